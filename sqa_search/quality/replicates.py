"""Quality with its uncertainty: one candidate trained from several seeds, as a mean and its standard error.

A single training run's loss moves with the initialisation seed by as much as the differences
between head configurations at small budgets (issue 14: MHA 2.356 +- 0.040 over 4 seeds at the
quickstart budget). `train_replicates` trains the same spec under the same settings once per seed
and returns the mean of the quality metric with its standard error (sample standard deviation /
sqrt(n); None for one replicate). The seeds vary the initialisation only: the data order is fixed
by ``data_seed`` and, with ``paired_init`` (the default), candidates with the same seed start from
the same weights wherever their shapes allow, so two candidates' replicates are paired seed by seed.

A candidate is as good as its worst replicate: one that fails (diverges, runs out of memory,
raises, or ends with no finite metric) fails the whole candidate, with that replicate's reason,
and the remaining seeds are not trained.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from ..layer.model import ModelConfig
from ..layer.spec import AttentionSpec
from .config import TrainConfig, TrainError
from .corpus import TextSource
from .result import TrainResult
from .tokens import TokenData
from .train import resolve_data, train_spec

__all__ = ["Replicates", "train_replicates", "mean_and_se", "replicate_seeds", "METRICS", "combined_summary"]

# the quality metrics a replicate set averages (TrainResult fields)
METRICS = ("val_loss", "val_ppl", "val_acc", "mqar_accuracy", "mqar_loss", "train_loss", "mqar_train_loss")
# summary fields that are per-run costs: the candidate's cost is their sum over replicates
_SUMMED = ("wall_s", "train_s")


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean): sample sd (n - 1 in the denominator) / sqrt(n); None for n = 1."""
    if not values:
        raise ValueError("mean_and_se needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def replicate_seeds(first: int, n: int) -> list[int]:
    """The seeds of ``n`` replicates starting at ``first``: first, first + 1, ..."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TrainError(f"replicates={n!r} is not allowed: must be an integer >= 1")
    return [first + i for i in range(n)]


@dataclass
class Replicates:
    """One candidate trained once per seed.

    ``values``: the metric of each finished replicate, in seed order (all of them when ``ok``).
    ``status``/``reason``: "ok", or the first failed replicate's status and reason (naming its seed).
    """

    spec: AttentionSpec
    metric: str
    seeds: list[int]
    results: list[TrainResult] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return mean_and_se(self.values)[0] if self.values else None

    @property
    def se(self) -> float | None:
        """The standard error of the mean; None with fewer than two replicates."""
        return mean_and_se(self.values)[1] if self.values else None

    @property
    def sd(self) -> float | None:
        """The sample standard deviation over seeds; None with fewer than two replicates."""
        return None if self.se is None else self.se * math.sqrt(self.n)

    def summaries(self) -> list[dict]:
        """Each replicate's `TrainResult.to_dict()` without its curves, evaluations and configs."""
        drop = ("loss_curve", "mqar_loss_curve", "evals", "train_config", "model_config")
        return [{k: v for k, v in r.to_dict().items() if k not in drop} for r in self.results]

    def summary(self) -> dict:
        """One training summary for the candidate: the first replicate's, with the quality metrics
        averaged over replicates, ``wall_s``/``train_s`` summed (what the candidate cost), and
        ``replicates``, ``seeds`` and ``per_seed`` (each replicate's metric, status and time)."""
        summaries = self.summaries()
        if not summaries:
            return {"replicates": 0, "seeds": list(self.seeds), "per_seed": []}
        combined = dict(summaries[0])
        for name in METRICS:
            values = [s.get(name) for s in summaries]
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                combined[name] = sum(values) / len(values)
        for name in _SUMMED:
            combined[name] = sum(s.get(name) or 0.0 for s in summaries)
        speeds = [s.get("tokens_per_s") or 0.0 for s in summaries]
        combined["tokens_per_s"] = sum(speeds) / len(speeds)
        combined["replicates"] = len(summaries)
        combined["seeds"] = [s["seed"] for s in summaries]
        combined["per_seed"] = [{"seed": s["seed"], self.metric: s.get(self.metric), "status": s["status"],
                                 "wall_s": s.get("wall_s")} for s in summaries]
        return combined


def combined_summary(earlier: dict, later: dict) -> dict:
    """Two `Replicates.summary()`s of one candidate (a promotion's new seeds after its earlier
    ones) as one: metrics averaged over every seed, costs summed, seeds and per-seed rows joined."""
    n_a, n_b = int(earlier.get("replicates") or 1), int(later.get("replicates") or 1)
    combined = {**later, "seed": earlier.get("seed", later.get("seed"))}  # the first seed, as in one summary
    for name in METRICS:
        a, b = earlier.get(name), later.get(name)
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)):
            combined[name] = (a * n_a + b * n_b) / (n_a + n_b)
    for name in _SUMMED:
        combined[name] = (earlier.get(name) or 0.0) + (later.get(name) or 0.0)
    combined["replicates"] = n_a + n_b
    combined["seeds"] = list(earlier.get("seeds") or []) + list(later.get("seeds") or [])
    combined["per_seed"] = list(earlier.get("per_seed") or []) + list(later.get("per_seed") or [])
    return combined


def train_replicates(
    spec: AttentionSpec,
    model: ModelConfig | str | dict | None,
    config: TrainConfig,
    seeds: list[int],
    metric: str = "val_loss",
    data: TokenData | str | os.PathLike | TextSource | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
    progress: bool | None = None,
) -> Replicates:
    """Train ``spec`` once per seed in ``seeds`` (``config.seed`` replaced by each) and collect ``metric``.

    ``callback`` (see `train_spec`) sees the first replicate only: a pruner compares one seed's
    curve with other candidates' first-seed curves (like with like), and step numbers never repeat.
    Stops at the first failed replicate (see the module's docstring). Raises TrainError for bad
    settings before any training; what the callback raises passes through.
    """
    if not seeds:
        raise TrainError("seeds=[] is not allowed: train at least one replicate")
    if len(set(seeds)) != len(seeds):
        raise TrainError(f"seeds={seeds!r} is not allowed: a repeated seed is the same run twice")
    if metric not in METRICS:
        raise TrainError(f"metric={metric!r} is not allowed: choose one of {', '.join(METRICS)}")
    tokens = resolve_data(data) if "lm" in config.tasks else None  # loaded once for every seed
    out = Replicates(spec=spec, metric=metric, seeds=list(seeds))
    for i, seed in enumerate(seeds):
        result = train_spec(spec, model, config.replace(seed=seed), data=tokens,
                            callback=callback if i == 0 else None, progress=progress)
        out.results.append(result)
        if result.status != "ok":
            out.status, out.reason = result.status, f"seed {seed}: {result.reason}"
            return out
        value = getattr(result, metric)
        if value is None or not math.isfinite(value):
            out.status, out.reason = "error", f"seed {seed}: training produced no finite {metric}"
            return out
        out.values.append(float(value))
    return out
