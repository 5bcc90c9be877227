"""Successive halving on the Ray backend: each rung of promotions (search/halving.py) is a Tune experiment.

The driver plans a rung from the study storage, hands Tune its promotions through `PromotionSearch`
(each configuration once, with its `records.promotion_attrs` under ``PROMOTE_KEY``), and the same
trainable and recorder as the trials run and store them. The next rung is planned from the storage
once the experiment ends, so an interrupted rung is simply planned again: nothing in Tune's state is
needed to resume it (`ray_backend._resume_last` closes it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from .halving import Promotion, next_plan, plan_words
from .ray_cluster import save_experiments
from .ray_worker import PROMOTE_KEY
from .records import PROMOTION, store_failure
from .recovery import INTERRUPTED
from .storage import StudyError
from .studies import StudyHandle

__all__ = ["PromotionSearch", "next_promotions", "run_promotions"]


class PromotionSearch(Searcher):
    """Hands Tune one rung's halving promotions, each once, then FINISHED."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self._sqa_configs = list(configs)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the configurations are fixed: nothing to search

    def suggest(self, trial_id: str):
        return self._sqa_configs.pop(0) if self._sqa_configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        pass  # the recorder stores the result; the next rung is planned from the storage


def _close_stale_queue(handle: StudyHandle) -> None:
    """Promotions the Optuna backend queued and never ran (the study then moved to Ray, which runs no
    queued trial): marked interrupted, so the planner plans them again instead of waiting for ever."""
    study = handle.study
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if PROMOTION in t.user_attrs:
            store_failure(study._storage, t._trial_id, f"{INTERRUPTED} (queued by the Optuna backend, not run)")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


def next_promotions(handle: StudyHandle) -> list[Promotion]:
    """The next rung's promotions of a study run on Ray ([] without halving or with nothing left)."""
    if handle.space.study.halving is None:
        return []
    _close_stale_queue(handle)
    return next_plan(handle.study, handle.space)


def run_promotions(handle: StudyHandle, ray_dir: Path, experiments: list[dict], *, concurrency: int,
                   max_retries: int, progress: bool, trainable: Callable, recorder: Callable,
                   dirname: Callable) -> None:
    """One Tune experiment per rung of promotions until none is left. ``trainable``/``recorder``:
    factories of the backend's trainable and its storage callback; ``dirname``: trial folder names."""
    while plan := next_promotions(handle):
        if progress:
            print(plan_words(plan))
        experiment = f"run-{len(experiments) + 1:03d}"
        experiments.append({"name": experiment, "trials": len(plan), "finished": False, "restored": 0,
                            "promotions": True, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        save_experiments(ray_dir, experiments)
        search = ConcurrencyLimiter(PromotionSearch([{**p.params, PROMOTE_KEY: p.attrs()} for p in plan]),
                                    max_concurrent=concurrency)
        tuner = tune.Tuner(
            trainable(),
            tune_config=tune.TuneConfig(search_alg=search, num_samples=len(plan), trial_dirname_creator=dirname,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=experiment, storage_path=str(ray_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_retries),
                                      callbacks=[recorder()]),
        )
        grid = tuner.fit()
        experiments[-1]["finished"] = True
        save_experiments(ray_dir, experiments)
        if len(grid) - grid.num_terminated - grid.num_errors > 0:  # Ctrl-C: the storage keeps what finished
            raise StudyError(f"the Ray study {handle.space.name!r} was interrupted during successive halving; run "
                             "the same command again to resume it")
