"""`sqa-search bench`: the SQA paper's Table 3 (seconds per step, per variant, per N) for any hardware.

Measured on this machine by default (`sqa_search.speed.timing`), or predicted for a named hardware
profile with ``--hardware`` (`sqa_search.speed.cost`, no GPU needed). The two are never mixed and
never confusable: the table title, the CSV column ``source`` and the plot title all say
"measured" or "predicted (profile P, calibration C)".

Output: a table per workload (paper layout: variants x N), a detail table (speedups against
MHA and GQA, the kernel that ran, flags, peak memory, KV cache), a scaling summary (how time
grows with N; windowed variants against the same heads with full attention), and with
``--out DIR`` a CSV, a JSON-lines file of the full records and a log-log plot of time vs N.

    sqa-search bench --seq-lens 1024,4096,16384 --mode both --out bench_out
    sqa-search bench --hardware h100-sxm --seq-lens 32k,131k
    python -m sqa_search.speed.bench --variants mha,sqa,8/2,8/4/256 --mode decode
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path

from ..layer.spec import VARIANTS, AttentionSpec, SpecError, normalise_variant
from .._format import fmt_bytes as _fmt_bytes, fmt_x as _fmt_x
from ..errors import UserError
from .hardware import Fingerprint
from .workload import Workload

__all__ = ["add_arguments", "run", "main", "BenchError", "parse_variants", "parse_seq_lens", "DEFAULT_VARIANTS"]

DEFAULT_VARIANTS = "mha,gqa,mqa,sqa,ssqa,xsqa,xsmqa,swsqa"
MODE_CHOICES = ("prefill", "train", "decode", "both")
MODE_TITLES = {"prefill": "forward (prefill)", "train": "forward+backward (train)", "decode": "decode (1 new token, cache of N)"}
CSV_COLUMNS = (
    "source", "mode", "mode_label", "what", "variant", "label", "n_q_heads", "n_kv_heads", "window",
    "n_global", "causal", "d_model", "n_heads", "n_layers", "batch", "seq_len", "dtype", "device",
    "threads", "seconds", "iqr_s", "raw_seconds", "machine_speed", "speed_corrected", "n_repeats", "speedup_vs_mha", "speedup_vs_gqa", "backend", "flags",
    "peak_mem_bytes", "mem_kind", "kv_cache_bytes", "kv_cache_tokens", "status", "error",
    "hardware", "fingerprint_id", "profile", "calibration", "pred_flops", "pred_bytes", "pred_bound",
)


class BenchError(UserError):
    """A bench option that cannot be used as given; the message names the option and the value."""


# ----- options -----------------------------------------------------------------------------
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
    parser.add_argument("--what", default="layer", choices=("layer", "block", "model"),
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


def parse_seq_lens(text: str) -> list[int]:
    """'1024,4k' -> [1024, 4096]; raises BenchError naming --seq-lens."""
    values = []
    for raw in str(text).split(","):
        token = raw.strip().lower()
        if not token:
            continue
        scale = 1
        if token.endswith("k"):
            token, scale = token[:-1], 1024
        try:
            value = int(token) * scale
        except ValueError:
            raise BenchError(f"--seq-lens: {raw.strip()!r} is not a sequence length: give positive "
                             f"integers, comma-separated, optionally with k (=1024), e.g. 1024,4k") from None
        if value < 1:
            raise BenchError(f"--seq-lens: {raw.strip()!r} is not allowed: a sequence length must be >= 1")
        if value not in values:
            values.append(value)
    if not values:
        raise BenchError(f"--seq-lens: {text!r} names no sequence length; e.g. --seq-lens 1024,4096")
    return sorted(values)


def parse_variants(text: str, *, d_model: int, n_heads: int, window: int, causal: bool) -> list[AttentionSpec]:
    """Variant names or 'q/kv' / 'q/kv/W' entries -> specs; raises BenchError naming --variants."""
    allowed = f"a variant name ({', '.join(VARIANTS)}) or heads as 'q/kv', 'q/kv/W' or 'q/kv/W/G'"
    specs: list[AttentionSpec] = []
    for raw in str(text).split(","):
        token = raw.strip()
        if not token:
            continue
        try:
            if "/" in token:
                parts = token.split("/")
                if len(parts) not in (2, 3, 4) or not all(p.strip().isdigit() for p in parts):
                    raise BenchError(f"--variants: {token!r} is not allowed: heads are written 'q/kv', "
                                     f"'q/kv/W' or 'q/kv/W/G' with positive integers, e.g. 8/4, 8/4/128 or "
                                     f"8/4/128/16")
                q, kv = int(parts[0]), int(parts[1])
                w = int(parts[2]) if len(parts) >= 3 else None
                g = int(parts[3]) if len(parts) == 4 else 0
                spec = AttentionSpec(d_model=d_model, n_heads=n_heads, n_q_heads=q, n_kv_heads=kv,
                                     window=w, n_global=g, causal=causal)
            else:
                try:
                    key = normalise_variant(token)
                except SpecError:
                    raise BenchError(f"--variants: {token!r} is not known: use {allowed}") from None
                overrides = {"causal": causal}
                if key in ("swsqa", "flexsqa"):
                    overrides["window"] = window
                spec = AttentionSpec.variant(key, d_model, n_heads, **overrides)
        except SpecError as exc:
            raise BenchError(f"--variants: {token!r} with --d-model {d_model} --heads {n_heads}: {exc}") from None
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise BenchError(f"--variants: {text!r} names no variant: use {allowed}")
    return specs


def _positive(option: str, value, low=1):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchError(f"{option}: {value!r} is not an integer")
    if value < low:
        raise BenchError(f"{option}: {value!r} is not allowed: must be >= {low}")
    return value


def _validate(args) -> dict:
    """Every check before any work; returns the resolved plan."""
    from .timing import TimingError, parse_dtype, resolve_device

    _positive("--d-model", args.d_model)
    _positive("--heads", args.heads)
    _positive("--batch", args.batch)
    _positive("--window", args.window)
    _positive("--layers", args.layers)
    _positive("--threads", args.threads)
    _positive("--max-repeats", args.max_repeats)
    if not (isinstance(args.budget_s, (int, float)) and math.isfinite(args.budget_s) and args.budget_s >= 0):
        raise BenchError(f"--budget-s: {args.budget_s!r} is not allowed: must be a number of seconds >= 0")
    if args.d_model % args.heads:
        raise BenchError(f"--heads: {args.heads} does not divide --d-model {args.d_model}: "
                         f"head_dim = d_model / heads must be a whole number")
    if (args.d_model // args.heads) % 2:
        raise BenchError(f"--heads: {args.heads} with --d-model {args.d_model} gives head_dim "
                         f"{args.d_model // args.heads}, which must be even (RoPE rotates pairs)")
    seq_lens = parse_seq_lens(args.seq_lens)
    specs = parse_variants(args.variants, d_model=args.d_model, n_heads=args.heads,
                           window=args.window, causal=args.causal)
    modes = ["prefill", "train"] if args.mode == "both" else [args.mode]
    if args.mode == "decode" and not args.causal:
        raise BenchError("--mode decode needs causal attention (an encoder has no next token): drop --bidirectional")

    plan = {"seq_lens": seq_lens, "specs": specs, "modes": modes, "profile": None, "device": None}
    if args.hardware is not None:
        from .hardware import CostError, load_profile

        try:
            plan["profile"] = load_profile(args.hardware)
        except CostError as exc:  # names the profile and lists the known ones
            raise BenchError(f"--hardware: {exc}") from None
        default_dtype = "bfloat16" if plan["profile"].device_type == "cuda" else "float32"
        device_type = plan["profile"].device_type
    else:
        try:
            plan["device"] = resolve_device(args.device)
        except TimingError as exc:
            raise BenchError(f"--device: {exc}") from None
        device_type = plan["device"].type
        default_dtype = "bfloat16" if device_type == "cuda" else "float32"
    try:
        plan["dtype"] = parse_dtype(args.dtype or default_dtype)[0]
    except TimingError:
        raise BenchError(f"--dtype: {args.dtype!r} is not known: choose one of float32, bfloat16, float16") from None
    plan["n_layers"] = (args.layers or 8) if args.what == "model" else 1
    plan["device_type"] = device_type
    # on a CPU the machine's speed wanders in spells of seconds: spread each point over the sweep
    plan["passes"] = _positive("--passes", args.passes) or (3 if device_type == "cpu" else 1)
    return plan


# ----- measuring and predicting -------------------------------------------------------------
def _workloads(args, plan, device: str) -> list[Workload]:
    """The workloads of the grid, by mode, then by N (the short runs first)."""
    return [Workload(mode=mode, seq_len=n, batch=args.batch, scope=args.what, dtype=plan["dtype"], device=device,
                     n_layers=plan["n_layers"], threads=args.threads)
            for mode in plan["modes"] for n in plan["seq_lens"]]


def _measure(args, plan) -> list:
    from .timing import time_specs

    return time_specs(
        plan["specs"], _workloads(args, plan, str(plan["device"])), progress=args.progress,
        fresh_process=args.fresh_process, desc="bench", budget_s=args.budget_s, max_repeats=args.max_repeats,
        cache_dir=args.cache_dir, use_cache=args.use_cache, force=args.force,
        speed_correction=args.speed_correction, passes=plan["passes"],
    )


def _predict(args, plan) -> list:
    from .cost import CostError, predict
    from .record import TimingResult

    profile = plan["profile"]
    results = []
    for workload in _workloads(args, plan, profile.device_type):
        mode, n = workload.mode, workload.seq_len
        for spec in plan["specs"]:
                rec = TimingResult(
                    spec=spec, label=spec.label, variant=spec.variant_name or spec.family,
                    mode=mode, what=args.what, batch=args.batch, seq_len=n, dtype=plan["dtype"],
                    device=f"{profile.device_type} (profile {profile.name})", n_layers=plan["n_layers"],
                    predicted=True, mem_kind="not predicted",
                )
                rec.kv_cache_bytes = spec.kv_cache_bytes(n, workload.dtype_bytes, args.batch) * plan["n_layers"]
                if mode == "decode":
                    rec.kv_cache_tokens = n if spec.window is None else min(n, spec.window)
                try:
                    pred = predict(spec, profile, workload)
                except (CostError, SpecError, ValueError) as exc:
                    rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
                else:
                    rec.median_s = pred.seconds
                    rec.backend = f"model:{pred.path}"
                    details = pred.to_dict()
                    details.pop("phases", None)
                    rec.prediction = details
                results.append(rec)
    return results


# ----- tables --------------------------------------------------------------------------------
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


def _baseline_heads(args) -> dict:
    out = {}
    for name in ("mha", "gqa"):
        try:
            out[name] = AttentionSpec.variant(name, args.d_model, args.heads, causal=args.causal)
        except SpecError:
            out[name] = None
    return out


def _speedups(results, args) -> dict:
    """(mode, N, spec) -> (vs MHA, vs GQA): baseline seconds / this spec's seconds."""
    base = _baseline_heads(args)
    times = {(r.mode, r.seq_len, json.dumps(r.spec.to_dict(), sort_keys=True)): r.median_s for r in results if r.ok}
    out = {}
    for r in results:
        row = []
        for name in ("mha", "gqa"):
            b = base[name]
            t_base = times.get((r.mode, r.seq_len, json.dumps(b.to_dict(), sort_keys=True))) if b else None
            row.append(t_base / r.median_s if (t_base and r.ok and r.median_s) else None)
        out[id(r)] = tuple(row)
    return out


def _title(args, plan, results, mode) -> str:
    what = {"layer": "attention layer", "block": "one block", "model": f"{plan['n_layers']}-layer proxy model"}[args.what]
    shape = (f"{what}, d_model {args.d_model}, H {args.heads}, {'causal' if args.causal else 'bidirectional'}, "
             f"batch {args.batch}, {plan['dtype']}")
    if plan["profile"] is not None:
        p = plan["profile"]
        headline = f"PREDICTED (profile {p.name}, calibration: {p.calibration_label}) -- not measured"
        body = f"{p.display_name}: {MODE_TITLES[mode] if mode else ''}{', ' if mode else ''}{shape}; seconds per step"
        return f"{headline}\n{body}"
    fp = next((r.fingerprint for r in results if r.fingerprint), None) or Fingerprint()
    where = fp.device_name or str(plan["device"])
    threads = f", {fp.threads} threads" if plan["device"].type == "cpu" else ""
    headline = f"MEASURED on {plan['device']} ({where}{threads}, torch {fp.torch_version or '?'})"
    pooled = f" pooled from {plan['passes']} passes over the grid" if plan.get("passes", 1) > 1 else ""
    body = (f"{MODE_TITLES[mode] + ', ' if mode else ''}{shape}; seconds per step, median of timed repeats{pooled}")
    correction = _speed_note(results)
    return f"{headline}\n{body}" + (f"\n{correction}" if correction else "")


def _speed_note(results) -> str | None:
    """How much the CPU speed correction moved the figures, so a reader can judge it."""
    corrected = [r for r in results if r.ok and r.speed_corrected and r.machine_speed]
    if not corrected:
        return None
    speeds = [s for r in corrected for s in r.speeds] or [r.machine_speed for r in corrected]
    refs = sorted({r.reference_probe_s for r in corrected})
    note = (f"corrected to this machine's reference speed (probe {', '.join(f'{x * 1e3:.3g} ms' for x in refs)}; "
            f"see sqa_search.speed.probe): the machine ran at {min(speeds):.2f}-{max(speeds):.2f}x of it during "
            f"these timings; raw medians are in the CSV (raw_seconds); --no-speed-correction reports them instead")
    if statistics.median(speeds) > 1.1:
        note += ("\nnote: the machine mostly ran faster than its reference, which was measured in a slow spell: "
                 "the figures are consistent between runs but high; delete machine-reference-*.json in the "
                 "timing cache to measure it again (cached timings are then re-timed)")
    return note


def _matrix(results, plan, mode) -> str:
    rows = []
    for spec in plan["specs"]:
        row = [spec.label]
        for n in plan["seq_lens"]:
            r = _find(results, mode, n, spec)
            row.append(_cell(r))
        rows.append(row)
    return _render(["variant"] + [f"N={n}" for n in plan["seq_lens"]], rows)


def _find(results, mode, n, spec):
    for r in results:
        if r.mode == mode and r.seq_len == n and r.spec == spec:
            return r
    return None


def _cell(r) -> str:
    if r is None:
        return "-"
    if not r.ok:
        return r.status.upper()
    return _fmt_s(r.median_s)


def _details(results, plan, mode, speedups) -> str:
    predicted = plan["profile"] is not None
    decode = mode == "decode"
    if predicted:
        headers = ["variant", "N", "s/step", "vs MHA", "vs GQA", "path", "bound", "GFLOP", "MB moved"]
    else:
        headers = ["variant", "N", "s/step", "IQR", "n", "vs MHA", "vs GQA", "backend", "peak mem"]
    if decode:
        headers += ["KV cache", "cached tok"]
    if not predicted:
        headers.append("flags")
    rows = []
    for n in plan["seq_lens"]:
        for spec in plan["specs"]:
            r = _find(results, mode, n, spec)
            if r is None:
                continue
            vs_mha, vs_gqa = speedups[id(r)]
            row = [spec.label, n, _cell(r)]
            if predicted:
                pred = r.prediction or {}
                row += [_fmt_x(vs_mha), _fmt_x(vs_gqa), r.backend or "-", pred.get("bound", "-"),
                        f"{pred['flops'] / 1e9:.3g}" if "flops" in pred else "-",
                        f"{pred['bytes'] / 1e6:.3g}" if "bytes" in pred else "-"]
            else:
                row += [_fmt_s(r.iqr_s) if r.ok else "-", r.n_repeats or "-", _fmt_x(vs_mha), _fmt_x(vs_gqa),
                        r.backend or "-", _fmt_bytes(r.peak_mem_bytes)]
            if decode:
                row += [_fmt_bytes(r.kv_cache_bytes), r.kv_cache_tokens if r.kv_cache_tokens is not None else "-"]
            if not predicted:
                row.append(",".join(r.flags) or "-")
            rows.append(row)
    return _render(headers, rows)


def _scaling(results, plan, mode) -> list[str]:
    """How time grows from the smallest to the largest N; windows against full attention."""
    lines = []
    ns = plan["seq_lens"]
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        for spec in plan["specs"]:
            a, b = _find(results, mode, lo, spec), _find(results, mode, hi, spec)
            if a and b and a.ok and b.ok and a.median_s:
                lines.append(f"  {spec.label}: t(N={hi}) / t(N={lo}) = {b.median_s / a.median_s:.2f}x "
                             f"(N grew {hi / lo:.0f}x; linear = {hi / lo:.0f}x, quadratic = {(hi / lo) ** 2:.0f}x)")
    for spec in plan["specs"]:
        if spec.window is None:
            continue
        full = spec.replace(window=None, n_global=0)
        for n in ns:
            w, f = _find(results, mode, n, spec), _find(results, mode, n, full)
            if w and f and w.ok and f.ok and w.median_s and f.median_s:
                ratio = f.median_s / w.median_s
                verdict = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
                same = " (N <= W: the same attention)" if n <= spec.window else ""
                lines.append(f"  {spec.label} vs the same heads with full attention ({full.label}) at N={n}: "
                             f"{verdict}{same}")
    return lines


def _print_report(results, args, plan, out=None) -> None:
    out = out or sys.stdout
    speedups = _speedups(results, args)
    base = _baseline_heads(args)
    spec_set = set(json.dumps(s.to_dict(), sort_keys=True) for s in plan["specs"])
    missing = [k.upper() for k, b in base.items() if b is None or json.dumps(b.to_dict(), sort_keys=True) not in spec_set]
    for mode in plan["modes"]:
        print("", file=out)
        print(_title(args, plan, results, mode), file=out)
        print(_matrix(results, plan, mode), file=out)
        print("", file=out)
        print(_details(results, plan, mode, speedups), file=out)
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
    if plan["profile"] is None:
        flagged = sorted({f for r in results for f in r.flags})
        if flagged:
            print(f"flags seen: {', '.join(flagged)} (see sqa_search.speed.timing for what each means)", file=out)
        rec = next((r for r in results if r.ok), None)
        if rec is not None:
            print(f"peak memory: {rec.mem_kind}", file=out)
        if plan["device"].type == "cpu":
            load = _load_note(rec.threads if rec is not None else None)
            if load:
                print(load, file=out)


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


# ----- files ---------------------------------------------------------------------------------
def _csv_rows(results, args, plan):
    speedups = _speedups(results, args)
    for r in results:
        spec = r.spec.to_dict()
        pred = r.prediction or {}
        vs_mha, vs_gqa = speedups[id(r)]
        yield {
            "source": "predicted" if r.predicted else "measured",
            "mode": r.mode,
            "mode_label": MODE_TITLES[r.mode],
            "what": r.what,
            "variant": r.variant,
            "label": r.label,
            "n_q_heads": spec["n_q_heads"],
            "n_kv_heads": spec["n_kv_heads"],
            "window": spec.get("window"),
            "n_global": spec.get("n_global", 0),
            "causal": spec.get("causal"),
            "d_model": spec["d_model"],
            "n_heads": spec["n_heads"],
            "n_layers": r.n_layers,
            "batch": r.batch,
            "seq_len": r.seq_len,
            "dtype": r.dtype,
            "device": r.device,
            "threads": r.threads,
            "seconds": r.median_s,
            "iqr_s": r.iqr_s,
            "raw_seconds": r.raw_median_s,
            "machine_speed": r.machine_speed,
            "speed_corrected": r.speed_corrected,
            "n_repeats": r.n_repeats,
            "speedup_vs_mha": None if vs_mha is None else round(vs_mha, 4),
            "speedup_vs_gqa": None if vs_gqa is None else round(vs_gqa, 4),
            "backend": r.backend,
            "flags": ";".join(r.flags),
            "peak_mem_bytes": r.peak_mem_bytes,
            "mem_kind": r.mem_kind,
            "kv_cache_bytes": r.kv_cache_bytes,
            "kv_cache_tokens": r.kv_cache_tokens,
            "status": r.status,
            "error": r.error,
            "hardware": (plan["profile"].display_name if plan["profile"] is not None
                         else (r.fingerprint.device_name if r.fingerprint else None)),
            "fingerprint_id": r.fingerprint_id or None,
            "profile": plan["profile"].name if plan["profile"] is not None else None,
            "calibration": pred.get("calibration"),
            "pred_flops": pred.get("flops"),
            "pred_bytes": pred.get("bytes"),
            "pred_bound": pred.get("bound"),
        }


def _stem(args, plan) -> str:
    source = f"predicted-{plan['profile'].name}" if plan["profile"] is not None else f"measured-{plan['device_type']}"
    return f"bench-{source}-{args.what}-{args.mode}-{plan['dtype']}"


def write_csv(path: Path, results, args, plan) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in _csv_rows(results, args, plan):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def plot_figure(results, args, plan):
    """The log-log plot of seconds per step against N, one panel per mode, laid out so that its
    title (as long as the run's settings make it) and labels fit inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .._figures import fit_text

    modes = plan["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False, dpi=110)
    for ax, mode in zip(axes[0], modes):
        for spec in plan["specs"]:
            pts = [(n, r.median_s) for n in plan["seq_lens"]
                   if (r := _find(results, mode, n, spec)) is not None and r.ok and r.median_s]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if spec.window is not None else "-"
            ax.plot(xs, ys, style, marker="o", label=spec.label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(plan["seq_lens"], [str(n) for n in plan["seq_lens"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the N that were run
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds per step")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(args, plan, results, None), fontsize=10)
    fit_text(fig)
    return fig


def write_plot(path: Path, results, args, plan) -> None:
    from .._figures import save

    save(plot_figure(results, args, plan), path)


# ----- entry points --------------------------------------------------------------------------
def run(args) -> int:
    """Run the bench for parsed `args` (see add_arguments). 0 = done, 1 = nothing ran, 2 = bad option."""
    try:
        plan = _validate(args)
    except BenchError as exc:
        print(f"sqa-search bench: error: {exc}", file=sys.stderr)
        return 2
    if plan["profile"] is not None:
        results = _predict(args, plan)
    else:
        results = _measure(args, plan)
    _print_report(results, args, plan)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = _stem(args, plan)
        write_csv(out / f"{stem}.csv", results, args, plan)
        with open(out / f"{stem}.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r.to_dict()) + "\n")
        write_plot(out / f"{stem}.png", results, args, plan)
        print(f"\nwrote {out / (stem + '.csv')}, {out / (stem + '.jsonl')}, {out / (stem + '.png')}")
    return 0 if any(r.ok for r in results) else 1


def main(argv=None) -> int:
    """`python -m sqa_search.speed.bench`: the same as `sqa-search bench`, errors included."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
