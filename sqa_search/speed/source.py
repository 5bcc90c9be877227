"""A latency source for a grid of specs and workloads (what `bench` sweeps): measured here by the
timing harness, or predicted for a hardware profile. The study and `recommend` call `time_spec` /
`predict` directly: a study stores its own timing rows, and `recommend` never times anything.

``latency_source("local", **options)`` measures with `sqa_search.speed.timing` (options are
`time_spec`'s: budget_s, cache_dir, speed_correction, ...); ``latency_source("h100-sxm")`` predicts
with the cost model for that profile. Both give the same shapes: a `TimingResult` per point
(`records`, what bench writes out) and a `Latency` (`latency`), so a caller never branches on where
a figure came from, and the figure says it itself (``Latency.kind``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..layer.spec import AttentionSpec, SpecError
from .cost import predict
from .hardware import CostError, HardwareProfile, load_profile
from .record import TimingResult
from .workload import Latency, Workload

__all__ = ["LatencySource", "latency_source"]


@dataclass
class LatencySource:
    """Where latencies come from: this machine (`profile` None) or a hardware profile."""

    hardware: str  # "local" or the profile's name
    profile: HardwareProfile | None = None
    options: dict = field(default_factory=dict)  # the timing harness's keywords (measured only)

    @property
    def measured(self) -> bool:
        return self.profile is None

    def describe(self) -> str:
        """'measured on this machine (..., speed-corrected on a CPU)' / 'predicted for h100-sxm (calibration ...)'."""
        if self.measured:
            correction = self.options.get("speed_correction")
            words = {True: "speed-corrected", False: "raw"}.get(correction, "speed-corrected on a CPU, raw on a GPU")
            return f"measured on this machine (sqa_search.speed.timing, {words})"
        return f"predicted for {self.profile.name} ({self.profile.calibration_label})"

    def latency(self, spec, workload: Workload) -> Latency:
        """One spec in one workload, as a `Latency` (measured or predicted, it says which)."""
        (record,) = self.records([spec], [workload], progress=False)
        return record.latency

    def records(self, specs, workloads, **sweep) -> list[TimingResult]:
        """Every (workload, spec) of the grid, by workload then spec, one record each. `sweep`:
        `time_specs`'s own keywords (progress, passes, fresh_process, desc), measured only."""
        specs = [AttentionSpec.coerce(s) for s in specs]
        if self.measured:
            from .timing import time_specs  # lazy: the harness imports torch, a prediction needs none

            return time_specs(specs, list(workloads), **sweep, **self.options)
        return [predicted_record(spec, self.profile, w) for w in workloads for spec in specs]


def latency_source(hardware: str, **options) -> LatencySource:
    """"local" measures here (options: `time_spec`'s keywords); a profile name, alias or YAML path
    predicts for it (CostError names the known ones)."""
    if str(hardware).strip().lower() == "local":
        return LatencySource("local", None, dict(options))
    profile = load_profile(hardware)
    return LatencySource(profile.name, profile, {})


def predicted_record(spec: AttentionSpec, profile: HardwareProfile, workload: Workload) -> TimingResult:
    """A prediction in the record form a timing has (``predicted=True``; the cost model's details in
    ``prediction``); a shape the model cannot predict becomes an error record, as a timing would."""
    n = workload.seq_len
    rec = TimingResult(
        spec=spec, label=spec.label, variant=spec.variant_name or spec.family, mode=workload.mode,
        what=workload.scope, batch=workload.batch, seq_len=n, dtype=workload.dtype,
        device=f"{profile.device_type} (profile {profile.name})", n_layers=workload.n_layers,
        predicted=True, mem_kind="not predicted",
    )
    rec.kv_cache_bytes = spec.kv_cache_bytes(n, workload.dtype_bytes, workload.batch) * workload.n_layers
    if workload.mode == "decode":
        rec.kv_cache_tokens = n if spec.window is None else min(n, spec.window)
    try:
        pred = predict(spec, profile, workload)
    except (CostError, SpecError, ValueError) as exc:
        rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
        return rec
    rec.median_s = pred.seconds
    rec.backend = f"model:{pred.path}"
    details = pred.to_dict()
    details.pop("phases", None)
    rec.prediction = details
    return rec
