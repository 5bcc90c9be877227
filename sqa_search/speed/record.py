"""The record of one timing (`TimingResult`) and the check that turns a request into one.

A request is an `AttentionSpec`, a `Workload` and the harness's options. `new_record` checks them
all before anything runs (argument mistakes raise `TimingError` / `SpecError`) and returns the
record with nothing measured yet; the harness (`sqa_search.speed.timing`) fills it in. The record
is JSON-safe (`to_dict` / `from_dict`) and its `key` names it in the timing cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from ..common import DTYPE_BYTES
from ..layer.attention import BACKENDS
from ..layer.spec import AttentionSpec
from .device import TimingError, parse_dtype, resolve_device
from .hardware import Fingerprint, fingerprint
from .probe import CLOCKS as PROBE_CLOCKS
from .workload import MODES, SCOPES, Latency, Workload

__all__ = ["TimingResult", "TimingError", "new_record", "check_int", "TIMING_VERSION", "CLOCKS"]

# Bump when the method changes so old cached timings are not mixed with new ones.
TIMING_VERSION = 2  # 2: CPU repeats corrected for machine speed (speed/probe.py)
CLOCKS = PROBE_CLOCKS  # thread: this thread's CPU time (CPU, one thread; see time_spec)


@dataclass
class TimingResult:
    """One timed (or predicted) spec at one shape and workload. JSON-safe via `to_dict`."""

    spec: AttentionSpec
    label: str
    variant: str
    mode: str
    what: str  # the workload's scope; the stored name, kept so old cache files read back
    batch: int
    seq_len: int
    dtype: str
    device: str
    n_layers: int = 1
    d_ff: int | None = None
    requested_backend: str = "auto"
    threads: int | None = None
    median_s: float | None = None  # corrected for machine speed when speed_corrected (CPU default)
    iqr_s: float | None = None
    raw_median_s: float | None = None  # the median of the uncorrected repeats (== median_s otherwise)
    raw_iqr_s: float | None = None
    speed_corrected: bool = False
    machine_speed: float | None = None  # median of reference / probe over the repeats: 0.7 = ran 30 % slow
    speeds: list = field(default_factory=list)  # that speed at each repeat
    reference_probe_s: float | None = None  # the machine's stored probe time the speeds divide by
    n_repeats: int = 0
    times_s: list = field(default_factory=list)
    n_warmup: int = 0
    first_call_s: float | None = None
    backend: str | None = None
    flags: list = field(default_factory=list)
    peak_mem_bytes: int | None = None
    mem_kind: str = "none"
    kv_cache_tokens: int | None = None  # decode: tokens the new query attends over in the cache
    kv_cache_bytes: int | None = None  # analytic KV cache at N (all layers), for every mode
    status: str = "ok"  # "ok" | "oom" | "error"
    error: str | None = None
    fingerprint: Fingerprint | None = None  # None for a prediction (no machine ran it)
    fingerprint_id: str = ""
    predicted: bool = False
    prediction: dict | None = None  # cost-model details when predicted
    timestamp: float = 0.0
    timing_version: int = TIMING_VERSION
    from_cache: bool = False
    passes: int = 1  # separate passes whose repeats were pooled (time_specs(passes=...))
    clock: str = "wall"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> str:
        """The cache key: everything the figure depends on, not the budget (that changes precision)."""
        device_type = str(self.device).split(":")[0]
        payload = {
            "v": TIMING_VERSION, "fp": self.fingerprint_id, "spec": self.spec.to_dict(), "batch": self.batch,
            "seq_len": self.seq_len, "mode": self.mode, "what": self.what, "n_layers": self.n_layers,
            "d_ff": self.d_ff, "dtype": self.dtype, "device": device_type,
            # threads only matter where the CPU does the work
            "threads": self.threads if device_type == "cpu" else None,
            "backend": self.requested_backend, "speed_corrected": bool(self.speed_corrected),
        }
        if self.clock != "wall":  # only then: wall-clock keys stay those of older versions
            payload["clock"] = self.clock
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def workload(self) -> Workload:
        """What was timed (or predicted). A prediction's device is the profile's device type."""
        device = str(self.device).split(" ")[0]
        return Workload(mode=self.mode, seq_len=self.seq_len, batch=self.batch, scope=self.what, dtype=self.dtype,
                        device=device, n_layers=self.n_layers, d_ff=self.d_ff, threads=self.threads)

    @property
    def latency(self) -> Latency:
        """The figure in the shape every latency source gives (see `sqa_search.speed.workload`)."""
        if self.predicted:
            kind = "predicted"
            pred = self.prediction or {}
            where = f"{pred.get('profile', self.device)} ({pred.get('calibration', 'uncalibrated')})"
        else:
            kind = "measured-corrected" if self.speed_corrected else "measured-raw"
            where = self.fingerprint.label if self.fingerprint else self.device
        return Latency(seconds=self.median_s, kind=kind, where=where, seq_len=self.seq_len, spread_s=self.iqr_s,
                       raw_seconds=self.raw_median_s, backend=self.backend, peak_memory_bytes=self.peak_mem_bytes,
                       flags=tuple(self.flags))

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["spec"] = self.spec.to_dict()
        data["fingerprint"] = self.fingerprint.to_dict() if self.fingerprint else {}
        for name in ("speeds", "times_s", "flags"):
            data[name] = list(data[name])
        data["prediction"] = dict(self.prediction) if self.prediction is not None else None
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TimingResult":
        """A stored record (the spec and fingerprint as dicts, as every version wrote them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        # unknown keys (the stored `key`, fields of a newer version) are ignored on purpose
        values = {k: v for k, v in data.items() if k in known}
        values["spec"] = AttentionSpec.coerce(values["spec"])
        fp = values.get("fingerprint")
        values["fingerprint"] = Fingerprint.from_dict(fp) if fp else None
        return cls(**values)


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TimingError(f"{name}={value!r} is not allowed: must be an integer >= {low}")
    return value


def new_record(spec, workload: Workload, *, backend: str = "auto", speed_correction: bool | None = None,
               clock: str = "wall") -> tuple[TimingResult, torch.device, torch.dtype]:
    """Check a request and return (its record with nothing measured, device, torch dtype).

    The workload's n_layers counts only for scope "model" (a layer or a block is recorded as 1)."""
    spec = AttentionSpec.coerce(spec)
    if not isinstance(workload, Workload):
        raise TimingError(f"workload={workload!r} is not allowed: give a sqa_search.speed.workload.Workload")
    if workload.mode not in MODES or workload.scope not in SCOPES:  # Workload checks; a guard for copies
        raise TimingError(f"workload {workload!r} has an unknown mode or scope")
    if backend not in BACKENDS:
        raise TimingError(f"backend={backend!r} is not known: choose one of {', '.join(BACKENDS)}")
    if clock not in CLOCKS:
        raise TimingError(f"clock={clock!r} is not known: choose one of {', '.join(CLOCKS)}")
    dtype_name, torch_dtype = parse_dtype(workload.dtype)
    dev = resolve_device(workload.device)
    if speed_correction is not None and not isinstance(speed_correction, bool):
        raise TimingError(f"speed_correction={speed_correction!r} is not allowed: choose True, False or None (auto)")
    if speed_correction and dev.type != "cpu":
        raise TimingError(f"speed_correction=True is not allowed on device={str(dev)!r}: the machine-speed "
                          "probe corrects CPU timings only (CUDA timings use events)")
    threads = workload.threads if workload.threads is not None else torch.get_num_threads()
    if clock == "thread" and not (dev.type == "cpu" and threads == 1):
        raise TimingError(f"clock='thread' is not allowed on device={str(dev)!r} with {threads} threads: it "
                          "needs device='cpu' and threads=1 (ops on other threads go uncounted)")
    corrected = dev.type == "cpu" if speed_correction is None else speed_correction
    n_layers = workload.n_layers if workload.scope == "model" else 1
    fp = fingerprint(dev, dtype_name, threads)
    record = TimingResult(
        spec=spec, label=spec.label, variant=spec.variant_name or spec.family, mode=workload.mode,
        what=workload.scope, batch=workload.batch, seq_len=workload.seq_len, dtype=dtype_name, device=str(dev),
        n_layers=n_layers, d_ff=workload.d_ff, requested_backend=backend, threads=threads,
        speed_corrected=corrected,
        kv_cache_bytes=spec.kv_cache_bytes(workload.seq_len, DTYPE_BYTES[dtype_name], workload.batch) * n_layers, fingerprint=fp, fingerprint_id=fp.id, timestamp=time.time(), clock=clock,
    )
    return record, dev, torch_dtype
