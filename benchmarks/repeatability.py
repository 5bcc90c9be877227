"""Issue 14's repeatability check: do two runs of a study with different seeds rank the named variants alike?

    python benchmarks/repeatability.py studies/quickstart studies/quickstart_seed2

Reads each study's current result per named variant (`records.current_records`: a halving
promotion's mean over all its seeds, not the trial it extended) and prints:

* each variant's quality in both runs, mean +- standard error and the number of seeds;
* Spearman's rho between the two runs' quality ranks (target >= 0.8);
* for each run, the pairs it separates beyond noise (|difference| > 2 combined noise scales, the
  rule of the report and of the halving planner: each figure's noise is its standard error, at
  least the run's pooled seed sd / sqrt(seeds), `halving.quality_noise`) and whether the other run
  has them in the same order (target: all of them).
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np

from sqa_search.search.halving import pooled_seed_sd, quality_noise
from sqa_search.search.records import current_records, read_records
from sqa_search.search.studies import open_study


def named_variants(folder: str) -> dict[str, tuple[float, float, int]]:
    """label of each named variant -> (quality, its standard error, seeds)."""
    records = read_records(open_study(folder).study)
    by_number = {r.number: r for r in records}

    def anchor(r):  # promotions stored before they carried the mark: follow them to the trial they extend
        while r is not None and r.anchor is None and r.promotion:
            r = by_number.get(int(r.promotion["from"]))
        return r.anchor if r is not None else None

    current = current_records(records)
    pooled = pooled_seed_sd(current)
    out = {}
    for r in current:
        if anchor(r) and r.quality is not None:
            n = len(r.quality_values) or 1
            out[r.label] = (r.quality, quality_noise(r.quality_se, n, pooled)[0] or 0.0, n)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def separated(run: dict, names: list[str]) -> dict[tuple[str, str], bool]:
    """Pairs separated beyond 2 combined standard errors -> whether the first is worse (higher)."""
    out = {}
    for x, y in itertools.combinations(names, 2):
        d = run[x][0] - run[y][0]
        if abs(d) > 2 * math.hypot(run[x][1], run[y][1]):
            out[(x, y)] = d > 0
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="a study folder")
    parser.add_argument("second", help="the same study run with other seeds")
    args = parser.parse_args(argv)
    a, b = named_variants(args.first), named_variants(args.second)
    names = sorted(set(a) & set(b), key=lambda n: a[n][0])
    rho = spearman(np.array([a[n][0] for n in names]), np.array([b[n][0] for n in names]))
    print(f"{len(names)} named variants in both runs; Spearman rho of their quality ranks = {rho:.3f}")
    print(f"  {'variant':14} {'first run (mean ± noise, seeds)':>33} {'second run':>33}")
    for n in names:
        print(f"  {n:14} {a[n][0]:>10.4f} ± {a[n][1]:.4f} ({a[n][2]} seeds) {b[n][0]:>10.4f} ± {b[n][1]:.4f} "
              f"({b[n][2]} seeds)")
    kept_all = True
    for label, run, other in (("first run", a, b), ("second run", b, a)):
        pairs = separated(run, names)
        kept = {pair: (other[pair[0]][0] - other[pair[1]][0] > 0) == up for pair, up in pairs.items()}
        kept_all &= all(kept.values())
        print(f"{label}: {len(pairs)} of {len(names) * (len(names) - 1) // 2} pairs separated beyond 2 SE; "
              f"same order in the other run: {sum(kept.values())}/{len(pairs)}")
        for (x, y), same in kept.items():
            if not same:
                print(f"    reversed: {x} vs {y}")
    print(f"targets: Spearman >= 0.8: {'met' if rho >= 0.8 else 'NOT met'}; every separated pair in the same "
          f"order: {'met' if kept_all else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
