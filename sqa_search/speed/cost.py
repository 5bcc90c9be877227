"""Analytic cost model: FLOPs and bytes per step and roofline predictions.

Three questions, three parts (the second and third live next door):

* **What work does a step do?** `step_cost` lists the phases (kernels) of one step of an
  `AttentionSpec` at a shape and mode, each with FLOPs, bytes moved and a kind (``matmul``,
  ``attention`` or ``elementwise``). Scope ``layer`` is the attention layer, ``block`` adds the
  pre-norms, residuals and SwiGLU FFN, ``model`` adds the tied embedding, final norm and LM
  head (and the loss in training); ``n_layers`` multiplies layers and blocks.
* **What does the hardware offer?** `sqa_search.speed.hardware.HardwareProfile`: dense peak FLOP/s per dtype, memory
  bandwidth and sizes from datasheets (YAML files in ``sqa_search/speed/profiles``), plus efficiency
  factors and a per-kernel overhead that start as guesses and are meant to be calibrated.
* **How long will it take?** `predict` is a roofline: the sum over phases of
  ``max(flops / (peak * eff[kind]), bytes / (bandwidth * eff["memory"])) + launches * overhead``.
  `sqa_search.speed.calibrate` fits the efficiency factors and the overhead to measured
  timings and reports the error on configurations left out of the fit.

Counting conventions (why the numbers are what they are):

* 2 FLOPs per multiply-add. Softmax is ~5 vector FLOPs per scored pair (max, subtract, exp,
  sum, scale) and stays on chip in fused kernels: it costs vector time, not bytes. Elementwise
  work runs on the vector units, so its peak is the profile's ``fp32`` (non-Tensor-Core) figure.
* ``train`` is forward + backward. Backward GEMMs cost twice the forward (input and weight
  gradients). Backward of fused attention costs 2.5x the forward core: it recomputes the
  scores (as flash kernels do), then dV, dP, dQ, dK. So `Prediction.flops` counts executed
  work and is larger than `AttentionSpec.attention_flops(backward=True)`, which counts 3x the
  forward without the recomputation.
* ``decode`` is one new token per sequence against a cache already holding N tokens (as
  `sqa_search.speed.timing` times it): the token is written to the cache and attends to
  ``min(N + 1, W) + n_global`` keys, reading the cache once per KV head (about
  ``AttentionSpec.kv_cache_bytes``) plus every weight once: decode is memory-bound.
* Without a ``device_type`` the counts are the algorithm's (visible pairs exactly, no copies):
  prefill FLOPs then equal ``AttentionSpec.attention_flops``. With ``device_type`` ("cuda" or
  "cpu", which `predict` takes from the profile) they mirror what `SparseQueryAttention`
  actually runs there: tile-granular causal and windowed work (flash/flex tiles on CUDA; the
  CPU flash kernel's 512-key blocks; the blocked window path's runs of p*blk + G keys per
  query row, from `sqa_search.layer.masks.BlockedLayout` itself, made as the layer makes it: with
  grad (``train``) blocks of ~W/2, pad/stack copies, one SDPA call per phase and the
  backward's slice gradients; without (``prefill``) blocks of ~W/4, q, k and v written once
  into the layout, interior runs sharing one broadcast mask (a few SDPA calls per phase), in
  float32 RoPE applied during that copy and, bidirectional, the global tokens' pass reading the
  layout's buffers under a mask), K/V expansion copies where the grouped kernel is not used,
  masks, concatenations, and RoPE as the layer runs it (weight rows put in pair order, one
  complex multiply; the factors are cached per length, so only decode builds them, once per
  step). Decode reads the cache as it is (global tokens in its first slots, no copy for any
  grouping). Calibration can only fit what the model's phases describe, so the phases follow
  the code, and tests/test_cost.py checks them against the layer's own FLOPs and kernels.
* ``launches`` count kernels (non-view ops; exact on CPU for prefill, decode and the forward of
  train, approximate for the backward). View ops are not counted, though on a CPU each costs
  about as much dispatch time (~1 us) as a tiny kernel: the forward-only blocked path runs
  several times the SDPA path's views (231-236 per forward of SW-SQA at d_model 128, N
  512-1024, against 30-36 for MHA, GQA and SQA; counted with a TorchDispatchMode, torch 2.13),
  so a CPU fit under-predicts windowed layers where overhead dominates (N of a few hundred:
  the default calibration's held-out error for windowed prefill at N=256 was -21% to -32%,
  2-core VM, 2026-12-02).

Calibration (`sqa_search.speed.calibrate`, ``sqa-search calibrate``): the factors absorb whatever
the roofline leaves out, so they are only valid for the dtype, scopes and kind of shapes they were
fitted on (the calibration record lists them). ``l2_bytes`` is recorded but not yet used by the
roofline; a memory efficiency above 1 after calibration means the working set stayed in cache.
Profiles are looked up by `sqa_search.speed.hardware.load_profile`; every `Prediction` says which
calibration it used in ``.calibration``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..common import DTYPE_BYTES
from ..layer.spec import AttentionSpec
from .hardware import CostError, HardwareProfile, load_profile, plain
from .phases import Builder, Phase, layer_phases, norm
from .workload import MODES, SCOPES, Latency, Workload

__all__ = ["CostError", "Phase", "Prediction", "peak_memory", "DTYPES", "KINDS", "step_cost", "build_phases", "predict",
           "phase_times", "dtype_info", "canonical_dtype", "default_d_ff"]

KINDS = ("matmul", "attention", "elementwise")
DEVICE_TYPES = ("cuda", "cpu")

# dtype name -> (the dtype whose bytes it has, profile peak key). "float32" means plain fp32
# matmuls (PyTorch's default); pass "tf32" for float32 tensors with TF32 matmuls enabled.
DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("float32", "fp32"),
    "fp32": ("float32", "fp32"),
    "float": ("float32", "fp32"),
    "tf32": ("float32", "tf32"),
    "bfloat16": ("bfloat16", "bf16"),
    "bf16": ("bfloat16", "bf16"),
    "float16": ("float16", "fp16"),
    "fp16": ("float16", "fp16"),
    "half": ("float16", "fp16"),
}


def _fail(field_name: str, value, allowed) -> CostError:
    if isinstance(allowed, (tuple, list)):
        allowed = "choose one of " + ", ".join(map(str, allowed))
    return CostError(f"{field_name}={value!r} is not allowed: {allowed}")


def dtype_info(dtype) -> tuple[str, int]:
    """(the profile's peak key, bytes per element) of a dtype name; CostError for an unknown one."""
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise _fail("dtype", dtype, tuple(DTYPES))
    name, peak_key = DTYPES[key]
    return peak_key, DTYPE_BYTES[name]


def canonical_dtype(dtype) -> str:
    """'bf16' -> 'bfloat16' (the name a Workload takes); CostError for an unknown one. "tf32" is
    float32 data: as a Workload it is predicted with plain fp32 matmuls."""
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise _fail("dtype", dtype, tuple(DTYPES))
    return DTYPES[key][0]


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise _fail(name, value, f"must be an integer >= {low}")
    return int(value)


def default_d_ff(d_model: int) -> int:
    """The proxy model's SwiGLU width (model.ModelConfig): 8/3 * d_model rounded up to 32."""
    return -(-(8 * d_model // 3) // 32) * 32


# ----- a step's phases -----------------------------------------------------------------------------
def build_phases(spec, *, batch, seq_len, mode, what, n_layers, d_ff, vocab_size, dtype, device_type, tile):
    """(phases, attention path) of one step; checks every argument (CostError names the field)."""
    spec = AttentionSpec.coerce(spec)
    batch = _positive_int("batch", batch)
    n = _positive_int("seq_len", seq_len)
    n_layers = _positive_int("n_layers", n_layers)
    vocab_size = _positive_int("vocab_size", vocab_size, 2)
    if mode not in MODES:
        raise _fail("mode", mode, MODES)
    if what not in SCOPES:
        raise _fail("what", what, SCOPES)
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise _fail("device_type", device_type, DEVICE_TYPES + (None,))
    if mode == "decode" and not spec.causal:
        raise _fail("mode", mode, "decode needs a causal spec (a bidirectional layer has no next token)")
    peak_key, eb = dtype_info(dtype)
    d = spec.d_model
    if d_ff is None:
        d_ff = default_d_ff(d)
    d_ff = _positive_int("d_ff", d_ff)
    tile = _positive_int("attention_tile", tile if tile is not None else 128)
    impl = device_type is not None
    rows = batch if mode == "decode" else batch * n

    layer = Builder(eb)
    if what != "layer":
        norm(layer, "attn_norm", rows, d, impl)
    path = layer_phases(layer, spec, batch, n, mode, device_type, peak_key, tile,
                         prefix="attn." if what != "layer" else "")
    if what != "layer":
        layer.elementwise("attn_residual", eb * 3 * rows * d, rows * d, 1)
        norm(layer, "ff_norm", rows, d, impl)
        layer.linear("ff.gate", rows, d, d_ff)
        layer.linear("ff.up", rows, d, d_ff)
        layer.elementwise("ff.act", eb * 5 * rows * d_ff, 6 * rows * d_ff, 2)  # silu(gate) * up
        layer.linear("ff.down", rows, d_ff, d)
        layer.elementwise("ff_residual", eb * 3 * rows * d, rows * d, 1)
    train = mode == "train"
    per_layer = layer.phases(train)
    phases = [ph.scaled(n_layers) for ph in per_layer] if n_layers > 1 else per_layer

    if what == "model":
        head = Builder(eb)
        head.elementwise("embed", eb * 2 * rows * d + 8 * rows, 0, 1)
        norm(head, "final_norm", rows, d, impl)
        head.linear("lm_head", rows, d, vocab_size)
        if train:
            # cross_entropy on float32 logits: cast (bf16/fp16), log_softmax, nll
            cast = (eb + 4) * rows * vocab_size if eb != 4 else 0
            head.elementwise("loss", cast + 8 * rows * vocab_size, 5 * rows * vocab_size, 4)
        head_phases = head.phases(train)
        # embedding and head phases sit around the blocks; order only matters for reading
        phases = head_phases[:1] + phases + head_phases[1:]
    return phases, path


def step_cost(spec, *, batch, seq_len, mode, what="layer", n_layers=1, d_ff=None, vocab_size=256,
              dtype="bfloat16", device_type=None, attention_tile=None) -> list[Phase]:
    """The phases of one step: a list of `Phase` (name, flops, bytes, kind, launches).

    mode: train | prefill | decode (decode: one token against a cache of N). what: layer |
    block | model; n_layers multiplies every scope's layers. d_ff: SwiGLU width (default as
    the proxy model: 8/3 d_model rounded up to 32). device_type: None for the algorithm's
    counts, "cuda"/"cpu" to mirror SparseQueryAttention's path there; attention_tile: the
    kernel tile (default 128).
    """
    phases, _ = build_phases(spec, batch=batch, seq_len=seq_len, mode=mode, what=what, n_layers=n_layers, d_ff=d_ff,
                       vocab_size=vocab_size, dtype=dtype, device_type=device_type, tile=attention_tile)
    return phases

# ----- prediction --------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A predicted step time, always labelled as a prediction and with its provenance."""

    seconds: float
    flops: float
    bytes: float
    bound: str  # "compute" | "memory" | "overhead": which term dominates the total
    profile: str
    calibration: str
    source: str = "predicted"
    mode: str = ""
    what: str = ""
    dtype: str = ""
    batch: int = 0
    seq_len: int = 0
    n_layers: int = 1
    spec: dict = field(default_factory=dict)
    path: str = ""  # the attention path modelled (sdpa, flex, blocked, sdpa-masked, decode)
    breakdown: dict = field(default_factory=dict)  # seconds in compute-, memory-bound phases, overhead
    phases: list = field(default_factory=list)  # per phase: name, kind, flops, bytes, seconds, bound
    peak_memory_bytes: int | None = None  # `peak_memory` of the step: what the timing's memory figure measures

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    @property
    def latency(self) -> Latency:
        """The figure in the shape every latency source gives (kind "predicted")."""
        return Latency(seconds=self.seconds, kind="predicted", where=f"{self.profile} ({self.calibration})",
                       seq_len=self.seq_len, backend=f"model:{self.path}", flags=(f"{self.bound}-bound",),
                       peak_memory_bytes=self.peak_memory_bytes)


def phase_times(phases, profile: HardwareProfile, peak_key: str, eff: dict, overhead: float):
    bw = profile.mem_bandwidth * eff["memory"]
    rows = []
    for ph in phases:
        peak = profile.peak_flops["fp32" if ph.kind == "elementwise" else peak_key]
        compute = ph.flops / (peak * eff[ph.kind])
        memory = ph.bytes / bw
        rows.append((ph, compute, memory, ph.launches * overhead))
    return rows


def predict(spec, profile, workload: Workload, *, vocab_size: int = 256) -> Prediction:
    """Roofline prediction of one step of `workload` on `profile` (a HardwareProfile or a name for
    `load_profile`). The workload's device and threads do not count: the profile's device type
    does. Its n_layers multiplies every scope's layers (as `step_cost`'s does)."""
    if not isinstance(workload, Workload):
        raise _fail("workload", workload, "give a sqa_search.speed.workload.Workload")
    batch, seq_len, mode, dtype = workload.batch, workload.seq_len, workload.mode, workload.dtype
    what, n_layers, d_ff = workload.scope, workload.n_layers, workload.d_ff
    profile = load_profile(profile) if not isinstance(profile, HardwareProfile) else profile
    spec = AttentionSpec.coerce(spec)
    peak_key, _ = dtype_info(dtype)
    phases, path = build_phases(spec, batch=batch, seq_len=seq_len, mode=mode, what=what, n_layers=n_layers, d_ff=d_ff,
                          vocab_size=vocab_size, dtype=dtype, device_type=profile.device_type,
                          tile=profile.attention_tile)
    rows = phase_times(phases, profile, peak_key, profile.efficiency, profile.overhead_s)
    compute_s = sum(c for _, c, m, _ in rows if c >= m)
    memory_s = sum(m for _, c, m, _ in rows if m > c)
    overhead_s = sum(o for *_, o in rows)
    total = compute_s + memory_s + overhead_s
    shares = {"compute": compute_s, "memory": memory_s, "overhead": overhead_s}
    return Prediction(
        seconds=total,
        flops=float(sum(ph.flops for ph in phases)),
        bytes=float(sum(ph.bytes for ph in phases)),
        bound=max(shares, key=shares.get),
        profile=profile.name,
        calibration=profile.calibration_label,
        mode=mode,
        what=what,
        dtype=str(dtype).replace("torch.", ""),
        batch=int(batch),
        seq_len=int(seq_len),
        n_layers=int(n_layers),
        spec=spec.to_dict(),
        path=path,
        breakdown={"compute_s": compute_s, "memory_s": memory_s, "overhead_s": overhead_s},
        phases=[
            {"name": ph.name, "kind": ph.kind, "flops": ph.flops, "bytes": ph.bytes,
             "seconds": max(c, m) + o, "bound": "compute" if c >= m else "memory"}
            for ph, c, m, o in rows
        ],
        peak_memory_bytes=peak_memory(spec, workload, path=path, vocab_size=vocab_size),
    )


# ----- peak memory ---------------------------------------------------------------------------------
def peak_memory(spec, workload: Workload, *, path: str = "sdpa", vocab_size: int = 256) -> int:
    """Bytes the step holds at its peak, counted as the timing measures them (speed/measure.py):
    what lives across calls (weights, the input, a decode's KV cache) plus the largest set of
    activations alive at once during one call. A tensor-by-tensor count of the eager layer and
    proxy model, not a fit: allocator slack, kernel workspaces and (on CPU) page rounding are left
    out, so expect tens of percent either way (benchmarks/memory_model.py prints the error).

    Scopes as the timing builds them: "layer" and "block" are one layer, "model" has
    `workload.n_layers` blocks. Train keeps every layer's saved activations for the backward pass
    and adds the weights' gradients; prefill holds one layer's activations at a time."""
    spec = AttentionSpec.coerce(spec)
    eb, b, n, d = workload.dtype_bytes, workload.batch, workload.seq_len, spec.d_model
    hd, hq, hkv = spec.head_dim, spec.n_q_heads, spec.n_kv_heads
    layers = workload.n_layers if workload.scope == "model" else 1
    d_ff = workload.d_ff or default_d_ff(d)
    attn_weights = d * (hq + 2 * hkv) * hd + hq * hd * d
    block_weights = attn_weights + (3 * d * d_ff + 2 * d if workload.scope != "layer" else 0)
    weights = eb * (layers * block_weights + (vocab_size * d + d if workload.scope == "model" else 0))
    if workload.mode == "decode":  # one new token against a cache of n: the cache is the memory
        cache = 2 * eb * b * hkv * hd * n * layers
        scores = eb * b * hq * (n + spec.n_global)
        return int(weights + cache + scores + eb * b * d * 4)
    # activations of one layer per token: projections, RoPE'd q and k, attention output, merged output
    attn = (hq + 2 * hkv) * hd + (hq + hkv) * hd + hq * hd + d
    mlp = 4 * d_ff + d if workload.scope != "layer" else 0  # gate, up, silu(gate), their product
    per_token = max(attn, mlp) + (2 * d if workload.scope != "layer" else 0)  # + norm output, residual
    live = eb * b * n * per_token
    if path in ("sdpa-masked", "flex-eager"):  # a dense (N, N + G) mask and scores are materialised
        live += eb * b * hq * n * (n + spec.n_global) * 2
    inputs = eb * b * n * d if workload.scope != "model" else 8 * b * n  # model scope: token ids
    logits = 4 * b * n * vocab_size if workload.scope == "model" else 0
    if workload.mode == "prefill":
        return int(weights + inputs + live + logits)
    saved = eb * b * n * (attn + mlp + (3 * d if workload.scope != "layer" else 0)) * layers
    input_grad = eb * b * n * d
    return int(2 * weights + inputs + saved + live + logits + input_grad)
