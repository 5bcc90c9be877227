"""The worker side of the Ray backend: one Ray trial evaluates one proposed spec on its node.

`evaluate_trial` runs the Optuna backend's own `TrialObjective` on a real `optuna.Trial` of a
throw-away in-memory study with the proposed parameters enqueued, so a trial's values, user
attributes and constraints are those the Optuna backend writes, computed by the same code. The
worker adds one attribute, ``ray`` (trial id, experiment, node, the worker's hardware
fingerprint), and reports every objective or raises: a finished trial with a missing or
non-finite objective is an error, never a silently dropped result. Workers never touch the
study's storage (the driver writes every result), so nodes on other hosts need no access to it.
"""

from __future__ import annotations

import json
import math
import socket

import optuna
import ray
from ray import tune

from ..common import resolve_device_name
from .engine import TrialFailed, TrialObjective
from .records import DUPLICATE_OF, RAY, anchor_attrs
from .space import SEARCH_PARAMS, SearchSpace, space_from_dict

__all__ = ["evaluate_trial", "ray_result", "metric_names", "directions", "is_number", "space_payload",
           "space_from_payload", "RAY_ATTR", "PARAM_NAMES", "STATE_KEY", "RECORD_KEY", "CONSTRAINTS_KEY",
           "ALREADY_RECORDED", "ANCHOR_KEY", "REUSE_KEY", "PROMOTE_KEY", "trainable"]

PARAM_NAMES = SEARCH_PARAMS
# The one user attribute a Ray trial has that an Optuna-backend trial has not.
RAY_ATTR = RAY

# keys of the result a trial reports to Tune (besides the objectives, named as in the space)
STATE_KEY = "sqa_state"
RECORD_KEY = "sqa_record"
CONSTRAINTS_KEY = "sqa_constraints"
ALREADY_RECORDED = "recorded"
# keys the searcher adds to a trial's config (besides the search parameters)
ANCHOR_KEY = "sqa_anchor"
REUSE_KEY = "sqa_reuse"
PROMOTE_KEY = "sqa_promotion"  # a halving promotion's attributes (records.promotion_attrs)


def metric_names(space: SearchSpace) -> list[str]:
    return [o.name for o in space.objectives_in_use()]


def directions(space: SearchSpace) -> list[str]:
    return [o.direction for o in space.objectives_in_use()]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def space_payload(space: SearchSpace) -> dict:
    return {"data": space.to_dict(), "source": space.source, "name": space.name}


def space_from_payload(payload: dict) -> SearchSpace:
    return space_from_dict(payload["data"], source=payload["source"], name=payload["name"])


def evaluate_trial(space: SearchSpace, params: dict, *, anchor: str | None = None, reuse: dict | None = None,
                   promotion: dict | None = None, cache_dir=None) -> dict:
    """Evaluate one proposed spec with the Optuna backend's `Objective`, on this machine.

    Returns the trial as a JSON-safe record (state, values, params, user_attrs, system_attrs,
    intermediate values, start and end). `reuse` is an earlier trial of the same spec
    ({"number", "values", "user_attrs"}): its result is reused as the Optuna backend reuses it.
    `promotion`: a halving promotion's attributes (`records.promotion_attrs`), which carry all it
    needs of the trial it extends.
    Deterministic failures come back as a FAIL record with ``fail_reason``; anything else raises.
    """
    params = {name: params[name] for name in PARAM_NAMES}
    local = optuna.create_study(directions=directions(space), sampler=optuna.samplers.RandomSampler(),
                                pruner=optuna.pruners.NopPruner())
    distributions = space.distributions()
    if reuse is not None:  # the earlier trial, so that the Objective finds and reuses it
        local.add_trial(optuna.trial.create_trial(
            values=reuse["values"], params=params, distributions=distributions,
            user_attrs=reuse["user_attrs"]))
    attrs = {**(anchor_attrs(anchor) if anchor else {}), **(promotion or {})}
    local.enqueue_trial(params, user_attrs=attrs or None)
    objective = TrialObjective(space, progress=False, cache_dir=cache_dir)
    local.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
    frozen = local.trials[-1]
    if frozen.params != params:
        raise RuntimeError(f"the objective evaluated {frozen.params}, not the proposed {params}")
    user_attrs = dict(frozen.user_attrs)
    if reuse is not None and DUPLICATE_OF in user_attrs:
        user_attrs[DUPLICATE_OF] = reuse["number"]  # the study's trial number, not the local one
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
    names = metric_names(space)
    state = record["state"]
    if state not in ("COMPLETE", "FAIL", "PRUNED"):
        raise RuntimeError(f"trial ended in state {state}: expected COMPLETE, FAIL or PRUNED")
    if state == "COMPLETE":
        values = record.get("values") or []
        if len(values) != len(names):
            raise RuntimeError(f"trial reported {len(values)} objective value(s) {values} for the "
                               f"{len(names)} objectives {names}")
        bad = [n for n, v in zip(names, values) if not is_number(v)]
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
    from ..speed.hardware import Fingerprint, fingerprint  # torch: only on a worker, when a trial runs

    t = space.target
    device = resolve_device_name(t.device) if t.measured else str(space.training.get("device", "cpu"))
    try:
        fp = fingerprint(device, t.dtype, t.threads)
        fp_id, fp_data = fp.id, fp.to_dict()
    except Exception as exc:  # noqa: BLE001 - an unknown device must not lose the trial's result
        fp_id, fp_data = Fingerprint().id, {"error": f"{type(exc).__name__}: {exc}"}
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "fingerprint_id": fp_id, "fingerprint": fp_data}


def trainable(config: dict, space_payload: dict, recorded: dict):
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
    space = space_from_payload(space_payload)
    record = evaluate_trial(space, params, anchor=config.get(ANCHOR_KEY), reuse=config.get(REUSE_KEY),
                            promotion=config.get(PROMOTE_KEY))
    record["user_attrs"][RAY_ATTR] = {"trial_id": trial_id, "experiment": context.get_experiment_name(),
                                      **_worker_identity(space)}
    tune.report(ray_result(space, record))
