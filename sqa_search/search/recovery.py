"""Interrupted trials: found, marked, and run again before anything else.

A trial left RUNNING by a killed process is found by the next trial of any worker on its host (its
pid is gone) or, on another host, by the RDB heartbeat; it is marked FAIL "interrupted", does not
count towards the study's trials, and its configuration is run again before any other waiting
trial, so nothing finished is recomputed and no configuration is lost.
"""

from __future__ import annotations

import os
import socket

import optuna
from optuna.trial import TrialState

from . import records

__all__ = ["RetryFirstStudy", "QueueEmpty", "INTERRUPTED", "FINISHED", "pid_alive", "is_interrupted", "recover_interrupted",
           "requeue", "retry_stale_trial", "waiting_reruns", "waiting_promotions", "finished_count"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted"  # how every fail_reason of a trial that never got to finish begins


class QueueEmpty(Exception):
    """Raised when asking for a trial while only queued ones may run (`RetryFirstStudy.queue_only`) and none is left."""


class RetryFirstStudy(optuna.Study):
    """An Optuna study whose queue hands out re-runs of interrupted trials before anything else.

    Optuna pops waiting trials in the order they were enqueued, so a re-run enqueued on resume
    waited behind the named variants still queued: a `--trials 3` quickstart killed during GQA
    then evaluated MQA and SQA and never GQA. Claiming a trial is Optuna's own atomic
    WAITING -> RUNNING transition, so two workers never take the same one.

    ``queue_only``: set while a worker only drains the queue (re-runs, halving promotions) after the
    study has its trials. A worker that loses the race for the last queued trial must then stop,
    not sample a new one: asking raises `QueueEmpty`.
    """

    queue_only = False

    def _pop_waiting_trial_id(self) -> int | None:
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.WAITING,))
        # stable: re-runs first, else in order
        for trial in sorted(waiting, key=lambda t: records.from_trial(t).retry_of is None):
            try:
                if self._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    records.store_owner(self._storage, trial._trial_id)  # a kill from here on is found and re-run
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took it and finished it meanwhile
        if self.queue_only:
            raise QueueEmpty()
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker its parent has not reaped yet is a zombie: dead, though kill(pid, 0) works
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): trust kill()
        return True


def is_interrupted(trial) -> bool:
    """A FAIL that is no result: its worker died or was stopped (no reason, or an 'interrupted' one)."""
    reason = records.from_trial(trial).fail_reason
    return trial.state == TrialState.FAIL and (not reason or str(reason).startswith(INTERRUPTED))


def recover_interrupted(study: optuna.Study, *, requeue_failed: bool = False) -> int:
    """Trials left RUNNING by a dead worker on this host -> FAIL 'interrupted', run again first.

    requeue_failed: also re-queue interrupted FAIL trials that have no re-run yet (a Ctrl-C, a
    heartbeat-stale trial whose re-run was lost); only where no other worker can race, at start.
    Workers on other hosts are found by RDB heartbeats (`retry_stale_trial`). Returns how many
    trials were re-queued.
    """
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = records.from_trial(trial)
        if record.host != host or record.pid is None or pid_alive(record.pid):
            continue
        try:  # only the worker whose FAIL lands re-queues it: two survivors never both do
            records.store_failure(study._storage, trial._trial_id, f"{INTERRUPTED} (worker process {record.pid} died)")
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        recovered += requeue(study, trial)
    if requeue_failed:
        retried = {records.from_trial(t).retry_of for t in study.get_trials(deepcopy=False)}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if is_interrupted(trial) and trial.number not in retried:
                recovered += requeue(study, trial)
    return recovered


def requeue(study: optuna.Study, trial) -> int:
    """Queue `trial`'s configuration again; RetryFirstStudy hands it out before anything else."""
    params = trial.system_attrs.get("fixed_params") or trial.params  # an anchor's, even if it died early
    if not params:
        return 0  # it died before choosing a configuration: there is nothing to lose
    study.enqueue_trial(params, user_attrs=records.rerun_attrs(records.from_trial(trial)), skip_if_exists=False)
    return 1


def retry_stale_trial(study: optuna.Study, trial) -> None:
    """Optuna's heartbeat check failed `trial` (its worker, on any host, stopped beating): re-run it.

    Optuna has already marked it FAIL, so it carries no fail_reason; `is_interrupted` counts it
    as interrupted for that reason.
    """
    requeue(study, trial)


def waiting_reruns(study: optuna.Study) -> bool:
    return any(records.from_trial(t).retry_of is not None
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def waiting_promotions(study: optuna.Study) -> bool:
    """Whether halving promotions (search/halving.py) are queued and not yet taken by a worker."""
    return any(records.PROMOTION in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the target: done, pruned or failed for a reason (not interrupted).
    A halving promotion is not one: it adds seeds to a trial already counted."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if not is_interrupted(t) and records.PROMOTION not in t.user_attrs)
