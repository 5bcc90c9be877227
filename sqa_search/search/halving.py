"""Successive halving over seeds: spend a study's training runs where they decide the front.

Every candidate first trains ``training.replicates`` seeds (rung 0). One seed's loss moves by as much
as the differences between head configurations (issue 14: MHA's seed sd 0.04 nats at the
quickstart's old budget), so more seeds are worth it only where the answer depends on them: for
candidates that may be on the front. A rung ``k`` holds ``replicates x eta^k`` seeds (capped at
``max_seeds``); `plan_promotions` picks, from the lowest rung that has any, the candidates to train
more seeds for:

* a **contender** is a candidate no other dominates beyond noise (`pareto.noise_aware_front`, the
  z = 2 rule the report uses), or whose quality is within ``tolerance`` of the best one, and whose
  latency is within ``constraints.max_latency_s``. Before any candidate has two seeds there is no
  estimate of the seed noise, and every candidate is a contender (the share then goes by rank). Its
  quality's noise is its standard error; a candidate with one seed has none of its own and takes
  the study's pooled seed standard deviation (over every candidate with two or more seeds) / sqrt(1),
  so a one-seed loss is never taken as exact once the study knows how much seeds move, and no
  standard error is taken below pooled sd / sqrt(n) (`quality_noise`: two seeds' SE is a rough guess);
* a rung promotes at most ``ceil(n / eta)`` of the ``n`` candidates that reached it (that is the
  halving), best first by non-dominated rank and then quality;
* each promotion costs the runs of the seeds it adds; nothing is planned beyond the budget
  (``halving.budget`` training runs in all, first runs included). When every rung has promoted its
  share and runs are left, the remaining contenders are promoted too, lowest rung first;
* a candidate whose promotion failed (a new seed diverged) is not promoted again: the failure is
  recorded with its reason and its earlier result stands.

A promotion is a trial of its own (its user attribute ``promotion`` names the trial it extends, its
rung and its new seeds; `records.promotion_attrs`): it copies the earlier trial's speed figures,
trains only the new seeds, and stores the mean and standard error over all of them.
`records.current_records` then reads it in place of the trial it extends. Both backends run the
plan: the Optuna backend queues the promotions and its workers drain the queue, the Ray backend
runs them as a Tune experiment.

This is synchronous successive halving with a multi-objective, noise-aware promotion rule (Syne
Tune's MO-ASHA ranks by non-dominated sorting; here the rank only orders the contenders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from optuna.trial import TrialState

from .budget import HalvingSettings, seed_levels
from .pareto import IQR_PER_SD, NOISE_Z, noise_aware_front, non_dominated_sort
from .records import TrialRecord, current_records, from_trial, promotion_attrs, read_records
from .recovery import INTERRUPTED
from .space import SearchSpace, replicates_of
from .storage import StudyError

__all__ = ["Promotion", "plan_promotions", "check_halving_budget", "check_runs_left", "quality_noise", "runs_spent",
           "pooled_seed_sd", "rung_of", "pending_promotions", "halving_summary", "failed_promotions", "next_plan",
           "plan_words"]


@dataclass(frozen=True)
class Promotion:
    """Train ``new_seeds`` more for the configuration of trial ``earlier``, reaching ``rung``."""

    earlier: TrialRecord
    rung: int
    new_seeds: tuple[int, ...]

    @property
    def params(self) -> dict:
        return dict(self.earlier.params)

    @property
    def cost(self) -> int:
        return len(self.new_seeds)

    def attrs(self) -> dict:
        return promotion_attrs(self.earlier, self.rung, list(self.new_seeds))

    def describe(self) -> str:
        seeds = ", ".join(map(str, self.new_seeds))
        return f"{self.earlier.label} (trial {self.earlier.number}): seed(s) {seeds} -> rung {self.rung}"


def runs_spent(records: list[TrialRecord]) -> int:
    """Training runs the study has spent: every seed any trial trained itself."""
    return sum(r.training_runs for r in records)


def pooled_seed_sd(current: list[TrialRecord]) -> float | None:
    """The seed standard deviation pooled over every candidate with two or more seeds (each one's
    sample variance weighted by its degrees of freedom); None when no candidate has two."""
    dof, total = 0, 0.0
    for r in current:
        n = len(r.quality_values)
        if n >= 2:
            mean = sum(r.quality_values) / n
            total += sum((v - mean) ** 2 for v in r.quality_values)
            dof += n - 1
    return math.sqrt(total / dof) if dof else None


def check_halving_budget(space: SearchSpace, trials: int) -> None:
    """A run's trial count must leave the budget its first runs (``--trials`` may differ from the file)."""
    settings = space.study.halving
    first = replicates_of(space.training)
    if settings is not None and settings.budget < trials * first:
        raise StudyError(f"trials={trials} is not allowed with study.halving.budget={settings.budget}: the "
                         f"first runs alone take trials x training.replicates = {trials} x {first} = "
                         f"{trials * first} training runs; raise the budget or ask for fewer trials")


def quality_noise(se: float | None, n: int, pooled: float | None) -> tuple[float | None, str | None]:
    """(a quality figure's noise scale, what it is): "SE", its own standard error; "pooled sd/√n",
    the study's pooled seed sd / sqrt(n) where that is larger (an SE from two or three seeds is
    itself a rough guess: one seed pair 0.004 nats apart where seeds move the loss by 0.015); or
    "pooled sd", the pooled seed sd standing in for a one-seed figure's. (None, None): no estimate."""
    floor = pooled / math.sqrt(max(n, 1)) if pooled is not None else None
    if se is not None and se == se and (floor is None or se >= floor):
        return se, "SE"
    if floor is None:
        return None, None
    return floor, ("pooled sd" if n <= 1 else "pooled sd/√n")


def rung_of(n_seeds: int, levels: list[int]) -> int:
    """The highest rung whose seed count a candidate with ``n_seeds`` holds."""
    return max((k for k, level in enumerate(levels) if n_seeds >= level), default=0)


def pending_promotions(study) -> dict[int, int]:
    """Queued or running promotions (planned, not done): the trial each extends -> the runs it will spend."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        promotion = from_trial(t).promotion
        if promotion is not None:
            out[int(promotion["from"])] = len(promotion.get("new_seeds") or [])
    return out


def failed_promotions(records: list[TrialRecord]) -> dict[int, str]:
    """The trials whose promotion failed for a reason (not interrupted) -> that reason. Such a
    candidate is not promoted again, and its figure rests on its earlier seeds."""
    return {int(r.promotion["from"]): r.fail_reason for r in records
            if r.promotion and r.state == "FAIL" and r.fail_reason and not r.fail_reason.startswith(INTERRUPTED)}


def check_runs_left(records: list[TrialRecord], space: SearchSpace, new_trials: int) -> None:
    """More trials on a study that already spent runs: their first runs must fit what is left."""
    settings = space.study.halving
    if settings is None or new_trials <= 0:
        return
    need, spent = new_trials * replicates_of(space.training), runs_spent(records)
    if spent + need > settings.budget:
        raise StudyError(f"study.halving.budget={settings.budget} is too small for {new_trials} more trial(s): the "
                         f"study has spent {spent} training runs and their first runs need {need} more; raise the "
                         f"budget to at least {spent + need} or ask for fewer trials")


def _points_and_noise(space: SearchSpace, current: list[TrialRecord],
                      pooled: float | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    objectives = space.objectives_in_use()
    points = np.array([[o.value(r) for o in objectives] for r in current], dtype=float)  # None -> nan
    noise = np.zeros_like(points)
    for j, o in enumerate(objectives):
        for i, r in enumerate(current):
            if o.column == "quality":
                noise[i, j] = quality_noise(r.quality_se, len(r.quality_values), pooled)[0] or 0.0
            elif o.column == "latency_s" and r.latency_iqr_s is not None:
                noise[i, j] = r.latency_iqr_s / IQR_PER_SD
    return points, noise, [o.direction for o in objectives]


def _contenders(space: SearchSpace, current: list[TrialRecord], tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(contender mask, order key: non-dominated rank then quality, lower first) over ``current``.

    Before any candidate has two seeds the study cannot tell how far one seed's loss may be off, so
    the noise-aware test would take one-seed losses as exact: then every candidate is a contender
    and the rung's share goes by rank alone (MO-ASHA's rule); afterwards, by noise."""
    pooled = pooled_seed_sd(current)
    points, noise, directions = _points_and_noise(space, current, pooled)
    if pooled is None and "quality" in [o.column for o in space.objectives_in_use()]:
        contender = np.ones(len(current), dtype=bool)
    else:
        contender = noise_aware_front(points, noise, directions, NOISE_Z)
    limit = space.constraints.max_latency_s
    if limit is not None:  # over the latency budget: never a candidate to spend seeds on
        contender &= np.array([r.latency_s is None or r.latency_s <= limit for r in current])
    quality = points[:, 0] * (1.0 if directions[0] == "minimize" else -1.0)  # quality is objective 0, lower better
    if tolerance > 0 and np.isfinite(quality).any():
        best = np.nanmin(quality)
        contender |= quality <= best + tolerance * abs(best)
    rank = np.zeros(len(current))
    finite = np.isfinite(points).all(axis=1)
    if finite.any():
        for level, members in enumerate(non_dominated_sort(points[finite], directions)):
            rank[np.flatnonzero(finite)[members]] = level
    rank[~finite] = np.inf
    contender &= finite
    return contender, np.lexsort((quality, rank))


def _new_seeds(record: TrialRecord, first_seed: int, count: int) -> tuple[int, ...]:
    """The ``count`` smallest seeds from ``first_seed`` on that the candidate has not trained."""
    held, out, seed = set(record.replicate_seeds), [], first_seed
    while len(out) < count:
        if seed not in held:
            out.append(seed)
        seed += 1
    return tuple(out)


def plan_promotions(records: list[TrialRecord], space: SearchSpace, settings: HalvingSettings,
                    pending: dict[int, int] | None = None) -> list[Promotion]:
    """The next promotions: those of the lowest rung that has any, within what is left of the
    budget (module docstring). ``pending`` (`pending_promotions`): promotions queued or running;
    while any is, nothing new is planned (a rung is decided on its finished results). Empty when
    nothing is left to promote or the budget cannot pay for it."""
    if pending:
        return []
    levels = seed_levels(replicates_of(space.training), settings.eta, settings.max_seeds)
    left = settings.budget - runs_spent(records)
    failed = failed_promotions(records)
    current = [r for r in current_records(records) if r.quality_values]
    if left <= 0 or not current:
        return []
    contender, order = _contenders(space, current, settings.tolerance)
    first_seed = int(space.training.get("seed", 0))
    rungs = [rung_of(len(r.quality_values), levels) for r in current]
    blocked = {i for i, r in enumerate(current) if r.number in failed}
    for capped in (True, False):  # each rung's share first; then, with runs left, every contender
        for k in range(len(levels) - 1):
            reached = sum(1 for rung in rungs if rung >= k)
            promoted = sum(1 for rung in rungs if rung > k)
            share = math.ceil(reached / settings.eta) - promoted if capped else len(current)
            plan, budget = [], left
            for i in order:
                if len(plan) >= share or rungs[i] != k or not contender[i] or i in blocked:
                    continue
                seeds = _new_seeds(current[i], first_seed, levels[k + 1] - len(current[i].quality_values))
                if len(seeds) <= budget:
                    plan.append(Promotion(current[i], k + 1, seeds))
                    budget -= len(seeds)
            if plan:
                return plan
    return []


def next_plan(study, space: SearchSpace) -> list[Promotion]:
    """The next rung's promotions of a study ([] without halving or with nothing left to promote)."""
    settings = space.study.halving
    if settings is None:
        return []
    return plan_promotions(read_records(study), space, settings, pending_promotions(study))


def plan_words(plan: list[Promotion]) -> str:
    """One line for the log: how many go to which rung, and each with its new seeds."""
    return (f"successive halving: {len(plan)} candidate(s) to rung {plan[0].rung}: "
            + "; ".join(p.describe() for p in plan))


def halving_summary(records: list[TrialRecord], space: SearchSpace) -> str | None:
    """One line for show and the report: rungs, how many candidates hold each, runs spent of the budget."""
    settings = space.study.halving
    if settings is None:
        return None
    levels = seed_levels(replicates_of(space.training), settings.eta, settings.max_seeds)
    current = [r for r in current_records(records) if r.quality_values]
    counts = [sum(1 for r in current if rung_of(len(r.quality_values), levels) == k) for k in range(len(levels))]
    rungs = ", ".join(f"{n} with {level} seed{'s' if level > 1 else ''}" for n, level in zip(counts, levels))
    return (f"successive halving over seeds: {runs_spent(records)} of {settings.budget} training runs spent; "
            f"candidates: {rungs}")
