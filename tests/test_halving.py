"""Successive halving over seeds (`study.halving`): its settings, the planner on synthetic studies
(trials written straight into Optuna), and real studies on both backends (real SQLite storage,
real training of 3 steps, a real local Ray), no mocks.

The real studies time nothing: their latency is predicted for a hardware profile, so it is the
same on every run, and training runs one thread, so a seed's loss is too. Each configuration's
result then depends on nothing but its seeds, which is what lets the Ray test compare its values
with the Optuna backend's.
"""

import argparse
import json
import math
import statistics

import optuna
import pytest
from optuna.trial import TrialState

from sqa_search.search.budget import HalvingSettings
from sqa_search.search.engine import StudyError, finished_count, queue_promotions, run_study
from sqa_search.search.halving import (check_halving_budget, halving_summary, pending_promotions, plan_promotions,
                                       pooled_seed_sd, runs_spent)
from sqa_search.search.records import current_records, read_records, spec_attrs
from sqa_search.search.recovery import recover_interrupted, waiting_promotions
from sqa_search.search.report import pareto_table
from sqa_search.search.space import SpaceError, load_space, params_of, space_from_dict, train_config_from
from sqa_search.search.studies import StudyHandle
from study_helpers import merged, space_file

TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"hardware": "h100", "seq_len": 64, "mode": "prefill"},  # predicted: no timing noise
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa", "xsqa"]},
    "constraints": {"allow_reverse": False},  # 6 valid configurations
    "study": {"sampler": "explore", "seed": 0, "trials": 6,
              # tolerance: every tiny model's loss is within 1 % of the best, so many are contenders
              "halving": {"budget": 12, "max_seeds": 4, "tolerance": 0.01}},
    "training": {"task": "lm", "budget_steps": 3, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "threads": 1},
}
DIRECTIONS = ["minimize", "minimize"]


def _with_halving(halving, **changes) -> dict:
    data = merged(TINY, **changes)
    data["study"]["halving"] = halving
    return data


# ----- settings ---------------------------------------------------------------------------------
def _halving_error(halving, **changes) -> str:
    with pytest.raises(SpaceError) as info:
        space_from_dict(_with_halving(halving, **changes), source="hv.yaml", name="hv")
    return str(info.value)


def test_halving_settings_are_read_with_their_defaults_and_absent_means_off():
    space = space_from_dict(_with_halving({"budget": 6}), name="hv")
    assert space.study.halving == HalvingSettings(budget=6, max_seeds=4, eta=2, tolerance=0.0)
    full = space_from_dict(_with_halving({"budget": 30, "max_seeds": 8, "eta": 3, "tolerance": 0.05},
                                         training={"replicates": 2}), name="hv")
    assert full.study.halving == HalvingSettings(budget=30, max_seeds=8, eta=3, tolerance=0.05)
    assert space_from_dict(_with_halving(None), name="hv").study.halving is None
    # it survives the study folder's copy of the space (space.yaml is written from to_dict)
    assert space_from_dict(full.to_dict(), name="hv").study.halving == full.study.halving


def test_halving_settings_errors_name_the_field_the_value_and_what_is_allowed():
    # the first runs alone: 6 trials x 1 replicate; 6 x 2 with two replicates
    message = _halving_error({"budget": 5})
    assert "hv.yaml: study.halving.budget=5 is not allowed" in message
    assert "study.trials x training.replicates = 6 x 1 = 6 training runs" in message
    message = _halving_error({"budget": 11}, training={"replicates": 2})
    assert "study.halving.budget=11 is not allowed" in message and "6 x 2 = 12" in message
    # a promotion adds seeds: the top rung must hold more than the first runs
    for replicates, max_seeds in ((1, 1), (2, 2), (3, 2)):
        message = _halving_error({"budget": 50, "max_seeds": max_seeds}, training={"replicates": replicates})
        assert f"study.halving.max_seeds={max_seeds} is not allowed" in message
        assert f"must be more than training.replicates ({replicates})" in message
    # the default max_seeds (4) is checked too
    assert "study.halving.max_seeds=4 is not allowed" in _halving_error({"budget": 50}, training={"replicates": 4})
    for eta in (1, 0, 2.5, True):
        message = _halving_error({"budget": 12, "eta": eta})
        assert f"study.halving.eta={eta!r} is not allowed: must be an integer >= 2" in message
    for tolerance in (1.0, 1, -0.1, float("nan"), True, "0.1"):
        message = _halving_error({"budget": 12, "tolerance": tolerance})
        assert f"study.halving.tolerance={tolerance!r} is not allowed" in message
        assert "[0, 1)" in message
    message = _halving_error({"budget": 12, "etta": 3})
    assert "unknown key(s) ['etta'] in study.halving" in message
    assert "allowed are ['budget', 'eta', 'max_seeds', 'tolerance']" in message
    assert "study.halving.budget=None is not allowed: is required" in _halving_error({"max_seeds": 4})
    for budget in ("12", 12.0, True):
        assert f"study.halving.budget={budget!r} is not allowed" in _halving_error({"budget": budget})


def test_a_run_whose_trials_the_budget_cannot_pay_for_is_refused_before_anything_is_written(tmp_path):
    from sqa_search.search.ray_backend import run_ray_study
    import ray

    studies = tmp_path / "studies"
    path = space_file(tmp_path, TINY, "short")  # budget 12, 1 replicate
    with pytest.raises(StudyError, match=r"trials=13 is not allowed with study\.halving\.budget=12: .* "
                                         r"13 x 1 = 13 training runs"):
        run_study(path, trials=13, studies_dir=studies, progress=False)
    with pytest.raises(StudyError, match=r"trials=13 is not allowed with study\.halving\.budget=12"):
        run_ray_study(path, trials=13, studies_dir=studies, num_cpus=2, progress=False)
    assert not ray.is_initialized()
    two = space_file(tmp_path, TINY, "short2", training={"replicates": 2},
                     study={"trials": 6, "halving": {"budget": 12}})
    with pytest.raises(StudyError, match=r"trials=7 .* 7 x 2 = 14 training runs"):
        run_study(two, trials=7, studies_dir=studies, progress=False)
    assert not studies.exists(), "nothing was written: no study folder"
    check_halving_budget(load_space(path), 12)  # exactly the first runs: allowed
    check_halving_budget(space_from_dict(_with_halving(None)), 1000)  # no halving: no limit


# ----- the planner on synthetic studies -----------------------------------------------------------
def _space(*, trials=6, budget=100, eta=2, max_seeds=4, tolerance=0.0, **changes):
    halving = {"budget": budget, "max_seeds": max_seeds, "eta": eta, "tolerance": tolerance}
    return space_from_dict(_with_halving(halving, study={"trials": trials}, **changes), source="synthetic",
                           name="synthetic")


def _se(values):
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _trial(study, space, heads, values, latency, *, seeds=None, promotion=None, state=TrialState.COMPLETE,
           fail_reason=None, runs=None, duplicate_of=None) -> int:
    """Write one trial as the engine stores it; its number. ``heads``: (n_q_heads, n_kv_heads);
    ``values``: the loss of each seed; ``promotion``: (earlier trial, rung, new seeds)."""
    spec = space.make_spec(*heads, None, 0)
    first = int(space.training.get("seed", 0))
    attrs = {**spec_attrs(spec, space), "latency_s": latency, "latency_source": "predicted for h100-sxm (test)",
             "timing": [{"seq_len": 64, "predicted_s": latency, "bound": None}]}
    if values:
        attrs.update(quality=statistics.fmean(values), quality_se=_se(values), quality_values=list(values),
                     replicate_seeds=list(seeds) if seeds is not None else list(range(first, first + len(values))))
    if promotion is not None:
        earlier, rung, new_seeds = promotion
        attrs["promotion"] = {"from": earlier, "rung": rung, "new_seeds": list(new_seeds), "earlier": {}}
    attrs["training_runs"] = runs if runs is not None else (len(promotion[2]) if promotion else len(values))
    if fail_reason is not None:
        attrs["fail_reason"] = fail_reason
    if duplicate_of is not None:
        attrs["duplicate_of"] = duplicate_of
    complete = state == TrialState.COMPLETE
    study.add_trial(optuna.trial.create_trial(
        state=state, values=[statistics.fmean(values), latency] if complete else None, params=params_of(spec),
        distributions=space.distributions(), user_attrs=attrs))
    return study.trials[-1].number


def _study(space, rows: dict) -> tuple[optuna.Study, dict]:
    """An in-memory study with one one-seed trial per row {heads: (loss, latency)}; their numbers."""
    study = optuna.create_study(directions=DIRECTIONS)
    return study, {heads: _trial(study, space, heads, [loss], latency) for heads, (loss, latency) in rows.items()}


def _planned(plan) -> list[int]:
    return [p.earlier.number for p in plan]


FRONT = {(4, 4): (5.00, 4.0), (4, 2): (5.10, 3.0), (4, 1): (5.20, 2.0), (2, 2): (5.30, 1.0)}  # (loss, latency)
BEHIND = {(2, 1): (5.40, 3.5),  # dominated by 4q/2kv
          (1, 1): (5.05, 4.5)}  # dominated by 4q/4kv


def test_a_rung_promotes_at_most_one_in_eta_of_its_candidates_contenders_only_best_first():
    space = _space()
    study, n = _study(space, {**FRONT, **BEHIND})
    records = read_records(study)
    plan = plan_promotions(records, space, space.study.halving)
    # ceil(6 / 2) = 3 of the 4 front points, by quality (all of non-dominated rank 0)
    assert _planned(plan) == [n[4, 4], n[4, 2], n[4, 1]]
    assert all(p.rung == 1 and p.new_seeds == (1,) and p.cost == 1 for p in plan)
    assert plan[0].params == params_of(space.make_spec(4, 4, None, 0))
    attrs = plan[0].attrs()["promotion"]
    assert (attrs["from"], attrs["rung"], attrs["new_seeds"]) == (n[4, 4], 1, [1])
    assert attrs["earlier"]["quality_values"] == [5.0] and attrs["earlier"]["latency_s"] == 4.0
    # eta 3: ceil(6 / 3) = 2
    eta3 = _space(eta=3)
    assert _planned(plan_promotions(records, eta3, eta3.study.halving)) == [n[4, 4], n[4, 2]]
    # while promotions are queued or running nothing new is planned: a rung is decided on finished results
    assert plan_promotions(records, space, space.study.halving, pending={n[4, 4]: 1}) == []
    # one candidate dominating all others, before any seed noise is known: the share (3) goes by rank
    study, n = _study(space, {(2, 2): (5.0, 1.0), **{h: (5.5, 2.0) for h in [(4, 4), (4, 2), (4, 1), (2, 1), (1, 1)]}})
    plan = _planned(plan_promotions(read_records(study), space, space.study.halving))
    assert len(plan) == 3 and plan[0] == n[2, 2]
    # once the seed noise is known (0.014), nothing dominated beyond it is promoted: only the leader,
    # to its next rung
    study = optuna.create_study(directions=DIRECTIONS)
    lead = _trial(study, space, (2, 2), [4.99, 5.01], 1.0)
    for h in [(4, 4), (4, 2), (4, 1), (2, 1), (1, 1)]:
        _trial(study, space, h, [5.5], 2.0)
    plan = plan_promotions(read_records(study), space, space.study.halving)
    assert [(p.earlier.number, p.rung) for p in plan] == [(lead, 2)]


def test_rank_orders_the_contenders_before_quality():
    # 4q/2kv is a contender only by tolerance (4q/4kv dominates it) and has a better loss than the
    # front point 4q/1kv; the share of 2 goes to the two front points
    space = _space(trials=4, tolerance=0.01)
    study, n = _study(space, {(4, 4): (5.00, 1.0), (4, 1): (5.30, 0.5), (4, 2): (5.01, 2.0), (2, 2): (5.6, 3.0)})
    assert _planned(plan_promotions(read_records(study), space, space.study.halving)) == [n[4, 4], n[4, 1]]


def test_nothing_is_planned_beyond_the_budget():
    rows = {**FRONT, **BEHIND}
    for budget, expected in ((6, []), (7, [(4, 4)]), (8, [(4, 4), (4, 2)]), (100, [(4, 4), (4, 2), (4, 1)])):
        space = _space(budget=budget)
        study, n = _study(space, rows)
        records = read_records(study)
        plan = plan_promotions(records, space, space.study.halving)
        assert _planned(plan) == [n[h] for h in expected], budget
        assert runs_spent(records) + sum(p.cost for p in plan) <= budget
    # a rung-1 promotion adds two seeds: one run left cannot pay for it, two can
    for budget, affordable in ((4, False), (5, True)):
        space = _space(trials=2, budget=budget)
        study = optuna.create_study(directions=DIRECTIONS)
        first = _trial(study, space, (4, 4), [5.0], 1.0)
        promoted = _trial(study, space, (4, 4), [5.0, 5.02], 1.0, promotion=(first, 1, [1]))
        _trial(study, space, (1, 1), [5.5], 2.0)
        records = read_records(study)
        assert runs_spent(records) == 3
        plan = plan_promotions(records, space, space.study.halving)
        if affordable:
            assert _planned(plan) == [promoted] and plan[0].new_seeds == (2, 3) and plan[0].rung == 2
        else:
            assert plan == []


def test_a_candidate_whose_promotion_failed_is_not_promoted_again_but_an_interrupted_one_is():
    space = _space(trials=2)
    rows = {(4, 4): (5.0, 2.0), (4, 2): (5.1, 1.0)}  # both on the front; the share is ceil(2 / 2) = 1
    study, n = _study(space, rows)
    assert _planned(plan_promotions(read_records(study), space, space.study.halving)) == [n[4, 4]]
    _trial(study, space, (4, 4), [], 2.0, promotion=(n[4, 4], 1, [1]), state=TrialState.FAIL,
           fail_reason="training diverged: loss nan at step 2 (seed 1)", runs=1)
    records = read_records(study)
    assert runs_spent(records) == 3  # the failed seed was trained: it cost a run
    assert _planned(plan_promotions(records, space, space.study.halving)) == [n[4, 2]]
    # an interrupted promotion is no result: the candidate may be promoted again
    study, n = _study(space, rows)
    _trial(study, space, (4, 4), [], 2.0, promotion=(n[4, 4], 1, [1]), state=TrialState.FAIL,
           fail_reason="interrupted (worker process 123 died)", runs=0)
    assert _planned(plan_promotions(read_records(study), space, space.study.halving)) == [n[4, 4]]


def test_a_candidate_with_a_pending_promotion_is_not_planned_twice(tmp_path):
    space = _space()
    study, n = _study(space, {**FRONT, **BEHIND})
    records = read_records(study)
    # queued: nothing is planned until it has run (a rung is decided on finished results)
    assert plan_promotions(records, space, space.study.halving, pending={n[4, 4]: 1}) == []
    # the engine's queue: planning again while promotions wait never queues a second one for a trial
    handle = StudyHandle(study, space, tmp_path, "in-memory")
    assert queue_promotions(handle, progress=False) == 3
    assert waiting_promotions(study)
    assert pending_promotions(study) == {n[4, 4]: 1, n[4, 2]: 1, n[4, 1]: 1}
    assert queue_promotions(handle, progress=False) == 0  # planning again while they wait queues nothing
    waiting = [t.user_attrs["promotion"]["from"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert len(waiting) == len(set(waiting))
    assert set(waiting) <= {n[h] for h in FRONT}  # the dominated ones never


def test_queued_promotions_count_against_the_budget(tmp_path):
    """A promotion queued or running (another worker's, another host's) will spend its runs: a plan
    made meanwhile may use only what is left after them."""
    space = _space(budget=7)  # 6 first runs: one run left
    study, n = _study(space, {**FRONT, **BEHIND})
    handle = StudyHandle(study, space, tmp_path, "in-memory")
    for _ in range(5):
        if not queue_promotions(handle, progress=False):
            break
    waiting = [t.user_attrs["promotion"] for t in study.get_trials(states=(TrialState.WAITING,))]
    committed = runs_spent(read_records(study)) + sum(len(p["new_seeds"]) for p in waiting)
    assert committed <= 7, f"{len(waiting)} promotions queued with one run left of the budget"


def test_new_seeds_are_the_smallest_ones_from_training_seed_the_candidate_lacks():
    space = _space(trials=2, training={"seed": 5})
    study = optuna.create_study(directions=DIRECTIONS)
    first = _trial(study, space, (4, 4), [5.0], 1.0, seeds=[5])
    gap = _trial(study, space, (4, 4), [5.0, 5.01], 1.0, seeds=[5, 7], promotion=(first, 1, [7]))
    _trial(study, space, (1, 1), [5.5], 2.0, seeds=[5])
    plan = plan_promotions(read_records(study), space, space.study.halving)
    assert [(p.earlier.number, p.new_seeds, p.rung) for p in plan] == [(gap, (6, 8), 2)]
    study, n = _study(space, {(4, 4): (5.0, 1.0), (1, 1): (5.5, 2.0)})
    assert [p.new_seeds for p in plan_promotions(read_records(study), space, space.study.halving)] == [(6,)]
    # two replicates: rungs of 2 and 4 seeds
    two = _space(trials=2, training={"seed": 5, "replicates": 2})
    study = optuna.create_study(directions=DIRECTIONS)
    a = _trial(study, two, (4, 4), [5.0, 5.02], 1.0)
    _trial(study, two, (1, 1), [5.5, 5.52], 2.0)
    assert [(p.earlier.number, p.new_seeds, p.rung) for p in plan_promotions(read_records(study), two,
                                                                              two.study.halving)] == [(a, (7, 8), 1)]


def test_once_the_seed_sd_is_known_a_one_seed_candidate_within_noise_of_the_front_is_a_contender():
    space = _space(trials=3)

    def plan_with(spread: float):
        study = optuna.create_study(directions=DIRECTIONS)
        a = _trial(study, space, (4, 4), [5.0 - spread, 5.0 + spread] * 2, 1.0)  # 4 seeds, mean 5.00
        b = _trial(study, space, (4, 2), [5.03], 1.0)  # as fast, 0.03 worse: one seed
        c = _trial(study, space, (4, 1), [6.0], 1.0)  # as fast, far worse
        records = read_records(study)
        sd = pooled_seed_sd(current_records(records))
        return {"a": a, "b": b, "c": c}, sd, _planned(plan_promotions(records, space, space.study.halving))

    # seeds move the loss by ~0.058: 0.03 worse on one seed is within noise of the front
    n, sd, planned = plan_with(0.05)
    assert sd == pytest.approx(statistics.stdev([4.95, 5.05] * 2))
    assert planned == [n["b"]]
    # the same loss when seeds do not move it at all: dominated, not promoted
    n, sd, planned = plan_with(0.0)
    assert sd == 0.0 and planned == []
    # before any candidate has two seeds, there is no pooled sd
    study, _ = _study(space, {(4, 4): (5.0, 1.0), (4, 2): (5.03, 1.0)})
    assert pooled_seed_sd(current_records(read_records(study))) is None


def test_tolerance_makes_a_candidate_within_that_fraction_of_the_best_quality_a_contender():
    rows = {(4, 4): (5.00, 1.0), (4, 2): (5.04, 2.0), (4, 1): (5.5, 3.0), (2, 1): (5.6, 3.5)}  # 4q/4kv dominates
    for tolerance, expected in ((0.0, [(4, 4)]), (0.005, [(4, 4)]), (0.01, [(4, 4), (4, 2)])):
        space = _space(trials=5, tolerance=tolerance)
        study, n = _study(space, rows)
        # a dominated candidate with two seeds: the study knows its seed noise (sd 0.007), so 4q/2kv's
        # 0.04 is beyond it; the rung's share is ceil(5 / 2) - 1 promoted = 2
        _trial(study, space, (1, 1), [5.8, 5.81], 4.0)
        planned = _planned(plan_promotions(read_records(study), space, space.study.halving))
        assert planned == [n[h] for h in expected], tolerance


def test_the_front_uses_a_promotion_even_when_a_duplicate_of_its_configuration_came_first(tmp_path):
    """A sampler may propose a configuration again (a duplicate reuses the first result) before
    that configuration is promoted: the table and the front must show the promoted result."""
    space = _space(trials=3)
    study = optuna.create_study(directions=DIRECTIONS)
    first = _trial(study, space, (1, 1), [5.10], 1.0)
    _trial(study, space, (4, 4), [5.00], 4.0)
    duplicate = _trial(study, space, (1, 1), [5.10], 1.0, runs=0, duplicate_of=first)
    promoted = _trial(study, space, (1, 1), [5.10, 5.06], 1.0, promotion=(first, 1, [1]))
    records = read_records(study)
    assert runs_spent(records) == 3  # the duplicate trained nothing
    [current] = [r for r in current_records(records) if r.label == "xSQA 1q/1kv"]
    assert current.number == promoted
    frame, front, hv = pareto_table(StudyHandle(study, space, tmp_path, "in-memory"))
    by_trial = frame.set_index("trial").current
    assert not by_trial[first] and not by_trial[duplicate] and by_trial[promoted]
    row = front[front.label == "xSQA 1q/1kv"]
    assert list(row.trial) == [promoted] and list(row.quality_n) == [2], \
        f"the front shows trial {list(row.trial)} (the duplicate is {duplicate}), not the promotion {promoted}"


# ----- the Optuna backend, end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def halving_study(tmp_path_factory):
    """The tiny space run once on the Optuna backend: 6 trials, a budget of 12 training runs."""
    folder = tmp_path_factory.mktemp("halving")
    path = space_file(folder, TINY, "halv")
    handle = run_study(path, studies_dir=folder / "studies", progress=False)
    return path, folder / "studies", handle


def _promoted(records):
    return [r for r in records if r.promotion]


@pytest.mark.slow
def test_optuna_backend_spends_the_budget_on_promotions_that_extend_earlier_trials(halving_study):
    path, studies, handle = halving_study
    study, space = handle.study, handle.space
    settings = space.study.halving
    records = read_records(study)
    spent = runs_spent(records)
    # the whole budget, or stopped with nothing left to promote; never more
    assert spent <= settings.budget
    assert spent == settings.budget or plan_promotions(records, space, settings) == []
    assert finished_count(study) == 6  # promotions are not trials of the target
    assert all(r.state == "COMPLETE" for r in records)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    first = [r for r in records if not r.promotion]
    promoted = _promoted(records)
    assert len(first) == 6 and all(r.training_runs == 1 and r.replicate_seeds == [0] for r in first)
    assert promoted, "the budget leaves 6 runs for promotions"
    assert spent == 6 + sum(len(r.promotion["new_seeds"]) for r in promoted)

    by_number = {r.number: r for r in records}
    for r in promoted:
        earlier = by_number[r.promotion["from"]]
        new = r.promotion["new_seeds"]
        assert earlier.number < r.number and earlier.complete
        assert r.spec_key == earlier.spec_key and r.params == earlier.params
        assert r.promotion["rung"] == earlier.rung + 1 and len(r.quality_values) == 2 ** r.rung
        # the smallest seeds it lacks, from training.seed (0)
        assert new == [s for s in range(100) if s not in earlier.replicate_seeds][:len(new)]
        assert r.replicate_seeds == earlier.replicate_seeds + new
        assert r.quality_values[:len(earlier.quality_values)] == earlier.quality_values
        assert r.quality == pytest.approx(statistics.fmean(r.quality_values), rel=1e-12)
        assert r.quality_se == pytest.approx(statistics.stdev(r.quality_values) / math.sqrt(len(r.quality_values)),
                                             rel=1e-9)
        assert list(r.values) == [r.quality, r.latency_s]
        # its speed is the earlier trial's, not measured or predicted again
        assert r.latency_s == earlier.latency_s and r.timing_rows == earlier.timing_rows
        assert r.latency_source == earlier.latency_source
        assert r.training_runs == len(new)
        assert r.train["seeds"] == r.replicate_seeds and r.train["replicates"] == len(r.quality_values)
        assert r.train["val_loss"] == pytest.approx(r.quality, rel=1e-9)

    # a new seed's loss is that seed's training run: train it again and compare
    from sqa_search.quality.replicates import train_replicates

    sample = promoted[0]
    again = train_replicates(sample.spec, dict(n_layers=space.model.n_layers, d_ff=space.model.d_ff),
                             train_config_from(space.training), sample.promotion["new_seeds"], progress=False)
    assert again.values == sample.quality_values[-len(sample.promotion["new_seeds"]):]

    # each configuration's current result: the trial with the most seeds
    current = current_records(records)
    assert len(current) == len({r.spec_key for r in records}) == 6
    for c in current:
        same = [r for r in records if r.spec_key == c.spec_key]
        assert len(c.quality_values) == max(len(r.quality_values) for r in same)
        assert (c.promotion is not None) == (len(same) > 1)
    assert halving_summary(records, space).startswith(f"successive halving over seeds: {spent} of 12 training runs")


@pytest.mark.slow
def test_the_front_and_show_use_the_promoted_trials_and_the_same_command_again_does_nothing(halving_study, tmp_path,
                                                                                            capsys):
    path, studies, handle = halving_study
    records = read_records(handle.study)
    current = {r.number: r for r in current_records(records)}
    frame, front, hv = pareto_table(handle)
    assert set(frame.trial[frame.current.astype(bool)]) == set(current)
    assert not front.empty and set(front.trial) <= set(current)
    for row in front.itertuples():
        assert row.quality == current[row.trial].quality and row.quality_n == len(current[row.trial].quality_values)
    # the fastest configuration (predicted: 1 query head) is on the front with its promoted result
    # (training is deterministic: in this study it is promoted at rung 0)
    assert any(current[t].promotion for t in front.trial)

    from sqa_search.cli.show import run as show

    assert show(argparse.Namespace(study=str(handle.directory), out=str(tmp_path / "shown"), all=False)) == 0
    out = capsys.readouterr().out
    assert f"successive halving over seeds: {runs_spent(records)} of 12 training runs spent" in out
    for row in front.itertuples():
        n = len(current[row.trial].quality_values)
        line = next(ln for ln in out.splitlines() if row.label in ln and "seed" in ln)
        # its own SE, or the pooled seed sd where that is larger (halving.quality_noise); never none
        assert "no SE" not in line
        assert (f"(SE, {n} seeds)" in line or f"(pooled sd/√n, {n} seeds)" in line) if n > 1 else "1 seed" in line

    # resume: nothing to do, nothing recomputed
    before = [(t.number, t.state, t.datetime_complete) for t in handle.study.trials]
    again = run_study(path, studies_dir=studies, progress=False)
    assert [(t.number, t.state, t.datetime_complete) for t in again.study.trials] == before
    assert runs_spent(read_records(again.study)) == runs_spent(records)


@pytest.fixture(scope="module")
def grown_study(tmp_path_factory):
    """A study run with a budget of 7 (the first 6 runs and one promotion), run again as it was,
    then with a budget of 12 (the `study` section is not part of the space's fingerprint)."""
    folder = tmp_path_factory.mktemp("grow")
    studies = folder / "studies"
    small = space_file(folder, TINY, "grow", study={"halving": {"budget": 7, "max_seeds": 4, "tolerance": 0.01}})
    first = run_study(small, studies_dir=studies, progress=False)
    after_small = [(t.number, t.datetime_complete) for t in first.study.trials]
    again = run_study(small, studies_dir=studies, progress=False)
    after_again = [(t.number, t.datetime_complete) for t in again.study.trials]
    larger = space_file(folder, TINY, "grow")  # the same file with a budget of 12
    grown = run_study(larger, studies_dir=studies, progress=False)
    return {"after_small": after_small, "after_again": after_again, "handle": grown}


@pytest.mark.slow
def test_a_larger_budget_promotes_further_and_the_same_budget_again_does_nothing(grown_study):
    after_small = grown_study["after_small"]
    # budget 7: the 6 first runs and exactly one promotion (the budget binds)
    assert len(after_small) == 7
    assert grown_study["after_again"] == after_small
    handle = grown_study["handle"]
    records = read_records(handle.study)
    assert runs_spent([r for r in records if r.number < 7]) == 7
    kept = {t.number: t.datetime_complete for t in handle.study.trials}
    assert all(kept[number] == when for number, when in after_small)
    spent = runs_spent(records)
    assert 7 < spent <= 12
    assert spent == 12 or plan_promotions(records, handle.space, handle.space.study.halving) == []
    assert all(r.promotion for r in records if r.number >= 7)
    assert finished_count(handle.study) == 6


@pytest.mark.slow
def test_show_reports_the_budget_the_study_last_ran_with(grown_study, tmp_path, capsys):
    handle = grown_study["handle"]
    spent = runs_spent(read_records(handle.study))
    from sqa_search.cli.show import run as show

    assert show(argparse.Namespace(study=str(handle.directory), out=str(tmp_path / "shown"), all=False)) == 0
    out = capsys.readouterr().out
    assert f"successive halving over seeds: {spent} of 12 training runs spent" in out


@pytest.mark.slow
def test_more_trials_never_push_a_study_past_its_halving_budget(tmp_path):
    """--trials may differ from the file: with the budget already spent on promotions, a larger
    trial count must not add first runs beyond it (refused, or kept within the budget)."""
    studies = tmp_path / "studies"
    path = space_file(tmp_path, TINY, "full", study={"trials": 3, "halving": {"budget": 4, "tolerance": 0.01}})
    handle = run_study(path, studies_dir=studies, progress=False)
    assert runs_spent(read_records(handle.study)) == 4  # 3 first runs and one promotion
    try:
        more = run_study(path, trials=4, studies_dir=studies, progress=False)
    except StudyError:
        return
    assert runs_spent(read_records(more.study)) <= 4


# ----- faults ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_interrupted_promotion_runs_again_as_a_promotion_not_as_a_fresh_trial(tmp_path):
    studies = tmp_path / "studies"
    path = space_file(tmp_path, TINY, "fault", study={"trials": 3, "halving": {"budget": 3}})  # first runs only
    handle = run_study(path, studies_dir=studies, progress=False)
    assert runs_spent(read_records(handle.study)) == 3 and not _promoted(read_records(handle.study))
    path = space_file(tmp_path, TINY, "fault", study={"trials": 3, "halving": {"budget": 5, "tolerance": 0.01}})
    study = handle.study
    queued = queue_promotions(StudyHandle(study, load_space(path), handle.directory, handle.storage_url), False)
    assert queued == 2  # ceil(3 / 2) of the 3 named variants, all within 1 % of the best loss
    victim, other = study.get_trials(states=(TrialState.WAITING,))
    # a worker took it and was stopped mid-training
    storage = study._storage
    assert storage.set_trial_state_values(victim._trial_id, state=TrialState.RUNNING)
    storage.set_trial_user_attr(victim._trial_id, "fail_reason", "interrupted (test)")
    storage.set_trial_state_values(victim._trial_id, state=TrialState.FAIL)

    assert recover_interrupted(study, requeue_failed=True) == 1
    [rerun] = [t for t in study.get_trials(states=(TrialState.WAITING,)) if t.number != other.number]
    assert rerun.user_attrs["retry_of"] == victim.number
    assert rerun.user_attrs["promotion"] == victim.user_attrs["promotion"]
    assert rerun.params == victim.params
    assert set(pending_promotions(study)) == {victim.user_attrs["promotion"]["from"],
                                              other.user_attrs["promotion"]["from"]}

    done = run_study(path, studies_dir=studies, progress=False).study
    records = read_records(done)
    assert finished_count(done) == 3  # neither the interrupted promotion nor its re-run is a trial
    assert [r.number for r in records if not r.promotion] == [0, 1, 2]
    ran = {r.number: r for r in records}
    assert ran[rerun.number].state == "COMPLETE" and ran[rerun.number].promotion == victim.user_attrs["promotion"]
    assert ran[rerun.number].replicate_seeds == [0, 1] and len(ran[rerun.number].quality_values) == 2
    assert ran[other.number].state == "COMPLETE"
    assert ran[victim.number].state == "FAIL" and ran[victim.number].training_runs == 0
    # one result per promotion: the interrupted one was not planned a second time beside its re-run
    complete = [(r.promotion["from"], r.promotion["rung"]) for r in records if r.promotion and r.complete]
    assert len(complete) == len(set(complete))
    space = load_space(path)
    spent = runs_spent(records)
    assert spent <= 5 and (spent == 5 or plan_promotions(records, space, space.study.halving) == [])
    assert not done.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


# ----- Ray ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_backend_runs_the_same_promotions_with_the_same_results(tmp_path, halving_study):
    import ray

    from sqa_search.search.ray_backend import RAY_ATTR, run_ray_study

    path = space_file(tmp_path, TINY, "halvray")
    studies = tmp_path / "studies"
    handle = run_ray_study(path, studies_dir=studies, num_cpus=2, max_concurrent=2, progress=False)
    assert not ray.is_initialized()
    study, space = handle.study, handle.space
    records = read_records(study)
    spent = runs_spent(records)
    assert spent <= 12 and (spent == 12 or plan_promotions(records, space, space.study.halving) == [])
    assert finished_count(study) == 6
    assert all(r.state == "COMPLETE" and RAY_ATTR in r.stored for r in records)
    promoted = _promoted(records)
    by_number = {r.number: r for r in records}
    for r in promoted:
        earlier = by_number[r.promotion["from"]]
        assert r.latency_s == earlier.latency_s and r.spec_key == earlier.spec_key
        assert r.quality_values[:len(earlier.quality_values)] == earlier.quality_values
        assert r.stored[RAY_ATTR]["experiment"] != "run-001"  # one Tune experiment per rung, after the trials
    experiments = json.loads((handle.directory / "ray" / "experiments.json").read_text())["experiments"]
    assert all(e["finished"] for e in experiments) and any(e.get("promotions") for e in experiments)

    # the same promotions as the Optuna backend, with the same losses (training is deterministic)
    reference = read_records(halving_study[2].study)

    def results(rs):
        return {(r.label, tuple(r.replicate_seeds)): r.quality_values for r in rs if r.complete}

    def promotions(rs):
        return sorted((r.label, r.rung, tuple(r.promotion["new_seeds"])) for r in _promoted(rs))

    assert promotions(records) == promotions(reference)
    assert results(records) == results(reference)
    assert spent == runs_spent(reference)

    # the same command again: nothing left, Ray is not started
    before = [(t.number, t.datetime_complete) for t in study.trials]
    again = run_ray_study(path, studies_dir=studies, num_cpus=2, progress=False)
    assert [(t.number, t.datetime_complete) for t in again.study.trials] == before
    assert not ray.is_initialized()


# ----- after the review: what a reader is told, and the queue --------------------------------------
def test_a_failed_promotion_is_said_in_the_report(tmp_path):
    """A configuration whose promotion failed keeps its earlier result, and the report says so."""
    from sqa_search.search.report import noise_lines

    space = _space(trials=2)
    study = optuna.create_study(directions=DIRECTIONS)
    first = _trial(study, space, (1, 1), [5.10], 1.0)
    _trial(study, space, (4, 4), [5.00, 5.02], 4.0)
    _trial(study, space, (1, 1), [], 1.0, promotion=(first, 1, [1]), state=TrialState.FAIL,
           fail_reason="training diverged: seed 1: loss nan at step 3", runs=1)
    frame, front, _ = pareto_table(StudyHandle(study, space, tmp_path, "in-memory"))
    row = front[front.label == "xSQA 1q/1kv"]
    assert list(row.trial) == [first]
    assert list(row.quality_noise_kind) == ["pooled sd"]  # one seed: the pooled sd of 4q/4kv's two
    lines = "\n".join(noise_lines(front))
    assert "xSQA 1q/1kv: a promotion to more seeds failed (training diverged: seed 1" in lines


def test_a_worker_that_may_only_drain_the_queue_never_samples_a_new_trial(tmp_path):
    """With the study's trials done, a worker losing the race for the last queued promotion must stop:
    asking then raises QueueEmpty instead of creating (and training) a fresh trial."""
    from sqa_search.search.recovery import QueueEmpty, RetryFirstStudy

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'q.db'}")
    optuna.create_study(study_name="q", storage=storage, directions=DIRECTIONS)
    study = RetryFirstStudy(study_name="q", storage=storage)
    study.enqueue_trial({"n_q_heads": 4, "n_kv_heads": 4, "window": None, "n_global": 0},
                        user_attrs={"promotion": {"from": 0, "rung": 1, "new_seeds": [1], "earlier": {}}})
    study.queue_only = True
    taken = study.ask()
    assert taken.user_attrs["promotion"]["new_seeds"] == [1]
    with pytest.raises(QueueEmpty):
        study.ask()
    assert len(study.trials) == 1  # nothing was created
    study.queue_only = False
    assert study.ask().number == 1  # an ordinary worker samples as before


def test_ray_plans_again_the_promotions_the_optuna_backend_queued_and_never_ran(tmp_path):
    """A study moved to Ray with promotions still queued (Ray runs no queued trial): they are closed
    as interrupted and planned again, not waited for."""
    pytest.importorskip("ray")
    from sqa_search.search.ray_halving import next_promotions

    space = _space()
    study, n = _study(space, {**FRONT, **BEHIND})
    handle = StudyHandle(study, space, tmp_path, "in-memory")
    assert queue_promotions(handle, progress=False) == 3
    planned = next_promotions(handle)
    assert sorted(p.earlier.number for p in planned) == sorted([n[4, 4], n[4, 2], n[4, 1]])
    stale = study.get_trials(states=(TrialState.FAIL,))
    assert len(stale) == 3 and all(t.user_attrs["fail_reason"].startswith("interrupted") for t in stale)


@pytest.mark.slow
def test_recommend_labels_what_each_loss_uncertainty_is(halving_study):
    """recommend reads the promoted results and says whether a ± is a standard error or the pooled seed sd."""
    from sqa_search.decide.candidates import study_rows

    _, _, handle = halving_study
    rows = study_rows(handle)
    current = {r.number: r for r in current_records(read_records(handle.study))}
    assert {row.trial for row in rows} == set(current)
    for row in rows:
        n = len(current[row.trial].quality_values)
        assert row.loss_se is not None and row.loss_noise_kind in ("SE", "pooled sd/√n", "pooled sd")
        assert (row.loss_noise_kind == "pooled sd") == (n == 1)
