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
* worker: `evaluate_trial` runs the Optuna backend's own `Objective` on a real `optuna.Trial` of
  a throw-away in-memory study with the proposed parameters enqueued, so a trial's values,
  user attributes and constraints are those the Optuna backend writes, computed by the same code.
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
import math
import os
import re
import socket
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from .space import SearchSpace, load_space, space_from_dict
from .engine import (
    DEFAULT_STUDIES_DIR,
    Objective,
    StudyError,
    StudyHandle,
    TrialFailed,
    _open_storage,
    _params,
    _prepare_study,
    _sampler,
    finished_count,
)

__all__ = ["run_ray_study", "trial_resources", "TrialResources", "evaluate_trial", "ray_result",
           "RAY_ATTR", "PARAM_NAMES"]

log = logging.getLogger(__name__)

PARAM_NAMES = ("n_q_heads", "n_kv_heads", "window", "n_global")
RAY_SUBDIR = "ray"
EXPERIMENTS_FILE = "experiments.json"
DEFAULT_MAX_CONCURRENT = 4
DEFAULT_MAX_RETRIES = 2
# The one user attribute a Ray trial has that an Optuna-backend trial has not.
RAY_ATTR = "ray"
# what the Optuna backend copies from an earlier trial when a spec is proposed again
REUSED_ATTRS = ("latency_s", "latency_source", "quality", "train", "timing")

# keys of the result a trial reports to Tune (besides the objectives, named as in the space)
STATE_KEY = "sqa_state"
RECORD_KEY = "sqa_record"
CONSTRAINTS_KEY = "sqa_constraints"
ALREADY_RECORDED = "recorded"
# keys the searcher adds to a trial's config (besides the four parameters)
ANCHOR_KEY = "sqa_anchor"
REUSE_KEY = "sqa_reuse"


# ----- what a study looks like to Ray -------------------------------------------------------------
def _metric_names(space: SearchSpace) -> list[str]:
    return list(space.objective_names) if space.study.mode == "pareto" else [space.objectives.quality]


def _directions(space: SearchSpace) -> list[str]:
    return list(space.directions) if space.study.mode == "pareto" else [space.directions[0]]


def _distributions(space: SearchSpace) -> dict:
    """The distributions the Optuna backend's `Objective.suggest` uses, in its order."""
    s = space.search
    return {"n_q_heads": CategoricalDistribution(list(s.n_q_heads)),
            "n_kv_heads": CategoricalDistribution(list(s.n_kv_heads)),
            "window": CategoricalDistribution(list(s.window)),
            "n_global": CategoricalDistribution(list(s.n_global))}


def _space_payload(space: SearchSpace) -> dict:
    return {"data": space.to_dict(), "source": space.source, "name": space.name}


def _space_from_payload(payload: dict) -> SearchSpace:
    return space_from_dict(payload["data"], source=payload["source"], name=payload["name"])


# ----- resources ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialResources:
    """What one trial holds on the cluster: CPUs and GPUs (whole GPUs when it times on one)."""

    cpus: float = 1
    gpus: float = 0

    def as_ray(self) -> dict:
        return {"cpu": self.cpus, "gpu": self.gpus}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_resources(space: SearchSpace, cpus_per_trial=1, gpus_per_trial=None, cluster_gpus: float = 0) -> TrialResources:
    """Validate (or choose, for gpus_per_trial=None) the resources of one trial.

    A trial times the spec and trains it. Timing on a GPU needs the whole device: fractional
    GPUs share a device with no isolation, so a neighbour's kernels would be timed too. Training
    alone (latency predicted by a cost-model profile, or timed on the CPU) may share a GPU.
    """
    t = space.target
    train_device = str(space.training.get("device", "cpu"))
    if not _is_number(cpus_per_trial) or cpus_per_trial <= 0:
        raise StudyError(f"cpus_per_trial={cpus_per_trial!r} is not allowed: must be a number > 0")
    if t.measured and t.device.startswith("cuda"):
        gpu_timing = True
    elif t.measured and t.device == "auto":
        gpu_timing = None  # a GPU if the trial is given one
    else:
        gpu_timing = False
    if gpus_per_trial is None:
        wants_gpu = gpu_timing or train_device.startswith("cuda") or (gpu_timing is None and cluster_gpus > 0)
        gpus_per_trial = 1 if wants_gpu else 0
    if not _is_number(gpus_per_trial) or gpus_per_trial < 0:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed: must be a number >= 0")
    times_on_gpu = gpu_timing or (gpu_timing is None and gpus_per_trial > 0)
    if times_on_gpu and gpus_per_trial != int(gpus_per_trial):
        raise StudyError(
            f"gpus_per_trial={gpus_per_trial!r} is not allowed with target.hardware=local, "
            f"target.device={t.device}: a timing trial needs whole GPUs (an integer >= 1), because "
            f"fractional GPUs share a device with no isolation and corrupt timings. Training-only trials "
            f"may share a GPU: predict latency with a cost-model profile (target.hardware) to use fractions")
    if gpu_timing and gpus_per_trial < 1:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed with target.device={t.device}: "
                         f"timing on a GPU needs gpus_per_trial >= 1")
    if train_device.startswith("cuda") and gpus_per_trial <= 0:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed with training.device={train_device}: "
                         f"training on a GPU needs gpus_per_trial > 0")
    for field_name, device in (("target.device", t.device), ("training.device", train_device)):
        if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= max(1, math.ceil(gpus_per_trial)):
            raise StudyError(
                f"{field_name}={device} is not allowed with gpus_per_trial={gpus_per_trial!r}: Ray shows a trial "
                f"only its own GPUs, numbered from cuda:0; use cuda (or cuda:0)")
    gpus = int(gpus_per_trial) if gpus_per_trial == int(gpus_per_trial) else float(gpus_per_trial)
    cpus = int(cpus_per_trial) if cpus_per_trial == int(cpus_per_trial) else float(cpus_per_trial)
    return TrialResources(cpus=cpus, gpus=gpus)


# ----- the worker side ----------------------------------------------------------------------------
def evaluate_trial(space: SearchSpace, params: dict, *, anchor: str | None = None, reuse: dict | None = None,
                   cache_dir=None) -> dict:
    """Evaluate one proposed spec with the Optuna backend's `Objective`, on this machine.

    Returns the trial as a JSON-safe record (state, values, params, user_attrs, system_attrs,
    intermediate values, start and end). `reuse` is an earlier trial of the same spec
    ({"number", "values", "user_attrs"}): its result is reused as the Optuna backend reuses it.
    Deterministic failures come back as a FAIL record with ``fail_reason``; anything else raises.
    """
    params = {name: params[name] for name in PARAM_NAMES}
    local = optuna.create_study(directions=_directions(space), sampler=optuna.samplers.RandomSampler(),
                                pruner=optuna.pruners.NopPruner())
    distributions = _distributions(space)
    if reuse is not None:  # the earlier trial, so that the Objective finds and reuses it
        local.add_trial(optuna.trial.create_trial(
            values=reuse["values"], params=params, distributions=distributions,
            user_attrs={k: v for k, v in reuse["user_attrs"].items() if k in REUSED_ATTRS + ("spec_key",)}))
    local.enqueue_trial(params, user_attrs={"anchor": anchor} if anchor else None)
    objective = Objective(space, progress=False, cache_dir=cache_dir)
    local.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
    frozen = local.trials[-1]
    if frozen.params != params:
        raise RuntimeError(f"the objective evaluated {frozen.params}, not the proposed {params}")
    user_attrs = dict(frozen.user_attrs)
    if reuse is not None and "duplicate_of" in user_attrs:
        user_attrs["duplicate_of"] = reuse["number"]  # the study's trial number, not the local one
    system_attrs = {k: v for k, v in frozen.system_attrs.items() if k != "fixed_params"}
    if anchor:  # the Optuna backend's anchors are enqueued trials and keep that mark
        system_attrs["fixed_params"] = params
    record = {
        "state": frozen.state.name,
        "values": list(frozen.values) if frozen.values is not None else None,
        "params": params,
        "user_attrs": user_attrs,
        "system_attrs": system_attrs,
        "intermediate_values": {str(k): v for k, v in frozen.intermediate_values.items()},
        "datetime_start": frozen.datetime_start.isoformat() if frozen.datetime_start else None,
        "datetime_complete": frozen.datetime_complete.isoformat() if frozen.datetime_complete else None,
    }
    json.dumps(record)  # a record that cannot travel fails here, on the worker, with its trial
    return record


def ray_result(space: SearchSpace, record: dict) -> dict:
    """The result a trial reports to Tune: every objective, or an error.

    A COMPLETE trial must carry every objective as a finite number; if one is missing the trial
    raises (and is retried, then recorded as failed) instead of being dropped by OptunaSearch
    with a log line. FAIL and PRUNED trials report NaN objectives and their state, which the
    searcher tells Optuna explicitly.
    """
    names = _metric_names(space)
    state = record["state"]
    if state not in ("COMPLETE", "FAIL", "PRUNED"):
        raise RuntimeError(f"trial ended in state {state}: expected COMPLETE, FAIL or PRUNED")
    if state == "COMPLETE":
        values = record.get("values") or []
        if len(values) != len(names):
            raise RuntimeError(f"trial reported {len(values)} objective value(s) {values} for the "
                               f"{len(names)} objectives {names}")
        bad = [n for n, v in zip(names, values) if not _is_number(v)]
        if bad:
            raise RuntimeError(f"trial reported no finite value for objective(s) {bad}: {values}")
        metrics = {n: float(v) for n, v in zip(names, values)}
    else:
        metrics = {n: float("nan") for n in names}
    constraints = {k.split(":", 1)[1]: v for k, v in record.get("system_attrs", {}).items()
                   if k.startswith("constraints:")}
    return {**metrics, STATE_KEY: state, CONSTRAINTS_KEY: json.dumps(constraints), RECORD_KEY: json.dumps(record)}


def _worker_identity(space: SearchSpace) -> dict:
    """This worker's node and hardware fingerprint (what a timing here depends on)."""
    from .engine import _device
    from ..speed.hardware import Fingerprint, fingerprint

    t = space.target
    device = _device(t.device) if t.measured else str(space.training.get("device", "cpu"))
    try:
        fp = fingerprint(device, t.dtype, t.threads)
        fp_id, fp_data = fp.id, fp.to_dict()
    except Exception as exc:  # noqa: BLE001 - an unknown device must not lose the trial's result
        fp_id, fp_data = Fingerprint().id, {"error": f"{type(exc).__name__}: {exc}"}
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "fingerprint_id": fp_id, "fingerprint": fp_data}


def _trainable(config: dict, space_payload: dict, recorded: dict):
    """One Ray trial: evaluate the proposed spec and report every objective, or raise."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    params = {name: config[name] for name in PARAM_NAMES}
    earlier = recorded.get(trial_id)
    if earlier is not None and earlier["params"] == params:
        # finished and stored before the driver was interrupted: report it again, do not recompute
        tune.report(earlier["result"])
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failure's reason travels in its record
    space = _space_from_payload(space_payload)
    record = evaluate_trial(space, params, anchor=config.get(ANCHOR_KEY), reuse=config.get(REUSE_KEY))
    record["user_attrs"][RAY_ATTR] = {"trial_id": trial_id, "experiment": context.get_experiment_name(),
                                      **_worker_identity(space)}
    tune.report(ray_result(space, record))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ----- the driver side ----------------------------------------------------------------------------
_STUDIES: dict = {}


def _study(storage_url: str, name: str) -> optuna.Study:
    """The study storage, opened once per driver process (never pickled with Tune's state)."""
    key = (storage_url, name)
    if key not in _STUDIES:
        _STUDIES[key] = optuna.load_study(study_name=name, storage=_open_storage(storage_url))
    return _STUDIES[key]


def _spec_attrs(space: SearchSpace, params: dict) -> dict:
    """The spec attributes the Objective sets first, for a trial whose worker never reported."""
    from .space import candidate_key

    try:
        spec = space.make_spec(params["n_q_heads"], params["n_kv_heads"], params["window"], params["n_global"])
    except Exception:  # noqa: BLE001 - the record of a failed trial keeps what can be known
        return {}
    return {"spec": spec.to_dict(), "label": spec.label, "family": spec.family, "variant": spec.variant_name,
            "kv_cache_bytes": space.kv_cache_bytes(spec), "n_params": spec.n_params(), "spec_key": candidate_key(spec)}


def _stored_result(space: SearchSpace, trial: optuna.trial.FrozenTrial) -> dict:
    """What a stored trial reported to Tune (for a trial finished before an interruption)."""
    names = _metric_names(space)
    if trial.state == TrialState.COMPLETE:
        metrics = dict(zip(names, (float(v) for v in trial.values)))
    else:
        metrics = {n: float("nan") for n in names}
    return {**metrics, STATE_KEY: trial.state.name, CONSTRAINTS_KEY: json.dumps(trial.constraints),
            RECORD_KEY: ALREADY_RECORDED}


def _ray_trials(study: optuna.Study, experiment: str | None = None) -> list:
    out = []
    for t in study.get_trials(deepcopy=False):
        info = t.user_attrs.get(RAY_ATTR)
        if isinstance(info, dict) and (experiment is None or info.get("experiment") == experiment):
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
        names = _metric_names(space)
        modes = ["min" if d == "minimize" else "max" for d in _directions(space)]
        super().__init__(
            space=_distributions(space),
            metric=names if len(names) > 1 else names[0],
            mode=modes if len(modes) > 1 else modes[0],
            points_to_evaluate=[_params(spec) for spec in anchors] or None,
            sampler=_sampler(space),
            study_name=space.name,
        )
        self._sqa_space = space
        self._sqa_storage = storage_url
        self._sqa_pending_anchors = {json.dumps(_params(spec), sort_keys=True): spec.label for spec in anchors}
        self._sqa_target = target

    def warm_start(self, trials) -> int:
        """Tell the sampler the study's finished trials (from either backend); returns how many."""
        n_values = len(_directions(self._sqa_space))
        distributions = _distributions(self._sqa_space)
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
        from .space import candidate_key

        space = self._sqa_space
        try:
            key = candidate_key(space.make_spec(params["n_q_heads"], params["n_kv_heads"], params["window"],
                                                params["n_global"]))
        except Exception:  # noqa: BLE001 - the worker reports the invalid spec
            return None
        study = _study(self._sqa_storage, space.name)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("spec_key") == key and "duplicate_of" not in t.user_attrs:
                return {"number": t.number, "values": list(t.values),
                        "user_attrs": {k: t.user_attrs[k] for k in REUSED_ATTRS + ("spec_key",) if k in t.user_attrs}}
        return None

    def restore(self, checkpoint_path: str):
        """Tune's searcher snapshot, then the study's trials of this experiment the snapshot missed
        (finished after it was taken), so the sampler learns from every stored result."""
        super().restore(checkpoint_path)
        known = set(self._ot_trials)
        study = _study(self._sqa_storage, self._sqa_space.name)
        missed = [t for t in _ray_trials(study) if t.user_attrs[RAY_ATTR].get("trial_id") not in known]
        done = {json.dumps(t.params, sort_keys=True) for t in missed}
        self._sqa_pending_anchors = {k: v for k, v in self._sqa_pending_anchors.items() if k not in done}
        told = {json.dumps(t.params, sort_keys=True) + str(t.values) for t in self._ot_study.get_trials(deepcopy=False)}
        self.warm_start([t for t in missed if json.dumps(t.params, sort_keys=True) + str(t.values) not in told])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or error:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        state = (result or {}).get(STATE_KEY)
        names = _metric_names(self._sqa_space)
        # constraints of every state: an invalid combination (PRUNED, infeasible) must steer the sampler away
        for name, value in json.loads((result or {}).get(CONSTRAINTS_KEY) or "{}").items():
            ot_trial.set_constraint(name, value)
        if state == "COMPLETE" and all(_is_number((result or {}).get(n)) for n in names):
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
            names = _metric_names(self._sqa_space)
            if record["state"] == "COMPLETE" and not all(_is_number(result.get(n)) for n in names):
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
            attrs["anchor"] = trial.config[ANCHOR_KEY]
        attrs["fail_reason"] = reason
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
            if t.user_attrs[RAY_ATTR].get("trial_id") == info["trial_id"]:
                return  # written before an interruption; the re-run only told the sampler
        frozen = _frozen_trial(self._sqa_space, record)
        study.add_trial(frozen)
        if self._sqa_progress:
            print(_progress_line(self._sqa_space, study, frozen, self._sqa_target), flush=True)


def _progress_line(space: SearchSpace, study: optuna.Study, frozen, target: int) -> str:
    """One line per finished trial: what the Optuna backend's progress bar says, as a log."""
    attrs = frozen.user_attrs
    if frozen.state == TrialState.COMPLETE:
        outcome = ", ".join(f"{n} {v:.4g}" for n, v in zip(_metric_names(space), frozen.values))
    else:
        outcome = attrs.get("fail_reason") or attrs.get("prune_reason") or ""
    where = attrs.get(RAY_ATTR, {})
    return (f"[{finished_count(study)}/{target}] {attrs.get('label', frozen.params)} {frozen.state.name}: {outcome} "
            f"(ray trial {where.get('trial_id')} on {where.get('hostname') or where.get('node_ip')})")


def _frozen_trial(space: SearchSpace, record: dict) -> optuna.trial.FrozenTrial:
    state = TrialState[record["state"]]
    frozen = optuna.trial.create_trial(
        state=state, values=record["values"] if state == TrialState.COMPLETE else None,
        params=record["params"], distributions=_distributions(space), user_attrs=record["user_attrs"],
        system_attrs=record.get("system_attrs") or {},
        intermediate_values={int(k): v for k, v in (record.get("intermediate_values") or {}).items()} or None,
    )
    if record.get("datetime_start"):
        frozen.datetime_start = datetime.fromisoformat(record["datetime_start"])
    if record.get("datetime_complete"):
        frozen.datetime_complete = datetime.fromisoformat(record["datetime_complete"])
    return frozen


# ----- experiments under studies/<name>/ray/ ------------------------------------------------------
def _load_experiments(ray_dir: Path) -> list[dict]:
    path = ray_dir / EXPERIMENTS_FILE
    return json.loads(path.read_text())["experiments"] if path.is_file() else []


def _save_experiments(ray_dir: Path, experiments: list[dict]) -> None:
    ray_dir.mkdir(parents=True, exist_ok=True)
    path = ray_dir / EXPERIMENTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"experiments": experiments}, indent=2))
    os.replace(tmp, path)


def _connect(address: str | None, num_cpus, num_gpus, progress: bool) -> bool:
    """Join a cluster or start a local instance; True when this call started Ray (and stops it)."""
    _check_address(address)
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # e.g. inside `ray job submit`
    common = dict(logging_level=logging.WARNING, log_to_driver=progress)
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    else:
        if num_cpus is not None or num_gpus is not None:
            raise StudyError("num_cpus/num_gpus size a local Ray instance; a cluster's size is set by `ray start`")
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds; say what to check
            raise StudyError(f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: {exc}. Check that "
                             f"`ray start --head` runs there, that this machine can reach it, and, with token "
                             f"authentication, that the cluster's token is here (~/.ray/auth_token or "
                             f"RAY_AUTH_TOKEN)") from exc
    return True


def _check_address(address) -> None:
    if address is not None and (not isinstance(address, str) or address.startswith("ray://") or not address):
        raise StudyError(f"address={address!r} is not allowed: give the head node's HOST:PORT (or auto). Ray Client "
                         f"(ray://) runs the driver elsewhere, but the driver writes the results into studies/: run "
                         f"sqa-search on a node of the cluster instead")


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes: Ray retries an unreachable head for a long time."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray finds the address itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise StudyError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc}); start it "
                         f"with `ray start --head --port={port}` on the head node") from None


def _default_concurrency(resources: TrialResources) -> int:
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 1) // resources.cpus) if resources.cpus else DEFAULT_MAX_CONCURRENT
    if resources.gpus:
        fits = min(fits, int(total.get("GPU", 0) // resources.gpus))
    return max(1, min(DEFAULT_MAX_CONCURRENT, fits))


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
    report: bool = True,
) -> StudyHandle:
    """Run (or resume, or extend) a study on Ray Tune until it has `trials` finished trials.

    address: a Ray cluster to join (``HOST:PORT`` of its head, or ``auto``); None starts a local
    instance sized to this machine (``num_cpus``/``num_gpus`` override the detected size), or
    joins ``$RAY_ADDRESS`` when set. cpus_per_trial / gpus_per_trial: resources of one trial
    (gpus None: one whole GPU when the trial times or trains on a GPU, else none); see
    `trial_resources`. max_concurrent: trials in flight at once (None: what fits, at most 4), so
    the sampler learns from results instead of proposing a flood of random starts. max_retries:
    how often a trial that raised is run again before it is recorded as FAIL.
    """
    space_path = None
    if not isinstance(space, SearchSpace):
        space_path = Path(space)
        space = load_space(space_path, name=name)
    elif name:
        space = replace(space, name=name)
    target = trials if trials is not None else space.study.trials
    _check_int("trials", target, 1)
    _check_int("max_retries", max_retries, 0)
    if max_concurrent is not None:
        _check_int("max_concurrent", max_concurrent, 1)
    trial_resources(space, cpus_per_trial, gpus_per_trial, cluster_gpus=0)  # argument mistakes before Ray starts
    _check_address(address)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handle = _prepare_study(space, space_path, studies_dir, storage, workers=1)
    if len(handle.study.directions) != len(_directions(space)):
        raise StudyError(f"study {space.name!r} was created with {len(handle.study.directions)} objective(s), but "
                         f"study.mode={space.study.mode} asks for {len(_directions(space))}: use another --name")
    ray_dir = (handle.directory / RAY_SUBDIR).resolve()
    experiments = _load_experiments(ray_dir)
    if finished_count(handle.study) >= target:  # nothing to run: do not start Ray
        if experiments and not experiments[-1]["finished"]:
            experiments[-1]["finished"] = True
            _save_experiments(ray_dir, experiments)
        if report:
            from .report import write_report

            write_report(handle)
        return handle
    _STUDIES[(handle.storage_url, space.name)] = handle.study
    started = _connect(address, num_cpus, num_gpus, progress)
    try:
        resources = trial_resources(space, cpus_per_trial, gpus_per_trial,
                                    cluster_gpus=ray.cluster_resources().get("GPU", 0))
        concurrency = max_concurrent or _default_concurrency(resources)
        if progress:
            print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
                  f"each trial holds {resources.cpus:g} CPU(s) and {resources.gpus:g} GPU(s); "
                  f"at most {concurrency} at once")
        cpu_timing = space.target.measured and (space.target.device == "cpu" or resources.gpus == 0)
        if cpu_timing and space.target.device != "cpu" and progress:
            print("note: trials hold no GPU, so target.device=auto times on the CPU")
        if cpu_timing and concurrency > 1 and progress:
            print(f"note: {concurrency} trials at once time on shared CPU cores, which slows their timings; for "
                  f"clean CPU timings give each trial a whole node (cpus_per_trial = its cores) or max_concurrent=1")
        period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period or "1"  # snapshot often: less to redo after a kill
        try:
            last = experiments[-1] if experiments else None
            if last and not last["finished"]:
                path = ray_dir / last["name"]
                tuner = None
                if tune.Tuner.can_restore(str(path)):
                    try:
                        tuner = tune.Tuner.restore(str(path), trainable=_make_trainable(space, resources, handle,
                                                                                        last["name"]),
                                                   resume_unfinished=True, resume_errored=False)
                    except Exception as exc:  # noqa: BLE001 - the study storage has every result: go on
                        log.warning("cannot restore the Ray experiment %s (%s): starting a new one", path, exc)
                if tuner is not None:
                    if progress:
                        print(f"resuming the interrupted Ray experiment {path}")
                    last["restored"] = last.get("restored", 0) + 1
                    _save_experiments(ray_dir, experiments)
                    _fit(tuner, handle, target, fresh=False)
                last["finished"] = True
                _save_experiments(ray_dir, experiments)
            remaining = target - finished_count(handle.study)
            if remaining > 0:
                experiment = f"run-{len(experiments) + 1:03d}"
                experiments.append({"name": experiment, "trials": remaining, "finished": False, "restored": 0,
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
                _save_experiments(ray_dir, experiments)
                tuner = _new_tuner(handle, experiment, ray_dir, remaining, resources, concurrency, max_retries,
                                   progress)
                _fit(tuner, handle, target, fresh=True)
                experiments[-1]["finished"] = True
                _save_experiments(ray_dir, experiments)
        finally:
            if period is None:
                os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
            else:
                os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period
    finally:
        if started:
            ray.shutdown()
        _STUDIES.clear()
    if report:
        from .report import write_report

        write_report(handle)
    return handle


def _fit(tuner, handle: StudyHandle, target: int, fresh: bool) -> None:
    """Run a Tuner; an interruption (Ctrl-C: Tune stops, saves and returns) is an error that says
    how to resume, and leaves the experiment to be restored."""
    grid = tuner.fit()
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    # a fresh experiment ends with the study complete unless it was stopped early
    if unfinished > 0 or (fresh and finished_count(handle.study) < target):
        raise StudyError(f"the Ray study {handle.space.name!r} was interrupted with {finished_count(handle.study)} "
                         f"of {target} trials stored in {handle.storage_url}; run the same command again to "
                         f"resume it")


def _make_trainable(space: SearchSpace, resources: TrialResources, handle: StudyHandle, experiment: str | None):
    recorded = {}
    if experiment is not None:  # trials of this experiment stored before an interruption
        for t in _ray_trials(handle.study, experiment):
            recorded[t.user_attrs[RAY_ATTR]["trial_id"]] = {"params": dict(t.params), "result": _stored_result(space, t)}
    trainable = tune.with_parameters(_trainable, space_payload=_space_payload(space), recorded=recorded)
    return tune.with_resources(trainable, resources.as_ray())


def _new_tuner(handle: StudyHandle, experiment: str, ray_dir: Path, n_trials: int, resources: TrialResources,
               concurrency: int, max_retries: int, progress: bool):
    space, study = handle.space, handle.study
    evaluated = {t.user_attrs.get("spec_key") for t in study.get_trials(deepcopy=False)
                 if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
    from .space import candidate_key

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
