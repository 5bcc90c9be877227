"""Does the default training budget tell attention variants apart? Or: train one variant once.

    python benchmarks/quality_discrimination.py --discrimination --variants mha,xsmqa --seeds 0,1,2
    python benchmarks/quality_discrimination.py --variant sqa --budget-steps 50 --json out.json

The discrimination experiment trains each named variant of a preset's size with each seed and
prints the mean and spread (sample standard deviation over seeds) of val loss and MQAR accuracy,
and whether MHA and xSMQA are apart by more than twice the larger of their spreads. It is what
`DEFAULT_BUDGET_TOKENS` was chosen by. Without ``--discrimination`` one variant is trained once
and the main figures of its `TrainResult` are printed as JSON. ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any, Sequence

from sqa_search.layer.model import MODEL_PRESETS
from sqa_search.layer.spec import AttentionSpec, SpecError, variant_display_name
from sqa_search.quality.config import TASKS, TrainConfig, TrainError
from sqa_search.quality.errors import DataError
from sqa_search.quality.plan import resolve_data
from sqa_search.quality.result import TrainResult, json_safe
from sqa_search.quality.train import train_spec

__all__ = ["DISCRIMINATION_VARIANTS", "discrimination_experiment", "main"]

DISCRIMINATION_VARIANTS = ("mha", "gqa", "sqa", "ssqa", "xsqa", "xsmqa")


def discrimination_experiment(
    variants: Sequence[str] = DISCRIMINATION_VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    train_config: TrainConfig | None = None,
    preset: str = "quickstart",
    data=None,
    out=None,
    progress: bool = False,
) -> dict:
    """Train each named variant of the preset's size with each seed; print and return a table
    of mean and spread (sample standard deviation over seeds) of val loss and MQAR accuracy,
    and whether MHA and xSMQA are apart by more than twice the larger of their spreads."""
    out = out or sys.stdout
    cfg = train_config or TrainConfig()
    size = MODEL_PRESETS[preset]
    # tokenised once, shared by every run
    tokens = resolve_data(data) if "lm" in cfg.tasks else None
    rows: dict[str, dict] = {}
    runs = []
    for name in variants:
        spec = AttentionSpec.variant(name, size["d_model"], size["n_heads"])
        per_seed = []
        for seed in seeds:
            r = train_spec(spec, preset, cfg.replace(seed=seed), data=tokens, progress=progress)
            per_seed.append(r)
            runs.append(r.to_dict())
            print(
                f"  {spec.label:<16} seed {seed}: status={r.status} val_loss={_fmt(r.val_loss)} "
                f"mqar_acc={_fmt(r.mqar_accuracy)} wall={r.wall_s:.1f}s tok/s={r.tokens_per_s:,.0f}",
                file=out, flush=True,
            )
        rows[name] = _summarise(spec, per_seed)
    print(_table(rows), file=out, flush=True)
    verdict = _separation(rows)
    for line in verdict["lines"]:
        print(line, file=out, flush=True)
    return {"rows": rows, "separation": verdict, "runs": runs, "train_config": cfg.to_dict(), "preset": preset}


def _stats(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(spec: AttentionSpec, results: list[TrainResult]) -> dict:
    vl_mean, vl_sd = _stats([r.val_loss for r in results])
    mq_mean, mq_sd = _stats([r.mqar_accuracy for r in results])
    return {
        "label": spec.label,
        "val_loss_mean": vl_mean,
        "val_loss_sd": vl_sd,
        "mqar_acc_mean": mq_mean,
        "mqar_acc_sd": mq_sd,
        "wall_s_mean": statistics.fmean(r.wall_s for r in results),
        "tokens_per_s_mean": statistics.fmean(r.tokens_per_s for r in results),
        "statuses": [r.status for r in results],
        "val_loss": [r.val_loss for r in results],
        "mqar_acc": [r.mqar_accuracy for r in results],
    }


def _fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(rows: dict) -> str:
    head = f"{'variant':<16} {'val_loss':>8} {'± sd':>7} {'mqar_acc':>9} {'± sd':>7} {'wall_s':>7} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for row in rows.values():
        lines.append(
            f"{row['label']:<16} {_fmt(row['val_loss_mean']):>8} {_fmt(row['val_loss_sd']):>7} "
            f"{_fmt(row['mqar_acc_mean'], 3):>9} {_fmt(row['mqar_acc_sd'], 3):>7} "
            f"{row['wall_s_mean']:>7.1f} {row['tokens_per_s_mean']:>8,.0f}"
        )
    return "\n".join(lines)


def _separation(rows: dict, a: str = "mha", b: str = "xsmqa") -> dict:
    lines, apart = [], {}
    if a not in rows or b not in rows:
        return {"lines": [f"separation: needs both {a} and {b} in the variants"], "apart": apart}
    for metric in ("val_loss", "mqar_acc"):
        ma, mb = rows[a][f"{metric}_mean"], rows[b][f"{metric}_mean"]
        sa, sb = rows[a][f"{metric}_sd"], rows[b][f"{metric}_sd"]
        if None in (ma, mb, sa, sb):
            continue
        gap, spread = abs(ma - mb), max(sa, sb)
        apart[metric] = gap > 2 * spread
        lines.append(
            f"{metric}: |{variant_display_name(a)} - {variant_display_name(b)}| = {gap:.4f}, "
            f"2 x spread = {2 * spread:.4f} -> {'apart' if apart[metric] else 'NOT apart'}"
        )
    lines.append(f"discriminates: {any(apart.values())}")
    return {"lines": lines, "apart": apart, "discriminates": any(apart.values())}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality_discrimination.py",
        description="The quality side of a trial: train the proxy model with one attention spec, briefly, "
                    "and measure it.",
    )
    parser.add_argument("--discrimination", action="store_true", help="run the discrimination experiment")
    parser.add_argument("--variant", default="mha", help="variant for a single trial (default mha)")
    parser.add_argument("--variants", default=",".join(DISCRIMINATION_VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="quickstart", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--task", default=None, choices=TASKS)
    parser.add_argument("--budget-tokens", type=int, default=None)
    parser.add_argument("--budget-steps", type=int, default=None)
    parser.add_argument("--budget-seconds", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="data source: a path, 'builtin' or 'hf:NAME'")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v for k, v in {
            "budget_tokens": args.budget_tokens, "budget_steps": args.budget_steps,
            "budget_seconds": args.budget_seconds, "threads": args.threads, "seed": args.seed,
        }.items() if v is not None
    }
    if args.task:
        overrides["task"] = args.task
    try:
        cfg = TrainConfig(**overrides)
        if args.discrimination:
            seeds = [int(s) for s in args.seeds.split(",") if s]
            variants = [v for v in args.variants.split(",") if v]
            report = discrimination_experiment(variants, seeds, cfg, args.preset, data=args.data,
                                               progress=not args.no_progress)
        else:
            size = MODEL_PRESETS[args.preset]
            spec = AttentionSpec.variant(args.variant, size["d_model"], size["n_heads"])
            res = train_spec(spec, args.preset, cfg, data=args.data, progress=False if args.no_progress else None)
            report = res.to_dict()
            keys = ("status", "reason", "steps", "tokens", "wall_s", "tokens_per_s", "train_loss", "val_loss",
                    "val_ppl", "val_acc", "mqar_accuracy", "backend")
            print(json.dumps({k: report[k] for k in keys}, indent=1))
    except (TrainError, DataError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
