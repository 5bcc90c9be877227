"""Calibration: fit a hardware profile's efficiency factors and overhead to measured timings.

`calibrate(profile, records)` fits; `calibrate_from_measurements` times a spread of attention
layers on this machine with the timing harness (`sqa_search.speed.timing`: the same warm-up,
repeats, speed correction and cache rules as bench and the study), calibrates and optionally
saves the profile where `load_profile` finds it first (``sqa-search calibrate --save``).

The fit: least squares on log time, made robust (soft-L1, so one stalled timing on a shared
machine cannot drag the fit) and pulled weakly towards the starting factors (so a factor the data
cannot see stays put). Its own small Nelder-Mead: the roofline's max() has kinks, and the fit
has five parameters. Held-out error: every configuration (spec + shape, all its modes together)
is predicted by a fit that did not see it.

What is fitted: each record's ``median_s``, i.e. speed-corrected seconds when the timing corrected
for the machine's speed (the CPU default, as bench's figures are) and raw seconds otherwise. The
report says which (``latency_kind``, ``clocks``) and keeps both figures of every point; `--save`
writes the report and the timing records (raw repeats, speeds, reference) beside the profile.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..layer.spec import AttentionSpec
from .cost import KINDS, build_phases, dtype_info
from .hardware import EFFICIENCY_KEYS, CostError, Fingerprint, HardwareProfile, load_profile, plain, save_profile
from .record import TimingResult
from .timing import time_points
from .workload import MODES, Workload

__all__ = ["CalibrationReport", "calibrate", "calibrate_from_measurements", "default_calibration_configs",
           "as_record", "save_calibration"]

_PARAMS = ("matmul", "attention", "elementwise", "memory", "overhead_s")
_RIDGE = 1e-3  # pull (in log space) towards the starting factors: keeps unidentifiable ones put
_HUBER = 0.1  # soft-L1 scale in log space: a stalled timing on a busy machine cannot drag the fit


@dataclass
class CalibrationReport:
    """What `calibrate` fitted, on what, and how well it predicts what it did not see.

    Errors are median absolute percentage errors (as fractions: 0.12 = 12%).
    """

    profile: str
    fingerprint: str
    date: str
    n_points: int
    n_skipped: int
    skipped: list
    modes: list
    dtypes: list
    efficiency_before: dict
    efficiency_after: dict
    overhead_before: float
    overhead_after: float
    fit_mape_before: float  # uncalibrated profile on all points
    fit_mape_after: float  # calibrated profile on the points it was fitted on
    heldout_mape: float  # each configuration predicted by a fit that did not see it
    heldout_method: str
    points: list  # one dict per point: config, measured (raw and corrected), predicted before/after/held-out
    latency_kind: str = "measured-raw"  # what was fitted: measured-corrected, measured-raw or "a + b" when mixed
    clocks: list = dataclasses.field(default_factory=list)  # the clocks the timings were taken with

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.points)

    def summary(self) -> str:
        def pct(x):
            return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"

        eff = ", ".join(f"{k} {self.efficiency_before[k]:.3g}->{self.efficiency_after[k]:.3g}" for k in EFFICIENCY_KEYS)
        return (
            f"calibrated {self.profile} on {self.fingerprint} ({self.date}): {self.n_points} points "
            f"({self.n_skipped} skipped), modes {', '.join(self.modes)}, dtypes {', '.join(self.dtypes)}\n"
            f"  fitted to {self.latency_kind} seconds ({', '.join(self.clocks) or '?'} clock)\n"
            f"  efficiency: {eff}; overhead {self.overhead_before:.3g}s->{self.overhead_after:.3g}s\n"
            f"  median abs error: uncalibrated {pct(self.fit_mape_before)}, fitted {pct(self.fit_mape_after)}, "
            f"held-out {pct(self.heldout_mape)} ({self.heldout_method})"
        )



def _fail(field_name: str, value, allowed) -> CostError:
    if isinstance(allowed, (tuple, list)):
        allowed = "choose one of " + ", ".join(map(str, allowed))
    return CostError(f"{field_name}={value!r} is not allowed: {allowed}")


def as_record(rec) -> TimingResult:
    """A TimingResult, or a stored one (a dict in its JSON form, as bench's .jsonl holds them);
    a dict may leave out the fields the fit does not use (label, variant, scope, device, dtype)."""
    if isinstance(rec, TimingResult):
        return rec
    if not isinstance(rec, dict):
        raise TypeError(f"a timing record must be a TimingResult or its dict, got {type(rec).__name__}")
    data = {"label": "", "variant": "", "what": "layer", "device": "", "dtype": "float32", "mode": None,
            "batch": None, "seq_len": None, **rec}
    return TimingResult.from_dict(data)


@dataclass
class _Point:
    spec: AttentionSpec
    mode: str
    what: str
    batch: int
    seq_len: int
    dtype: str
    n_layers: int
    d_ff: int | None
    measured: float  # what is fitted: the record's median_s (speed-corrected when the timing corrected)
    group: str
    fingerprint: Fingerprint | None
    raw: float | None = None  # the uncorrected median
    kind: str = "measured-raw"  # a Latency kind: measured-corrected or measured-raw
    clock: str = "wall"


def _parse_results(results, device_type: str) -> tuple[list[_Point], list[str]]:
    points, skipped = [], []
    for i, raw in enumerate(results):
        try:
            rec = as_record(raw)
        except (ValueError, TypeError, KeyError) as exc:
            skipped.append(f"#{i}: {type(exc).__name__}: {exc}")
            continue
        if rec.status != "ok":
            skipped.append(f"#{i}: status {rec.status!r}")
            continue
        if rec.predicted:
            skipped.append(f"#{i}: a prediction, not a measurement")
            continue
        device = str(rec.device or "")
        family = "cuda" if device.startswith("cuda") else ("cpu" if device.startswith("cpu") else None)
        if family and family != device_type:
            skipped.append(f"#{i}: measured on {device!r}, but the profile is a {device_type} profile")
            continue
        try:
            seconds = float(rec.median_s)
            if not (math.isfinite(seconds) and seconds > 0):
                raise CostError(f"median_s={seconds!r} must be a positive time")
            pt = _Point(spec=rec.spec, mode=rec.mode, what=rec.what or "layer", batch=int(rec.batch),
                        seq_len=int(rec.seq_len), dtype=str(rec.dtype).replace("torch.", ""),
                        n_layers=int(rec.n_layers or 1), d_ff=rec.d_ff, measured=seconds, group="",
                        fingerprint=rec.fingerprint, raw=rec.raw_median_s if rec.raw_median_s else seconds,
                        kind="measured-corrected" if rec.speed_corrected else "measured-raw", clock=rec.clock)
            # validate now, so a bad record is skipped with a reason rather than failing the fit
            build_phases(pt.spec, batch=pt.batch, seq_len=pt.seq_len, mode=pt.mode, what=pt.what,
                         n_layers=pt.n_layers, d_ff=pt.d_ff, vocab_size=256, dtype=pt.dtype, device_type=None,
                         tile=None)
        except (ValueError, TypeError) as exc:
            skipped.append(f"#{i}: {exc}")
            continue
        pt.group = json.dumps([pt.spec.to_dict(), pt.what, pt.batch, pt.seq_len, pt.dtype, pt.n_layers], sort_keys=True)
        points.append(pt)
    return points, skipped


class _Design:
    """Per-point phase times at efficiency 1 and zero overhead, for a fast vectorised fit."""

    def __init__(self, points: list[_Point], profile: HardwareProfile):
        comp, mem, kind, owner, launches = [], [], [], [], np.zeros(len(points))
        for i, pt in enumerate(points):
            peak_key, _ = dtype_info(pt.dtype)
            phases, _ = build_phases(pt.spec, batch=pt.batch, seq_len=pt.seq_len, mode=pt.mode, what=pt.what,
                               n_layers=pt.n_layers, d_ff=pt.d_ff, vocab_size=256, dtype=pt.dtype,
                               device_type=profile.device_type, tile=profile.attention_tile)
            for ph in phases:
                peak = profile.peak_flops["fp32" if ph.kind == "elementwise" else peak_key]
                comp.append(ph.flops / peak)
                mem.append(ph.bytes / profile.mem_bandwidth)
                kind.append(KINDS.index(ph.kind))
                owner.append(i)
                launches[i] += ph.launches
        self.comp, self.mem = np.array(comp), np.array(mem)
        self.kind, self.owner = np.array(kind, dtype=int), np.array(owner, dtype=int)
        self.launches = launches
        self.n = len(points)

    def predict(self, theta: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
        eff = np.exp(theta[:4])
        t_phase = np.maximum(self.comp / eff[self.kind], self.mem / eff[3])
        t = np.bincount(self.owner, weights=t_phase, minlength=self.n) + self.launches * np.exp(theta[4])
        return t if subset is None else t[subset]


def _theta(profile: HardwareProfile) -> np.ndarray:
    eff = [profile.efficiency[k] for k in EFFICIENCY_KEYS]
    return np.log(np.array(eff + [max(profile.overhead_s, 1e-9)], dtype=float))


_BOUNDS = (np.log([1e-4, 1e-4, 1e-4, 1e-3, 1e-9]), np.log([1e2, 1e2, 1e2, 1e3, 1e-1]))


def _nelder_mead(f, x0, step=0.7, iters=1500, tol=1e-10):
    """Minimise f from x0 (small, derivative-free: the roofline's max() has kinks)."""
    n = len(x0)
    simplex = [np.array(x0, dtype=float)]
    for i in range(n):
        x = np.array(x0, dtype=float)
        x[i] += step
        simplex.append(x)
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) <= tol * (1 + abs(values[0])):
            break
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - worst)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (worst - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [best + 0.5 * (x - best) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = int(np.argmin(values))
    return simplex[i], values[i]


def _fit(design: _Design, measured: np.ndarray, subset: np.ndarray, theta0: np.ndarray) -> np.ndarray:
    log_y = np.log(measured[subset])
    lo, hi = _BOUNDS

    def loss(theta):
        theta = np.clip(theta, lo, hi)
        r = np.log(design.predict(theta, subset)) - log_y
        robust = 2 * _HUBER**2 * (np.sqrt(1 + (r / _HUBER) ** 2) - 1)
        return float(np.mean(robust) + _RIDGE * np.sum((theta - theta0) ** 2))

    # start from the prior, and from the prior shifted so the median ratio is 1
    shift = float(np.median(log_y - np.log(design.predict(theta0, subset))))
    starts = [theta0, theta0 - np.array([shift] * 4 + [-shift])]
    best_x, best_v = None, math.inf
    for start in starts:
        x, v = _nelder_mead(loss, start)
        x, v = _nelder_mead(loss, x, step=0.2)  # restart: Nelder-Mead stalls on kinks
        if v < best_v:
            best_x, best_v = x, v
    return np.clip(best_x, lo, hi)


def _mdape(pred: np.ndarray, meas: np.ndarray) -> float:
    if len(meas) == 0:
        return math.nan
    return float(np.median(np.abs(pred - meas) / meas))



def calibrate(profile, results, *, folds: int | None = None, seed: int = 0):
    """Fit `profile`'s efficiency factors and overhead to measured timings.

    results: TimingResult objects, or their dicts (see `as_record`). Records whose status is not
    "ok", that are predictions, or whose device is of another kind than the profile's (a cuda
    timing for a cpu profile) are skipped (listed in the report). Held-out error: every
    configuration is predicted by a fit that did not see it: leave-one-out up to 25
    configurations, else `folds`-fold (default 5).
    Returns (calibrated profile, CalibrationReport).
    """
    profile = load_profile(profile) if not isinstance(profile, HardwareProfile) else profile
    points, skipped = _parse_results(results, profile.device_type)
    if not points:
        raise CostError(f"calibrate needs at least one usable timing record; got none ({len(skipped)} skipped: "
                        f"{'; '.join(skipped[:5])})")
    measured = np.array([p.measured for p in points])
    design = _Design(points, profile)
    theta0 = _theta(profile)
    theta = _fit(design, measured, np.arange(len(points)), theta0)
    before, after = design.predict(theta0), design.predict(theta)
    heldout, method = _heldout(design, points, measured, theta0, folds, seed)
    heldout_mape = _mdape(heldout, measured) if np.isfinite(heldout).all() else math.nan
    main_fp, label = _main_fingerprint(points)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    eff_after = {k: float(np.exp(theta[i])) for i, k in enumerate(EFFICIENCY_KEYS)}
    modes = sorted({p.mode for p in points})
    dtypes = sorted({p.dtype for p in points})
    report = CalibrationReport(
        profile=profile.name, fingerprint=label, date=date, n_points=len(points), n_skipped=len(skipped),
        skipped=skipped, modes=modes, dtypes=dtypes, efficiency_before=dict(profile.efficiency),
        efficiency_after=eff_after, overhead_before=float(profile.overhead_s), overhead_after=float(np.exp(theta[4])),
        fit_mape_before=_mdape(before, measured), fit_mape_after=_mdape(after, measured), heldout_mape=heldout_mape,
        heldout_method=method, points=[_point_row(p, before[i], after[i], heldout[i]) for i, p in enumerate(points)],
        latency_kind=" + ".join(sorted({p.kind for p in points})), clocks=sorted({p.clock for p in points}),
    )
    return _calibrated_profile(profile, report, points, main_fp), report


def _point_row(p: _Point, before: float, after: float, heldout: float) -> dict:
    """One point of the report: its configuration, both measured figures and the predictions."""
    return {"label": p.spec.label, "mode": p.mode, "what": p.what, "batch": p.batch, "seq_len": p.seq_len,
            "dtype": p.dtype, "measured_s": p.measured, "measured_kind": p.kind, "clock": p.clock,
            "measured_raw_s": p.raw, "measured_corrected_s": p.measured if p.kind == "measured-corrected" else None,
            "predicted_uncalibrated_s": float(before), "predicted_fitted_s": float(after),
            "predicted_heldout_s": float(heldout)}


def _heldout(design, points, measured, theta0, folds, seed) -> tuple[np.ndarray, str]:
    """Each point predicted by a fit that did not see its configuration, and how the folds were made."""
    groups = sorted({p.group for p in points})
    group_of = np.array([groups.index(p.group) for p in points])
    heldout = np.full(len(points), np.nan)
    if len(groups) < 2:
        return heldout, "none (needs at least two configurations)"
    if len(groups) <= 25 and folds is None:
        fold_of_group = np.arange(len(groups))
        method = f"leave-one-configuration-out over {len(groups)} configurations"
    else:
        k = min(folds or 5, len(groups))
        rng = np.random.default_rng(seed)
        fold_of_group = rng.permutation(len(groups)) % k
        method = f"{k}-fold by configuration over {len(groups)} configurations"
    for fold in np.unique(fold_of_group):
        test = np.flatnonzero(fold_of_group[group_of] == fold)
        train = np.flatnonzero(fold_of_group[group_of] != fold)
        theta_f = _fit(design, measured, train, theta0)
        heldout[test] = design.predict(theta_f, test)
    return heldout, method


def _main_fingerprint(points) -> tuple[Fingerprint | None, str]:
    """The most common machine among the points, and its label (saying how many others there were)."""
    counted = Counter(json.dumps(p.fingerprint.to_dict() if p.fingerprint else None, sort_keys=True)
                      for p in points)
    detail = json.loads(counted.most_common(1)[0][0])
    main_fp = Fingerprint.from_dict(detail) if detail is not None else None
    label = main_fp.label if main_fp is not None else "unknown device"
    if len(counted) > 1:
        label += f" (+{len(counted) - 1} other fingerprint(s))"
    return main_fp, label


def _calibrated_profile(profile: HardwareProfile, report: CalibrationReport, points, main_fp) -> HardwareProfile:
    """`profile` with the fitted factors, and a calibration record saying what they were fitted on."""
    label, date, n = report.fingerprint, report.date, report.n_points
    sources = dict(profile.sources)
    sources["efficiency"] = sources["overhead_s"] = f"calibrated on {label} {date} ({n} timings)"
    return dataclasses.replace(
        profile,
        efficiency=report.efficiency_after,
        overhead_s=report.overhead_after,
        sources=sources,
        calibration={
            "fingerprint": label,
            "fingerprint_detail": main_fp.to_dict() if main_fp is not None else {},
            "date": date,
            "n_points": n,
            "modes": report.modes,
            "dtypes": report.dtypes,
            "scopes": sorted({p.what for p in points}),
            "heldout_mape": report.heldout_mape,
            "heldout_method": report.heldout_method,
            "fit_mape": report.fit_mape_after,
            "uncalibrated_mape": report.fit_mape_before,
            "efficiency_before": dict(profile.efficiency),
            "overhead_before": float(profile.overhead_s),
            "latency_kind": report.latency_kind,  # what the factors were fitted to
            "clock": ", ".join(report.clocks),
        },
    )


# ----- measuring on this machine ---------------------------------------------------------------------
def default_calibration_configs() -> list[dict]:
    """A small spread of specs and shapes that exercises every phase kind on a CPU in seconds:
    full, grouped, uneven, reverse, windowed and global-token attention at a few lengths."""
    configs = []
    # head_dim 16 (the SQA paper's dense model has 256/16): much smaller heads hit kernel corners
    for d, h in ((64, 4), (128, 8)):
        for name in ("mha", "gqa", "mqa", "sqa", "xsqa", "lsqa", "rsqa", "swsqa", "flexsqa"):
            for n in (256, 512, 1024):
                if name in ("lsqa", "rsqa", "flexsqa") and n == 512:
                    continue
                configs.append({"variant": name, "d_model": d, "n_heads": h, "seq_len": n, "batch": 1,
                                "window": 128 if name in ("swsqa", "flexsqa") else None})
    return configs



def calibrate_from_measurements(profile="cpu-generic", *, configs=None, modes=MODES, dtype="float32",
                                device="cpu", repeats=3, passes=3, threads: int | None = 1, clock: str = "auto",
                                save: bool = False, progress=None, speed_correction: bool | None = None):
    """Time a spread of attention layers here with the timing harness, calibrate `profile` on
    them, optionally save it (``sqa-search calibrate --save``).

    configs: dicts with variant, d_model, n_heads, seq_len, batch and optional window (default
    `default_calibration_configs`). threads: torch threads while timing (1 by default: on a
    busy 2-core machine multi-threaded ops stall on each other; the fingerprint records it).
    Each configuration is timed in `passes` passes over all of them, with at least `repeats`
    repeats each, and the pooled repeats' median is kept: interleaving spreads a busy spell
    over every configuration instead of a few (`time_points(passes=...)`).
    clock: "wall" or "thread" (this thread's CPU time, which leaves out the time other processes
    hold the core; valid only on CPU with one torch thread). "auto" picks "thread" there and
    "wall" otherwise. speed_correction (default: on for CPU): each repeat is scaled by the
    machine's speed at that moment, as bench's are, so the profile predicts the figures bench
    measures. progress: called with each record. Returns (calibrated profile, report, records).
    """
    on_cpu = not str(device).startswith("cuda")
    if clock == "auto":
        clock = "thread" if on_cpu and threads == 1 else "wall"
    if clock not in ("wall", "thread"):
        raise _fail("clock", clock, ("auto", "wall", "thread"))
    if clock == "thread" and not (on_cpu and threads == 1):
        raise _fail("clock", clock, "'thread' needs device='cpu' and threads=1 (ops on other threads go uncounted)")
    if speed_correction and not on_cpu:
        raise _fail("speed_correction", speed_correction, "True only with device='cpu' (the probe is a CPU kernel)")
    points = []
    for cfg in default_calibration_configs() if configs is None else configs:
        overrides = {"window": cfg["window"]} if cfg.get("window") else {}
        spec = AttentionSpec.variant(cfg["variant"], cfg["d_model"], cfg["n_heads"], **overrides)
        for mode in modes:
            points.append((spec, Workload(mode=mode, seq_len=cfg["seq_len"], batch=cfg.get("batch", 1), dtype=dtype,
                                          device=str(device), threads=threads)))
    passes = max(1, passes)
    # each pass: at least `repeats` calls and 20 ms, at most 20 x repeats (as the fastest-of timer was)
    records = time_points(points, passes=passes, progress=False, budget_s=0.02 * passes,
                          min_repeats=max(1, repeats) * passes, max_repeats=20 * max(1, repeats) * passes,
                          use_cache=False, speed_correction=speed_correction, clock=clock)
    for rec in records:
        if progress:
            progress(rec)
    failed = [r for r in records if not r.ok]
    if failed:
        raise CostError(f"calibration timing failed for {failed[0].label} {failed[0].mode} N={failed[0].seq_len}: "
                        f"{failed[0].error}")
    calibrated, report = calibrate(profile, records)
    if save:
        save_calibration(calibrated, report, records)
    return calibrated, report, records


def save_calibration(calibrated: HardwareProfile, report: CalibrationReport, records, path=None) -> Path:
    """Save the profile (`save_profile`) and, beside it as ``<name>.calibration.json``, the report
    (each point's raw and corrected seconds) and the timing records (raw repeats, speeds, the
    machine reference and its clock): the figures the factors were fitted to stay readable.
    The file's name goes into ``calibrated.calibration["timings_file"]``. Returns the profile's path."""
    timings_name = f"{calibrated.name}.calibration.json"
    calibrated.calibration = {**(calibrated.calibration or {}), "timings_file": timings_name}
    profile_path = save_profile(calibrated, path)
    payload = {"report": report.to_dict(), "records": [as_record(r).to_dict() for r in records]}
    (profile_path.parent / timings_name).write_text(json.dumps(plain(payload), indent=1) + "\n")
    return profile_path

