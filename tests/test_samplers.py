"""The explore sampler on real Optuna studies (SQLite storage): it proposes only unevaluated valid
candidates, the most promising first, and ends cleanly when the space is exhausted."""

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from sqa_search.search.records import read_records
from sqa_search.search.samplers import (
    ExploreSampler,
    distinct_configurations,
    make_sampler,
    params_key,
    resolve_sampler,
    space_exhausted,
    unevaluated_candidates,
)
from sqa_search.search.space import params_of, space_from_dict

SPACE = {
    "name": "small",
    "model": {"d_model": 64, "n_heads": 8, "n_layers": 1},
    "target": {"seq_len": 256, "mode": "prefill"},
    "search": {"n_q_heads": [1, 2, 4, 6, 8], "n_kv_heads": [1, 2, 4, 8], "window": [None, 64],
               "variants": ["mha", "gqa", "sqa"]},
    "constraints": {"allow_reverse": False},
    "study": {"seed": 0, "trials": 12},
    "training": {"task": "lm"},
}


def _space(**study):
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in SPACE.items()}
    data["study"] = {**data["study"], **study}
    return space_from_dict(data, source="test")


def _values(params):
    """A synthetic trade-off: more heads and a longer span cost time and lower the loss."""
    span = 1.0 if params["window"] is None else 0.25
    loss = 3.0 - 0.2 * np.log2(params["n_q_heads"]) - 0.05 * np.log2(params["n_kv_heads"]) - 0.02 * span
    latency = 0.001 * params["n_q_heads"] * (0.2 + span) + 0.0001 * params["n_kv_heads"]
    return [float(loss), float(latency)]


def _study(tmp_path, space, name="s"):
    return optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}",
                               directions=["minimize", "minimize"], sampler=make_sampler(space))


def test_default_is_explore_for_small_spaces_and_tpe_for_large_ones():
    space = _space()
    assert space.study.sampler == "auto"
    assert resolve_sampler(space) == "explore"
    assert isinstance(make_sampler(space), ExploreSampler)
    assert resolve_sampler(_space(sampler="tpe")) == "tpe"
    big = space_from_dict({**SPACE, "search": {**SPACE["search"], "window": [None, *range(16, 256, 16)],
                                               "n_global": [0, 1, 2, 4]}}, source="big")
    assert len(big.candidates()) > 300
    assert resolve_sampler(big) == "tpe"


def test_never_proposes_an_evaluated_running_or_forbidden_configuration(tmp_path):
    space = _space(sampler="explore")
    study = _study(tmp_path, space)
    for spec in space.named_variants():
        study.enqueue_trial(params_of(spec))
    valid = {params_key(params_of(s)) for s in space.candidates()}
    assert len(valid) == 26  # 13 head pairs with q >= kv, full or windowed
    seen = []
    held = study.ask()  # a trial in flight (another worker): its configuration is taken too
    seen.append(params_key(held.params if held.params else space.suggest_params(held)))
    while unevaluated_candidates(study, space):
        trial = study.ask()
        params = space.suggest_params(trial)
        key = params_key(params)
        assert key in valid, f"forbidden configuration proposed: {params}"
        assert key not in seen, f"configuration proposed twice: {params}"
        seen.append(key)
        study.tell(trial, _values(params))
    assert sorted(seen) == sorted(valid)
    study.tell(held, _values(json.loads(seen[0])))
    assert space_exhausted(study, space)
    # exhausted: a proposal is a valid configuration already evaluated (reused by the engine)
    extra = study.ask()
    assert params_key(space.suggest_params(extra)) in valid
    assert distinct_configurations(read_records(study)) == 26  # the extra one is still running
    assert not study.get_trials(states=(TrialState.PRUNED, TrialState.FAIL))


def test_model_based_choice_finds_the_synthetic_front_early(tmp_path):
    """Without anchors, after the space-filling start the model goes for the front: the whole
    front of the synthetic trade-off is found well before the space is exhausted."""
    space = _space(sampler="explore")
    candidates = [params_of(s) for s in space.candidates()]
    points = np.array([_values(p) for p in candidates])
    from sqa_search.search.pareto import non_dominated_mask

    front = {params_key(p) for p, on in zip(candidates, non_dominated_mask(points, ["minimize"] * 2)) if on}
    reached = []
    for seed in range(3):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=ExploreSampler(space, seed=seed))
        found = set()
        for n in range(1, len(candidates) + 1):
            trial = study.ask()
            params = space.suggest_params(trial)
            found.add(params_key(params))
            study.tell(trial, _values(params))
            if front <= found:
                reached.append(n)
                break
    assert max(reached) < 0.75 * len(candidates), reached


def test_distinct_configurations_counts_duplicates_once(tmp_path):
    space = _space(sampler="random")
    study = _study(tmp_path, space)
    distributions = space.distributions()
    for i, spec in enumerate(space.candidates()[:3] + space.candidates()[:1]):
        attrs = {"spec_key": json.dumps(spec.to_dict(), sort_keys=True)}
        if i == 3:
            attrs["duplicate_of"] = 0
        study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], params=params_of(spec),
                                                  distributions=distributions, user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=params_of(space.candidates()[5]),
                                              distributions=distributions))
    assert distinct_configurations(read_records(study)) == 3


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_other_samplers_never_count_the_space_as_exhausted(tmp_path, sampler):
    space = _space(sampler=sampler)
    study = _study(tmp_path, space)
    distributions = space.distributions()
    for spec in space.candidates():
        study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], params=params_of(spec),
                                                  distributions=distributions))
    assert not unevaluated_candidates(study, space)
    assert not space_exhausted(study, space)


def test_single_objective_study_constrained_mode_explores_too():
    """Constrained mode optimises quality alone: the model scores by improvement over the best."""
    space = _space(sampler="explore")
    study = optuna.create_study(direction="minimize", sampler=ExploreSampler(space, seed=0))
    seen = set()
    for _ in space.candidates():
        trial = study.ask()
        params = space.suggest_params(trial)
        assert params_key(params) not in seen
        seen.add(params_key(params))
        study.tell(trial, _values(params)[0])
    assert space_exhausted(study, space)
