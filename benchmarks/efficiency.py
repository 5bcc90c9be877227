"""How quickly does a study's sampler find the front? Measured on a space small enough to evaluate
exhaustively.

Every candidate of the space is evaluated once (real timing on this machine, a short real
training run as the quality proxy). Then studies are replayed against that table with each
sampler and many seeds, exactly as `sqa-search run` would drive them (same sampler settings,
named variants enqueued first), and the hypervolume after each trial is compared with the
exhaustive front's. Usage:

    python benchmarks/efficiency.py search_spaces/efficiency.yaml --seeds 10 --out bench_out/efficiency

The exhaustive table is cached in OUT/exhaustive.json (a rerun with the same --out replays only).
The issue-14 target: `explore` without anchors reaches 95% of the exhaustive hypervolume within 20%
of the candidates (median over 10 seeds); the other samplers are listed beside it for comparison.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from sqa_search.search.pareto import hypervolume, hypervolume_history, reference_point
from sqa_search.search.space import SearchSpace, candidate_key, load_space, params_of, train_config_from

__all__ = ["evaluate_all", "replay", "main"]


def evaluate_all(space: SearchSpace, cache: Path | None = None, progress: bool = True) -> list[dict]:
    """Quality and latency of every candidate, cached in a JSON file so reruns are free."""
    from sqa_search.speed.timing import time_spec
    from sqa_search.speed.workload import DEFAULT_MODEL_LAYERS, Workload
    from sqa_search.quality.train import train_spec

    table = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    candidates = space.candidates()
    t, m = space.target, space.model
    config = train_config_from(space.training, space.objectives.quality)
    iterator = candidates
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(candidates, desc="exhaustive evaluation", unit="spec")
    for spec in iterator:
        key = candidate_key(spec)
        if key in table:
            continue
        # a model scope times the paper's 8 layers, as the loose-keyword call did before
        workload = Workload(mode=t.mode, seq_len=t.seq_len[0], batch=t.batch, scope=t.what, dtype=t.dtype,
                            device="cpu", n_layers=DEFAULT_MODEL_LAYERS, threads=t.threads)
        timing = time_spec(spec, workload, budget_s=t.timing_budget_s)
        result = train_spec(spec, dict(n_layers=m.n_layers, d_ff=m.d_ff), config, progress=False)
        quality = getattr(result, space.objectives.quality)
        table[key] = {"label": spec.label, "params": params_of(spec), "quality": quality,
                      "latency_s": timing.median_s, "status": result.status}
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(table, indent=1))
    return [table[candidate_key(s)] for s in candidates]


def _directions(space: SearchSpace) -> list[str]:
    """The benchmark's two objectives, quality and latency, as the space declares them."""
    return [o.direction for o in space.declared_objectives()[:2]]


def replay(space: SearchSpace, table: list[dict], sampler: str, seed: int, n_trials: int,
           anchors: bool = True) -> np.ndarray:
    """Objective values in trial order of a study driven by `sampler` against the table.

    anchors: enqueue the named variants first, as `sqa-search run` does; without them the
    sampler alone is measured."""
    import optuna

    from sqa_search.search.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    lookup = {json.dumps(row["params"], sort_keys=True): (row["quality"], row["latency_s"]) for row in table}
    run_space = replace(space, study=replace(space.study, sampler=sampler, seed=seed))
    study = optuna.create_study(directions=_directions(space), sampler=make_sampler(run_space))
    for spec in space.named_variants() if anchors else []:
        study.enqueue_trial(params_of(spec))

    def objective(trial):
        params = space.suggest_params(trial)
        params["n_global"] = params["n_global"] if params["window"] is not None else 0
        key = json.dumps(params, sort_keys=True)
        if key not in lookup:  # outside the static constraints: a failed trial, as in a study
            raise optuna.TrialPruned()
        return lookup[key]

    values = []
    for _ in range(n_trials):
        trial = study.ask()
        try:
            result = objective(trial)
            study.tell(trial, result)
            values.append(result)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            values.append((np.nan, np.nan))
    return np.array(values, dtype=float)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("space", help="a search-space YAML small enough to evaluate exhaustively")
    parser.add_argument("--samplers", default="explore,nsga2,tpe,random", help="comma-separated; gp also works where scipy is installed")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95, help="fraction of the exhaustive hypervolume")
    parser.add_argument("--out", default="bench_out/efficiency")
    args = parser.parse_args(argv)

    space = load_space(args.space)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = [row for row in evaluate_all(space, cache=out / "exhaustive.json") if row["status"] == "ok"]
    points = np.array([[r["quality"], r["latency_s"]] for r in table])
    directions = _directions(space)
    ref = reference_point(points, directions)
    full = hypervolume(points, ref, directions)
    n = len(table)
    print(f"exhaustive: {n} candidates, front hypervolume {full:.5g} (reference {np.round(ref, 5).tolist()})")

    curves, rows = {}, []
    runs = [(sampler, anchors) for anchors in (True, False) for sampler in args.samplers.split(",")]
    for sampler, anchors in runs:
        fractions = []
        for seed in range(args.seeds):
            values = replay(space, table, sampler, seed, n, anchors=anchors)
            fractions.append(hypervolume_history(values, ref, directions) / full)
        fractions = np.array(fractions)
        name = f"{sampler}{'' if anchors else ' (no anchors)'}"
        curves[name] = fractions
        reach = [int(np.argmax(f >= args.target)) + 1 if (f >= args.target).any() else None for f in fractions]
        reached = [r for r in reach if r is not None]
        # a seed that never reaches the target (trials spent on repeats and forbidden proposals) counts
        # as infinitely many trials: the median is still defined while fewer than half of them miss
        median = float(np.median([np.inf if r is None else r for r in reach]))
        median = median if np.isfinite(median) else None
        rows.append({"sampler": sampler, "named_variants_first": anchors, "seeds": args.seeds,
                     "median_trials_to_target": median,
                     "median_pct_of_candidates": round(100 * median / n, 1) if median is not None else None,
                     "worst_trials_to_target": max(reached) if len(reached) == len(reach) else None,
                     "seeds_reaching": len(reached),
                     "seeds_within_half": sum(r is not None and r <= n / 2 for r in reach),
                     "mean_hv_fraction_at_half": float(fractions[:, n // 2 - 1].mean())})
    import pandas as pd

    frame = pd.DataFrame(rows)
    print(f"\ntrials to reach {args.target:.0%} of the exhaustive hypervolume ({n} candidates; half = {n // 2}):")
    print(frame.to_string(index=False))
    frame.to_csv(out / "efficiency.csv", index=False)
    (out / "efficiency.txt").write_text(frame.to_string(index=False) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sqa_search._figures import fit_text, save

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, fractions in curves.items():
        mean = fractions.mean(0)
        ax.plot(range(1, n + 1), mean, ls="-" if "no anchors" not in name else "--",
                label=f"{name} (mean of {args.seeds} seeds)")
    ax.axhline(args.target, ls="--", c="k", lw=0.8)
    ax.axvline(n / 2, ls=":", c="k", lw=0.8)
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume / exhaustive hypervolume")
    ax.set_title(f"{space.name}: search efficiency ({n} candidates)")
    ax.legend()
    ax.grid(alpha=0.3)
    fit_text(fig)
    save(fig, out / "efficiency.png")
    print(f"\nwritten: {out / 'efficiency.csv'}, {out / 'efficiency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
