"""Measuring one `Job`: warm-up, timed repeats, kernel checks, the summary and the peak memory.

The method and the meaning of every flag are described in `sqa_search.speed.timing`, the
harness that calls `measure`. Kept apart so the harness reads as the steps it takes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import sys
import time

import torch

from .job import Job
from .probe import BUSY_CORRECTION, CLOCK_FUNCTIONS, PROBE_INTERVAL_S, SpeedProbe, corrected_times

__all__ = ["measure", "summarise", "backend_parts", "speed_probe", "REPEAT_FLAGS", "CLOCK_FUNCTIONS",
           "CPU_MEM_KIND", "CUDA_MEM_KIND", "MIN_REPEATS", "WARMUP_MIN", "WARMUP_MAX"]

MIN_REPEATS = 3
WARMUP_MIN = 2
WARMUP_MAX = 10
WARMUP_TOLERANCE = 0.10  # two consecutive warm-up calls within 10 % = settled
UNSTABLE_FACTOR = 5.0  # samples this many times the median are outliers ...
UNSTABLE_SHARE = 0.02  # ... and more than this share of them (at least one) flags "unstable": one interrupt
# in a thousand decode steps is the machine, not the timing
L2_FLUSH_BYTES = 256 * 2**20


def _dynamo_counts() -> tuple[int, int] | None:
    """(graphs compiled, recompile-limit hits) so far, or None when dynamo is not loaded.

    Best effort: reads torch._dynamo.utils.counters, a private structure that may move.
    Dynamo is only consulted when already imported (nothing compiled otherwise), so CPU runs
    do not pay for importing it.
    """
    if "torch._dynamo" not in sys.modules:
        return None
    try:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
        limit_hits = sum(
            int(v) for k, v in counters["unimplemented"].items() if "recompile" in str(k).lower()
        )
        return graphs, limit_hits
    except Exception:
        return None


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc: the figure is a little less exact, say nothing more
        pass


CPU_MEM_KIND = "cpu-rss-peak-delta + resident tensor bytes (approximate)"
CUDA_MEM_KIND = "cuda-allocator-peak-delta + resident tensor bytes"


def _peak_memory(job: Job, dev: torch.device) -> tuple[int | None, str]:
    """Peak bytes of one untimed call; see the module docstring for what each kind counts."""
    if dev.type == "cuda":
        job.before()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        job.step()
        torch.cuda.synchronize(dev)
        rise = int(torch.cuda.max_memory_allocated(dev)) - before
        return job.resident_bytes + max(0, rise), CUDA_MEM_KIND
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        rss0 = _proc_status()["VmRSS"]
        job.before()
        job.step()
        peak = _proc_status()["VmHWM"]
    except (OSError, KeyError):
        return None, "unavailable (no /proc on this system)"
    return job.resident_bytes + max(0, peak - rss0), CPU_MEM_KIND


def _timer(job: Job, dev: torch.device, flush_l2: bool, clock=time.perf_counter):
    """A function that runs the job once (its untimed `before`, then the timed step) -> seconds.

    CUDA: an event pair recorded on `dev`'s current stream, inside ``torch.cuda.device(dev)``
    (a bare ``Event().record()`` records on the *current* device's stream, so timing cuda:1
    from a process whose current device is cuda:0 would time an idle stream).
    """
    if dev.type != "cuda":
        def one() -> float:
            job.before()
            t0 = clock()
            job.step()
            return clock() - t0

        return one

    flush = None
    if flush_l2:
        props = torch.cuda.get_device_properties(dev)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        flush = torch.empty(max(L2_FLUSH_BYTES, 2 * l2), dtype=torch.uint8, device=dev)

    def one() -> float:
        with torch.cuda.device(dev):
            job.before()
            if flush is not None:
                flush.zero_()
            stream = torch.cuda.current_stream(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            job.step()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

    return one


class _SdpChoiceReplay:
    """Answers ``torch._fused_sdp_choice`` during the timed repeats from the last warm-up call.

    The layer asks SDPA which kernel it will pick (to name its backend and, on CUDA, to keep
    K/V grouped or not) on every call; that host-side query is detection, not attention. One
    job's calls ask the same questions in the same order (same inputs, same layer), so the
    answers of the last warm-up call are recorded in order and replayed by position in each
    timed call: a list lookup instead of torch's checks. A call that asks more questions than
    were recorded asks torch.
    """

    def __init__(self, original):
        self.original = original
        self.answers: list = []
        self.recording = True
        self.position = 0

    def start_call(self, recording: bool) -> None:
        self.recording, self.position = recording, 0
        if recording:
            self.answers = []

    def __call__(self, *args, **kwargs):
        if self.recording:
            answer = self.original(*args, **kwargs)
            self.answers.append(answer)
            return answer
        if self.position < len(self.answers):
            self.position += 1
            return self.answers[self.position - 1]
        return self.original(*args, **kwargs)


@contextlib.contextmanager
def _sdp_choice_replay():
    """Install a `_SdpChoiceReplay` in place of ``torch._fused_sdp_choice`` (None if torch has none)."""
    original = getattr(torch, "_fused_sdp_choice", None)
    if original is None:  # the private API moved: the layer cannot ask it, nothing to take out
        yield None
        return
    replay = _SdpChoiceReplay(original)
    torch._fused_sdp_choice = replay
    try:
        yield replay
    finally:
        torch._fused_sdp_choice = original



def measure(job: Job, dev: torch.device, *, budget_s: float, max_repeats: int, min_repeats: int,
            warmup_max: int, flush_l2: bool, probe=None, reference=None, clock: str = "wall") -> dict:
    """Warm up, time the repeats, summarise; with a `probe`, correct each repeat for machine speed.

    Returns the measured fields of a `TimingResult` (name -> value)."""
    with _sdp_choice_replay() as replay:
        timed_call = _timer(job, dev, flush_l2, CLOCK_FUNCTIONS[clock])

        def one(warmup: bool = False) -> float:
            if replay is not None:
                replay.start_call(recording=warmup)
            return timed_call()

        dyn0 = _dynamo_counts()
        warm, settled = _warm_up(one, budget_s, warmup_max)
        dyn1 = _dynamo_counts()
        times, speeds, backends = _timed_repeats(one, job, budget_s=budget_s, max_repeats=max_repeats,
                                                 min_repeats=min_repeats, probe=probe, reference=reference)
        dyn2 = _dynamo_counts()
        one = timed_call = None  # noqa: F841 - frees the L2 flush buffer before the memory call

        flags = [] if settled else ["warmup-unsettled"]
        seen = backend_parts(backends)
        flags += _kernel_flags(backends, seen, dyn0, dyn1, dyn2)
        figures, repeat_flags = summarise(times, speeds)
        flags += repeat_flags
        if replay is not None:
            replay.start_call(recording=False)
        peak, mem_kind = _peak_memory(job, dev)
    return {
        **figures,
        "times_s": times,
        "speeds": speeds,
        "n_repeats": len(times),
        "n_warmup": len(warm),
        "first_call_s": warm[0],
        "backend": ",".join(seen),
        "flags": flags,
        "peak_mem_bytes": peak,
        "mem_kind": mem_kind,
    }


def _warm_up(one, budget_s: float, warmup_max: int) -> tuple[list[float], bool]:
    """>= WARMUP_MIN calls, until two consecutive agree or the cap (count or time): (times, settled)."""
    warm: list[float] = []
    w_start = time.perf_counter()
    while True:
        warm.append(one(warmup=True))
        if len(warm) >= WARMUP_MIN:
            a, b = warm[-2], warm[-1]
            if abs(a - b) <= WARMUP_TOLERANCE * min(a, b):
                return warm, True
            if len(warm) >= warmup_max or time.perf_counter() - w_start > max(budget_s, 1e-9) + warm[0]:
                return warm, False


def _timed_repeats(one, job: Job, *, budget_s: float, max_repeats: int, min_repeats: int, probe, reference):
    """The timed repeats until the budget (within the repeat bounds): (times, speeds, backends).

    With a probe, the machine's speed (reference / probe) at each repeat goes into speeds."""
    times: list[float] = []
    speeds: list[float] = []
    backends: list[str] = []
    t_start = time.perf_counter()
    if probe is not None:
        last_probe, last_probe_at, pending = probe(), time.perf_counter(), 0
    while len(times) < max_repeats:
        times.append(one())
        backends.append(job.observe())
        done = len(times) >= max_repeats or (
            len(times) >= min_repeats and time.perf_counter() - t_start >= budget_s)
        if probe is not None:
            pending += 1
            if done or time.perf_counter() - last_probe_at >= PROBE_INTERVAL_S:
                # the repeats since the last probe ran at the speed between the two probes
                now = probe()
                speeds += [reference / ((last_probe + now) / 2)] * pending
                last_probe, last_probe_at, pending = now, time.perf_counter(), 0
        if done:
            break
    return times, speeds, backends


def _kernel_flags(backends: list[str], seen: list[str], dyn0, dyn1, dyn2) -> list[str]:
    """What the kernels of the timed repeats did wrong (see the harness's docstring)."""
    flags = []
    if len(set(backends)) > 1:
        flags.append("backend-changed")
    if any("math" in name for name in seen):
        flags.append("math-fallback")
    if any("flex-eager" in name for name in seen):
        # eager flex materialises N x N scores: never the speed of the compiled kernel
        flags.append("eager-flex")
    if dyn1 is not None and dyn2 is not None and dyn2[0] > dyn1[0]:
        flags.append("compile-in-timing")
    if dyn2 is not None and dyn2[1] > (dyn0[1] if dyn0 else 0):
        flags.append("recompile-limit-hit")
    return flags


REPEAT_FLAGS = ("machine-busy", "unstable")  # the flags `summarise` decides from the repeats


def summarise(times: list[float], speeds: list[float]) -> tuple[dict, list[str]]:
    """Median and IQR of the repeats (corrected by their speeds, when measured) and the raw ones,
    the machine's median speed, and the REPEAT_FLAGS they raise."""
    raw_median, raw_iqr = _median_iqr(times)
    summary = corrected_times(times, speeds) if speeds else times
    median, iqr = _median_iqr(summary)
    machine_speed = statistics.median(speeds) if speeds else None
    flags = []
    if machine_speed is not None and machine_speed < 1 / BUSY_CORRECTION:
        flags.append("machine-busy")
    if _unstable(summary, median):
        flags.append("unstable")
    figures = {"median_s": median, "iqr_s": iqr, "raw_median_s": raw_median, "raw_iqr_s": raw_iqr,
               "machine_speed": machine_speed}
    return figures, flags


def backend_parts(names) -> list[str]:
    """The distinct kernels named in backend strings ("a,b"), in first-seen order."""
    return list(dict.fromkeys(part for name in names for part in (name or "").split(",") if part))


def _unstable(samples: list[float], median: float) -> bool:
    outliers = sum(t > UNSTABLE_FACTOR * median for t in samples)
    return outliers > 0 and outliers > UNSTABLE_SHARE * len(samples)


@functools.lru_cache(maxsize=None)
def speed_probe(kind: str, clock: str = "wall") -> SpeedProbe:
    """One probe of each kind (and clock) per process: building one (tensors, warm-up calls) is not free."""
    return SpeedProbe(kind, clock=clock)


def _median_iqr(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    if len(values) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1
