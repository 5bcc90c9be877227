"""`sqa-search bench`'s work: the SQA paper's Table 3 (seconds per step, per variant, per N) for any hardware.

Measured on this machine by default, or predicted for a named hardware profile with
``--hardware`` (no GPU needed), both through one latency source (`sqa_search.speed.source`).
The two are never mixed and never confusable: the table title, the CSV column ``source`` and the
plot title all say "measured" or "predicted (profile P, calibration C)", and what a measured figure
is: ``measured-corrected`` (CPU default: seconds at the machine's reference speed, see
`sqa_search.speed.probe`) or ``measured-raw`` (the CSV's ``latency_kind``; raw medians are in
``raw_seconds`` either way).

Here: the options checked into a plan (`make_plan`), the records (`bench_records`), speedups,
the CSV, the JSON-lines file and the plot. The tables are printed by `sqa_search.cli.bench`.

    sqa-search bench --seq-lens 1024,4096,16384 --mode both --out bench_out
    sqa-search bench --hardware h100-sxm --seq-lens 32k,131k
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..layer.spec import VARIANTS, AttentionSpec, SpecError, normalise_variant
from .hardware import CostError, Fingerprint, HardwareProfile, load_profile
from .source import LatencySource, latency_source
from .workload import Workload, latency_kind

__all__ = ["BenchError", "BenchPlan", "parse_variants", "parse_seq_lens", "make_plan", "bench_records", "write_outputs",
           "plot_figure", "write_plot", "write_csv", "title", "speedups", "baseline_heads", "find", "DEFAULT_VARIANTS",
           "MODE_CHOICES", "MODE_TITLES", "CSV_COLUMNS", "results_kind"]

DEFAULT_VARIANTS = "mha,gqa,mqa,sqa,ssqa,xsqa,xsmqa,swsqa"
MODE_CHOICES = ("prefill", "train", "decode", "both")
MODE_TITLES = {"prefill": "forward (prefill)", "train": "forward+backward (train)", "decode": "decode (1 new token, cache of N)"}
CSV_COLUMNS = (
    "source", "mode", "mode_label", "what", "variant", "label", "n_q_heads", "n_kv_heads", "window",
    "n_global", "causal", "d_model", "n_heads", "n_layers", "batch", "seq_len", "dtype", "device",
    "threads", "seconds", "iqr_s", "raw_seconds", "machine_speed", "speed_corrected", "n_repeats", "speedup_vs_mha",
    "speedup_vs_gqa", "backend", "flags",
    "peak_mem_bytes", "mem_kind", "kv_cache_bytes", "kv_cache_tokens", "status", "error",
    "hardware", "fingerprint_id", "profile", "calibration", "pred_flops", "pred_bytes", "pred_bound",
    "latency_kind", "clock",  # what `seconds` is (measured-corrected, measured-raw, predicted); the timing's clock
)


@dataclass
class BenchPlan:
    """What a bench run does, every option checked (`make_plan`)."""

    seq_lens: list[int]
    specs: list[AttentionSpec]
    modes: list[str]
    profile: HardwareProfile | None = None  # predicted for this profile, or measured here (None)
    device: object = None  # the torch.device measured on (None when predicted)
    dtype: str = "float32"
    n_layers: int = 1
    device_type: str = "cpu"
    passes: int = 1


class BenchError(UserError):
    """A bench option that cannot be used as given; the message names the option and the value."""


# ----- options -----------------------------------------------------------------------------
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


def make_plan(args) -> BenchPlan:
    """Every check before any work; returns the resolved plan."""
    from .device import TimingError, parse_dtype, resolve_device  # lazy: torch

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

    plan = BenchPlan(seq_lens=seq_lens, specs=specs, modes=modes)
    if args.hardware is not None:
        try:
            plan.profile = load_profile(args.hardware)
        except CostError as exc:  # names the profile and lists the known ones
            raise BenchError(f"--hardware: {exc}") from None
        default_dtype = "bfloat16" if plan.profile.device_type == "cuda" else "float32"
        device_type = plan.profile.device_type
    else:
        try:
            plan.device = resolve_device(args.device)
        except TimingError as exc:
            raise BenchError(f"--device: {exc}") from None
        device_type = plan.device.type
        default_dtype = "bfloat16" if device_type == "cuda" else "float32"
    try:
        plan.dtype = parse_dtype(args.dtype or default_dtype)[0]
    except TimingError:
        raise BenchError(f"--dtype: {args.dtype!r} is not known: choose one of float32, bfloat16, float16") from None
    plan.n_layers = (args.layers or 8) if args.what == "model" else 1
    plan.device_type = device_type
    # on a CPU the machine's speed wanders in spells of seconds: spread each point over the sweep
    plan.passes = _positive("--passes", args.passes) or (3 if device_type == "cpu" else 1)
    return plan



# ----- records ---------------------------------------------------------------------------------
def workloads(args, plan, device: str) -> list[Workload]:
    """The workloads of the grid, by mode, then by N (the short runs first)."""
    return [Workload(mode=mode, seq_len=n, batch=args.batch, scope=args.what, dtype=plan.dtype, device=device,
                     n_layers=plan.n_layers, threads=args.threads)
            for mode in plan.modes for n in plan.seq_lens]


def bench_records(args, plan) -> list:
    """Every point of the plan's grid, measured here or predicted for its profile: one record each."""
    if plan.profile is not None:
        source = LatencySource(plan.profile.name, plan.profile)
        return source.records(plan.specs, workloads(args, plan, plan.profile.device_type))
    source = latency_source("local", budget_s=args.budget_s, max_repeats=args.max_repeats, cache_dir=args.cache_dir,
                            use_cache=args.use_cache, force=args.force, speed_correction=args.speed_correction)
    return source.records(plan.specs, workloads(args, plan, str(plan.device)), progress=args.progress,
                          fresh_process=args.fresh_process, desc="bench", passes=plan.passes)


def write_outputs(out: Path, results, args, plan) -> list[Path]:
    """The CSV, the JSON-lines records and the plot under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    name = stem(args, plan)
    paths = [out / f"{name}.csv", out / f"{name}.jsonl", out / f"{name}.png"]
    write_csv(paths[0], results, args, plan)
    with open(paths[1], "w") as f:
        for r in results:
            f.write(json.dumps(r.to_dict()) + "\n")
    write_plot(paths[2], results, args, plan)
    return paths


# ----- figures -------------------------------------------------------------------------------
def baseline_heads(args) -> dict:
    out = {}
    for name in ("mha", "gqa"):
        try:
            out[name] = AttentionSpec.variant(name, args.d_model, args.heads, causal=args.causal)
        except SpecError:
            out[name] = None
    return out


def speedups(results, args) -> dict:
    """(mode, N, spec) -> (vs MHA, vs GQA): baseline seconds / this spec's seconds."""
    base = baseline_heads(args)
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


def title(args, plan, results, mode) -> str:
    what = {"layer": "attention layer", "block": "one block", "model": f"{plan.n_layers}-layer proxy model"}[args.what]
    shape = (f"{what}, d_model {args.d_model}, H {args.heads}, {'causal' if args.causal else 'bidirectional'}, "
             f"batch {args.batch}, {plan.dtype}")
    if plan.profile is not None:
        p = plan.profile
        headline = f"PREDICTED (profile {p.name}, calibration: {p.calibration_label}) -- not measured"
        body = f"{p.display_name}: {MODE_TITLES[mode] if mode else ''}{', ' if mode else ''}{shape}; seconds per step"
        return f"{headline}\n{body}"
    fp = next((r.fingerprint for r in results if r.fingerprint), None) or Fingerprint()
    where = fp.device_name or str(plan.device)
    threads = f", {fp.threads} threads" if plan.device.type == "cpu" else ""
    kind = results_kind(results, mode)
    headline = (f"MEASURED on {plan.device} ({where}{threads}, torch {fp.torch_version or '?'})"
                + (f": {kind}" if kind else ""))
    pooled = f" pooled from {plan.passes} passes over the grid" if plan.passes > 1 else ""
    body = (f"{MODE_TITLES[mode] + ', ' if mode else ''}{shape}; seconds per step, median of timed repeats{pooled}")
    correction = speed_note(results)
    return f"{headline}\n{body}" + (f"\n{correction}" if correction else "")


def results_kind(results, mode=None) -> str | None:
    """What the figures of `results` (of one mode, or all) are: a Latency kind, "a + b" when mixed."""
    return latency_kind(r.latency for r in results if r.ok and (mode is None or r.mode == mode))


def speed_note(results) -> str | None:
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


def find(results, mode, n, spec):
    for r in results:
        if r.mode == mode and r.seq_len == n and r.spec == spec:
            return r
    return None



# ----- files ---------------------------------------------------------------------------------
def csv_rows(results, args, plan):
    ratios = speedups(results, args)
    for r in results:
        spec = r.spec
        pred = r.prediction or {}
        vs_mha, vs_gqa = ratios[id(r)]
        yield {
            "source": "predicted" if r.predicted else "measured",
            "mode": r.mode,
            "mode_label": MODE_TITLES[r.mode],
            "what": r.what,
            "variant": r.variant,
            "label": r.label,
            "n_q_heads": spec.n_q_heads,
            "n_kv_heads": spec.n_kv_heads,
            "window": spec.window,
            "n_global": spec.n_global,
            "causal": spec.causal,
            "d_model": spec.d_model,
            "n_heads": spec.n_heads,
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
            "hardware": (plan.profile.display_name if plan.profile is not None
                         else (r.fingerprint.device_name if r.fingerprint else None)),
            "fingerprint_id": r.fingerprint_id or None,
            "profile": plan.profile.name if plan.profile is not None else None,
            "calibration": pred.get("calibration"),
            "pred_flops": pred.get("flops"),
            "pred_bytes": pred.get("bytes"),
            "pred_bound": pred.get("bound"),
            "latency_kind": r.latency.kind,
            "clock": None if r.predicted else r.clock,
        }


def stem(args, plan) -> str:
    source = f"predicted-{plan.profile.name}" if plan.profile is not None else f"measured-{plan.device_type}"
    return f"bench-{source}-{args.what}-{args.mode}-{plan.dtype}"


def write_csv(path: Path, results, args, plan) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in csv_rows(results, args, plan):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def plot_figure(results, args, plan):
    """The log-log plot of seconds per step against N, one panel per mode, laid out so that its
    title (as long as the run's settings make it) and labels fit inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .._figures import fit_text

    modes = plan.modes
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False, dpi=110)
    for ax, mode in zip(axes[0], modes):
        for spec in plan.specs:
            pts = [(n, r.median_s) for n in plan.seq_lens
                   if (r := find(results, mode, n, spec)) is not None and r.ok and r.median_s]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if spec.window is not None else "-"
            ax.plot(xs, ys, style, marker="o", label=spec.label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(plan.seq_lens, [str(n) for n in plan.seq_lens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the N that were run
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds per step")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title(args, plan, results, None), fontsize=10)
    fit_text(fig)
    return fig


def write_plot(path: Path, results, args, plan) -> None:
    from .._figures import save

    save(plot_figure(results, args, plan), path)

