"""Search studies on Optuna: the tool's main job.

A study is a named, resumable set of trials under ``studies/<name>/``: the search space it was
made from (``space.yaml``), its storage (SQLite by default, a journal file when several worker
processes share a host, or any Optuna storage URL), and the results and report written at the
end. Each trial times one `AttentionSpec` on the target (speed) and trains the proxy model
briefly (quality). Running the same command again resumes the study; more trials extend it.

Fault handling, because a lost hour of trials is the worst thing a tuner can do:
* a trial that fails (exception, NaN, out of memory) is recorded as FAIL with its reason in the
  user attribute ``fail_reason`` and the study goes on; a proposal the space's rules exclude
  (an invalid combination) is PRUNED with its ``prune_reason`` and an infeasible constraint
  (``valid_combination`` = 1), so the sampler learns to avoid it;
* every finished trial is committed to the storage at once; a trial left RUNNING by a killed
  process is found by the next trial of any worker on its host (its pid is gone) or, on another
  host, by the RDB heartbeat; it is marked FAIL "interrupted", does not count towards the
  study's trials, and its configuration is run again before any other waiting trial, so nothing
  finished is recomputed and no configuration is lost;
* a damaged study folder or storage is refused before anything is written (`study_storage`);
* identical specs are evaluated once: a repeat proposal reuses the earlier trial's values.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .space import SearchSpace, candidate_key, load_space, train_config_from
from ..layer.spec import AttentionSpec
from ..speed.workload import Workload
from .storage import (
    META_FILE,
    SPACE_FILE,
    StudyError,
    check_storage_url,
    existing_meta,
    load_existing_study,
    open_storage,
    read_meta,
    safe_url,
    stored_space,
)

__all__ = ["run_study", "open_study", "StudyError", "study_dir_for", "trials_frame", "finished_count", "is_interrupted"]

log = logging.getLogger(__name__)

DEFAULT_STUDIES_DIR = Path("studies")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted"  # how every fail_reason of a trial that never got to finish begins


class TrialFailed(Exception):
    """Raised inside a trial to record it as FAIL with a reason; the study goes on."""


# ----- storage and metadata ---------------------------------------------------------------------
def study_dir_for(name: str, studies_dir: str | Path = DEFAULT_STUDIES_DIR) -> Path:
    return Path(studies_dir) / name


def _default_storage(study_dir: Path, workers: int) -> str:
    if workers > 1:  # several processes on one host: a journal file, no database locking
        return f"journal:{(study_dir / 'journal.log').resolve()}"
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def _open_storage(url: str, heartbeat: bool = True, *, existing: bool = False):
    """heartbeat=False: read-only use (show, recommend, export); nothing is written."""
    return open_storage(url, read_only=not heartbeat, existing=existing, retry_stale=_retry_stale_trial)


def _sampler(space: SearchSpace):
    name, seed = space.study.sampler, space.study.seed
    if name == "nsga2":
        # small populations: a short study should still get past its random first generation
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner():
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


class RetryFirstStudy(optuna.Study):
    """An Optuna study whose queue hands out re-runs of interrupted trials before anything else.

    Optuna pops waiting trials in the order they were enqueued, so a re-run enqueued on resume
    waited behind the named variants still queued: a `--trials 3` quickstart killed during GQA
    then evaluated MQA and SQA and never GQA. Claiming a trial is Optuna's own atomic
    WAITING -> RUNNING transition, so two workers never take the same one.
    """

    def _pop_waiting_trial_id(self) -> int | None:
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: "retry_of" not in t.user_attrs):  # stable: else in order
            try:
                if self._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    _set_owner(self._storage, trial._trial_id)  # a kill from here on is found and re-run
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took it and finished it meanwhile
        return None


def _set_owner(storage, trial_id: int) -> None:
    """The worker running a trial, which `recover_interrupted` checks is still alive."""
    storage.set_trial_user_attr(trial_id, "pid", os.getpid())
    storage.set_trial_user_attr(trial_id, "host", socket.gethostname())


@dataclass
class StudyHandle:
    study: optuna.Study
    space: SearchSpace
    directory: Path
    storage_url: str


def open_study(study_dir: str | Path) -> StudyHandle:
    """An existing study folder -> its Optuna study and search space, read-only: nothing in the
    folder or the storage is written, and a damaged folder is a StudyError saying what is wrong."""
    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    space = stored_space(study_dir, meta)
    storage = open_storage(meta["storage"], read_only=True, where="the study's storage")
    study = load_existing_study(storage, meta["name"], meta["storage"])
    return StudyHandle(study, space, study_dir, meta["storage"])


def _check_existing(space: SearchSpace, study_dir: Path, meta: dict, storage: str | None) -> None:
    """An existing study folder `run` may resume; refuses (writing nothing) otherwise."""
    if meta["name"] != space.name:
        raise StudyError(f"{str(study_dir / META_FILE)!r} is damaged or moved: it names study {meta['name']!r}, "
                         f"but the folder is the study {space.name!r}'s")
    if meta["space_fingerprint"] != space.fingerprint():
        raise StudyError(
            f"study {space.name!r} in {study_dir} was made from a different search space "
            f"(model, target, search, constraints, objectives or training changed): resuming would mix "
            f"incomparable trials. Use another --name, or delete {study_dir} to start over."
        )
    if storage and storage != meta["storage"]:
        raise StudyError(f"study {space.name!r} lives in {safe_url(meta['storage'])}; --storage "
                         f"{safe_url(storage)} differs")
    stored_space(study_dir, meta)  # show and report read it: it must be whole before more trials go in


def _prepare_study(space: SearchSpace, space_path: Path | None, studies_dir, storage, workers) -> StudyHandle:
    """The study to run: created, or resumed after checking that nothing in its folder is damaged.

    Everything is checked before the first write, so a refused run leaves every file as it was.
    """
    if storage is not None:
        check_storage_url(storage)
    study_dir = study_dir_for(space.name, studies_dir)
    meta = existing_meta(study_dir)
    directions = space.directions if space.study.mode == "pareto" else [space.directions[0]]
    if meta is not None:
        _check_existing(space, study_dir, meta, storage)
        storage_url = meta["storage"]
        opened = _open_storage(storage_url, existing=True)
        study = load_existing_study(opened, space.name, storage_url, sampler=_sampler(space), pruner=_pruner(),
                                    study_class=RetryFirstStudy)
        if [d.name.lower() for d in study.directions] != directions:
            raise StudyError(
                f"study {space.name!r} optimises {[d.name.lower() for d in study.directions]}, but the search "
                f"space now asks for {directions} (study.mode or objectives changed): use another --name"
            )
        return StudyHandle(study, space, study_dir, storage_url)
    storage_url = storage or _default_storage(study_dir, workers)
    if not storage:  # the default storage lives in the folder; a given one is opened (or refused) first
        study_dir.mkdir(parents=True, exist_ok=True)
    opened = _open_storage(storage_url)
    try:  # a shared server may hold it already (another host made it): join it
        existing = optuna.load_study(study_name=space.name, storage=opened)
    except KeyError:
        existing = None
    fingerprint = space.fingerprint()
    if existing is not None and existing.user_attrs.get("space_fingerprint", fingerprint) != fingerprint:
        raise StudyError(f"the storage {safe_url(storage_url)} holds a study {space.name!r} made from a different "
                         f"search space (on another host?): resuming would mix incomparable trials; use another --name")
    if existing is not None and [d.name.lower() for d in existing.directions] != directions:
        raise StudyError(f"the storage {safe_url(storage_url)} holds a study {space.name!r} that optimises "
                         f"{[d.name.lower() for d in existing.directions]}, not {directions}: use another --name")
    study_dir.mkdir(parents=True, exist_ok=True)
    _write_folder(space, space_path, study_dir, storage_url)
    created = optuna.create_study(study_name=space.name, storage=opened, directions=directions, load_if_exists=True)
    if existing is None:  # what a host joining the study later checks its own space against
        created.set_user_attr("space_fingerprint", fingerprint)
    study = RetryFirstStudy(study_name=space.name, storage=opened, sampler=_sampler(space), pruner=_pruner())
    return StudyHandle(study, space, study_dir, storage_url)


def _write_folder(space: SearchSpace, space_path: Path | None, study_dir: Path, storage_url: str) -> None:
    import yaml

    (study_dir / SPACE_FILE).write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    meta = {"name": space.name, "storage": storage_url, "space_fingerprint": space.fingerprint(),
            "source": str(space_path) if space_path else None, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta_path = study_dir / META_FILE
    tmp = meta_path.with_suffix(".tmp")  # study.json appears whole or not at all
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


# ----- recovery and anchors -----------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
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
    reason = trial.user_attrs.get("fail_reason")
    return trial.state == TrialState.FAIL and (not reason or str(reason).startswith(INTERRUPTED))


def recover_interrupted(study: optuna.Study, *, requeue_failed: bool = False) -> int:
    """Trials left RUNNING by a dead worker on this host -> FAIL 'interrupted', run again first.

    requeue_failed: also re-queue interrupted FAIL trials that have no re-run yet (a Ctrl-C, a
    heartbeat-stale trial whose re-run was lost); only where no other worker can race, at start.
    Workers on other hosts are found by RDB heartbeats (`_retry_stale_trial`). Returns how many
    trials were re-queued.
    """
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or "pid" not in attrs or _pid_alive(attrs["pid"]):
            continue
        try:  # only the worker whose FAIL lands re-queues it: two survivors never both do
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason",
                                               f"{INTERRUPTED} (worker process {attrs['pid']} died)")
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        recovered += _requeue(study, trial)
    if requeue_failed:
        retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if is_interrupted(trial) and trial.number not in retried:
                recovered += _requeue(study, trial)
    return recovered


def _requeue(study: optuna.Study, trial) -> int:
    """Queue `trial`'s configuration again; RetryFirstStudy hands it out before anything else."""
    params = trial.system_attrs.get("fixed_params") or trial.params  # an anchor's, even if it died early
    if not params:
        return 0  # it died before choosing a configuration: there is nothing to lose
    attrs = {"retry_of": trial.number}
    if "anchor" in trial.user_attrs:
        attrs["anchor"] = trial.user_attrs["anchor"]
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    return 1


def _retry_stale_trial(study: optuna.Study, trial) -> None:
    """Optuna's heartbeat check failed `trial` (its worker, on any host, stopped beating): re-run it.

    Optuna has already marked it FAIL, so it carries no fail_reason; `is_interrupted` counts it
    as interrupted for that reason.
    """
    _requeue(study, trial)


def _waiting_reruns(study: optuna.Study) -> bool:
    return any("retry_of" in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def enqueue_named_variants(handle: StudyHandle) -> list[str]:
    """Evaluate the named variants inside the space first, so every front has its anchors."""
    study = handle.study
    if study.user_attrs.get("variants_enqueued"):
        return []
    labels = []
    for spec in handle.space.named_variants():
        study.enqueue_trial(_params(spec), user_attrs={"anchor": spec.label}, skip_if_exists=True)
        labels.append(spec.label)
    study.set_user_attr("variants_enqueued", True)
    return labels


def _params(spec: AttentionSpec) -> dict:
    return {"n_q_heads": spec.n_q_heads, "n_kv_heads": spec.n_kv_heads,
            "window": spec.window, "n_global": spec.n_global}


# ----- the objective ------------------------------------------------------------------------------
class Objective:
    """One trial: propose a spec, check it, time it on the target, train it, return objectives."""

    def __init__(self, space: SearchSpace, progress: bool = False, cache_dir=None):
        self.space = space
        self.progress = progress
        self.cache_dir = cache_dir

    def suggest(self, trial: optuna.Trial) -> AttentionSpec:
        s = self.space.search
        q = trial.suggest_categorical("n_q_heads", list(s.n_q_heads))
        kv = trial.suggest_categorical("n_kv_heads", list(s.n_kv_heads))
        window = trial.suggest_categorical("window", list(s.window))
        n_global = trial.suggest_categorical("n_global", list(s.n_global))
        return self.space.make_spec(q, kv, window, n_global)

    def __call__(self, trial: optuna.Trial):
        try:
            return self._evaluate(trial)
        except KeyboardInterrupt:  # Ctrl-C: no result, so the trial runs again first on resume
            trial.set_user_attr("fail_reason", f"{INTERRUPTED} (KeyboardInterrupt)")
            raise
        except Exception as exc:
            # a reason, so the FAIL is a result and not an interruption: without one, every resume
            # would re-run (and crash on) this configuration first
            if "fail_reason" not in trial.user_attrs:
                trial.set_user_attr("fail_reason", f"error: {type(exc).__name__}: {' '.join(str(exc).split())}")
            raise

    def _evaluate(self, trial: optuna.Trial):
        _set_owner(trial.study._storage, trial._trial_id)  # a new trial's; a queued one has it already
        spec = self.suggest(trial)
        trial.set_user_attr("spec", spec.to_dict())
        trial.set_user_attr("label", spec.label)
        trial.set_user_attr("family", spec.family)
        trial.set_user_attr("variant", spec.variant_name)
        trial.set_user_attr("kv_cache_bytes", self.space.kv_cache_bytes(spec))
        trial.set_user_attr("n_params", spec.n_params())
        trial.set_user_attr("spec_key", candidate_key(spec))

        reason = self.space.violation(spec)
        if reason:
            self._reject(trial, f"invalid combination: {reason}")

        earlier = _earlier_result(trial, candidate_key(spec))
        if earlier is not None:  # the sampler proposed a spec already evaluated: reuse it
            trial.set_user_attr("duplicate_of", earlier.number)
            for key in ("latency_s", "latency_source", "quality", "train", "timing"):
                if key in earlier.user_attrs:
                    trial.set_user_attr(key, earlier.user_attrs[key])
            return earlier.values if len(earlier.values) > 1 else earlier.values[0]

        latency, source = self._latency(trial, spec)
        budget = self.space.constraints.max_latency_s
        if budget is not None:
            if self.space.study.mode == "pareto":  # feasibility, read by constraint-aware samplers
                trial.set_constraint("latency", latency - budget)
            elif latency > budget:
                trial.set_user_attr("prune_reason", f"latency {latency:.4g} s > max_latency_s {budget:.4g} s")
                raise optuna.TrialPruned(f"latency {latency:.4g} s over budget {budget:.4g} s")

        quality = self._train(trial, spec)
        values = [quality, latency]
        if self.space.objectives.kv_cache:
            values.append(float(self.space.kv_cache_bytes(spec)))
        return values if self.space.study.mode == "pareto" else quality

    def _fail(self, trial, reason: str):
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)

    def _reject(self, trial, reason: str):
        """A proposal the space's rules exclude: PRUNED (nothing was evaluated) and infeasible.

        The constraint is what teaches the sampler: TPE puts infeasible trials with its worst
        ones and stops proposing them, while a FAIL teaches it nothing (the quickstart study once
        spent three of its twelve trials proposing the same invalid 1q/4kv).
        """
        trial.set_user_attr("prune_reason", reason)
        trial.set_constraint("valid_combination", 1.0)
        raise optuna.TrialPruned(reason)

    def _latency(self, trial, spec: AttentionSpec) -> tuple[float, str]:
        t = self.space.target
        total, records = 0.0, []
        for n in t.seq_len:
            workload = Workload(mode=t.mode, seq_len=n, batch=t.batch, scope=t.what, dtype=t.dtype,
                                device=_device(t.device) if t.measured else "cpu",
                                n_layers=self.space.model.n_layers, d_ff=self.space.model.d_ff, threads=t.threads)
            if t.measured:
                from ..speed.timing import time_spec

                result = time_spec(spec, workload, budget_s=t.timing_budget_s, cache_dir=self.cache_dir)
                if result.status != "ok":
                    self._fail(trial, f"timing {result.status}: {result.error}")
                records.append({"seq_len": n, "median_s": result.median_s, "iqr_s": result.iqr_s,
                                "raw_median_s": result.raw_median_s, "machine_speed": result.machine_speed,
                                "backend": result.backend, "flags": result.flags,
                                "fingerprint_id": result.fingerprint_id, "peak_mem_bytes": result.peak_mem_bytes})
                total += result.median_s
                source = f"measured on {result.fingerprint.device_name or result.device}"
                trial.set_user_attr("fingerprint", result.fingerprint.to_dict())
            else:
                from ..speed.cost import predict
                from ..speed.hardware import load_profile

                profile = load_profile(t.hardware)
                pred = predict(spec, profile, workload)
                records.append({"seq_len": n, "predicted_s": pred.seconds, "bound": pred.bound})
                total += pred.seconds
                source = f"predicted for {t.hardware} ({pred.calibration})"
        trial.set_user_attr("latency_s", total)
        trial.set_user_attr("latency_source", source)
        trial.set_user_attr("timing", records)
        return total, source

    def _train(self, trial, spec: AttentionSpec) -> float:
        from ..quality.train import train_spec

        config = train_config_from(self.space.training, self.space.objectives.quality)
        constrained = self.space.study.mode == "constrained"
        metric = self.space.objectives.quality

        def report(step, metrics):
            value = metrics.get("val_loss")
            if constrained and value is not None and metric == "val_loss" and math.isfinite(value):
                trial.report(value, step)  # single-objective only: multi-objective cannot prune
                if trial.should_prune():
                    trial.set_user_attr("prune_reason", f"val_loss {value:.4f} at step {step} below the median")
                    raise optuna.TrialPruned()

        m = self.space.model
        result = train_spec(spec, dict(n_layers=m.n_layers, d_ff=m.d_ff), config, callback=report,
                            progress=self.progress)
        summary = {k: v for k, v in result.to_dict().items() if k not in ("loss_curve", "mqar_loss_curve", "evals",
                                                                        "train_config", "model_config")}
        trial.set_user_attr("train", summary)
        if result.status != "ok":
            self._fail(trial, f"training {result.status}: {result.reason}")
        value = getattr(result, metric)
        if value is None or not math.isfinite(value):
            self._fail(trial, f"training produced no finite {metric}")
        trial.set_user_attr("quality", value)
        return float(value)


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _earlier_result(trial: optuna.Trial, key: str):
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.user_attrs.get("spec_key") == key:
            return other
    return None


# ----- running ------------------------------------------------------------------------------------
def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the target: done, pruned or failed for a reason (not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if not is_interrupted(t))


def _optimize(handle: StudyHandle, target: int, progress: bool, cache_dir=None) -> None:
    study = handle.study
    objective = Objective(handle.space, progress=False, cache_dir=cache_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=finished_count(study), desc=f"study {handle.space.name}", unit="trial")
    try:
        # a worker beside this one may have died mid-trial: its configuration is re-run first, and
        # a re-run is never skipped for the budget (an interrupted trial is no result)
        while True:
            recover_interrupted(study)
            if finished_count(study) >= target and not _waiting_reruns(study):
                break
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
            if bar is not None:
                bar.n = finished_count(study)
                bar.set_postfix_str(_progress_summary(handle), refresh=False)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


def _progress_summary(handle: StudyHandle) -> str:
    from .pareto import non_dominated_mask
    import numpy as np

    done = handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return "no finished trial yet"
    names = handle.space.objective_names if handle.space.study.mode == "pareto" else [handle.space.objectives.quality]
    directions = handle.space.directions[: len(names)]
    values = np.array([t.values for t in done], dtype=float)
    parts = []
    for i, (name, direction) in enumerate(zip(names, directions)):
        best = values[:, i].max() if direction == "maximize" else values[:, i].min()
        parts.append(f"best {name} {best:.4g}")
    if values.shape[1] > 1:
        parts.append(f"pareto {int(non_dominated_mask(values, directions).sum())}")
    return ", ".join(parts)


def _worker_main(space_dict, studies_dir, storage_url, target, cache_dir):
    from .space import space_from_dict

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_from_dict(space_dict["data"], source=space_dict["source"], name=space_dict["name"])
    study = RetryFirstStudy(study_name=space.name, storage=_open_storage(storage_url, existing=True),
                            sampler=_sampler(space), pruner=_pruner())
    handle = StudyHandle(study, space, study_dir_for(space.name, studies_dir), storage_url)
    _optimize(handle, target, progress=False, cache_dir=cache_dir)


def _run_workers(handle: StudyHandle, payload: dict, workers: int, studies_dir, target: int, cache_dir,
                 progress: bool) -> None:
    """`workers` processes on the study; a worker that dies costs no configuration: the others
    (or this process, once they are done) re-run its trial first and finish the study."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(payload, str(studies_dir), handle.storage_url,
                                                      target, cache_dir)) for _ in range(workers)]
    for p in procs:
        p.start()
    running = list(procs)
    while running:  # reap each worker as it ends, so a dead one is not left a zombie that looks alive
        ended = multiprocessing.connection.wait([p.sentinel for p in running])
        for p in [p for p in running if p.sentinel in ended]:
            p.join()
            running.remove(p)
    died = [p.exitcode for p in procs if p.exitcode != 0]
    if died:
        message = (f"{len(died)} of {workers} worker process(es) exited with codes {died}; their trials are "
                   f"recorded as interrupted and run again")
        log.warning(message)
        if progress:
            print(message)
        _optimize(handle, target, progress=False, cache_dir=cache_dir)


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
    report: bool = True,
) -> StudyHandle:
    """Run (or resume, or extend) the study of a search space until it has `trials` finished trials."""
    space_path = None
    raw = None
    if not isinstance(space, SearchSpace):
        space_path = Path(space)
        space = load_space(space_path, name=name)
        import yaml

        raw = yaml.safe_load(space_path.read_text())
    elif name:
        from dataclasses import replace

        space = replace(space, name=name)
    target = trials if trials is not None else space.study.trials
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise StudyError(f"trials={target!r} is not allowed: must be an integer >= 1")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"workers={workers!r} is not allowed: must be an integer >= 1")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handle = _prepare_study(space, space_path, studies_dir, storage, workers)
    recovered = recover_interrupted(handle.study, requeue_failed=True)
    if recovered and progress:
        print(f"recovered {recovered} interrupted trial(s): they run again first")
    anchors = enqueue_named_variants(handle)
    if anchors and progress:
        print(f"evaluating the named variants first: {', '.join(anchors)}")

    if workers == 1:
        _optimize(handle, target, progress, cache_dir)
    else:
        payload = {"data": raw if raw is not None else space.to_dict(), "source": space.source, "name": space.name}
        _run_workers(handle, payload, workers, studies_dir, target, cache_dir, progress)
    if report:
        from .report import write_report

        write_report(handle)
    return handle


def trials_frame(handle: StudyHandle):
    """All trials as a pandas DataFrame with the columns `show` and the report use."""
    import pandas as pd

    rows = []
    names = handle.space.objective_names
    for t in handle.study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        train = attrs.get("train") or {}
        row = {
            "trial": t.number, "state": t.state.name, "label": attrs.get("label"),
            "variant": attrs.get("variant"), "family": attrs.get("family"),
            "n_q_heads": t.params.get("n_q_heads"), "n_kv_heads": t.params.get("n_kv_heads"),
            "window": t.params.get("window"), "n_global": t.params.get("n_global"),
            "quality": attrs.get("quality"), "latency_s": attrs.get("latency_s"),
            "kv_cache_bytes": attrs.get("kv_cache_bytes"), "n_params": attrs.get("n_params"),
            "val_loss": train.get("val_loss"), "mqar_accuracy": train.get("mqar_accuracy"),
            "train_wall_s": train.get("wall_s"), "tokens_per_s": train.get("tokens_per_s"),
            "latency_source": attrs.get("latency_source"), "duplicate_of": attrs.get("duplicate_of"),
            "fail_reason": attrs.get("fail_reason") or attrs.get("prune_reason")
            or (f"{INTERRUPTED} (no result, no reason: its worker was lost)" if is_interrupted(t) else None),
            "fingerprint_id": (attrs.get("timing") or [{}])[0].get("fingerprint_id"),
            "backend": (attrs.get("timing") or [{}])[0].get("backend"),
            "datetime_start": t.datetime_start, "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["objectives"] = names
    return frame


# ----- `sqa-search run` ---------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("space", help="a search-space YAML, e.g. search_spaces/quickstart.yaml")
    parser.add_argument("--name", help="study name (default: the YAML's name); studies/<name>/")
    parser.add_argument("--trials", type=int, help="finished trials the study should reach (default: the YAML's)")
    parser.add_argument("--storage", help="an Optuna storage URL (postgresql://..., mysql://..., sqlite:///...); "
                                          "default: SQLite under studies/<name>/ (a journal file with --workers > 1)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this host (default 1)")
    parser.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                        help="optuna: embedded (default); ray: Ray Tune, on a local instance or a cluster")
    parser.add_argument("--address", help="with --backend ray: HEAD_IP:PORT of an existing Ray cluster")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="with --backend ray (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="with --backend ray: default one whole GPU when a trial runs on a GPU; "
                             "fractions are refused for timing trials")
    parser.add_argument("--max-concurrent", type=int, default=None, help="with --backend ray (default: what fits, <= 4)")
    parser.add_argument("--max-retries", type=int, default=2, help="with --backend ray: retries of a crashed trial")
    parser.add_argument("--studies-dir", default=str(DEFAULT_STUDIES_DIR), help="where studies live (default studies/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from .report import pareto_table, _front_columns

    if args.backend == "ray":
        if args.workers != 1:
            raise StudyError(f"--workers={args.workers} is not allowed with --backend ray: Ray schedules "
                             f"the trials (use --max-concurrent)")
        from .ray_backend import run_ray_study

        handle = run_ray_study(args.space, name=args.name, trials=args.trials, storage=args.storage,
                               studies_dir=args.studies_dir, address=args.address,
                               cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                               max_concurrent=args.max_concurrent, max_retries=args.max_retries,
                               progress=not args.no_progress)
    else:
        if args.address:
            raise StudyError(f"--address={args.address!r} is only for --backend ray")
        handle = run_study(args.space, name=args.name, trials=args.trials, storage=args.storage,
                           workers=args.workers, studies_dir=args.studies_dir, progress=not args.no_progress)
    frame, front, hv = pareto_table(handle)
    print(f"\nPareto front of {handle.space.name} (hypervolume {hv:.4g}; latency "
          f"{'measured' if handle.space.target.measured else 'PREDICTED'}):")
    print(_front_columns(front).to_string(index=False) if not front.empty else "(no complete trial)")
    print(f"\nreport: {handle.directory / 'report.md'}")
    return 0
