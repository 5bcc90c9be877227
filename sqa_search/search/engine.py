"""Search studies on Optuna: the tool's main job.

A study is a named, resumable set of trials under ``studies/<name>/``: the search space it was
made from (``space.yaml``), its storage (SQLite by default, a journal file when several worker
processes share a host, or any Optuna storage URL), and the results and report `sqa-search run`
writes at the end. Each trial times one `AttentionSpec` on the target (speed) and trains the proxy
model briefly (quality). Running the same command again resumes the study; more trials extend it.
With ``study.halving`` the trials are followed by rungs of promotions (more seeds for the candidates
that may be on the front, `search/halving.py`), queued here and drained by the same workers.

Fault handling, because a lost hour of trials is the worst thing a tuner can do:
* a trial that fails (exception, NaN, out of memory) is recorded as FAIL with its reason in the
  user attribute ``fail_reason`` and the study goes on; a proposal the space's rules exclude
  (an invalid combination) is PRUNED with its ``prune_reason`` and an infeasible constraint
  (``valid_combination`` = 1), so the sampler learns to avoid it;
* every finished trial is committed to the storage at once; a trial left RUNNING by a killed
  process is marked FAIL "interrupted" and run again first (`recovery`);
* a damaged study folder or storage is refused before anything is written (`storage`, `studies`);
* identical specs are evaluated once: a repeat proposal reuses the earlier trial's values.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from ..layer.spec import AttentionSpec
from ..speed.workload import latency_label
from .pareto import non_dominated_mask
from .records import (
    TrialRecord,
    anchor_attrs,
    carried_replicates,
    current_records,
    from_trial,
    record_duplicate,
    record_failure,
    record_latency,
    record_promotion_start,
    record_prune,
    record_replicates,
    record_spec,
    record_training,
    record_training_runs,
    read_records,
    store_owner,
)
from .halving import check_halving_budget, check_runs_left, next_plan, plan_words, runs_spent
from .recovery import (INTERRUPTED, QueueEmpty, finished_count, is_interrupted, recover_interrupted, waiting_promotions,
                       waiting_reruns)
from .samplers import space_exhausted
from .space import (SearchSpace, candidate_key, load_space, params_of, replicates_of, space_from_dict,
                    train_config_from)
from .storage import StudyError
from .studies import (DEFAULT_STUDIES_DIR, StudyHandle, open_study, open_study_storage, prepare_study, running_study,
                      store_study_settings, study_dir_for)
from .workers import run_processes

__all__ = ["run_study", "open_study", "StudyError", "StudyHandle", "study_dir_for", "finished_count",
           "is_interrupted", "recover_interrupted", "enqueue_named_variants", "TrialObjective", "TrialFailed",
           "DEFAULT_STUDIES_DIR"]


def enqueue_named_variants(handle: StudyHandle) -> list[str]:
    """Evaluate the named variants inside the space first, so every front has its anchors."""
    study = handle.study
    if study.user_attrs.get("variants_enqueued"):
        return []
    labels = []
    for spec in handle.space.named_variants():
        study.enqueue_trial(params_of(spec), user_attrs=anchor_attrs(spec.label), skip_if_exists=True)
        labels.append(spec.label)
    study.set_user_attr("variants_enqueued", True)
    return labels


# ----- the objective ------------------------------------------------------------------------------
class TrialFailed(Exception):
    """Raised inside a trial to record it as FAIL with a reason; the study goes on."""


def earlier_result(trial: optuna.Trial, key: str) -> TrialRecord | None:
    """The current result of the same spec in the study, if any (reused): with halving, the trial
    with the most seeds (`current_records`), not the first one-seed trial."""
    others = [from_trial(t) for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.number != trial.number]
    return next((r for r in current_records(others) if r.spec_key == key), None)


class TrialObjective:
    """The Optuna objective of a study: one call evaluates one trial."""

    def __init__(self, space: SearchSpace, progress: bool = False, cache_dir=None):
        self.space = space
        self.progress = progress
        self.cache_dir = cache_dir

    def suggest(self, trial: optuna.Trial) -> AttentionSpec:
        return self.space.suggest(trial)

    def __call__(self, trial: optuna.Trial):
        try:
            return self._evaluate(trial)
        except KeyboardInterrupt:  # Ctrl-C: no result, so the trial runs again first on resume
            record_failure(trial, f"{INTERRUPTED} (KeyboardInterrupt)")
            raise
        except Exception as exc:
            # a reason, so the FAIL is a result and not an interruption: without one, every resume
            # would re-run (and crash on) this configuration first
            if from_trial(trial).fail_reason is None:
                record_failure(trial, f"error: {type(exc).__name__}: {' '.join(str(exc).split())}")
            raise

    def _evaluate(self, trial: optuna.Trial):
        store_owner(trial.study._storage, trial._trial_id)  # a new trial's; a queued one has it already
        spec = self.suggest(trial)
        record_spec(trial, spec, self.space)

        reason = self.space.violation(spec)
        if reason:
            self._reject(trial, f"invalid combination: {reason}")
        promotion = from_trial(trial).promotion
        if promotion is not None:  # more seeds for a configuration already evaluated
            return self._promote(trial, spec, promotion)

        earlier = earlier_result(trial, candidate_key(spec))
        if earlier is not None:  # the sampler proposed a spec already evaluated: reuse it
            record_duplicate(trial, earlier)
            return list(earlier.values) if len(earlier.values) > 1 else earlier.values[0]

        latency, source = self._latency(trial, spec)
        budget = self.space.constraints.max_latency_s
        if budget is not None:
            if self.space.study.mode == "pareto":  # feasibility, read by constraint-aware samplers
                trial.set_constraint("latency", latency - budget)
            elif latency > budget:
                record_prune(trial, f"latency {latency:.4g} s ({source}) > max_latency_s {budget:.4g} s")
                raise optuna.TrialPruned(f"latency {latency:.4g} s over budget {budget:.4g} s")

        self._train(trial, spec)
        return self._values(trial)

    def _values(self, trial):
        """The trial's objective values, read back from what it recorded."""
        record = from_trial(trial)
        if self.space.study.mode != "pareto":
            return record.quality
        values = {objective.name: objective.value(record) for objective in self.space.objectives_in_use()}
        missing = [name for name, value in values.items() if value is None]
        if missing:  # e.g. peak memory where the platform cannot measure it
            self._fail(trial, f"no value for the objective(s) {', '.join(missing)}")
        return list(values.values())

    def _promote(self, trial, spec: AttentionSpec, promotion: dict):
        """A halving promotion (search/halving.py): the earlier trial's speed figures, its seeds'
        losses and the new seeds', their mean and standard error over all of them."""
        from ..quality.replicates import combined_summary, mean_and_se

        carried_key = promotion["earlier"].get("spec_key")
        if carried_key is not None and carried_key != candidate_key(spec):  # never mix two configurations' seeds
            self._fail(trial, f"promotion of trial {promotion['from']} proposes another configuration ({spec.label})")
        record_promotion_start(trial, promotion)
        budget = self.space.constraints.max_latency_s
        if budget is not None and self.space.study.mode == "pareto":  # as its first trial: samplers read it
            trial.set_constraint("latency", float(promotion["earlier"]["latency_s"]) - budget)
        earlier_values, earlier_seeds, earlier_train = carried_replicates(promotion)
        result = self._train_seeds(trial, spec, list(promotion["new_seeds"]), callback=None)
        values = earlier_values + result.values
        seeds = earlier_seeds + result.seeds
        mean, se = mean_and_se(values)
        record_training(trial, combined_summary(earlier_train, result.summary()))
        record_replicates(trial, values, seeds, mean, se)
        return self._values(trial)

    def _fail(self, trial, reason: str):
        record_failure(trial, reason)
        raise TrialFailed(reason)

    def _reject(self, trial, reason: str):
        """A proposal the space's rules exclude: PRUNED (nothing was evaluated) and infeasible.

        The constraint is what teaches the sampler: TPE puts infeasible trials with its worst
        ones and stops proposing them, while a FAIL teaches it nothing (the quickstart study once
        spent three of its twelve trials proposing the same invalid 1q/4kv).
        """
        record_prune(trial, reason)
        trial.set_constraint("valid_combination", 1.0)
        raise optuna.TrialPruned(reason)

    def _latency(self, trial, spec: AttentionSpec) -> tuple[float, str]:
        t = self.space.target
        total, records, fingerprint = 0.0, [], None
        if not t.measured:
            from ..speed.cost import predict
            from ..speed.hardware import load_profile

            profile = load_profile(t.hardware)  # once per trial, not once per sequence length
        for n in t.seq_len:
            workload = self.space.workload(n)
            if t.measured:
                from ..speed.timing import time_spec  # torch: loaded when the first trial is timed

                result = time_spec(spec, workload, budget_s=t.timing_budget_s, cache_dir=self.cache_dir)
                if result.status != "ok":
                    self._fail(trial, f"timing {result.status}: {result.error}")
                records.append({"seq_len": n, "median_s": result.median_s, "iqr_s": result.iqr_s,
                                "raw_median_s": result.raw_median_s, "machine_speed": result.machine_speed,
                                "backend": result.backend, "flags": result.flags,
                                "fingerprint_id": result.fingerprint_id, "peak_mem_bytes": result.peak_mem_bytes,
                                "speed_corrected": result.speed_corrected})
                total += result.median_s
                # "measured on X, speed-corrected" (CPU: seconds at the machine's reference speed) or ", raw"
                source = latency_label(result.latency.kind, result.fingerprint.device_name or result.device)
                fingerprint = result.fingerprint
            else:
                pred = predict(spec, profile, workload)
                records.append({"seq_len": n, "predicted_s": pred.seconds, "bound": pred.bound,
                                "peak_mem_bytes": pred.peak_memory_bytes})
                total += pred.seconds
                source = f"predicted for {t.hardware} ({pred.calibration})"
        record_latency(trial, records, total, source, fingerprint)
        return total, source

    def _train(self, trial, spec: AttentionSpec) -> float:
        """Train the candidate once per replicate seed (training.seed, + 1, ...); its quality is the
        mean, stored with its standard error and the per-seed values. A failed seed fails the trial."""
        from ..quality.replicates import replicate_seeds  # torch: loaded when the first trial trains

        config = train_config_from(self.space.training, self.space.objectives.quality)
        constrained = self.space.study.mode == "constrained"
        metric = self.space.objectives.quality

        def report(step, metrics):  # sees the first seed only (train_replicates): like with like
            value = metrics.get("val_loss")
            if constrained and value is not None and metric == "val_loss" and math.isfinite(value):
                trial.report(value, step)  # single-objective only: multi-objective cannot prune
                if trial.should_prune():
                    record_prune(trial, f"val_loss {value:.4f} at step {step} below the median")
                    raise optuna.TrialPruned()

        seeds = replicate_seeds(config.seed, replicates_of(self.space.training))
        result = self._train_seeds(trial, spec, seeds, callback=report)
        record_training(trial, result.summary())
        record_replicates(trial, result.values, result.seeds, result.mean, result.se)
        return float(result.mean)

    def _train_seeds(self, trial, spec: AttentionSpec, seeds: list[int], callback):
        """Train ``spec`` once per seed; what it cost is recorded, and a failed seed fails the trial."""
        from ..quality.replicates import train_replicates  # torch: loaded when the first trial trains

        config = train_config_from(self.space.training, self.space.objectives.quality)
        m = self.space.model
        try:
            result = train_replicates(spec, dict(n_layers=m.n_layers, d_ff=m.d_ff), config, seeds,
                                      metric=self.space.objectives.quality, callback=callback, progress=self.progress)
        except optuna.TrialPruned:  # pruned from its first seed's curve: that run was spent all the same
            record_training_runs(trial, 1)
            raise
        record_training_runs(trial, len(result.results))
        if not result.ok:
            record_training(trial, result.summary())
            self._fail(trial, f"training {result.status}: {result.reason}")
        return result


# ----- running ------------------------------------------------------------------------------------
def optimize(handle: StudyHandle, target: int, progress: bool, cache_dir=None) -> None:
    """Run trials in this process until the study has `target` finished trials and nothing queued
    (re-runs, halving promotions) is left."""
    study = handle.study
    objective = TrialObjective(handle.space, progress=False, cache_dir=cache_dir)
    bar = _progress_bar(handle, target) if progress else None
    try:
        # a worker beside this one may have died mid-trial: its configuration is re-run first, and
        # a re-run is never skipped for the budget (an interrupted trial is no result)
        while True:
            recover_interrupted(study)
            done = finished_count(study) >= target
            if done and not (waiting_reruns(study) or waiting_promotions(study)):
                break
            if space_exhausted(study, handle.space):  # every valid configuration evaluated: no repeats
                break
            study.queue_only = done  # only the queue is left: never sample
            try:
                study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
            except QueueEmpty:  # another worker took the last queued trial
                continue
            if bar is not None:
                bar.n = _progress_done(handle)
                bar.set_postfix_str(_progress_summary(handle), refresh=False)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(handle: StudyHandle, target: int):
    """Trials of the target; with halving, training runs of its budget (promotions are runs too)."""
    from tqdm.auto import tqdm  # only with a progress bar

    halving = handle.space.study.halving
    if halving is not None:
        return tqdm(total=halving.budget, initial=_progress_done(handle), unit="run",
                    desc=f"study {handle.space.name} (training runs)")
    return tqdm(total=target, initial=finished_count(handle.study), desc=f"study {handle.space.name}", unit="trial")


def _progress_done(handle: StudyHandle) -> int:
    if handle.space.study.halving is not None:
        return runs_spent(read_records(handle.study))
    return finished_count(handle.study)


def queue_promotions(handle: StudyHandle, progress: bool) -> int:
    """Plan the next halving rung's promotions (search/halving.py) and queue them; how many."""
    plan = next_plan(handle.study, handle.space)
    for promotion in plan:
        handle.study.enqueue_trial(promotion.params, user_attrs=promotion.attrs(), skip_if_exists=False)
    if plan and progress:
        print(plan_words(plan))
    return len(plan)


def _progress_summary(handle: StudyHandle) -> str:
    done = current_records(read_records(handle.study))  # one per configuration, with the most seeds
    if not done:
        return "no finished trial yet"
    objectives = handle.space.objectives_in_use()
    values = np.array([r.values for r in done], dtype=float)
    parts = []
    for i, objective in enumerate(objectives):
        best = values[:, i].max() if objective.direction == "maximize" else values[:, i].min()
        parts.append(f"best {objective.name} {best:.4g}")
    if values.shape[1] > 1:
        parts.append(f"pareto {int(non_dominated_mask(values, [o.direction for o in objectives]).sum())}")
    return ", ".join(parts)


def worker_main(space_payload: dict, studies_dir: str, storage_url: str, target: int, cache_dir) -> None:
    """One worker process of `run_study(workers=N)`: trials until the study has its target."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_from_dict(space_payload["data"], source=space_payload["source"], name=space_payload["name"])
    study = running_study(space, open_study_storage(storage_url, existing=True))
    handle = StudyHandle(study, space, study_dir_for(space.name, studies_dir), storage_url)
    optimize(handle, target, progress=False, cache_dir=cache_dir)


def load_run_space(space: SearchSpace | str | Path, name: str | None) -> tuple[SearchSpace, Path | None, dict | None]:
    """(the space, the file it came from, the file's YAML as read) for `run_study` and the Ray backend."""
    if isinstance(space, SearchSpace):
        return (replace(space, name=name) if name else space), None, None
    path = Path(space)
    return load_space(path, name=name), path, yaml.safe_load(path.read_text())


def run_study(
    space: SearchSpace | str | Path,
    *,
    name: str | None = None,
    trials: int | None = None,
    storage: str | None = None,
    workers: int = 1,
    studies_dir: str | Path = DEFAULT_STUDIES_DIR,
    progress: bool = True,
    cache_dir=None,
) -> StudyHandle:
    """Run (or resume, or extend) the study of a search space until it has `trials` finished trials.

    The results and report are written by the caller (`sqa-search run` does, with `report.write_report`).
    """
    space, space_path, raw = load_run_space(space, name)
    target = trials if trials is not None else space.study.trials
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise StudyError(f"trials={target!r} is not allowed: must be an integer >= 1")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"workers={workers!r} is not allowed: must be an integer >= 1")

    check_halving_budget(space, target)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handle = prepare_study(space, space_path, studies_dir, storage, workers)
    check_runs_left(read_records(handle.study), space, target - finished_count(handle.study))
    store_study_settings(handle)
    recovered = recover_interrupted(handle.study, requeue_failed=True)
    if recovered and progress:
        print(f"recovered {recovered} interrupted trial(s): they run again first")
    anchors = enqueue_named_variants(handle)
    if anchors and progress:
        print(f"evaluating the named variants first: {', '.join(anchors)}")

    payload = {"data": raw if raw is not None else space.to_dict(), "source": space.source, "name": space.name}
    while True:  # the trials; then, with halving, one rung of promotions at a time until none is left
        if workers == 1:
            optimize(handle, target, progress, cache_dir)
        elif not run_processes(worker_main, (payload, str(studies_dir), handle.storage_url, target, cache_dir),
                               workers, progress):
            optimize(handle, target, progress=False, cache_dir=cache_dir)  # finish what the dead ones left
        if not queue_promotions(handle, progress):
            break
    if progress and finished_count(handle.study) < target and space_exhausted(handle.study, handle.space):
        print(f"the space is exhausted: every one of its {len(space.candidates())} valid configurations is "
              f"evaluated, so the study stops at {finished_count(handle.study)} of {target} trials")
    return handle
