"""Studies on a real PostgreSQL server (the `postgres_url` fixture in conftest.py), the storage the
README offers for studies across hosts: two worker processes, one killed with SIGKILL mid-trial,
then a resume; and the heartbeat that finds a worker that died on another host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime

import optuna
import pytest
from optuna.trial import TrialState

from sqa_search.search.space import load_space
from sqa_search.search.engine import StudyError, open_study, run_study
from sqa_search.search.recovery import RetryFirstStudy, finished_count, is_interrupted, retry_stale_trial
from sqa_search.search.studies import prepare_study
from study_helpers import space_file

# n_heads 4: MHA 4/4, GQA 4/1, SQA 2/1, sSQA 2/2 and xSQA 1/1 are five distinct anchors, claimed
# atomically from the queue, so five trials are all anchors and any duplicate evaluation is a defect
SPACE = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "gqa", "sqa", "ssqa", "xsqa"]},
    "study": {"sampler": "random", "seed": 0, "trials": 5},
    # a few seconds a trial: long enough to be killed mid-trial
    "training": {"task": "lm", "budget_steps": 60, "batch_size": 2, "seq_len": 32, "eval_batches": 1},
}


def _study(storage, name):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet by the run under test
        return None


def _just_started(study):
    """A RUNNING trial inside its objective (its spec is recorded) that began under a second ago,
    so that it is still running when the kill lands, or None."""
    now = datetime.now()  # Optuna's clock: local, naive
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next((t for t in running if "spec_key" in t.user_attrs
                 and (now - t.datetime_start).total_seconds() < 1.0), None)


def _evaluations(study):
    """spec_key -> how many trials computed it (COMPLETE, not reused from an earlier trial)."""
    return Counter(t.user_attrs["spec_key"] for t in study.get_trials(states=(TrialState.COMPLETE,))
                   if "duplicate_of" not in t.user_attrs)


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial_lose_nothing(tmp_path, postgres_url):
    path = space_file(tmp_path, SPACE, "pgkill")
    studies = tmp_path / "studies"
    cmd = [sys.executable, "-m", "sqa_search.cli", "run", str(path), "--storage", postgres_url, "--workers", "2",
           "--studies-dir", str(studies), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # the run has made the tables once study.json is written; one storage (one connection pool) then
    while not (studies / "pgkill" / "study.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    storage = optuna.storages.RDBStorage(postgres_url)
    victim = None
    while victim is None and time.time() < deadline and proc.poll() is None:
        study = _study(storage, "pgkill")
        if study is not None and finished_count(study) >= 1:
            victim = _just_started(study)
        time.sleep(0.1)
    assert victim is not None, "no trial was running after the first finished"
    pid = victim.user_attrs["pid"]
    assert pid != proc.pid, "trials run in the worker processes"
    os.kill(pid, signal.SIGKILL)
    study = _study(storage, "pgkill")
    done_at_kill = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))}
    # the dead worker's trial (the victim, unless it finished in the instant before the kill)
    interrupted = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.user_attrs.get("pid") == pid]
    assert len(interrupted) == 1, "the kill should have interrupted a trial"
    victim = interrupted[0]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "1 of 2 worker process(es) exited with codes [-9]" in output

    study = open_study(studies / "pgkill").study
    after_run = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))}
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL and is_interrupted(killed)
    assert killed.user_attrs["fail_reason"] == f"interrupted (worker process {pid} died)"
    reruns = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(reruns) == 1 and reruns[0].state == TrialState.COMPLETE and reruns[0].params == killed.params
    counted_after_run = finished_count(study)
    assert counted_after_run == 5
    anchors = Counter(t.user_attrs.get("anchor") for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert len(anchors) == 5 and set(anchors.values()) == {1}, anchors  # each anchor evaluated once

    # resume with one more trial: the finished ones are neither lost nor computed again
    handle = run_study(path, trials=6, storage=postgres_url, studies_dir=studies, progress=False)
    study = handle.study
    after_resume = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))}
    lost = [n for n in after_run if n not in after_resume]
    recomputed = [n for n, when in after_run.items() if after_resume.get(n) != when]
    recomputed += [n for n, when in done_at_kill.items() if after_run.get(n) != when]
    duplicated = {key: n for key, n in _evaluations(study).items() if n > 1}
    print(f"\nPostgreSQL, 2 workers, one SIGKILLed mid-trial: {len(done_at_kill)} trial(s) finished before the "
          f"kill, {counted_after_run} counted after the run, "
          f"{finished_count(study)} after the resume (--trials 6); lost {len(lost)}, recomputed "
          f"{len(recomputed)}, duplicated {len(duplicated)}; interrupted trial #{killed.number} "
          f"({killed.user_attrs.get('label')}) re-run as #{reruns[0].number} ({reruns[0].state.name}) by pid "
          f"{reruns[0].user_attrs['pid']} (killed worker {pid}, run {proc.pid})")
    assert finished_count(study) == 6
    assert not lost and not recomputed and not duplicated
    assert not study.get_trials(states=(TrialState.RUNNING,)) and not study.get_trials(states=(TrialState.WAITING,))
    assert [t for t in study.trials if is_interrupted(t)] == [killed]  # one interruption, recorded once


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_heartbeat_finds_a_worker_that_died_on_another_host_and_its_trial_runs_first(postgres_url):
    # the study's own storage waits 180 s for a heartbeat; this one, 1 s (Optuna's minimum)
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=1,
                                         heartbeat_stale_trial_callback=retry_stale_trial)
    optuna.create_study(study_name="hb", storage=storage)
    study = RetryFirstStudy(study_name="hb", storage=storage)
    lost = study.ask()  # a trial whose worker, elsewhere, beats once and dies
    lost.suggest_categorical("n_q_heads", [1, 2, 4])
    lost.set_user_attr("host", "another-host")
    storage.record_heartbeat(lost._trial_id)
    study.enqueue_trial({"n_q_heads": 4}, user_attrs={"anchor": "MHA"})  # queued before the failure
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)  # what study.optimize does before each trial

    failed = study.trials[lost.number]
    assert failed.state == TrialState.FAIL and is_interrupted(failed) and finished_count(study) == 0
    first = study.ask()  # the re-run, ahead of the anchor queued before it
    assert first.user_attrs["retry_of"] == lost.number
    assert study.trials[first.number].system_attrs["fixed_params"] == failed.params == lost.params
    assert study.ask().user_attrs["anchor"] == "MHA"


def test_hosts_join_one_study_on_the_server_only_with_the_same_space(tmp_path, postgres_url):
    # each host has its own studies/ folder; the server holds the trials
    path = space_file(tmp_path, SPACE, "shared")
    first = prepare_study(load_space(path), path, tmp_path / "host-a", postgres_url, 1)
    first.study.enqueue_trial({"n_q_heads": 4}, user_attrs={"anchor": "MHA"})
    joined = prepare_study(load_space(path), path, tmp_path / "host-b", postgres_url, 1)
    assert joined.study._study_id == first.study._study_id and len(joined.study.trials) == 1
    other = space_file(tmp_path, {**SPACE, "target": {**SPACE["target"], "seq_len": 128}}, "shared")
    with pytest.raises(StudyError, match="different search space"):
        prepare_study(load_space(other), other, tmp_path / "host-c", postgres_url, 1)
    assert not (tmp_path / "host-c").exists()
