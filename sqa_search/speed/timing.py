"""Timing trials: how long one `AttentionSpec` takes per step on this machine, honestly measured.

`time_spec(spec, workload)` times one spec in one `Workload`: a shape (batch, N), dtype, device
and `mode` (``train``: forward + backward, ``prefill``: forward without grad, ``decode``: one new
token against a KV cache of N tokens) for the attention layer alone, a whole block or the whole
proxy model (``scope``), and returns a `TimingResult` that says not only the median and IQR
but which kernel ran (``backend``), what went wrong (``flags``), the peak memory and the
machine (``fingerprint``); ``.latency`` gives the figure as a `Latency`. This module is the one
timing harness: bench, the study, the efficiency benchmark and calibration all call it.

Where the parts live: `record` (the record and the request's checks), `job` (the module and
step to time), `measure` (warm-up, repeats, flags, memory), `timing_cache` (the cache),
`isolated` (a timing in a fresh process).

Method, and why:

* Warm-up until stable: at least two calls (the first pays for lazy init, compilation and
  allocator growth), more until two consecutive calls agree within 10 % or a cap is reached.
* Repeats until a time budget (1 s) with at least 3 and at most 50 samples; median and IQR,
  because a shared machine produces one-sided outliers that a mean would absorb.
* CUDA: ``torch.cuda.Event`` pairs with a synchronise per repeat (kernels are asynchronous:
  host-side clocks time the launches, not the work) and an L2 flush (a 256 MiB buffer, or
  twice the L2, zeroed) before each repeat, so a small shape is not timed out of a warm L2.
  CPU: ``time.perf_counter`` (or this thread's CPU time, ``clock="thread"``) and a fixed, recorded
  thread count.
* CPU speed correction (default on CPU): a shared machine changes speed under a timing, in
  phases longer than any timing budget, so each repeat is scaled by the machine's speed at
  that moment, measured by a fixed probe kernel between repeats against this machine's stored
  reference (`sqa_search.speed.probe`), taken with the timing's own clock. ``median_s``/``iqr_s``
  are then "seconds at the machine's reference speed" (``.latency.kind`` "measured-corrected");
  ``raw_median_s``, ``times_s`` (raw), ``speeds`` and ``machine_speed`` keep what the clock said.
  ``machine-busy`` flags a median correction above 1.5x.
* The backend of every timed repeat is read from ``layer.last_backend``; a change during the
  timed repeats, a math-path SDPA, an eager FlexAttention, a compilation during the timed
  repeats or dynamo's recompile limit being hit (best effort: read from
  ``torch._dynamo.utils.counters`` when dynamo is loaded) are flagged, so the wrong kernel is
  never reported as the spec's speed.
  Flags: ``backend-changed`` (the timed repeats did not all run one kernel),
  ``math-fallback`` (SDPA's math path ran: N x N materialised), ``eager-flex`` (FlexAttention
  ran uncompiled: N x N materialised), ``compile-in-timing`` (dynamo compiled a graph during
  the timed repeats), ``recompile-limit-hit`` (dynamo gave up compiling: later calls run
  eager), ``unstable`` (more than 2 % of the timed samples, and at least one, above 5x the
  median), ``warmup-unsettled`` (warm-up hit its cap before two consecutive calls agreed
  within 10 %: typical of a busy machine), ``machine-busy`` (CPU: the speed correction
  scaled the repeats by more than 1.5x, see below).
* Peak memory is measured in one extra, untimed call after the timed repeats, with one
  definition on both devices: the bytes of the resident weights, inputs and cache, plus the
  peak rise above what was in use just before the call. CUDA: ``max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus ``memory_allocated`` before the call, so masks cached by
  earlier calls, other trials' tensors and the allocator's cache do not count. CPU has no
  allocator statistics: the peak resident set size above the resident set before the call
  (kernel ``VmHWM`` after ``clear_refs``, with free heap returned by ``malloc_trim`` first),
  labelled approximate: the C library may reuse memory the kernel already counts.
* CUDA events are created and recorded on the timed tensors' device (``cuda:1`` times
  ``cuda:1``'s stream, not the current device's), and SDPA's kernel choice
  (``torch._fused_sdp_choice``, which the layer calls to name its backend) is looked up once
  in the warm-up and replayed in the timed repeats, so its host-side cost is not timed.

Cache: see `sqa_search.speed.timing_cache`; a ``cache_dir`` argument replaces the default folder.

Fresh process: `time_specs(..., fresh_process=True)` runs each point through
`sqa_search.speed.isolated`, which starts ``python -m sqa_search.speed.timing`` (JSON in on argv,
JSON out on stdout), for long sweeps where compiled kernels would pile up recompilations in one
process.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys

import torch

from ..common import is_oom
from ..layer.spec import AttentionSpec
from . import timing_cache
from .device import TimingError
from .isolated import RESULT_MARKER, time_spec_subprocess
from .job import build_job
from .measure import MIN_REPEATS, REPEAT_FLAGS, WARMUP_MAX, WARMUP_MIN, backend_parts, measure, speed_probe, summarise
from .probe import machine_reference, probe_kind
from .record import TimingResult, check_int, new_record
from .workload import Workload

__all__ = [
    "TimingResult",
    "TimingError",
    "time_spec",
    "time_points",
    "time_specs",
    "merge_passes",
]


def time_spec(
    spec,
    workload: Workload,
    *,
    backend: str = "auto",
    budget_s: float = 1.0,
    max_repeats: int = 50,
    min_repeats: int = MIN_REPEATS,
    warmup_max: int = WARMUP_MAX,
    flush_l2: bool = True,
    cache_dir=None,
    use_cache: bool = True,
    force: bool = False,
    seed: int = 0,
    speed_correction: bool | None = None,
    clock: str = "wall",
) -> TimingResult:
    """Time one spec in `workload`; see the module docstring.

    Argument mistakes raise `TimingError` / `SpecError` before anything runs. What goes wrong
    while running (out of memory, a kernel that refuses the shape) comes back as a record with
    status "oom" or "error" and the message: a sweep never dies on one bad point.

    The workload's n_layers counts for scope "model" only (a layer or a block is recorded as 1);
    its threads: CPU threads for the timing (None: the current setting), restored afterwards.
    cache_dir / use_cache / force: see `sqa_search.speed.timing_cache`; force re-times and
    overwrites the cached record. speed_correction: scale each CPU repeat by the machine's speed
    at that moment (see `sqa_search.speed.probe`); None = on for CPU, off for CUDA. The raw
    figures stay in the record. clock: "wall", or "thread" (this thread's CPU time; CPU with one
    thread only): what calibration uses to estimate a step on an idle core.
    """
    result, dev, torch_dtype = new_record(spec, workload, backend=backend, speed_correction=speed_correction,
                                          clock=clock)
    for name, value, low in (("max_repeats", max_repeats, 1), ("min_repeats", min_repeats, 1),
                             ("warmup_max", warmup_max, WARMUP_MIN)):
        check_int(name, value, low)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s < 0:
        raise TimingError(f"budget_s={budget_s!r} is not allowed: must be a number >= 0")
    path = timing_cache.cache_path(cache_dir, result)
    if use_cache and not force:
        cached = timing_cache.load(path, result.key)
        if cached is not None:
            return cached
    if result.mode == "decode" and not result.spec.causal:
        result.status = "error"
        result.error = (
            "mode='decode' needs a causal spec: a bidirectional layer (an encoder) has no next "
            "token to decode; time it with mode='prefill' or 'train'"
        )
        return result
    repeats = {"budget_s": float(budget_s), "max_repeats": max_repeats, "min_repeats": min(min_repeats, max_repeats),
               "warmup_max": warmup_max, "flush_l2": flush_l2}
    _run(result, dev, torch_dtype, workload.threads, seed, timing_cache.default_cache_dir(cache_dir), repeats)
    if result.ok and use_cache:
        timing_cache.store(path, result)
    return result


def _run(result: TimingResult, dev, torch_dtype, threads, seed: int, cache_root, repeats: dict) -> None:
    """Build the job and measure it into `result`; a failure becomes its status and error."""
    failure = None
    with _threads(threads) as actual, torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []):
        result.threads = actual
        torch.manual_seed(seed)
        try:
            probe = reference = None
            if result.speed_corrected:
                probe = speed_probe(probe_kind(result.mode), result.clock)
                stored = machine_reference(probe, fingerprint_id=result.fingerprint_id, cache_dir=cache_root)
                if stored.clock != result.clock:  # machine_reference reads only its probe's clock: a guard
                    raise TimingError(f"the machine reference was taken with the {stored.clock} clock, the timing "
                                      f"uses the {result.clock} clock")
                reference = result.reference_probe_s = stored.probe_s
            job = build_job(
                result.spec, what=result.what, mode=result.mode, batch=result.batch, seq_len=result.seq_len,
                n_layers=result.n_layers, d_ff=result.d_ff, backend=result.requested_backend, device=dev,
                dtype=torch_dtype, seed=seed,
            )
            result.kv_cache_tokens = job.kv_cache_tokens
            measured = measure(job, dev, probe=probe, reference=reference, clock=result.clock, **repeats)
            for name, value in measured.items():
                setattr(result, name, value)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record
            failure = ("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {exc}"[:2000])
            del exc
        finally:
            job = None  # noqa: F841 - drop the module, inputs and caches before freeing
    if failure is not None:
        result.status, result.error = failure
        # the traceback (and the tensors its frames held) is gone; give the memory back
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def merge_passes(records: list[TimingResult]) -> TimingResult:
    """One record for a point timed in several passes: the repeats of all passes pooled.

    A failed pass makes the point failed (its record is returned). Flags are the union, except
    the two that describe the pooled repeats (``unstable``, ``machine-busy``), which are judged
    again on them.
    """
    failed = next((r for r in records if not r.ok), None)
    if failed is not None:
        return failed
    first = records[0]
    merged = TimingResult.from_dict(first.to_dict())
    merged.times_s = [t for r in records for t in r.times_s]
    merged.speeds = [v for r in records for v in r.speeds] if first.speed_corrected else []
    merged.n_repeats = len(merged.times_s)
    merged.n_warmup = sum(r.n_warmup for r in records)
    figures, repeat_flags = summarise(merged.times_s, merged.speeds)
    for name, value in figures.items():
        setattr(merged, name, value)
    backends = backend_parts(r.backend for r in records)
    merged.backend = ",".join(backends)
    flags = [f for r in records for f in r.flags if f not in REPEAT_FLAGS]
    if len(backends) > 1:
        flags.append("backend-changed")
    merged.flags = list(dict.fromkeys(flags + repeat_flags))
    peaks = [r.peak_mem_bytes for r in records if r.peak_mem_bytes is not None]
    merged.peak_mem_bytes = max(peaks) if peaks else None
    merged.timestamp = records[-1].timestamp
    merged.passes = len(records)
    merged.from_cache = False
    return merged


def time_specs(specs, workloads, *, progress: bool = True, fresh_process: bool = False,
               timeout_s: float | None = None, desc: str = "timing", passes: int = 1, **options) -> list[TimingResult]:
    """Time every (workload, spec) of the grid; a tqdm bar shows progress.

    Order: by workload as given (bench gives them by mode, then N, so the short runs come
    first), then by spec. Every point gives a record (failures included). The other keywords
    are those of `time_spec`; see `time_points` for `fresh_process`, `timeout_s` and `passes`.
    """
    if isinstance(specs, (AttentionSpec, dict)):
        specs = [specs]
    if isinstance(workloads, Workload):
        workloads = [workloads]
    specs = [AttentionSpec.coerce(s) for s in specs]
    points = [(s, w) for w in workloads for s in specs]
    return time_points(points, progress=progress, fresh_process=fresh_process, timeout_s=timeout_s, desc=desc,
                       passes=passes, **options)


def time_points(points, *, progress: bool = True, fresh_process: bool = False, timeout_s: float | None = None,
                desc: str = "timing", passes: int = 1, **options) -> list[TimingResult]:
    """Time every (spec, workload) pair of `points`, in order; one record each.

    fresh_process: each point in its own process (`sqa_search.speed.isolated`, with `timeout_s`
    per point). passes > 1 goes over all points that many times, each time with 1/passes of the
    budget and of the repeat counts, and pools each point's repeats (`merge_passes`): a point's
    repeats then span the whole sweep instead of one stretch of it, so a spell in which the
    machine ran differently weighs on every point a little instead of on a few a lot.
    """
    passes = check_int("passes", passes, 1)
    points = [(AttentionSpec.coerce(s), w) for s, w in points]
    use_cache = options.get("use_cache", True) and passes > 1
    each, cached = _pass_options(points, passes, options)
    todo = [i for i in range(len(points)) if i not in cached]
    pooled = _run_passes(points, todo, passes, each, progress=progress, desc=desc,
                         fresh_process=fresh_process, timeout_s=timeout_s)
    results = []
    for i in range(len(points)):
        if i in cached:
            results.append(cached[i])
        elif passes == 1:
            results.append(pooled[i][0])
        else:
            merged = merge_passes(pooled[i])
            if use_cache and merged.ok:
                timing_cache.store(timing_cache.cache_path(options.get("cache_dir"), merged), merged)
            results.append(merged)
    return results


def _pass_options(points, passes: int, options: dict) -> tuple[dict, dict]:
    """(the keywords every pass's call gets, {point index: cached pooled record})."""
    each = dict(options)
    cached: dict[int, TimingResult] = {}
    if passes == 1:
        return each, cached
    # each pass times with a share of the budget and no cache; the pooled record is cached
    use_cache, force = each.pop("use_cache", True), each.pop("force", False)
    each["use_cache"] = False
    each["budget_s"] = options.get("budget_s", 1.0) / passes
    each["min_repeats"] = -(-options.get("min_repeats", MIN_REPEATS) // passes)
    each["max_repeats"] = -(-options.get("max_repeats", 50) // passes)
    if use_cache and not force:
        for i, (spec, workload) in enumerate(points):
            base, _, _ = new_record(spec, workload, backend=options.get("backend", "auto"),
                                    speed_correction=options.get("speed_correction"),
                                    clock=options.get("clock", "wall"))
            hit = timing_cache.cached(base, options.get("cache_dir"))
            if hit is not None:
                cached[i] = hit
    return each, cached


def _run_passes(points, todo, passes, each, *, progress, desc, fresh_process, timeout_s) -> dict:
    """{point index: its records, one per pass}, with a progress bar."""
    pooled: dict[int, list[TimingResult]] = {i: [] for i in todo}
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: only a sweep with a bar needs it

        bar = tqdm(total=len(todo) * passes, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        for p in range(passes):
            for i in todo:
                spec, workload = points[i]
                if bar is not None:
                    where = f"pass {p + 1}/{passes} " if passes > 1 else ""
                    bar.set_postfix_str(f"{where}{spec.label} {workload.mode} N={workload.seq_len}")
                if fresh_process:
                    pooled[i].append(time_spec_subprocess(spec, workload, timeout_s=timeout_s, **each))
                else:
                    pooled[i].append(time_spec(spec, workload, **each))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return pooled


def main(argv=None) -> int:
    """``python -m sqa_search.speed.timing '<json>'`` (what `sqa_search.speed.isolated` starts):
    {"spec": {...}, "workload": {...}, "options": {...}} -> one result line on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sqa_search.speed.timing '{\"spec\": {...}, \"workload\": {\"mode\": \"prefill\", "
              "\"seq_len\": 1024, ...}, \"options\": {...}}'", file=sys.stderr)
        return 2
    request = json.loads(argv[0])
    result = time_spec(AttentionSpec.from_dict(request["spec"]), Workload.from_dict(request["workload"]),
                       **request.get("options", {}))
    sys.stdout.write(RESULT_MARKER + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
