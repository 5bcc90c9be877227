"""`sqa-search bench`: parsing and printing; the measuring, predicting and files are `sqa_search.speed.bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .._format import fmt_bytes, fmt_x
from ..layer.spec import VARIANTS
from ..speed.workload import SCOPES
from ..speed.bench import (DEFAULT_VARIANTS, MODE_CHOICES, BenchError, baseline_heads, bench_records, find,
                           make_plan, results_kind, speedups, title, write_outputs)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=256, help="model width (default 256, the paper's)")
    parser.add_argument("--heads", type=int, default=16, help="baseline heads H (default 16, the paper's)")
    parser.add_argument("--seq-lens", default="1024,4096",
                        help="comma list of sequence lengths N; k means x1024 (4k = 4096, 128k = 131072; default 1024,4096)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i> (default auto)")
    parser.add_argument("--mode", default="prefill", choices=MODE_CHOICES,
                        help="prefill = forward, train = forward+backward, decode = one token against a "
                             "cache of N, both = prefill and train (default prefill)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma list of variant names ({', '.join(VARIANTS)}) or heads as "
                             f"'q/kv', 'q/kv/W' (W = sliding window) or 'q/kv/W/G' (G global tokens); "
                             f"default {DEFAULT_VARIANTS}")
    parser.add_argument("--window", type=int, default=128, help="window W of swsqa / flexsqa (default 128)")
    causal = parser.add_mutually_exclusive_group()
    causal.add_argument("--causal", dest="causal", action="store_true", default=True,
                        help="causal attention, a decoder (default)")
    causal.add_argument("--bidirectional", dest="causal", action="store_false",
                        help="bidirectional attention, an encoder")
    parser.add_argument("--what", default="layer", choices=SCOPES,
                        help="time the attention layer, a whole block, or the whole proxy model (default layer)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the proxy model with --what model (default 8, the paper's)")
    parser.add_argument("--hardware", default=None, metavar="NAME",
                        help="print PREDICTED figures for a cost-model hardware profile (e.g. h100-sxm) "
                             "instead of measuring here; needs no GPU")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write CSV, JSON-lines records and a PNG plot to DIR")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for timing (default: torch's current)")
    parser.add_argument("--budget-s", type=float, default=3.0,
                        help="timing budget per point in seconds, shared by the passes (default 3: a busy CPU "
                             "needs several repeats)")
    parser.add_argument("--passes", type=int, default=None,
                        help="go over the whole grid this many times, each with a share of the budget, and "
                             "pool each point's repeats (default 3 on CPU, 1 on CUDA)")
    parser.add_argument("--max-repeats", type=int, default=1000,
                        help="most timed repeats per point (default 1000: the budget decides, even for decode steps)")
    parser.add_argument("--force", action="store_true", help="re-time points that are in the timing cache")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false",
                        help="neither read nor write the timing cache")
    parser.add_argument("--cache-dir", default=None, help="timing cache directory (default: see sqa_search.speed.timing)")
    parser.add_argument("--no-speed-correction", dest="speed_correction", action="store_const", const=False,
                        default=None, help="report raw CPU times, not corrected for the machine's speed "
                                           "(see sqa_search.speed.probe; raw times are in the CSV either way)")
    parser.add_argument("--fresh-process", action="store_true",
                        help="time each point in a fresh Python process (long sweeps with compiled kernels)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    """Run the bench for parsed `args` (see add_arguments). 0 = done, 1 = nothing ran, 2 = bad option."""
    try:
        plan = make_plan(args)
    except BenchError as exc:
        print(f"sqa-search bench: error: {exc}", file=sys.stderr)
        return 2
    results = bench_records(args, plan)
    _print_report(results, args, plan)
    if args.out:
        csv_path, jsonl_path, png_path = write_outputs(Path(args.out), results, args, plan)
        print(f"\nwrote {csv_path}, {jsonl_path}, {png_path}")
    return 0 if any(r.ok for r in results) else 1


def _print_report(results, args, plan, out=None) -> None:
    out = out or sys.stdout
    ratios = speedups(results, args)
    base = baseline_heads(args)
    spec_set = set(json.dumps(s.to_dict(), sort_keys=True) for s in plan.specs)
    missing = [k.upper() for k, b in base.items() if b is None or json.dumps(b.to_dict(), sort_keys=True) not in spec_set]
    for mode in plan.modes:
        print("", file=out)
        print(title(args, plan, results, mode), file=out)
        print(_matrix(results, plan, mode), file=out)
        print("", file=out)
        print(_details(results, plan, mode, ratios), file=out)
        scaling = _scaling(results, plan, mode)
        if scaling:
            print("scaling:", file=out)
            print("\n".join(scaling), file=out)
    if missing:
        print(f"\nnote: add {' and '.join(m.lower() for m in missing)} to --variants for speedups vs "
              f"{' / '.join(missing)}", file=out)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"{r.status.upper()}: {r.label} {r.mode} N={r.seq_len}: {r.error}", file=out)
    if plan.profile is None:
        flagged = sorted({f for r in results for f in r.flags})
        if flagged:
            print(f"flags seen: {', '.join(flagged)} (see sqa_search.speed.timing for what each means)", file=out)
        rec = next((r for r in results if r.ok), None)
        if rec is not None:
            print(f"peak memory: {rec.mem_kind}", file=out)
        if plan.device.type == "cpu":
            load = _load_note(rec.threads if rec is not None else None)
            if load:
                print(load, file=out)


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.3f}"
    if x >= 1e-3:
        return f"{x:.4f}"
    return f"{x:.2e}"


def _render(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _matrix(results, plan, mode) -> str:
    rows = []
    for spec in plan.specs:
        row = [spec.label]
        for n in plan.seq_lens:
            r = find(results, mode, n, spec)
            row.append(_cell(r))
        rows.append(row)
    return _render(["variant"] + [f"N={n}" for n in plan.seq_lens], rows)


def _cell(r) -> str:
    if r is None:
        return "-"
    if not r.ok:
        return r.status.upper()
    return _fmt_s(r.median_s)


def _details(results, plan, mode, ratios) -> str:
    predicted = plan.profile is not None
    decode = mode == "decode"
    seconds = f"s/step ({results_kind(results, mode) or '-'})"  # measured-corrected, measured-raw or predicted
    if predicted:
        headers = ["variant", "N", seconds, "vs MHA", "vs GQA", "path", "bound", "GFLOP", "MB moved"]
    else:
        headers = ["variant", "N", seconds, "IQR", "n", "vs MHA", "vs GQA", "backend", "peak mem"]
    if decode:
        headers += ["KV cache", "cached tok"]
    if not predicted:
        headers.append("flags")
    rows = []
    for n in plan.seq_lens:
        for spec in plan.specs:
            r = find(results, mode, n, spec)
            if r is None:
                continue
            vs_mha, vs_gqa = ratios[id(r)]
            row = [spec.label, n, _cell(r)]
            if predicted:
                pred = r.prediction or {}
                row += [fmt_x(vs_mha), fmt_x(vs_gqa), r.backend or "-", pred.get("bound", "-"),
                        f"{pred['flops'] / 1e9:.3g}" if "flops" in pred else "-",
                        f"{pred['bytes'] / 1e6:.3g}" if "bytes" in pred else "-"]
            else:
                row += [_fmt_s(r.iqr_s) if r.ok else "-", r.n_repeats or "-", fmt_x(vs_mha), fmt_x(vs_gqa),
                        r.backend or "-", fmt_bytes(r.peak_mem_bytes)]
            if decode:
                row += [fmt_bytes(r.kv_cache_bytes), r.kv_cache_tokens if r.kv_cache_tokens is not None else "-"]
            if not predicted:
                row.append(",".join(r.flags) or "-")
            rows.append(row)
    return _render(headers, rows)


def _scaling(results, plan, mode) -> list[str]:
    """How time grows from the smallest to the largest N; windows against full attention."""
    lines = []
    ns = plan.seq_lens
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        for spec in plan.specs:
            a, b = find(results, mode, lo, spec), find(results, mode, hi, spec)
            if a and b and a.ok and b.ok and a.median_s:
                lines.append(f"  {spec.label}: t(N={hi}) / t(N={lo}) = {b.median_s / a.median_s:.2f}x "
                             f"(N grew {hi / lo:.0f}x; linear = {hi / lo:.0f}x, quadratic = {(hi / lo) ** 2:.0f}x)")
    for spec in plan.specs:
        if spec.window is None:
            continue
        full = spec.replace(window=None, n_global=0)
        for n in ns:
            w, f = find(results, mode, n, spec), find(results, mode, n, full)
            if w and f and w.ok and f.ok and w.median_s and f.median_s:
                ratio = f.median_s / w.median_s
                verdict = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
                same = " (N <= W: the same attention)" if n <= spec.window else ""
                lines.append(f"  {spec.label} vs the same heads with full attention ({full.label}) at N={n}: "
                             f"{verdict}{same}")
    return lines


def _load_note(threads) -> str | None:
    try:
        load1 = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if load1 > cores:
        note = (f"note: load average {load1:.1f} on {cores} cores after timing: other work shared the CPU, "
                f"so these timings are noisy (re-run with --force on a quiet machine)")
        if threads is None or threads > 1:
            note += ("; with more than one thread on a busy CPU the threads wait for each other "
                     "(--threads 1 is steadier)")
        return note
    return None

