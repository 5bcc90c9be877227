"""What paired initialisation buys: the seed-to-seed spread of the difference between two variants.

    python benchmarks/paired_seeds.py                       # the quickstart's budget, 4 seeds, 2 jobs
    python benchmarks/paired_seeds.py --budget-tokens 128000 --json out.json
    python benchmarks/paired_seeds.py --from-json out.json   # the table again, from saved runs

Trains the quickstart's model (d_model 128, 8 heads, 4 layers, the default TrainConfig: task lm,
builtin corpus, data order fixed by data_seed 0) with MHA 8q/8kv, SQA 4q/2kv and xSMQA 2q/1kv,
each with every seed, twice: with paired initialisation (`TrainConfig.paired_init`, the default:
embeddings, norms and MLP the same tensors for a seed, a variant's heads a slice of one full-size
draw) and without (``torch.manual_seed(seed)`` then the model's own init, as before issue 14).

Printed: each variant's mean val loss +- standard error per mode; for each pair of variants the
mean difference and the sample standard deviation over seeds of the per-seed difference, paired
and unpaired, and their ratio (unpaired sd / paired sd: how much pairing shrinks the spread of a
difference; the standard error of a mean difference shrinks by the same factor). Runs are spread
over ``--jobs`` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from sqa_search.layer.model import MODEL_PRESETS
from sqa_search.layer.spec import AttentionSpec
from sqa_search.quality.config import DEFAULT_BUDGET_TOKENS, TrainConfig
from sqa_search.quality.replicates import mean_and_se
from sqa_search.quality.train import train_spec

__all__ = ["VARIANTS", "run_one", "summarise", "main"]

VARIANTS = ("mha", "sqa", "xsmqa")
MODES = {"paired": True, "unpaired": False}
PRESET = "quickstart"


def _spec(variant: str) -> AttentionSpec:
    size = MODEL_PRESETS[PRESET]
    return AttentionSpec.variant(variant, size["d_model"], size["n_heads"])


def run_one(job: tuple[str, str, int, int]) -> dict:
    """One training run (in a worker process): (mode, variant, seed, budget_tokens) -> its figures."""
    mode, variant, seed, budget = job
    config = TrainConfig(budget_tokens=budget, seed=seed, threads=1, paired_init=MODES[mode])
    r = train_spec(_spec(variant), PRESET, config, progress=False)
    return {"mode": mode, "variant": variant, "seed": seed, "status": r.status, "val_loss": r.val_loss,
            "wall_s": r.wall_s, "steps": r.steps}


def _f_quantile(df: int, p: float) -> float:
    """The p-quantile of the F(df, df) distribution (df >= 2), without scipy: X = F / (F + 1) is
    Beta(df/2, df/2); its CDF by the trapezoid rule on a fine grid, inverted by bisection."""
    a = df / 2
    log_norm = math.lgamma(2 * a) - 2 * math.lgamma(a)
    grid = [i / 20000 for i in range(20001)]
    dens = [0.0 if x in (0.0, 1.0) else math.exp(log_norm + (a - 1) * (math.log(x) + math.log(1 - x))) for x in grid]
    cdf = [0.0]
    for i in range(1, len(grid)):
        cdf.append(cdf[-1] + (dens[i] + dens[i - 1]) / 2 / 20000)
    x = grid[next(i for i, c in enumerate(cdf) if c >= p * cdf[-1])]
    return x / (1 - x)


def _fmt_se(mean: float, se: float | None) -> str:
    return f"{mean:.4f} +- {se:.4f}" if se is not None else f"{mean:.4f} (1 seed)"


def summarise(runs: list[dict], seeds: list[int]) -> list[str]:
    """The printed table: per-variant mean +- SE per mode, then per pair the difference's spread."""
    loss = {(r["mode"], r["variant"], r["seed"]): r["val_loss"] for r in runs if r["status"] == "ok"}
    lines = ["", "val loss over seeds (mean +- standard error; sd = sample sd over seeds)"]
    lines.append(f"{'variant':<14}" + "".join(f"{mode:>30}" for mode in MODES))
    for v in VARIANTS:
        cells = []
        for mode in MODES:
            values = [loss[(mode, v, s)] for s in seeds if (mode, v, s) in loss]
            if not values:
                cells.append(f"{'-':>30}")
                continue
            mean, se = mean_and_se(values)
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{_fmt_se(mean, se) + f'  sd {sd:.4f}':>30}")
        lines.append(f"{_spec(v).label:<14}" + "".join(cells))
    lines += ["", "difference B - A per seed (sd over seeds of the per-seed difference)",
              f"{'A':<12}{'B':<14}{'mean diff paired':>18}{'unpaired':>10}{'sd paired':>11}{'unpaired':>10}"
              f"{'ratio':>8}{'95% interval':>16}"]
    n = len(seeds)
    # two independent sample sds with n - 1 degrees of freedom each: their ratio's 95% interval
    spread = math.sqrt(_f_quantile(n - 1, 0.975)) if n >= 3 else math.nan
    for a, b in itertools.combinations(VARIANTS, 2):
        stats = {}
        for mode in MODES:
            diffs = [loss[(mode, b, s)] - loss[(mode, a, s)] for s in seeds
                     if (mode, a, s) in loss and (mode, b, s) in loss]
            stats[mode] = (statistics.fmean(diffs) if diffs else math.nan,
                           statistics.stdev(diffs) if len(diffs) > 1 else math.nan)
        (mp, sp), (mu, su) = stats["paired"], stats["unpaired"]
        ratio = su / sp if sp and math.isfinite(sp) and sp > 0 else math.nan
        interval = f"{ratio / spread:.2f} - {ratio * spread:.2f}"
        lines.append(f"{_spec(a).label:<12}{_spec(b).label:<14}{mp:>+18.4f}{mu:>+10.4f}{sp:>11.4f}{su:>10.4f}"
                     f"{ratio:>8.2f}{interval:>16}")
    lines.append("ratio = unpaired sd / paired sd (> 1: pairing makes the difference less noisy); its 95% interval "
                 f"from F({n - 1}, {n - 1}), treating the two sds as independent")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (default 4)")
    parser.add_argument("--budget-tokens", type=int, default=DEFAULT_BUDGET_TOKENS,
                        help=f"training tokens per run (default {DEFAULT_BUDGET_TOKENS:,}, the quickstart's)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--from-json", help="print the table of the runs a --json file holds; train nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(f"{len(saved['runs'])} runs read from {args.from_json} ({saved['budget_tokens']:,} training tokens each)")
        for line in summarise(saved["runs"], saved["seeds"]):
            print(line)
        return 0
    seeds = list(range(args.seeds))
    jobs = [(mode, v, s, args.budget_tokens) for s in seeds for v in VARIANTS for mode in MODES]
    steps = args.budget_tokens // (TrainConfig().batch_size * TrainConfig().seq_len)
    print(f"quickstart model ({MODEL_PRESETS[PRESET]}), {args.budget_tokens:,} training tokens per run "
          f"(~{steps} steps of 8 x 128), seeds {seeds}, data order fixed (data_seed 0); {len(jobs)} runs "
          f"over {args.jobs} process(es) x 1 thread", flush=True)
    start, runs = time.perf_counter(), []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, jobs):
            runs.append(r)
            print(f"  {r['mode']:<9} {_spec(r['variant']).label:<14} seed {r['seed']}: {r['status']} "
                  f"val_loss {r['val_loss'] if r['val_loss'] is None else round(r['val_loss'], 4)} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    for line in summarise(runs, seeds):
        print(line)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget_tokens": args.budget_tokens, "seeds": seeds, "runs": runs}, f, indent=1)
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
