"""The sampler and pruner a study's settings ask for, shared by both backends and the efficiency
benchmark (so a replayed study proposes what `sqa-search run` would)."""

from __future__ import annotations

import optuna

from .space import SearchSpace

__all__ = ["make_sampler", "make_pruner"]


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    name, seed = space.study.sampler, space.study.seed
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
