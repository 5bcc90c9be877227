"""How the training budget and batch size set the seed noise and the ranking of the named variants.

    python benchmarks/budget_sweep.py --settings '{"b4": {"batch_size": 4}}' --seeds 0,1,2,3 --json out.json
    python benchmarks/budget_sweep.py --from-json out.json          # the tables again

Trains the quickstart's model (d_model 128, 8 heads, 4 layers, task lm on the builtin corpus, data
order fixed) with every named variant of `--variants` and every seed, under each named set of
TrainConfig settings, in `--jobs` processes of one torch thread each. Prints, per settings: each
variant's mean val loss, its seed sd and per-seed values; the pooled seed sd; and Spearman's rho
between the variants' loss ranks under disjoint halves of the seeds and under single seeds (how
often two runs with different seeds would rank the variants alike).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from sqa_search.layer.model import MODEL_PRESETS
from sqa_search.layer.spec import AttentionSpec
from sqa_search.quality.config import TrainConfig
from sqa_search.quality.train import train_spec

VARIANTS = "mha,gqa,mqa,sqa,ssqa,xsqa,xsmqa,lsqa"


def run_one(job: tuple[str, str, int, dict]) -> dict:
    name, variant, seed, settings = job
    size = MODEL_PRESETS["quickstart"]
    spec = AttentionSpec.variant(variant, size["d_model"], size["n_heads"])
    r = train_spec(spec, "quickstart", TrainConfig(seed=seed, threads=1, **settings), progress=False)
    return {"settings": name, "variant": variant, "seed": seed, "status": r.status, "val_loss": r.val_loss,
            "wall_s": r.wall_s, "steps": r.steps}


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def summarise(runs: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["settings"] for r in runs):
        mine = [r for r in runs if r["settings"] == name and r["status"] == "ok"]
        loss = {(r["variant"], r["seed"]): r["val_loss"] for r in mine}
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        seeds = sorted({r["seed"] for r in mine})
        lines += ["", f"settings {name}: {len(mine)} runs, {statistics.mean(r['wall_s'] for r in mine):.1f} s each "
                      f"(one thread, {len(seeds)} seeds)"]
        for v in sorted(variants, key=lambda v: statistics.mean(loss[v, s] for s in seeds)):
            xs = [loss[v, s] for s in seeds]
            lines.append(f"  {v:6} mean {statistics.mean(xs):.4f}  sd {statistics.stdev(xs):.4f}  "
                         f"seeds {' '.join(f'{x:.4f}' for x in xs)}")
        pooled = math.sqrt(statistics.mean(statistics.variance([loss[v, s] for s in seeds]) for v in variants))
        lines.append(f"  pooled seed sd {pooled:.4f}")
        if len(variants) < 3:
            continue  # a rank correlation needs variants to rank
        halves = []
        for a in itertools.combinations(seeds, len(seeds) // 2):
            b = tuple(s for s in seeds if s not in a)
            if a < b:
                mean = lambda group: [statistics.mean(loss[v, s] for s in group) for v in variants]  # noqa: E731
                halves.append(f"{a} vs {b}: {spearman(mean(a), mean(b)):.3f}")
        lines.append("  Spearman, seed halves: " + "; ".join(halves))
        singles = [spearman([loss[v, a] for v in variants], [loss[v, b] for v in variants])
                   for a, b in itertools.combinations(seeds, 2)]
        lines.append(f"  Spearman, single seeds ({len(singles)} pairs): " + " ".join(f"{x:.3f}" for x in singles)
                     + f"; {sum(x >= 0.8 for x in singles)} of {len(singles)} >= 0.8")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default='{"default": {}}', help="JSON: name -> TrainConfig fields")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="save the runs here")
    parser.add_argument("--from-json", help="print the tables of saved runs instead of training")
    args = parser.parse_args(argv)
    if args.from_json:
        runs = json.loads(open(args.from_json).read())
    else:
        settings = json.loads(args.settings)
        jobs = [(n, v, int(s), kw) for n, kw in settings.items() for v in args.variants.split(",")
                for s in args.seeds.split(",")]
        with ProcessPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(run_one, jobs))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs, f, indent=1)
    print("\n".join(summarise(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
