"""`sqa-search doctor`: can this machine be trusted with a study? Run it before a long one.

It checks, on the device at hand and in each dtype it supports, every path the layer can take
(fused SDPA for MHA, GQA, uneven groups, rSQA and bidirectional attention; the blocked window
path; FlexAttention; the dense mask with global tokens; decode from a KV cache) against the
float64 reference (`sqa_search.layer.reference`) at small N, forward and, where the path has one,
backward. It names the kernel each case ran (``layer.last_backend``: SDPA's flash, efficient
or math kernel; compiled or eager flex), and it checks the timing itself: on CUDA, event
times against the wall clock of the same synchronised calls; on any device, the spread of
repeats of a small timing.

Errors are relative: max |layer - reference| / max |reference| over outputs (and input and
weight gradients for backward), with the layer's weights and inputs first rounded to the dtype,
so the tolerance measures the kernels' arithmetic, not the rounding of the inputs.

Verdicts: PASS; FAIL (a path that ran and disagrees, a wrong kernel where the right one must run,
event times that do not match the clock, repeats too spread to time with); SKIP (a path this
machine cannot run, with why: that is not a failure); WARN (repeats spread enough that timings
need more repeats or passes, not so much that they are useless). Exit status 1 on any FAIL.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..layer.spec import AttentionSpec
from .device import TimingError, resolve_device
from .timing import time_spec
from .workload import Workload

__all__ = ["Check", "DoctorError", "TOLERANCES", "run_doctor", "resolve"]

# Relative error allowed per dtype (see the module docstring). float32 kernels agree with
# float64 to ~1e-6 on CPU; the 16-bit ones accumulate in float32 but round P and the output.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16", "float32")}
SPREAD_WARN = 0.10  # IQR / median of a small timing: above this, use more repeats or passes
SPREAD_FAIL = 0.50  # above this, a timing cannot tell variants 2x apart: do not time here
EVENT_WALL_RANGE = (0.7, 1.05)  # CUDA event time / wall time of the same synchronised call
N, BATCH, D, H = 150, 2, 128, 8  # 150 tokens = three 64-token blocks of the blocked path; head_dim 16


class DoctorError(UserError):
    """A doctor request that cannot be run as asked (unknown device or dtype)."""


@dataclass
class Check:
    """One row of the doctor's table."""

    check: str
    spec: str
    dtype: str
    mode: str  # forward | train | decode | timing
    status: str = "PASS"  # PASS | FAIL | SKIP | WARN
    backend: str = ""
    error: float | None = None  # relative error (or the timing figure), see `tolerance`
    tolerance: float | None = None
    note: str = ""
    seconds: float = 0.0


@dataclass
class _Case:
    name: str
    spec: AttentionSpec
    backend: str = "auto"
    modes: tuple = ("forward", "train")
    expect: str | None = None  # a prefix last_backend must have (None: whatever auto picks)
    extra: dict = field(default_factory=dict)


def _cases(device_type: str) -> list[_Case]:
    cuda = device_type == "cuda"
    flex_modes = ("forward", "train") if cuda else ("forward",)  # flex has no CPU backward (torch 2.13)
    return [
        _Case("sdpa MHA", AttentionSpec(D, H, 8, 8), "sdpa", expect="sdpa/"),
        _Case("sdpa GQA (enable_gqa on CUDA)", AttentionSpec(D, H, 8, 2), "sdpa", expect="sdpa/"),
        _Case("sdpa uneven groups", AttentionSpec(D, H, 6, 4), "sdpa", expect="sdpa/"),
        _Case("sdpa rSQA", AttentionSpec.variant("rsqa", D, H), "sdpa", expect="sdpa/"),
        _Case("sdpa bidirectional SQA", AttentionSpec.variant("sqa", D, H, causal=False), "sdpa", expect="sdpa/"),
        _Case("blocked window W=16", AttentionSpec(D, H, 4, 2, window=16), "blocked", expect="blocked"),
        _Case("blocked window bidir + 2 global", AttentionSpec(D, H, 4, 2, window=16, n_global=2, causal=False),
              "blocked", expect="blocked"),
        _Case("global tokens, full attention", AttentionSpec(D, H, 4, 2, n_global=2), "auto",
              expect="flex" if cuda else "sdpa-masked", modes=flex_modes),
        _Case("flex window W=16", AttentionSpec(D, H, 4, 2, window=16), "flex", expect="flex", modes=flex_modes),
        _Case("flex window bidir + 2 global", AttentionSpec(D, H, 6, 4, window=16, n_global=2, causal=False), "flex",
              expect="flex", modes=flex_modes),
        _Case("decode SQA", AttentionSpec.variant("sqa", D, H), modes=("decode",)),
        _Case("decode uneven groups", AttentionSpec(D, H, 6, 4), modes=("decode",)),
        _Case("decode window W=8 (ring buffer)", AttentionSpec(D, H, 4, 2, window=8), modes=("decode",)),
        _Case("decode window + 2 global", AttentionSpec(D, H, 4, 2, window=8, n_global=2), modes=("decode",)),
    ]


def _reference(layer, x):
    from ..layer.reference import reference  # looked up per call, so a test can substitute a wrong one

    return reference(layer, x)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double().cpu() - want).abs().max().item() / scale


def _layers(case: _Case, device, dtype):
    """(layer on device in dtype, float64 CPU twin with the same, dtype-rounded, weights)."""
    from ..layer.attention import SparseQueryAttention

    layer = SparseQueryAttention(case.spec, backend=case.backend).to(device=device, dtype=dtype)
    twin = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    return layer, twin


def _flex_unavailable(exc: BaseException) -> str | None:
    """Why FlexAttention cannot run here (compiler, Triton, inductor missing), or None for a real bug."""
    text = f"{type(exc).__name__}: {exc}"
    needles = ("triton", "inductor", "compiler", "InvalidCxxCompiler", "BackendCompilerFailed", "flex_attention",
               "not supported on", "NotImplementedError")
    return text.splitlines()[0][:160] if any(n.lower() in text.lower() for n in needles) else None


def _check_forward_train(case: _Case, mode: str, device, dtype) -> tuple[float, str]:
    gen = torch.Generator().manual_seed(0)
    layer, twin = _layers(case, device, dtype)
    x = torch.randn(BATCH, N, D, generator=gen).to(dtype)
    if mode == "forward":
        with torch.no_grad():
            got = layer(x.to(device))
        backend = layer.last_backend
        with torch.no_grad():
            want = _reference(twin, x.double())
        return _rel_err(got, want), backend
    grad_out = torch.randn(BATCH, N, D, generator=gen).to(dtype)
    xd = x.to(device).clone().requires_grad_(True)
    layer(xd).backward(grad_out.to(device))
    backend = layer.last_backend
    xr = x.double().clone().requires_grad_(True)
    want = _reference(twin, xr)
    want.backward(grad_out.double())
    # outputs again without grad for the forward part of the error
    with torch.no_grad():
        err = _rel_err(layer(x.to(device)), want.detach())
    err = max(err, _rel_err(xd.grad, xr.grad))
    for p, q in zip(layer.parameters(), twin.parameters()):
        err = max(err, _rel_err(p.grad, q.grad))
    return err, backend


def _check_decode(case: _Case, device, dtype) -> tuple[float, str]:
    """A prompt written into the cache, then one token at a time; each output against the
    reference's output at that position over the whole sequence (causal: the same thing)."""
    gen = torch.Generator().manual_seed(1)
    layer, twin = _layers(case, device, dtype)
    prompt, steps = 20, 12
    x = torch.randn(BATCH, prompt + steps, D, generator=gen).to(dtype)
    with torch.no_grad():
        cache = layer.new_cache(BATCH, prompt + steps)
        layer.prefill_cache(x[:, :prompt].to(device), cache)
        outs = [layer.decode(x[:, t:t + 1].to(device), cache) for t in range(prompt, prompt + steps)]
        want = _reference(twin, x.double())[:, prompt:]
    return _rel_err(torch.cat(outs, 1), want), layer.last_backend


def _path_checks(device: torch.device, dtypes, quick: bool, log) -> list[Check]:
    rows = []
    cases = _cases(device.type)
    if quick:  # one of each path
        cases = [c for c in cases if c.name in ("sdpa GQA (enable_gqa on CUDA)", "sdpa uneven groups", "sdpa rSQA",
                                                "blocked window bidir + 2 global", "global tokens, full attention",
                                                "flex window W=16", "decode window + 2 global")]
    for dtype_name in dtypes:
        dtype, tol = DTYPES[dtype_name], TOLERANCES[dtype_name]
        for case in cases:
            for mode in case.modes:
                row = Check(case.name, case.spec.label, dtype_name, mode, tolerance=tol)
                t0 = time.perf_counter()
                try:
                    err, backend = (_check_decode(case, device, dtype) if mode == "decode"
                                    else _check_forward_train(case, mode, device, dtype))
                except Exception as exc:  # noqa: BLE001 - every failure becomes a row
                    why = _flex_unavailable(exc) if case.expect == "flex" else None
                    row.status = "SKIP" if why else "FAIL"
                    row.note = f"skipped: {why}" if why else f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                else:
                    row.error, row.backend = err, backend or ""
                    _judge(row, case, device)
                row.seconds = time.perf_counter() - t0
                rows.append(row)
                log(row)
    return rows


def _judge(row: Check, case: _Case, device: torch.device) -> None:
    if row.error != row.error or row.error > row.tolerance:  # NaN fails too
        row.status, row.note = "FAIL", f"error {row.error:.2e} > tolerance {row.tolerance:.0e}"
    elif case.expect and not row.backend.startswith(case.expect):
        row.status, row.note = "FAIL", f"ran {row.backend!r}, expected {case.expect}*"
    elif device.type == "cuda" and row.backend == "flex-eager":
        row.status, row.note = "FAIL", "FlexAttention ran eagerly on CUDA (N x N materialised): compile failed"
    elif "math" in row.backend and device.type == "cuda" and row.dtype != "float32":
        row.status, row.note = "WARN", "SDPA's math kernel on CUDA in 16-bit: no fused kernel for this shape/GPU"


# ----- timing sanity -------------------------------------------------------------------------------
def _spread_check(device: torch.device, dtype_name: str, quick: bool) -> Check:
    spec = AttentionSpec.variant("sqa", 256, 16)
    workload = Workload(mode="prefill", seq_len=1024, dtype=dtype_name, device=str(device),
                        threads=1 if device.type == "cpu" else None)
    r = time_spec(spec, workload, use_cache=False, budget_s=0.3 if quick else 1.0, min_repeats=10, max_repeats=200)
    row = Check("timing: repeat spread (IQR/median)", spec.label, dtype_name, "timing", tolerance=SPREAD_FAIL,
                backend=r.backend or "")
    if not r.ok:
        row.status, row.note = "FAIL", f"timing failed: {r.error}"
        return row
    row.error = r.iqr_s / r.median_s
    corrected = " (speed-corrected)" if r.speed_corrected else ""
    row.note = f"median {r.median_s * 1e3:.3g} ms over {r.n_repeats} repeats{corrected}"
    if row.error > SPREAD_FAIL:
        row.status = "FAIL"
        row.note += f"; spread above {SPREAD_FAIL:.0%}: timings here cannot separate variants"
    elif row.error > SPREAD_WARN:
        row.status = "WARN"
        row.note += f"; spread above {SPREAD_WARN:.0%}: use more repeats (timing_budget_s) or bench --passes"
    return row


def _event_check(device: torch.device, dtype_name: str) -> Check:
    """CUDA events against the wall clock of the same synchronised calls, on `device`."""
    from ..layer.attention import SparseQueryAttention

    spec = AttentionSpec.variant("mha", 256, 16)
    dtype = DTYPES[dtype_name]
    layer = SparseQueryAttention(spec).to(device=device, dtype=dtype)
    x = torch.randn(1, 8192, 256, device=device, dtype=dtype)
    ratios = []
    with torch.cuda.device(device), torch.no_grad():
        stream = torch.cuda.current_stream(device)
        for i in range(12):
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record(stream)
            layer(x)
            end.record(stream)
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            if i >= 2:  # two warm-up calls
                ratios.append(start.elapsed_time(end) / 1e3 / wall)
    row = Check("timing: CUDA events vs wall clock", spec.label, dtype_name, "timing", backend=layer.last_backend,
                error=statistics.median(ratios), tolerance=None)
    low, high = EVENT_WALL_RANGE
    row.note = f"event/wall median {row.error:.3f} over {len(ratios)} calls (allowed {low}-{high})"
    if not low <= row.error <= high:
        row.status = "FAIL"
    return row


# ----- the command ---------------------------------------------------------------------------------
def resolve(device: str, dtypes: str | None) -> tuple[torch.device, tuple]:
    try:
        dev = resolve_device(device)
    except TimingError as exc:
        raise DoctorError(f"--device: {exc}") from None
    if dtypes is None:
        return dev, DEFAULT_DTYPES[dev.type]
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise DoctorError(f"--dtype={dtypes!r} is not allowed: a comma-separated list of {', '.join(DTYPES)}")
    return dev, names


def run_doctor(device: str = "auto", dtypes: str | None = None, quick: bool = False, log=None) -> list[Check]:
    """Every check on `device` (see the module docstring); `log(row)` is called as rows finish."""
    dev, names = resolve(device, dtypes)
    if quick:
        names = names[:1]
    log = log or (lambda row: None)
    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # small shapes on a shared CPU: more threads only wait on each other
    try:
        rows = _path_checks(dev, names, quick, log)
        timing_dtype = "bfloat16" if dev.type == "cuda" else "float32"
        rows.append(_spread_check(dev, timing_dtype, quick))
        log(rows[-1])
        if dev.type == "cuda":
            rows.append(_event_check(dev, timing_dtype))
            log(rows[-1])
    finally:
        torch.set_num_threads(old_threads)
    return rows
