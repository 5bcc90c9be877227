"""Timing trials: how long one `AttentionSpec` takes per step on this machine, honestly measured.

`time_spec` times one spec at one shape (batch, N), dtype, device and workload `mode`
(``train``: forward + backward, ``prefill``: forward without grad, ``decode``: one new token
against a KV cache of N tokens) for the attention layer alone, a whole block or the whole
proxy model (``what``), and returns a `TimingResult` that says not only the median and IQR
but which kernel ran (``backend``), what went wrong (``flags``), the peak memory and the
machine (``fingerprint``).

Method, and why:

* Warm-up until stable: at least two calls (the first pays for lazy init, compilation and
  allocator growth), more until two consecutive calls agree within 10 % or a cap is reached.
* Repeats until a time budget (1 s) with at least 3 and at most 50 samples; median and IQR,
  because a shared machine produces one-sided outliers that a mean would absorb.
* CUDA: ``torch.cuda.Event`` pairs with a synchronise per repeat (kernels are asynchronous:
  host-side clocks time the launches, not the work) and an L2 flush (a 256 MiB buffer, or
  twice the L2, zeroed) before each repeat, so a small shape is not timed out of a warm L2.
  CPU: ``time.perf_counter`` and a fixed, recorded thread count.
* CPU speed correction (default on CPU): a shared machine changes speed under a timing, in
  phases longer than any timing budget, so each repeat is scaled by the machine's speed at
  that moment, measured by a fixed probe kernel between repeats against this machine's stored
  reference (`sqa_search.speed.probe`). ``median_s``/``iqr_s`` are then "seconds at the
  machine's reference speed"; ``raw_median_s``, ``times_s`` (raw), ``speeds`` and
  ``machine_speed`` keep what the clock said. ``machine-busy`` flags a median correction
  above 1.5x.
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

Cache: one JSON file per key under ``<cache dir>/<fingerprint id>/<key>.json``. The default
directory is ``~/.cache/sqa_search/timings``; the environment variable ``SQA_SEARCH_CACHE``
replaces the root (``$SQA_SEARCH_CACHE/timings``); a ``cache_dir`` argument replaces both and
is used as is. The key covers the fingerprint id, the spec, batch, N, mode, what, n_layers,
d_ff, dtype, device type, threads (CPU only), the requested backend and TIMING_VERSION; not
the budget, which changes precision, not the figure. Only ``ok`` results are cached: an ``oom`` may come from memory another
process held at the time and an ``error`` from a bug since fixed, so both are re-tried.

Fresh process: `time_spec_subprocess` runs the same trial in ``python -m sqa_search.speed.timing``
(JSON in on argv, JSON out on stdout), for long sweeps where compiled kernels would pile up
recompilations in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layer.spec import AttentionSpec
from .probe import (BUSY_CORRECTION, PROBE_INTERVAL_S, SpeedProbe, corrected_times, machine_reference,
                          probe_kind, stored_reference)
from ..errors import UserError

__all__ = [
    "TimingResult",
    "TimingError",
    "MODES",
    "WHATS",
    "time_spec",
    "time_specs",
    "time_spec_subprocess",
    "merge_passes",
    "fingerprint",
    "fingerprint_id",
    "default_cache_dir",
    "parse_dtype",
]

# Bump when the method changes so old cached timings are not mixed with new ones.
TIMING_VERSION = 2  # 2: CPU repeats corrected for machine speed (speed_probe.py)

MODES = ("train", "prefill", "decode")
WHATS = ("layer", "block", "model")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

DEFAULT_MODEL_LAYERS = 8  # the SQA paper's dense model
MIN_REPEATS = 3
WARMUP_MIN = 2
WARMUP_MAX = 10
WARMUP_TOLERANCE = 0.10  # two consecutive warm-up calls within 10 % = settled
UNSTABLE_FACTOR = 5.0  # samples this many times the median are outliers ...
UNSTABLE_SHARE = 0.02  # ... and more than this share of them (at least one) flags "unstable": one interrupt
# in a thousand decode steps is the machine, not the timing
L2_FLUSH_BYTES = 256 * 2**20
RESULT_MARKER = "SQA_TIMING_RESULT "

# The fields of `fingerprint()` that identify the machine and software stack. dtype and
# thread count are left out: each timing's key carries them, so one id groups every timing
# taken on one machine (which is what a cost-model calibration wants).
HARDWARE_FIELDS = (
    "device_type",
    "device_name",
    "compute_capability",
    "gpu_memory_bytes",
    "sm_count",
    "driver_version",
    "cuda_version",
    "torch_version",
    "cpu_model",
    "cpu_count",
)


class TimingError(UserError):
    """A timing request that cannot be run as asked (bad mode, dtype, device, shape)."""


# ----- the record --------------------------------------------------------------------------
@dataclass
class TimingResult:
    """One timed (or predicted) spec at one shape and workload. JSON-safe via `to_dict`."""

    spec: dict
    label: str
    variant: str
    mode: str
    what: str
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
    fingerprint: dict = field(default_factory=dict)
    fingerprint_id: str = ""
    predicted: bool = False
    prediction: dict | None = None  # cost-model details when predicted
    timestamp: float = 0.0
    timing_version: int = TIMING_VERSION
    from_cache: bool = False
    passes: int = 1  # separate passes whose repeats were pooled (time_specs(passes=...))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> str:
        return _job_key(
            fingerprint_id=self.fingerprint_id,
            spec=self.spec,
            batch=self.batch,
            seq_len=self.seq_len,
            mode=self.mode,
            what=self.what,
            n_layers=self.n_layers,
            d_ff=self.d_ff,
            dtype=self.dtype,
            device=self.device,
            threads=self.threads,
            backend=self.requested_backend,
            speed_corrected=self.speed_corrected,
        )

    @property
    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec.from_dict(self.spec)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TimingResult":
        known = {f.name for f in dataclasses.fields(cls)}
        # unknown keys (the stored `key`, fields of a newer version) are ignored on purpose
        return cls(**{k: v for k, v in data.items() if k in known})


def _job_key(*, fingerprint_id, spec, batch, seq_len, mode, what, n_layers, d_ff, dtype, device, threads, backend,
             speed_corrected=False):
    device_type = str(device).split(":")[0]
    payload = {
        "v": TIMING_VERSION,
        "fp": fingerprint_id,
        "spec": spec,
        "batch": batch,
        "seq_len": seq_len,
        "mode": mode,
        "what": what,
        "n_layers": n_layers,
        "d_ff": d_ff,
        "dtype": dtype,
        "device": device_type,
        # threads only matter where the CPU does the work
        "threads": threads if device_type == "cpu" else None,
        "backend": backend,
        "speed_corrected": bool(speed_corrected),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ----- argument checks ---------------------------------------------------------------------
def parse_dtype(dtype) -> tuple[str, torch.dtype]:
    """'bf16' -> ('bfloat16', torch.bfloat16); raises TimingError naming the allowed ones."""
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return str(value).replace("torch.", ""), value
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise TimingError(f"dtype={dtype!r} is not known: choose one of float32, bfloat16, float16")
    value = _DTYPES[key]
    return str(value).replace("torch.", ""), value


def resolve_device(device) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' -> 'cuda:<current>'; checks availability."""
    text = str(device).lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise TimingError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:<index>") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TimingError(f"device={device!r} asked for, but CUDA is not available on this machine")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise TimingError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise TimingError(f"device={device!r} is not supported: use auto, cpu, cuda or cuda:<index>")
    return dev


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TimingError(f"{name}={value!r} is not allowed: must be an integer >= {low}")
    return value


# ----- fingerprint -------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_FP_CACHE: dict = {}


def _driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi, else the CUDA driver API version (best effort)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = int(torch._C._cuda_getDriverVersion())
        return f"cuda-driver-api {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None


def fingerprint(device="cpu", dtype="float32", threads: int | None = None) -> dict:
    """What a timing depends on besides its shape: device, software, CPU, threads, dtype.

    No hostnames or serial numbers: two identical machines share a fingerprint, which is the
    point (timings transfer between them).
    """
    dev = resolve_device(device)
    dtype_name, _ = parse_dtype(dtype)
    base_key = str(dev)
    if base_key not in _FP_CACHE:
        fp = {
            "device_type": dev.type,
            "device_name": None,
            "compute_capability": None,
            "gpu_memory_bytes": None,
            "sm_count": None,
            "driver_version": None,
            "cuda_version": torch.version.cuda,
            "torch_version": torch.__version__,
            "cpu_model": _cpu_model(),
            "cpu_count": _cpu_count(),
            "python_version": platform.python_version(),
            "os": platform.system(),
        }
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            fp["device_name"] = props.name
            fp["compute_capability"] = f"{props.major}.{props.minor}"
            fp["gpu_memory_bytes"] = int(props.total_memory)
            fp["sm_count"] = int(props.multi_processor_count)
            fp["l2_cache_bytes"] = int(getattr(props, "L2_cache_size", 0)) or None
            fp["driver_version"] = _driver_version()
        else:
            fp["device_name"] = fp["cpu_model"]
        _FP_CACHE[base_key] = fp
    fp = dict(_FP_CACHE[base_key])
    fp["threads"] = threads if threads is not None else torch.get_num_threads()
    fp["dtype"] = dtype_name
    return fp


def fingerprint_id(fp: dict) -> str:
    """A short stable hash of the hardware and software fields (see HARDWARE_FIELDS)."""
    blob = json.dumps({k: fp.get(k) for k in HARDWARE_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----- cache -------------------------------------------------------------------------------
def default_cache_dir(cache_dir=None) -> Path:
    """The timings directory: the argument, else $SQA_SEARCH_CACHE/timings, else ~/.cache/..."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("SQA_SEARCH_CACHE")
    if root:
        return Path(root).expanduser() / "timings"
    return Path.home() / ".cache" / "sqa_search" / "timings"


def _cache_path(cache_dir: Path, fp_id: str, key: str) -> Path:
    return cache_dir / fp_id / f"{key}.json"


def _cache_load(path: Path, key: str) -> TimingResult | None:
    try:
        data = json.loads(path.read_text())
        result = TimingResult.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None  # missing or damaged: time again
    if result.key != key or result.status != "ok":
        return None
    if result.speed_corrected:
        # corrected against a reference since re-measured (or deleted): another scale, time again
        ref = stored_reference(fingerprint_id=result.fingerprint_id, cache_dir=path.parent.parent,
                               threads=result.threads, kind=probe_kind(result.mode))
        if ref is None or ref.probe_s != result.reference_probe_s:
            return None
    result.from_cache = True
    return result


def _cache_store(path: Path, result: TimingResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["from_cache"] = False
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----- building the thing to time ----------------------------------------------------------
@dataclass
class _Job:
    step: callable  # the timed call
    before: callable  # untimed, before every call (zero grads, reset the cache length)
    observe: callable  # the backend string(s) the last call ran on
    resident_bytes: int  # weights, inputs and cache that live across calls
    kv_cache_tokens: int | None = None


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _build_job(spec, *, what, mode, batch, seq_len, n_layers, d_ff, backend, device, dtype, seed) -> _Job:
    from ..layer.attention import SparseQueryAttention
    from ..layer.model import Block, ModelConfig, ProxyLM

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    b, n, d = batch, seq_len, spec.d_model
    if what == "layer":
        module = SparseQueryAttention(spec, backend=backend)
        attn_layers = [module]
    else:
        cfg_fields = {"attention": spec, "backend": backend}
        if d_ff is not None:
            cfg_fields["d_ff"] = d_ff
        if what == "block":
            module = Block(ModelConfig(**cfg_fields))
            attn_layers = [module.attn]
        else:
            module = ProxyLM(ModelConfig(n_layers=n_layers, **cfg_fields))
            attn_layers = module.attention_layers
    module = module.to(device=device, dtype=dtype)
    params = list(module.parameters()) + list(module.buffers())

    def observe() -> str:
        names = []
        for layer in attn_layers:
            name = layer.last_backend or "unknown"
            if name not in names:
                names.append(name)
        return ",".join(names)

    def reset_backend():
        for layer in attn_layers:
            layer.last_backend = None

    if mode == "decode":
        return _build_decode(module, attn_layers, what, b, n, d, randn, gen, device, params, observe, reset_backend)

    if what == "model":
        vocab = module.config.vocab_size
        idx = torch.randint(0, vocab, (b, n), generator=gen).to(device)
        inputs = [idx]
        if mode == "prefill":
            def step():
                with torch.inference_mode():
                    module(idx)
            before = reset_backend
        else:
            targets = torch.randint(0, vocab, (b, n), generator=gen).to(device)
            inputs.append(targets)

            def step():
                _, loss = module(idx, targets)
                loss.backward()

            def before():
                module.zero_grad(set_to_none=True)
                reset_backend()
    else:
        x = randn(b, n, d)
        inputs = [x]
        if mode == "prefill":
            def step():
                with torch.inference_mode():
                    module(x)
            before = reset_backend
        else:
            # a fixed random output gradient: backward of sum() would hand every kernel a
            # constant gradient, which is not what training sees
            x.requires_grad_(True)
            grad_out = randn(b, n, d)
            inputs.append(grad_out)

            def step():
                module(x).backward(grad_out)

            def before():
                module.zero_grad(set_to_none=True)
                x.grad = None
                reset_backend()

    return _Job(step, before, observe, _tensor_bytes(params + inputs))


def _build_decode(module, attn_layers, what, b, n, d, randn, gen, device, params, observe, reset_backend) -> _Job:
    """One new token against caches that hold N tokens (a window holds min(N, W)).

    The caches get capacity N + 1 and are filled from an N-token prompt (untimed); before
    every repeat their length is set back to N, so each timed call decodes position N.
    Block and model decode follow Block.forward / ProxyLM.forward with the layer's decode.
    """
    caches = [layer.new_cache(b, n + 1) for layer in attn_layers]
    with torch.inference_mode():
        if what == "layer":
            prompt = randn(b, n, d)
            module.prefill_cache(prompt, caches[0])
            x_new = randn(b, 1, d)

            def step():
                with torch.inference_mode():
                    module.decode(x_new, caches[0])
        elif what == "block":
            prompt = randn(b, n, d)
            module.attn.prefill_cache(module.attn_norm(prompt), caches[0])
            x_new = randn(b, 1, d)

            def step():
                with torch.inference_mode():
                    h = x_new + module.attn.decode(module.attn_norm(x_new), caches[0])
                    h + module.ff(module.ff_norm(h))
        else:
            vocab = module.config.vocab_size
            idx = torch.randint(0, vocab, (b, n), generator=gen).to(device)
            h = module.embed(idx)
            for block, cache in zip(module.blocks, caches):
                block.attn.prefill_cache(block.attn_norm(h), cache)
                h = block(h)
            token = torch.randint(0, vocab, (b, 1), generator=gen).to(device)
            x_new = token

            def step():
                with torch.inference_mode():
                    h = module.embed(token)
                    for block, cache in zip(module.blocks, caches):
                        h = h + block.attn.decode(block.attn_norm(h), cache)
                        h = h + block.ff(block.ff_norm(h))
                    F.linear(module.norm(h), module.embed.weight)

    def before():
        for cache in caches:
            cache.length = n
        reset_backend()

    before()
    cache_tensors = [t for c in caches for t in (c.k, c.v)]
    resident = _tensor_bytes(params + cache_tensors + [x_new])
    return _Job(step, before, observe, resident, kv_cache_tokens=caches[0].filled)


# ----- measuring ---------------------------------------------------------------------------
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


def _peak_memory(job: _Job, dev: torch.device) -> tuple[int | None, str]:
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


def _timer(job: _Job, dev: torch.device, flush_l2: bool):
    """A function that runs the job once (its untimed `before`, then the timed step) -> seconds.

    CUDA: an event pair recorded on `dev`'s current stream, inside ``torch.cuda.device(dev)``
    (a bare ``Event().record()`` records on the *current* device's stream, so timing cuda:1
    from a process whose current device is cuda:0 would time an idle stream).
    """
    if dev.type != "cuda":
        def one() -> float:
            job.before()
            t0 = time.perf_counter()
            job.step()
            return time.perf_counter() - t0

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


def _measure(job: _Job, dev: torch.device, *, budget_s: float, max_repeats: int, min_repeats: int,
             warmup_max: int, flush_l2: bool, probe=None, reference=None) -> dict:
    """Warm up, time the repeats, summarise; with a `probe`, correct each repeat for machine speed."""
    with _sdp_choice_replay() as replay:
        return _measure_repeats(job, dev, replay, budget_s=budget_s, max_repeats=max_repeats,
                                min_repeats=min_repeats, warmup_max=warmup_max, flush_l2=flush_l2, probe=probe,
                                reference=reference)


def _measure_repeats(job: _Job, dev: torch.device, replay, *, budget_s: float, max_repeats: int,
                     min_repeats: int, warmup_max: int, flush_l2: bool, probe=None, reference=None) -> dict:
    timed_call = _timer(job, dev, flush_l2)

    def one(warmup: bool = False) -> float:
        if replay is not None:
            replay.start_call(recording=warmup)
        return timed_call()

    flags: list[str] = []
    dyn0 = _dynamo_counts()

    # warm-up: >= WARMUP_MIN calls, until two consecutive agree or the cap (count or time)
    warm: list[float] = []
    w_start = time.perf_counter()
    settled = False
    while True:
        warm.append(one(warmup=True))
        if len(warm) >= WARMUP_MIN:
            a, b = warm[-2], warm[-1]
            if abs(a - b) <= WARMUP_TOLERANCE * min(a, b):
                settled = True
                break
            if len(warm) >= warmup_max or time.perf_counter() - w_start > max(budget_s, 1e-9) + warm[0]:
                break
    if not settled:
        flags.append("warmup-unsettled")

    dyn1 = _dynamo_counts()
    times: list[float] = []
    speeds: list[float] = []  # machine speed (reference / probe) at each repeat, with a probe
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
    dyn2 = _dynamo_counts()
    one = timed_call = None  # noqa: F841 - frees the L2 flush buffer before the memory call

    seen = _backend_parts(backends)
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

    figures, repeat_flags = _summarise(times, speeds)
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


REPEAT_FLAGS = ("machine-busy", "unstable")  # the flags `_summarise` decides from the repeats


def _summarise(times: list[float], speeds: list[float]) -> tuple[dict, list[str]]:
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


def _backend_parts(names) -> list[str]:
    """The distinct kernels named in backend strings ("a,b"), in first-seen order."""
    return list(dict.fromkeys(part for name in names for part in (name or "").split(",") if part))


def _unstable(samples: list[float], median: float) -> bool:
    outliers = sum(t > UNSTABLE_FACTOR * median for t in samples)
    return outliers > 0 and outliers > UNSTABLE_SHARE * len(samples)


@functools.lru_cache(maxsize=None)
def _probe(kind: str) -> SpeedProbe:
    """One probe of each kind per process: building one (tensors, warm-up calls) is not free."""
    return SpeedProbe(kind)


def _median_iqr(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    if len(values) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory"
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


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


# ----- public API --------------------------------------------------------------------------
def _prepare(spec, *, batch=1, seq_len, mode="prefill", dtype="float32", device="cpu", what="layer",
             n_layers=None, d_ff=None, backend="auto", threads=None, speed_correction=None, **_ignored):
    """Check a request and return (its record with nothing measured, device, torch dtype)."""
    from ..layer.attention import BACKENDS

    spec = AttentionSpec.coerce(spec)
    if mode not in MODES:
        raise TimingError(f"mode={mode!r} is not known: choose one of {', '.join(MODES)}")
    if what not in WHATS:
        raise TimingError(f"what={what!r} is not known: choose one of {', '.join(WHATS)}")
    _check_int("batch", batch, 1)
    _check_int("seq_len", seq_len, 1)
    if threads is not None:
        _check_int("threads", threads, 1)
    if what == "model":
        n_layers = DEFAULT_MODEL_LAYERS if n_layers is None else _check_int("n_layers", n_layers, 1)
    else:
        n_layers = 1
    if d_ff is not None:
        _check_int("d_ff", d_ff, 1)
    if backend not in BACKENDS:
        raise TimingError(f"backend={backend!r} is not known: choose one of {', '.join(BACKENDS)}")
    dtype_name, torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    if speed_correction is not None and not isinstance(speed_correction, bool):
        raise TimingError(f"speed_correction={speed_correction!r} is not allowed: choose True, False or None (auto)")
    if speed_correction and dev.type != "cpu":
        raise TimingError(f"speed_correction=True is not allowed on device={str(dev)!r}: the machine-speed "
                          "probe corrects CPU timings only (CUDA timings use events)")
    corrected = dev.type == "cpu" if speed_correction is None else speed_correction
    used_threads = threads if threads is not None else torch.get_num_threads()
    fp = fingerprint(dev, dtype_name, used_threads)
    bytes_each = torch.empty((), dtype=torch_dtype).element_size()
    result = TimingResult(
        spec=spec.to_dict(),
        label=spec.label,
        variant=spec.variant_name or spec.family,
        mode=mode,
        what=what,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype_name,
        device=str(dev),
        n_layers=n_layers,
        d_ff=d_ff,
        requested_backend=backend,
        threads=used_threads,
        speed_corrected=corrected,
        kv_cache_bytes=spec.kv_cache_bytes(seq_len, bytes_each, batch) * n_layers,
        fingerprint=fp,
        fingerprint_id=fingerprint_id(fp),
        timestamp=time.time(),
    )
    return result, dev, torch_dtype


def time_spec(
    spec,
    *,
    batch: int = 1,
    seq_len: int,
    mode: str = "prefill",
    dtype="float32",
    device="cpu",
    what: str = "layer",
    n_layers: int | None = None,
    d_ff: int | None = None,
    backend: str = "auto",
    threads: int | None = None,
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
) -> TimingResult:
    """Time one spec at (batch, seq_len) for `mode` on `device`; see the module docstring.

    Argument mistakes raise `TimingError` / `SpecError` before anything runs. What goes wrong
    while running (out of memory, a kernel that refuses the shape) comes back as a record with
    status "oom" or "error" and the message: a sweep never dies on one bad point.

    n_layers: layers of the proxy model for what="model" (default 8, the paper's model);
    ignored (recorded as 1) for a layer or a block. threads: CPU threads for the timing
    (default: the current setting); restored afterwards. cache_dir / use_cache / force: see
    the module docstring; force re-times and overwrites the cached record.
    speed_correction: scale each CPU repeat by the machine's speed at that moment (see
    `sqa_search.speed.probe`); None = on for CPU, off for CUDA. The raw figures stay in the record.
    """
    result, dev, torch_dtype = _prepare(
        spec, batch=batch, seq_len=seq_len, mode=mode, dtype=dtype, device=device, what=what,
        n_layers=n_layers, d_ff=d_ff, backend=backend, threads=threads, speed_correction=speed_correction,
    )
    for name, value, low in (("max_repeats", max_repeats, 1), ("min_repeats", min_repeats, 1),
                             ("warmup_max", warmup_max, WARMUP_MIN)):
        _check_int(name, value, low)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s < 0:
        raise TimingError(f"budget_s={budget_s!r} is not allowed: must be a number >= 0")
    min_repeats = min(min_repeats, max_repeats)
    spec = result.attention_spec
    fp_id = result.fingerprint_id
    cache_root = default_cache_dir(cache_dir)
    path = _cache_path(cache_root, fp_id, result.key)
    if use_cache and not force:
        cached = _cache_load(path, result.key)
        if cached is not None:
            return cached

    if mode == "decode" and not spec.causal:
        result.status = "error"
        result.error = (
            "mode='decode' needs a causal spec: a bidirectional layer (an encoder) has no next "
            "token to decode; time it with mode='prefill' or 'train'"
        )
        return result

    failure = None
    with _threads(threads) as actual, torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []):
        result.threads = actual
        torch.manual_seed(seed)
        try:
            probe = reference = None
            if result.speed_corrected:
                probe = _probe(probe_kind(mode))
                reference = machine_reference(probe, fingerprint_id=fp_id, cache_dir=cache_root).probe_s
                result.reference_probe_s = reference
            job = _build_job(
                spec, what=what, mode=mode, batch=batch, seq_len=seq_len, n_layers=result.n_layers,
                d_ff=d_ff, backend=backend, device=dev, dtype=torch_dtype, seed=seed,
            )
            result.kv_cache_tokens = job.kv_cache_tokens
            measured = _measure(
                job, dev, budget_s=float(budget_s), max_repeats=max_repeats,
                min_repeats=min_repeats, warmup_max=warmup_max, flush_l2=flush_l2,
                probe=probe, reference=reference,
            )
            for name, value in measured.items():
                setattr(result, name, value)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record
            failure = ("oom" if _is_oom(exc) else "error", f"{type(exc).__name__}: {exc}"[:2000])
            del exc
        finally:
            job = None  # noqa: F841 - drop the module, inputs and caches before freeing
    if failure is not None:
        result.status, result.error = failure
        # the traceback (and the tensors its frames held) is gone; give the memory back
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return result

    if use_cache:
        _cache_store(path, result)
    return result


def _job_arguments(kwargs: dict) -> dict:
    """Keyword arguments of time_spec in a JSON-safe form (for the fresh process)."""
    out = dict(kwargs)
    if "dtype" in out:
        out["dtype"] = parse_dtype(out["dtype"])[0]
    if "device" in out:
        out["device"] = str(out["device"])
    if out.get("cache_dir") is not None:
        out["cache_dir"] = str(out["cache_dir"])
    return out


def time_spec_subprocess(spec, *, timeout_s: float | None = None, **kwargs) -> TimingResult:
    """`time_spec` in a fresh ``python -m sqa_search.speed.timing`` process; same arguments, same record.

    A cached record is returned without starting a process. A process that dies (killed for
    memory, crashed in a kernel) or runs past `timeout_s` gives a record with status "oom"
    (killed by signal 9, the usual out-of-memory kill) or "error" and the end of its stderr.
    """
    spec = AttentionSpec.coerce(spec)
    if kwargs.get("use_cache", True) and not kwargs.get("force", False):
        cached = _cached_only(spec, **kwargs)
        if cached is not None:
            return cached
    payload = json.dumps({"spec": spec.to_dict(), "kwargs": _job_arguments(kwargs)})
    env = dict(os.environ)
    # the child must import this very package, wherever the caller imported it from
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base, _, _ = _prepare(spec, **kwargs)  # checks the arguments here, not in the child
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sqa_search.speed.timing", payload],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        base.status, base.error = "error", f"fresh-process timing ran past timeout_s={timeout_s}"
        return base
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return TimingResult.from_dict(json.loads(line[len(RESULT_MARKER):]))
    tail = (proc.stderr or "").strip()[-1500:]
    base.status = "oom" if proc.returncode == -9 else "error"
    base.error = f"fresh-process timing exited with code {proc.returncode} and no result: {tail}"
    return base


def _cached_only(spec: AttentionSpec, **kwargs) -> TimingResult | None:
    """The cached record for these arguments, or None; times nothing."""
    base, _, _ = _prepare(spec, **kwargs)
    path = _cache_path(default_cache_dir(kwargs.get("cache_dir")), base.fingerprint_id, base.key)
    return _cache_load(path, base.key)


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
    figures, repeat_flags = _summarise(merged.times_s, merged.speeds)
    for name, value in figures.items():
        setattr(merged, name, value)
    backends = _backend_parts(r.backend for r in records)
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


def time_specs(
    specs,
    *,
    seq_lens,
    modes=("prefill",),
    progress: bool = True,
    fresh_process: bool = False,
    timeout_s: float | None = None,
    desc: str = "timing",
    passes: int = 1,
    **kwargs,
) -> list[TimingResult]:
    """Time every (mode, seq_len, spec) of the grid; a tqdm bar shows progress.

    Order: by mode, then by N, then by spec, so the short runs come first. Every point gives
    a record (failures included); `fresh_process` times each point in its own process (with
    `timeout_s` per point). The other keywords are those of `time_spec`.

    passes > 1 goes over the whole grid that many times, each time with 1/passes of the
    budget and of the repeat counts, and pools each point's repeats (`merge_passes`): a point's
    repeats then span the whole sweep instead of one stretch of it, so a spell in which the
    machine ran differently weighs on every point a little instead of on a few a lot.
    """
    passes = _check_int("passes", passes, 1)
    if isinstance(specs, (AttentionSpec, dict)):
        specs = [specs]
    specs = [AttentionSpec.coerce(s) for s in specs]
    seq_lens = [seq_lens] if isinstance(seq_lens, int) else list(seq_lens)
    modes = [modes] if isinstance(modes, str) else list(modes)
    grid = [(m, n, s) for m in modes for n in seq_lens for s in specs]
    if fresh_process:
        def fn(spec, **kw):
            return time_spec_subprocess(spec, timeout_s=timeout_s, **kw)
    else:
        fn = time_spec

    each = dict(kwargs)  # what every call gets
    cached: dict[int, TimingResult] = {}
    if passes > 1:
        # each pass times with a share of the budget and no cache; the pooled record is cached
        use_cache, force = each.pop("use_cache", True), each.pop("force", False)
        each["use_cache"] = False
        each["budget_s"] = kwargs.get("budget_s", 1.0) / passes
        each["min_repeats"] = -(-kwargs.get("min_repeats", MIN_REPEATS) // passes)
        each["max_repeats"] = -(-kwargs.get("max_repeats", 50) // passes)
        if use_cache and not force:
            for i, (mode, n, spec) in enumerate(grid):
                hit = _cached_only(spec, seq_len=n, mode=mode, **kwargs)
                if hit is not None:
                    cached[i] = hit
    todo = [i for i in range(len(grid)) if i not in cached]

    pooled: dict[int, list[TimingResult]] = {i: [] for i in todo}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * passes, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        for p in range(passes):
            for i in todo:
                mode, n, spec = grid[i]
                if bar is not None:
                    where = f"pass {p + 1}/{passes} " if passes > 1 else ""
                    bar.set_postfix_str(f"{where}{spec.label} {mode} N={n}")
                pooled[i].append(fn(spec, seq_len=n, mode=mode, **each))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    results = []
    for i in range(len(grid)):
        if i in cached:
            results.append(cached[i])
        elif passes == 1:
            results.append(pooled[i][0])
        else:
            merged = merge_passes(pooled[i])
            if use_cache and merged.ok:
                path = _cache_path(default_cache_dir(kwargs.get("cache_dir")), merged.fingerprint_id, merged.key)
                _cache_store(path, merged)
            results.append(merged)
    return results


def main(argv=None) -> int:
    """``python -m sqa_search.speed.timing '<json>'``: {"spec": {...}, "kwargs": {...}} -> one result line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sqa_search.speed.timing '{\"spec\": {...}, \"kwargs\": {\"seq_len\": 1024, ...}}'",
              file=sys.stderr)
        return 2
    request = json.loads(argv[0])
    result = time_spec(AttentionSpec.from_dict(request["spec"]), **request.get("kwargs", {}))
    sys.stdout.write(RESULT_MARKER + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
