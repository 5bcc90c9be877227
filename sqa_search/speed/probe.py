"""The machine-speed probe: CPU timings corrected for a machine whose speed changes under them.

Why it exists. A shared CPU (a cloud VM, a CI runner) does not run at one speed: other tenants
of the host take memory bandwidth, cache and turbo headroom, and the vCPU slows down without
losing any CPU time (thread CPU time grows exactly as wall time does, so a CPU-time clock does
not help). Measured on the 2-core VM this project is built on: a fixed 512x512 matmul moved
between 13.6 and 19.4 ms within a minute, in phases that last 10-30 s, and the median of the
same attention layer in three separate 2 s runs moved by 23-71 %. No statistic over a few
seconds of samples (median, minimum, low percentile) survives a phase that lasts longer than
the run.

What it does. A small fixed kernel, the probe, is timed between the repeats of a timing
(after each repeat, or every `PROBE_INTERVAL_S` of short ones). Each repeat is scaled by the
machine's speed at that moment, ``reference / probe_now`` (the mean of the probes either side
of it), where ``reference`` is this machine's probe time stored once per fingerprint, thread
count and probe kind. The corrected figure is "seconds at this machine's reference speed"; the
raw times, the per-repeat speeds and the reference stay in the record, so nothing is hidden.
Two probes, because a slow spell does not slow all work alike: prefill and training steps get
the "compute" probe (a causal SDPA of 1 head x 2048 tokens x 64 dims, ~10 ms on one core);
decode steps, whose time is mostly per-op overhead, get the "dispatch" probe (a burst of tiny
ops, ~1 ms). Three separate bench runs here (benchmarks/2026-11-28-cpu-reproducibility):
prefill medians within 7.7 % corrected against 30.8 % raw, decode within 12.2 % against 58.4 %.

What it assumes, and where that is weaker: that a slow spell slows the timed work by the same
factor as its probe. That held for attention layers within a few per cent in prefill; decode
steps follow their probe less closely (up to 12 % between runs), and so does a whole block with
its MLP (up to 10 %). The record's ``machine_speed`` says how
much was corrected; a correction above ``BUSY_CORRECTION`` is flagged ``machine-busy``.

The reference is measured the first time it is needed (``REFERENCE_S`` of probes, the fastest
kept) and stored as JSON beside the timings cache; every later process on the machine uses the
same figure, which is what makes separate runs comparable. A reference belongs to one clock: the
wall clock (``time.perf_counter``, what bench and the study time with) or this thread's CPU time
(what calibration may time with). The clock is in the file's name and contents and is checked when
read, so a timing never divides by a reference taken with another clock (a thread-clock reference
leaves out the time other processes hold the core, and would scale a wall-clock timing wrongly).
Delete the file (or call
`machine_reference` with ``remeasure=True``) to measure it again, e.g. after moving the cache
to another machine with the same fingerprint. CPU only: CUDA timings use events, and a GPU's
clock is not the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["SpeedProbe", "MachineReference", "machine_reference", "stored_reference", "corrected_times",
           "probe_kind", "CLOCKS", "CLOCK_FUNCTIONS"]

PROBE_SHAPE = (1, 1, 2048, 64)  # (batch, heads, tokens, head dim): ~10 ms on one EPYC core
PROBE_INTERVAL_S = 0.02  # probe after a repeat once this much time passed since the last probe: after
# every repeat of a long step, every ~20 ms of short ones (at most about half the budget goes to probing)
REFERENCE_S = 3.0  # seconds of probing when the machine's reference is first measured
BUSY_CORRECTION = 1.5  # a median correction above this flags the timing "machine-busy"
DISPATCH_OPS = 160  # ops in one dispatch probe: ~1 ms on one EPYC core
PROBE_KINDS = ("compute", "dispatch")
PROBE_VERSION = 3  # bump when the probe's work changes: stored references are then stale

# "thread": this thread's CPU time, which leaves out the time other processes hold the core (valid
# only on CPU with one torch thread, where every op runs on the calling thread)
CLOCK_FUNCTIONS = {"wall": time.perf_counter, "thread": time.thread_time}
CLOCKS = tuple(CLOCK_FUNCTIONS)

_MEMO: dict[tuple, "MachineReference"] = {}


class SpeedProbe:
    """A fixed probe; call it to get its time now (the better of two calls, seconds).

    kind "compute": a causal SDPA (`PROBE_SHAPE`), the work of prefill and training steps.
    kind "dispatch": a burst of tiny ops (in-place adds on 16 floats, one-row matrix products),
    the work of a decode step, whose time is mostly per-op overhead; on a shared host it slows
    by other factors than arithmetic does (measured here: a decode step's time moved by up to
    2x between runs while the compute probe moved by 1.3x).
    """

    def __init__(self, kind: str = "compute", seed: int = 0, clock: str = "wall"):
        if kind not in PROBE_KINDS:
            raise ValueError(f"kind={kind!r} is not known: choose one of {', '.join(PROBE_KINDS)}")
        if clock not in CLOCK_FUNCTIONS:
            raise ValueError(f"clock={clock!r} is not known: choose one of {', '.join(CLOCKS)}")
        self.kind = kind
        self.clock = clock  # the clock of the timings it corrects (the cost calibration may use thread time)
        self._now = CLOCK_FUNCTIONS[clock]
        gen = torch.Generator().manual_seed(seed)
        if kind == "compute":
            self.q, self.k, self.v = (torch.randn(*PROBE_SHAPE, generator=gen) for _ in range(3))
        else:
            self.small, self.small2 = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
            self.row, self.weight = torch.randn(1, 256, generator=gen), torch.randn(256, 256, generator=gen)
        for _ in range(3):  # first calls pay for lazy initialisation
            self._run()

    def _run(self) -> None:
        with torch.no_grad():
            if self.kind == "compute":
                F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=True)
                return
            for _ in range(DISPATCH_OPS // 4):
                self.small.mul_(0.5).add_(self.small2)
                torch.mm(self.row, self.weight)
                self.small.neg_()

    def __call__(self) -> float:
        best = float("inf")
        for _ in range(2):  # the better of two: one interrupt should not move the correction
            t0 = self._now()
            self._run()
            best = min(best, self._now() - t0)
        return best


def probe_kind(mode: str) -> str:
    """The probe for a workload: decode steps are per-op overhead, the rest is arithmetic."""
    return "dispatch" if mode == "decode" else "compute"


@dataclass(frozen=True)
class MachineReference:
    """This machine's probe time at its fastest, the yardstick every correction divides by."""

    probe_s: float
    threads: int
    fingerprint_id: str
    kind: str
    measured_at: float  # unix time
    n_probes: int
    path: str | None  # where it is stored; None when it could not be written
    probe_version: int = PROBE_VERSION
    clock: str | None = "wall"  # the clock it was taken with; None in files written before it was stored


def _reference_path(cache_dir: Path, fp_id: str, threads: int, kind: str, clock: str) -> Path:
    """The wall clock keeps the name references always had; another clock has its own file."""
    suffix = "" if clock == "wall" else f"-{clock}"
    return Path(cache_dir) / fp_id / f"machine-reference-{kind}-t{threads}{suffix}.json"


def _load(path: Path, clock: str) -> MachineReference | None:
    """The reference stored at `path` if it is current and was taken with `clock`, else None.

    A file without a clock was written when calibration could store a thread-clock reference
    under the wall clock's name: which clock it holds is unknown, so it is measured again."""
    try:
        data = json.loads(path.read_text())
        ref = MachineReference(**{"clock": None, **data, "path": str(path)})
    except (OSError, ValueError, TypeError):
        return None
    if ref.probe_version != PROBE_VERSION or not ref.probe_s > 0 or ref.clock != clock:
        return None
    return ref


def _store(path: Path, ref: MachineReference) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({k: v for k, v in asdict(ref).items() if k != "path"}, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
        return False


def stored_reference(*, fingerprint_id: str, cache_dir, threads: int, kind: str = "compute",
                     clock: str = "wall") -> MachineReference | None:
    """The reference stored for this machine, thread count, probe kind and clock, or None; measures nothing."""
    return _load(_reference_path(Path(cache_dir), fingerprint_id, threads, kind, clock), clock)


def machine_reference(probe: SpeedProbe, *, fingerprint_id: str, cache_dir, remeasure: bool = False,
                      seconds: float = REFERENCE_S) -> MachineReference:
    """The stored reference for this machine, thread count, `probe.kind` and `probe.clock`, measured
    and stored if missing.

    Call it with torch's thread count already set to the one being timed. One process measures
    at most once per (machine, threads, kind, clock); a cache directory that cannot be written
    still gets a reference, kept in memory (its ``path`` is None).
    """
    threads = torch.get_num_threads()
    path = _reference_path(Path(cache_dir), fingerprint_id, threads, probe.kind, probe.clock)
    memo_key = (fingerprint_id, threads, probe.kind, probe.clock)
    if not remeasure:
        stored = _load(path, probe.clock)
        if stored is not None:
            _MEMO[memo_key] = stored
            return stored
        if memo_key in _MEMO:  # measured in this process for another cache dir: same machine
            ref = _MEMO[memo_key]
            written = _store(path, ref)
            return MachineReference(**{**asdict(ref), "path": str(path) if written else None})
    samples = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(samples) < 5:
        samples.append(probe())
    ref = MachineReference(probe_s=min(samples), threads=threads, fingerprint_id=fingerprint_id, kind=probe.kind,
                           measured_at=time.time(), n_probes=len(samples), path=str(path), clock=probe.clock)
    if not _store(path, ref):
        ref = MachineReference(**{**asdict(ref), "path": None})
    _MEMO[memo_key] = ref
    return ref


def corrected_times(times_s: list[float], speeds: list[float]) -> list[float]:
    """Each raw repeat scaled to the reference speed: a repeat run at 0.7x speed counts 0.7 of its time."""
    if len(times_s) != len(speeds):
        raise ValueError(f"{len(times_s)} times but {len(speeds)} speeds: one speed per repeat is needed")
    return [t * s for t, s in zip(times_s, speeds)]
