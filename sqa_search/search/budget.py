"""How a study spends its training runs: `study.halving` of a search space, read and checked.

A training run is one seed of one candidate at the training budget (``training.budget_tokens``
...). Without ``study.halving`` every candidate trains ``training.replicates`` seeds. With it, the
study runs successive halving over seeds (`search/halving.py`) under a fixed total:

```yaml
study:
  trials: 12                     # candidates, each first trained training.replicates seeds (rung 0)
  halving:
    budget: 24                   # training runs in all, first runs and promotions together
    max_seeds: 4                 # seeds of the top rung; rung k has replicates x eta^k (capped here)
    eta: 2                       # a rung promotes at most 1/eta of the candidates that reached it
    tolerance: 0.0               # also promote a quality within this fraction of the best one
```

Seeds, not tokens, are what a promotion adds: a loss after more tokens is another objective, so a
candidate trained longer could not be compared with one that was not, while more seeds of the same
run shrink its standard error and leave its expected value alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HalvingSettings", "read_halving", "HALVING_KEYS", "seed_levels"]

HALVING_KEYS = ("budget", "max_seeds", "eta", "tolerance")


@dataclass(frozen=True)
class HalvingSettings:
    budget: int
    max_seeds: int = 4
    eta: int = 2
    tolerance: float = 0.0


def seed_levels(first: int, eta: int, most: int) -> list[int]:
    """The seeds a candidate holds at each rung: first, first x eta, ... capped at most."""
    levels = [first]
    while levels[-1] < most:
        levels.append(min(levels[-1] * eta, most))
    return levels


def read_halving(reader, trials: int, replicates: int) -> HalvingSettings | None:
    """``study.halving``, given (an empty mapping is an error: the budget is required). ``reader`` is
    the space loader's reader of that mapping, whose errors name the file, the key, the value and
    what is allowed."""
    reader.check_unknown(HALVING_KEYS)
    budget = reader.int("budget", required=True)
    max_seeds = reader.int("max_seeds", 4)
    eta = reader.int("eta", 2, low=2)
    tolerance = reader.data.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1 \
            or not math.isfinite(tolerance):
        raise reader.error("tolerance", tolerance, "must be a number in [0, 1): a fraction of the best quality")
    if max_seeds <= replicates:
        raise reader.error("max_seeds", max_seeds, f"must be more than training.replicates ({replicates}): "
                           "a promotion adds seeds to a candidate's first ones")
    if budget < trials * replicates:
        raise reader.error("budget", budget, f"must be at least study.trials x training.replicates = "
                           f"{trials} x {replicates} = {trials * replicates} training runs: every candidate "
                           "gets its first runs before any is promoted")
    return HalvingSettings(budget=budget, max_seeds=max_seeds, eta=eta, tolerance=float(tolerance))
