"""Ray Tune backend: the same studies on a cluster (`sqa-search run SPACE.yaml --backend ray`).

Ray Tune's `Tuner` schedules the trials over a Ray cluster (a local instance when no address is
given); Optuna proposes them (`OptunaSearch` with the study's own sampler, behind a
`ConcurrencyLimiter`). Moving from one machine to many changes one flag, not the workflow: the
results land in the study's Optuna storage under ``studies/<name>/`` in the Optuna backend's
format, so `show`, `recommend` and `export` do not care which backend ran.

How a trial travels:
* driver: the searcher proposes head counts. The named variants go first (points_to_evaluate);
  a spec already evaluated in the study is sent with its earlier result, to be reused, exactly as
  the Optuna backend reuses duplicates.
* worker (`ray_worker`): `evaluate_trial` runs the Optuna backend's own `TrialObjective` on a
  real `optuna.Trial` of a throw-away in-memory study with the proposed parameters enqueued, so
  a trial's values, user attributes and constraints are those the Optuna backend writes,
  computed by the same code.
  The worker adds one attribute, ``ray`` (trial id, experiment, node, the worker's hardware
  fingerprint), and reports every objective or raises: a finished trial with a missing or
  non-finite objective is an error, never a silently dropped result.
* driver: a Tune callback writes each finished trial into the study storage
  (`optuna.trial.create_trial` + `Study.add_trial`); workers never touch the storage, so nodes
  on other hosts need no access to it. A trial that raised (worker died, out of memory, a bug)
  is retried up to ``max_retries`` times and then recorded as FAIL with its ``fail_reason``.
  Deterministic failures (a timing or training that failed) are FAIL at once, with their
  reason, and are not retried; an invalid combination is PRUNED and infeasible, as in the
  Optuna backend, and the searcher is told its constraint.

Resuming: the Ray experiment lives in ``studies/<name>/ray/run-NNN/`` (``experiments.json``
lists them). Running the same command again restores an unfinished experiment (`Tuner.restore`),
then starts a new one for any trials still missing (a larger ``trials`` extends the study), its
sampler warm-started from the study storage. A trial that finished after Tune's last experiment
snapshot is re-reported from the storage, not recomputed, and never written twice; the storage,
not Tune's sample count, decides when the study has its trials. Ctrl-C stops Tune cleanly and
`run_ray_study` raises `StudyError` saying how to resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from .engine import load_run_space
from .halving import check_halving_budget, check_runs_left
from .ray_halving import next_promotions, run_promotions
from .records import FAIL_REASON, anchor_attrs, from_trial, read_records, spec_attrs
from .recovery import finished_count
from .samplers import make_sampler, space_exhausted
from .space import SearchSpace, candidate_key, params_of
from .storage import StudyError
from .studies import DEFAULT_STUDIES_DIR, StudyHandle, open_study_storage, prepare_study, store_study_settings
from .ray_cluster import (
    DEFAULT_MAX_CONCURRENT,
    TrialResources,
    check_address,
    connect,
    default_concurrency,
    load_experiments,
    save_experiments,
    trial_resources,
)
from .ray_worker import (
    ALREADY_RECORDED,
    ANCHOR_KEY,
    CONSTRAINTS_KEY,
    PARAM_NAMES,
    PROMOTE_KEY,
    RAY_ATTR,
    RECORD_KEY,
    REUSE_KEY,
    STATE_KEY,
    directions,
    evaluate_trial,
    is_number,
    metric_names,
    ray_result,
    space_payload,
    trainable,
)

__all__ = ["run_ray_study", "trial_resources", "TrialResources", "evaluate_trial", "ray_result",
           "RAY_ATTR", "PARAM_NAMES", "DEFAULT_MAX_CONCURRENT"]

log = logging.getLogger(__name__)

RAY_SUBDIR = "ray"
DEFAULT_MAX_RETRIES = 2


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ----- the driver side ----------------------------------------------------------------------------
_STUDIES: dict = {}


def _study(storage_url: str, name: str) -> optuna.Study:
    """The study storage, opened once per driver process (never pickled with Tune's state)."""
    key = (storage_url, name)
    if key not in _STUDIES:
        _STUDIES[key] = optuna.load_study(study_name=name, storage=open_study_storage(storage_url))
    return _STUDIES[key]


def _spec_attrs(space: SearchSpace, params: dict) -> dict:
    """The spec attributes the TrialObjective sets first, for a trial whose worker never reported."""
    try:
        spec = space.make_spec(**params)
    except Exception:  # noqa: BLE001 - the record of a failed trial keeps what can be known
        return {}
    return spec_attrs(spec, space)


def _stored_result(space: SearchSpace, trial: optuna.trial.FrozenTrial) -> dict:
    """What a stored trial reported to Tune (for a trial finished before an interruption)."""
    names = metric_names(space)
    if trial.state == TrialState.COMPLETE:
        metrics = dict(zip(names, (float(v) for v in trial.values)))
    else:
        metrics = {n: float("nan") for n in names}
    return {**metrics, STATE_KEY: trial.state.name, CONSTRAINTS_KEY: json.dumps(trial.constraints),
            RECORD_KEY: ALREADY_RECORDED}


def _ray_trials(study: optuna.Study, experiment: str | None = None) -> list:
    out = []
    for t in study.get_trials(deepcopy=False):
        info = from_trial(t).ray
        if info is not None and (experiment is None or info.get("experiment") == experiment):
            out.append(t)
    return out


def _error_summary(text: str | None) -> str:
    """The last failure in Tune's error.txt, in one line: the exception, and why a worker died."""
    if not text:
        return "no error text was kept"
    block = text.strip().split("Failure # ")[-1]
    lines = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln)]
    summary = raised[-1] if raised else (lines[0] if lines else block.strip())
    detail = re.search(r"Worker exit detail: (.*?\.)(\s|$)", block)
    if detail:
        summary += f" ({detail.group(1)})"
    return summary[:500]


class StudySearch(OptunaSearch):
    """OptunaSearch that knows the study it feeds.

    * the named variants inside the space are proposed first (points_to_evaluate), marked as anchors;
    * a spec the study has already evaluated is sent with its earlier result, to be reused;
    * FAIL and PRUNED results are told to Optuna as such (OptunaSearch would call a result without
      objectives PRUNED), and the trial's constraints are told with its values;
    * a finished trial without every objective is told FAIL and logged as an error, never dropped.
    """

    def __init__(self, space: SearchSpace, *, storage_url: str, anchors: list, target: int):
        names = metric_names(space)
        modes = ["min" if d == "minimize" else "max" for d in directions(space)]
        super().__init__(
            space=space.distributions(),
            metric=names if len(names) > 1 else names[0],
            mode=modes if len(modes) > 1 else modes[0],
            points_to_evaluate=[params_of(spec) for spec in anchors] or None,
            sampler=make_sampler(space),
            study_name=space.name,
        )
        self._sqa_space = space
        self._sqa_storage = storage_url
        self._sqa_pending_anchors = {json.dumps(params_of(spec), sort_keys=True): spec.label for spec in anchors}
        self._sqa_target = target

    def warm_start(self, trials) -> int:
        """Tell the sampler the study's finished trials (from either backend); returns how many."""
        n_values = len(directions(self._sqa_space))
        distributions = self._sqa_space.distributions()
        told = 0
        for t in trials:
            if t.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
                continue
            if t.state == TrialState.COMPLETE and (t.values is None or len(t.values) != n_values):
                continue
            if set(t.params) != set(distributions):
                continue
            try:
                self._ot_study.add_trial(optuna.trial.create_trial(
                    state=t.state, values=t.values if t.state == TrialState.COMPLETE else None, params=t.params,
                    distributions=distributions, constraints=t.constraints or None))
                told += 1
            except ValueError as exc:  # a trial from a different search space: leave it out
                log.warning("trial %d not told to the sampler: %s", t.number, exc)
        return told

    def suggest(self, trial_id: str):
        # The storage decides when the study is done, not Tune's sample count: after a restore from
        # a snapshot older than the storage, Tune would otherwise run more trials than asked for.
        study = _study(self._sqa_storage, self._sqa_space.name)
        in_flight = len(set(self._ot_trials) - self._completed_trials)
        if finished_count(study) + in_flight >= self._sqa_target:
            return Searcher.FINISHED
        if space_exhausted(self._ot_study, self._sqa_space):  # every valid configuration taken: no repeats
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if config is None:
            return None
        key = json.dumps({name: config[name] for name in PARAM_NAMES}, sort_keys=True)
        label = self._sqa_pending_anchors.pop(key, None)
        if label:
            config[ANCHOR_KEY] = label
        earlier = self._earlier(config)
        if earlier is not None:
            config[REUSE_KEY] = earlier
        return config

    def _earlier(self, params: dict) -> dict | None:
        space = self._sqa_space
        try:
            key = candidate_key(space.make_spec(**{name: params[name] for name in PARAM_NAMES}))
        except Exception:  # noqa: BLE001 - the worker reports the invalid spec
            return None
        study = _study(self._sqa_storage, space.name)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            record = from_trial(t)
            if record.spec_key == key and record.duplicate_of is None:
                return {"number": record.number, "values": list(record.values), "user_attrs": record.reused_attrs()}
        return None

    def restore(self, checkpoint_path: str):
        """Tune's searcher snapshot, then the study's trials of this experiment the snapshot missed
        (finished after it was taken), so the sampler learns from every stored result."""
        super().restore(checkpoint_path)
        known = set(self._ot_trials)
        study = _study(self._sqa_storage, self._sqa_space.name)
        missed = [t for t in _ray_trials(study) if from_trial(t).ray.get("trial_id") not in known]
        done = {json.dumps(t.params, sort_keys=True) for t in missed}
        self._sqa_pending_anchors = {k: v for k, v in self._sqa_pending_anchors.items() if k not in done}
        told = {json.dumps(t.params, sort_keys=True) + str(t.values) for t in self._ot_study.get_trials(deepcopy=False)}
        self.warm_start([t for t in missed if json.dumps(t.params, sort_keys=True) + str(t.values) not in told])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or error:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        state = (result or {}).get(STATE_KEY)
        names = metric_names(self._sqa_space)
        # constraints of every state: an invalid combination (PRUNED, infeasible) must steer the sampler away
        for name, value in json.loads((result or {}).get(CONSTRAINTS_KEY) or "{}").items():
            ot_trial.set_constraint(name, value)
        if state == "COMPLETE" and all(is_number((result or {}).get(n)) for n in names):
            return super().on_trial_complete(trial_id, result=result, error=False)
        if state not in ("FAIL", "PRUNED"):
            log.error("Ray trial %s finished without every objective %s (result keys %s): recorded as FAIL",
                      trial_id, names, sorted(result or {}))
            state = "FAIL"
        self._ot_study.tell(ot_trial, state=TrialState[state])
        self._completed_trials.add(trial_id)


class StudyRecorder(tune.Callback):
    """Writes each finished Ray trial into the study storage, once, from the driver."""

    def __init__(self, space: SearchSpace, *, storage_url: str, max_retries: int, target: int, progress: bool):
        self._sqa_space = space
        self._sqa_storage = storage_url
        self._sqa_max_retries = max_retries
        self._sqa_target = target
        self._sqa_progress = progress

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        raw = result.get(RECORD_KEY)
        if raw == ALREADY_RECORDED:
            return
        if not raw:
            record = self._driver_record(trial, "the Ray trial finished without reporting a result")
        else:
            record = json.loads(raw)
            names = metric_names(self._sqa_space)
            if record["state"] == "COMPLETE" and not all(is_number(result.get(n)) for n in names):
                record = self._driver_record(trial, f"the Ray trial reported no finite value for every objective {names}")
        self._store(record, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        attempts = trial.num_failures
        reason = (f"ray trial failed {attempts} time(s) (max_retries={self._sqa_max_retries}): "
                  f"{_error_summary(trial.get_error())}")
        self._store(self._driver_record(trial, reason), trial)

    def _driver_record(self, trial, reason: str) -> dict:
        params = {name: trial.config.get(name) for name in PARAM_NAMES}
        attrs = _spec_attrs(self._sqa_space, params)
        if trial.config.get(ANCHOR_KEY):
            attrs.update(anchor_attrs(trial.config[ANCHOR_KEY]))
        attrs.update(trial.config.get(PROMOTE_KEY) or {})  # a failed promotion stays one (not a new trial)
        attrs[FAIL_REASON] = reason
        attrs[RAY_ATTR] = {"trial_id": trial.trial_id, "experiment": trial.experiment_dir_name,
                           "node_ip": (trial.last_result or {}).get("node_ip")}
        now = datetime.now().isoformat()
        return {"state": "FAIL", "values": None, "params": params, "user_attrs": attrs, "system_attrs": {},
                "intermediate_values": {}, "datetime_start": now, "datetime_complete": now}

    def _store(self, record: dict, trial) -> None:
        study = _study(self._sqa_storage, self._sqa_space.name)
        info = record["user_attrs"].setdefault(RAY_ATTR, {})
        info.setdefault("trial_id", trial.trial_id)
        info.setdefault("experiment", trial.experiment_dir_name)
        info["failures"] = trial.num_failures
        for t in _ray_trials(study, info["experiment"]):
            if from_trial(t).ray.get("trial_id") == info["trial_id"]:
                return  # written before an interruption; the re-run only told the sampler
        frozen = _frozen_trial(self._sqa_space, record)
        study.add_trial(frozen)
        if self._sqa_progress:
            print(_progress_line(self._sqa_space, study, frozen, self._sqa_target), flush=True)


def _progress_line(space: SearchSpace, study: optuna.Study, frozen, target: int) -> str:
    """One line per finished trial: what the Optuna backend's progress bar says, as a log."""
    record = from_trial(frozen)
    if record.complete:
        outcome = ", ".join(f"{n} {v:.4g}" for n, v in zip(metric_names(space), record.values))
    else:
        outcome = record.reason or ""
    where = record.ray or {}
    return (f"[{finished_count(study)}/{target}] {record.label or record.params} {record.state}: {outcome} "
            f"(ray trial {where.get('trial_id')} on {where.get('hostname') or where.get('node_ip')})")


def _frozen_trial(space: SearchSpace, record: dict) -> optuna.trial.FrozenTrial:
    state = TrialState[record["state"]]
    frozen = optuna.trial.create_trial(
        state=state, values=record["values"] if state == TrialState.COMPLETE else None,
        params=record["params"], distributions=space.distributions(), user_attrs=record["user_attrs"],
        system_attrs=record.get("system_attrs") or {},
        intermediate_values={int(k): v for k, v in (record.get("intermediate_values") or {}).items()} or None,
    )
    if record.get("datetime_start"):
        frozen.datetime_start = datetime.fromisoformat(record["datetime_start"])
    if record.get("datetime_complete"):
        frozen.datetime_complete = datetime.fromisoformat(record["datetime_complete"])
    return frozen


# ----- experiments under studies/<name>/ray/ ------------------------------------------------------
def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StudyError(f"{name}={value!r} is not allowed: must be an integer >= {low}")


# ----- running ------------------------------------------------------------------------------------
def run_ray_study(
    space: SearchSpace | str | Path,
    *,
    name: str | None = None,
    trials: int | None = None,
    storage: str | None = None,
    studies_dir: str | Path = DEFAULT_STUDIES_DIR,
    address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    progress: bool = True,
) -> StudyHandle:
    """Run (or resume, or extend) a study on Ray Tune until it has `trials` finished trials.

    address: a Ray cluster to join (``HOST:PORT`` of its head, or ``auto``); None starts a local
    instance sized to this machine (``num_cpus``/``num_gpus`` override the detected size), or
    joins ``$RAY_ADDRESS`` when set. cpus_per_trial / gpus_per_trial: resources of one trial
    (gpus None: one whole GPU when the trial times or trains on a GPU, else none); see
    `trial_resources`. max_concurrent: trials in flight at once (None: what fits, at most 4), so
    the sampler learns from results instead of proposing a flood of random starts. max_retries:
    how often a trial that raised is run again before it is recorded as FAIL. The results and
    report are written by the caller (`sqa-search run` does, with `report.write_report`).
    """
    space, space_path, _ = load_run_space(space, name)
    target = trials if trials is not None else space.study.trials
    _check_int("trials", target, 1)
    _check_int("max_retries", max_retries, 0)
    if max_concurrent is not None:
        _check_int("max_concurrent", max_concurrent, 1)
    trial_resources(space, cpus_per_trial, gpus_per_trial, cluster_gpus=0)  # argument mistakes before Ray starts
    check_address(address)

    check_halving_budget(space, target)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handle = prepare_study(space, space_path, studies_dir, storage, workers=1)
    if len(handle.study.directions) != len(directions(space)):
        raise StudyError(f"study {space.name!r} was created with {len(handle.study.directions)} objective(s), but "
                         f"study.mode={space.study.mode} asks for {len(directions(space))}: use another --name")
    check_runs_left(read_records(handle.study), space, target - finished_count(handle.study))
    store_study_settings(handle)
    ray_dir = (handle.directory / RAY_SUBDIR).resolve()
    experiments = load_experiments(ray_dir)
    if finished_count(handle.study) >= target and not next_promotions(handle):  # nothing to run: do not start Ray
        if experiments and not experiments[-1]["finished"]:
            experiments[-1]["finished"] = True
            save_experiments(ray_dir, experiments)
        return handle
    _STUDIES[(handle.storage_url, space.name)] = handle.study
    started = connect(address, num_cpus, num_gpus, progress)
    try:
        resources = trial_resources(space, cpus_per_trial, gpus_per_trial,
                                    cluster_gpus=ray.cluster_resources().get("GPU", 0))
        concurrency = max_concurrent or default_concurrency(resources)
        if progress:
            _print_plan(space, resources, concurrency)
        period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period or "1"  # snapshot often: less to redo after a kill
        try:
            _resume_last(handle, ray_dir, experiments, resources, target, progress)
            remaining = target - finished_count(handle.study)
            if remaining > 0 and not space_exhausted(handle.study, space):
                _run_new(handle, ray_dir, experiments, remaining, resources, concurrency, max_retries, target,
                         progress)
            _run_promotions(handle, ray_dir, experiments, resources, concurrency, max_retries, target, progress)
        finally:
            if period is None:
                os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
            else:
                os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period
    finally:
        if started:
            ray.shutdown()
        _STUDIES.clear()
    return handle


def _print_plan(space: SearchSpace, resources: TrialResources, concurrency: int) -> None:
    print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
          f"each trial holds {resources.cpus:g} CPU(s) and {resources.gpus:g} GPU(s); "
          f"at most {concurrency} at once")
    cpu_timing = space.target.measured and (space.target.device == "cpu" or resources.gpus == 0)
    if cpu_timing and space.target.device != "cpu":
        print("note: trials hold no GPU, so target.device=auto times on the CPU")
    if cpu_timing and concurrency > 1:
        print(f"note: {concurrency} trials at once time on shared CPU cores, which slows their timings; for "
              f"clean CPU timings give each trial a whole node (cpus_per_trial = its cores) or max_concurrent=1")


def _resume_last(handle: StudyHandle, ray_dir: Path, experiments: list[dict], resources: TrialResources,
                 target: int, progress: bool) -> None:
    """Restore the last Ray experiment if it was interrupted (the storage has every stored result,
    so one that cannot be restored is simply closed). An interrupted rung of promotions is closed,
    not restored: the next rung is planned from the storage, which re-plans what did not finish."""
    last = experiments[-1] if experiments else None
    if not last or last["finished"]:
        return
    if last.get("promotions"):
        last["finished"] = True
        save_experiments(ray_dir, experiments)
        return
    path = ray_dir / last["name"]
    tuner = None
    if tune.Tuner.can_restore(str(path)):
        try:
            tuner = tune.Tuner.restore(str(path), trainable=_make_trainable(handle.space, resources, handle,
                                                                            last["name"]),
                                       resume_unfinished=True, resume_errored=False)
        except Exception as exc:  # noqa: BLE001 - the study storage has every result: go on
            log.warning("cannot restore the Ray experiment %s (%s): starting a new one", path, exc)
    if tuner is not None:
        if progress:
            print(f"resuming the interrupted Ray experiment {path}")
        last["restored"] = last.get("restored", 0) + 1
        save_experiments(ray_dir, experiments)
        _fit(tuner, handle, target, fresh=False)
    last["finished"] = True
    save_experiments(ray_dir, experiments)


def _run_new(handle: StudyHandle, ray_dir: Path, experiments: list[dict], remaining: int,
             resources: TrialResources, concurrency: int, max_retries: int, target: int, progress: bool) -> None:
    """A new Ray experiment for the trials still missing."""
    experiment = f"run-{len(experiments) + 1:03d}"
    experiments.append({"name": experiment, "trials": remaining, "finished": False, "restored": 0,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    save_experiments(ray_dir, experiments)
    tuner = _new_tuner(handle, experiment, ray_dir, remaining, resources, concurrency, max_retries, progress)
    _fit(tuner, handle, target, fresh=True)
    experiments[-1]["finished"] = True
    save_experiments(ray_dir, experiments)


def _run_promotions(handle: StudyHandle, ray_dir: Path, experiments: list[dict], resources: TrialResources,
                    concurrency: int, max_retries: int, target: int, progress: bool) -> None:
    """Successive halving on Ray (search/ray_halving.py), with this backend's trainable and recorder."""
    run_promotions(handle, ray_dir, experiments, concurrency=concurrency, max_retries=max_retries, progress=progress,
                   trainable=lambda: _make_trainable(handle.space, resources, handle, None),
                   recorder=lambda: StudyRecorder(handle.space, storage_url=handle.storage_url,
                                                  max_retries=max_retries, target=target, progress=progress),
                   dirname=_trial_dirname)


def _fit(tuner, handle: StudyHandle, target: int, fresh: bool) -> None:
    """Run a Tuner; an interruption (Ctrl-C: Tune stops, saves and returns) is an error that says
    how to resume, and leaves the experiment to be restored."""
    grid = tuner.fit()
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    # a fresh experiment ends with the study complete unless it was stopped early
    short = finished_count(handle.study) < target and not space_exhausted(handle.study, handle.space)
    if unfinished > 0 or (fresh and short):
        raise StudyError(f"the Ray study {handle.space.name!r} was interrupted with {finished_count(handle.study)} "
                         f"of {target} trials stored in {handle.storage_url}; run the same command again to "
                         f"resume it")


def _make_trainable(space: SearchSpace, resources: TrialResources, handle: StudyHandle, experiment: str | None):
    recorded = {}
    if experiment is not None:  # trials of this experiment stored before an interruption
        for t in _ray_trials(handle.study, experiment):
            recorded[from_trial(t).ray["trial_id"]] = {"params": dict(t.params), "result": _stored_result(space, t)}
    with_payload = tune.with_parameters(trainable, space_payload=space_payload(space), recorded=recorded)
    return tune.with_resources(with_payload, resources.as_ray())


def _new_tuner(handle: StudyHandle, experiment: str, ray_dir: Path, n_trials: int, resources: TrialResources,
               concurrency: int, max_retries: int, progress: bool):
    space, study = handle.space, handle.study
    evaluated = {from_trial(t).spec_key for t in study.get_trials(deepcopy=False)
                 if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
    anchors = [spec for spec in space.named_variants() if candidate_key(spec) not in evaluated]
    if anchors and progress:
        print(f"evaluating the named variants first: {', '.join(s.label for s in anchors)}")
    searcher = StudySearch(space, storage_url=handle.storage_url, anchors=anchors,
                           target=finished_count(study) + n_trials)
    told = searcher.warm_start(study.get_trials(deepcopy=False))
    if told and progress:
        print(f"the sampler starts from the study's {told} finished trial(s)")
    return tune.Tuner(
        _make_trainable(space, resources, handle, None),
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                                    num_samples=n_trials, trial_dirname_creator=_trial_dirname,
                                    # a warm worker process keeps torch, the corpus and compiled kernels
                                    # between trials, as the Optuna backend's one process does
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=experiment, storage_path=str(ray_dir), verbose=0,  # one line per trial instead (StudyRecorder)
            failure_config=tune.FailureConfig(max_failures=max_retries),
            callbacks=[StudyRecorder(space, storage_url=handle.storage_url, max_retries=max_retries,
                                     target=finished_count(study) + n_trials, progress=progress)],
        ),
    )
