"""The sampler and pruner a study's settings ask for, shared by both backends and the efficiency
benchmark (so a replayed study proposes what `sqa-search run` would).

`ExploreSampler` (``study.sampler: explore``, the default for spaces of at most
`EXPLORE_MAX_CANDIDATES` valid candidates) never spends a trial on a configuration the study has
already evaluated, queued or is running, nor on one the space's rules forbid: it enumerates the
space's valid candidates (`SearchSpace.candidates`, i.e. `SearchSpace.violation` is None) and
proposes one it has not seen. Which one, in this order:

1. space-filling while fewer than `MODEL_MIN_POINTS` results exist (the named variants are usually
   those): the candidate farthest, in the normalised head/window features, from everything taken;
   the first one is the cheapest corner (fewest heads, smallest window), whose latency anchors the
   front's fast end;
2. model-based afterwards: each objective is fitted by a Bayesian ridge regression on a few
   features of the configuration (query heads, KV heads, attention span, their product and global
   tokens; latency grows with heads times span, the loss falls with heads) and every unevaluated
   candidate is scored by the hypervolume its optimistic prediction (mean minus one predictive
   standard deviation, in each objective's better direction) would add to the front so far. The
   best score wins; when nothing is predicted to add anything, space-filling again.

Why this and not TPE/NSGA-II: on a few dozen candidates those samplers repeat configurations and
propose forbidden ones, and a linear model in the head counts already ranks candidates well after
a handful of results (measured: benchmarks/2026-12-02-cpu-efficiency). When every valid candidate
is taken the sampler proposes a valid one already evaluated (a duplicate, which the engine reuses
at no cost); both backends stop before that happens (`unevaluated_candidates` is empty).
"""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
from optuna.trial import TrialState

from .pareto import hypervolume, non_dominated_mask
from .records import TrialRecord
from .space import SEARCH_PARAMS, SearchSpace, params_of

__all__ = ["make_sampler", "make_pruner", "resolve_sampler", "ExploreSampler", "unevaluated_candidates", "space_exhausted",
           "distinct_configurations", "EXPLORE_MAX_CANDIDATES", "MODEL_MIN_POINTS"]

# Above this many valid candidates enumerating them per trial stops being cheap and TPE/NSGA-II's
# models of the parameters are worth their repeats: `sampler: auto` picks TPE there.
EXPLORE_MAX_CANDIDATES = 300
# Results needed before the regression is trusted over space-filling: the cheapest corner and the
# farthest one (ridge keeps a two-point fit tame; measured: 6 trials to 95% against 8 with 3-5 points).
MODEL_MIN_POINTS = 2
# Trial states whose configuration counts as taken: evaluated (or being evaluated, or queued).
TAKEN_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def resolve_sampler(space: SearchSpace) -> str:
    """The sampler a study runs: `auto` is explore for small spaces, else TPE."""
    name = space.study.sampler
    if name == "auto":
        return "explore" if len(space.candidates()) <= EXPLORE_MAX_CANDIDATES else "tpe"
    return name


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    name, seed = resolve_sampler(space), space.study.seed
    if name == "explore":
        return ExploreSampler(space, seed=seed)
    if name == "nsga2":
        # small populations: a short study should still get past its random first generation
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def params_key(params: dict) -> str:
    """A configuration's identity among the search parameters (window null means no global tokens)."""
    values = {name: params.get(name) for name in SEARCH_PARAMS}
    if values["window"] is None:
        values["n_global"] = 0
    return json.dumps(values, sort_keys=True)


def taken_params(study: optuna.Study, exclude_number: int | None = None) -> set[str]:
    """Keys of the configurations the study's trials hold (run, running or queued), but one trial's."""
    out = set()
    for t in study.get_trials(deepcopy=False, states=TAKEN_STATES):
        if t.number == exclude_number:
            continue
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if params:
            out.add(params_key(params))
    return out


def unevaluated_candidates(study: optuna.Study, space: SearchSpace, exclude_number: int | None = None) -> list[dict]:
    """The space's valid configurations that no trial of the study holds, as trial params."""
    taken = taken_params(study, exclude_number)
    return [p for p in (params_of(s) for s in space.candidates()) if params_key(p) not in taken]


def space_exhausted(study: optuna.Study, space: SearchSpace) -> bool:
    """True when the study explores (`sampler: explore`, or auto on a small space), nothing is
    queued, and every valid candidate is taken: another trial could only repeat one, so both
    backends stop there instead (other samplers keep their behaviour and run every trial asked for)."""
    if resolve_sampler(space) != "explore" or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return False
    return not unevaluated_candidates(study, space)


def distinct_configurations(records: list[TrialRecord]) -> int:
    """How many distinct configurations the study evaluated: complete trials, duplicates once."""
    return len({r.spec_key or json.dumps(r.params, sort_keys=True) for r in records if r.state == "COMPLETE"})


def features(space: SearchSpace, params: dict) -> np.ndarray:
    """What the regression sees of a configuration, each in [0, 1] over the space's range."""
    h, longest = space.model.n_heads, max(space.target.seq_len)
    q = math.log2(params["n_q_heads"]) / max(math.log2(h), 1.0)
    kv = math.log2(params["n_kv_heads"]) / max(math.log2(h), 1.0)
    window = params["window"]
    span = 1.0 if window is None else min(window, longest) / longest
    glob = params["n_global"] / (1 + max(space.search.n_global)) if window is not None else 0.0
    return np.array([q, kv, span, q * span, glob])


class ExploreSampler(optuna.samplers.BaseSampler):
    """Proposes the space's unevaluated valid candidates, most promising first (module docstring)."""

    def __init__(self, space: SearchSpace, seed: int | None = None, kappa: float = 1.0):
        self.space = space
        self.kappa = kappa
        self.rng = np.random.RandomState(seed)
        self.candidates = [params_of(s) for s in space.candidates()]
        self.keys = [params_key(p) for p in self.candidates]
        self.features = np.array([features(space, p) for p in self.candidates])
        self.fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self.rng.seed()
        self.fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict:
        return self.space.distributions()

    def sample_relative(self, study, trial, search_space) -> dict:
        if not search_space:
            return {}
        taken = taken_params(study, exclude_number=trial.number)
        open_ = [i for i, key in enumerate(self.keys) if key not in taken]
        if not open_:  # exhausted: a valid, already evaluated one (reused by the engine, no cost)
            return dict(self.candidates[self.rng.randint(len(self.candidates))])
        known = self.results(study)
        if len(known) >= MODEL_MIN_POINTS:
            pick = self.best_improvement(open_, known, study.directions)
            if pick is not None:
                return dict(self.candidates[pick])
        taken_idx = [i for i, key in enumerate(self.keys) if key in taken]
        return dict(self.candidates[self.farthest(open_, taken_idx)])

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.fallback.sample_independent(study, trial, param_name, param_distribution)

    def results(self, study) -> dict[int, np.ndarray]:
        """Candidate index -> objective values, from the study's complete trials."""
        index = {key: i for i, key in enumerate(self.keys)}
        out = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            i = index.get(params_key(t.params))
            if i is not None and t.values is not None and np.isfinite(t.values).all():
                out[i] = np.array(t.values, dtype=float)
        return out

    def farthest(self, open_: list[int], taken: list[int]) -> int:
        """Space-filling: the open candidate farthest from every taken one (the cheapest corner first)."""
        x = self.features
        if not taken:
            scores = -x[open_].sum(axis=1)
        else:
            d = np.linalg.norm(x[open_][:, None, :] - x[taken][None, :, :], axis=2)
            scores = d.min(axis=1)
        best = np.flatnonzero(scores >= scores.max() - 1e-12)
        return open_[int(best[self.rng.randint(len(best))])]

    def best_improvement(self, open_: list[int], known: dict, directions) -> int | None:
        """The open candidate whose optimistic predicted point adds most hypervolume, or None."""
        signs = np.array([1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in directions])
        idx = sorted(known)
        y = np.array([known[i] for i in idx]) * signs  # every objective minimised from here on
        low, span = y.min(axis=0), np.ptp(y, axis=0)
        span[span == 0] = 1.0
        y = (y - low) / span
        mean, sd = predict(self.features[idx], y, self.features[open_])
        optimistic = mean - self.kappa * sd
        front = y[non_dominated_mask(y, ["minimize"] * y.shape[1])]
        reference = y.max(axis=0) + 0.1
        base = hypervolume(front, reference)
        gains = np.array([hypervolume(np.vstack([front, p]), reference) - base for p in optimistic])
        if not (gains > 1e-12).any():
            return None
        best = np.flatnonzero(gains >= gains.max() - 1e-12)
        return open_[int(best[self.rng.randint(len(best))])]


def predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Bayesian ridge regression per objective: predictive mean and standard deviation at x_new.

    The noise scale is the residual spread of the fit (at least 5% of the objective's range, so a
    near-perfect fit on few points still leaves room to explore)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    new = np.hstack([np.ones((len(x_new), 1)), x_new])
    precision = design.T @ design + ridge * np.eye(design.shape[1])
    cov = np.linalg.inv(precision)
    coef = cov @ design.T @ y
    residual = y - design @ coef
    dof = max(len(x) - design.shape[1], 1)
    noise = np.maximum(np.sqrt((residual ** 2).sum(axis=0) / dof), 0.05)
    leverage = np.einsum("ij,jk,ik->i", new, cov, new)
    sd = np.sqrt(1.0 + leverage)[:, None] * noise[None, :]
    return new @ coef, sd
