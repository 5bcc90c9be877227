"""Analytic cost model: FLOPs and bytes per step, hardware profiles, roofline predictions, calibration.

Three questions, three parts:

* **What work does a step do?** `step_cost` lists the phases (kernels) of one step of an
  `AttentionSpec` at a shape and mode, each with FLOPs, bytes moved and a kind (``matmul``,
  ``attention`` or ``elementwise``). Scope ``layer`` is the attention layer, ``block`` adds the
  pre-norms, residuals and SwiGLU FFN, ``model`` adds the tied embedding, final norm and LM
  head (and the loss in training); ``n_layers`` multiplies layers and blocks.
* **What does the hardware offer?** `HardwareProfile`: dense peak FLOP/s per dtype, memory
  bandwidth and sizes from datasheets (YAML files in ``sqa_search/speed/profiles``), plus efficiency
  factors and a per-kernel overhead that start as guesses and are meant to be calibrated.
* **How long will it take?** `predict` is a roofline: the sum over phases of
  ``max(flops / (peak * eff[kind]), bytes / (bandwidth * eff["memory"])) + launches * overhead``.
  `calibrate` fits the efficiency factors and the overhead to measured timings and reports the
  error on configurations left out of the fit.

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

Calibration (`calibrate`): least squares on log time, made robust (soft-L1, so one stalled
timing on a shared machine cannot drag the fit) and pulled weakly towards the starting factors
(so a factor the data cannot see stays put). The factors absorb whatever the roofline leaves
out, so they are only valid for the dtype, scopes and kind of shapes they were fitted on (the
calibration record lists them). ``l2_bytes`` is recorded but not yet used by the roofline; a
memory efficiency above 1 after calibration means the working set stayed in cache.
`calibrate_from_measurements` (or ``python -m sqa_search.speed.cost calibrate --save``) times a
spread of layers on this machine, calibrates and saves in one go.

Profile lookup (`load_profile`): a path loads that file. A name looks first in the user
calibration directory (``$SQA_SEARCH_CACHE/profiles``, default ``~/.cache/sqa_search/profiles``),
where `save_profile` writes calibrated profiles, then among the profiles shipped with the
package. A calibrated profile of the same name therefore wins over the datasheet one;
``load_profile(name, calibrated=False)`` gets the shipped figures. Every `Prediction` says
which it used in ``.calibration``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import UserError
from ..layer.masks import BlockedLayout, Visibility
from ..layer.spec import AttentionSpec

__all__ = [
    "CostError",
    "Phase",
    "HardwareProfile",
    "Prediction",
    "CalibrationReport",
    "MODES",
    "SCOPES",
    "DTYPES",
    "list_profiles",
    "load_profile",
    "save_profile",
    "user_profile_dir",
    "step_cost",
    "predict",
    "calibrate",
    "calibrate_from_measurements",
    "default_calibration_configs",
    "default_d_ff",
]


class CostError(UserError):
    """Bad input to the cost model: an unknown profile, mode, dtype or scope, or a bad profile file."""


MODES = ("train", "prefill", "decode")
SCOPES = ("layer", "block", "model")
KINDS = ("matmul", "attention", "elementwise")
EFFICIENCY_KEYS = ("matmul", "attention", "elementwise", "memory")
PEAK_KEYS = ("fp32", "tf32", "bf16", "fp16")
DEVICE_TYPES = ("cuda", "cpu")

# dtype name -> (profile peak key, bytes per element). "float32" means plain fp32 matmuls
# (PyTorch's default); pass "tf32" for float32 tensors with TF32 matmuls enabled.
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("fp32", 4),
    "fp32": ("fp32", 4),
    "float": ("fp32", 4),
    "tf32": ("tf32", 4),
    "bfloat16": ("bf16", 2),
    "bf16": ("bf16", 2),
    "float16": ("fp16", 2),
    "fp16": ("fp16", 2),
    "half": ("fp16", 2),
}

# Kernel facts the implementation-mirroring counts rely on (see the module docstring).
CPU_FLASH_KV_SPLIT = 512  # torch's CPU flash kernel walks keys in blocks of 512
# attention.FLEX_MIN_HEAD_DIM (not imported: attention imports torch, this module must not):
# below it, auto takes the blocked path on CUDA too. tests/test_cost.py checks they agree.
FLEX_MIN_HEAD_DIM = 16
SOFTMAX_FLOPS_PER_PAIR = 5

_SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
_ALIASES = {
    "a100": "a100-80gb",
    "a100-40g": "a100-40gb",
    "a100-80g": "a100-80gb",
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "cpu": "cpu-generic",
}


def _fail(field_name: str, value, allowed) -> CostError:
    if isinstance(allowed, (tuple, list)):
        allowed = "choose one of " + ", ".join(map(str, allowed))
    return CostError(f"{field_name}={value!r} is not allowed: {allowed}")


def _dtype(dtype) -> tuple[str, int]:
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise _fail("dtype", dtype, tuple(DTYPES))
    return DTYPES[key]


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise _fail(name, value, f"must be an integer >= {low}")
    return int(value)


def default_d_ff(d_model: int) -> int:
    """The proxy model's SwiGLU width (model.ModelConfig): 8/3 * d_model rounded up to 32."""
    return -(-(8 * d_model // 3) // 32) * 32


# ----- phases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One kernel (or a few eager ops counted together) of a step.

    flops: executed FLOPs; bytes: bytes moved to and from device memory; kind: which
    efficiency factor applies; launches: kernels/ops it takes (each costs the overhead term).
    """

    name: str
    flops: float
    bytes: float
    kind: str
    launches: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def scaled(self, factor: float, prefix: str = "") -> "Phase":
        return Phase(prefix + self.name, self.flops * factor, self.bytes * factor, self.kind, self.launches * factor)


class _Builder:
    """Collects forward phases and how each one's backward costs (for train)."""

    def __init__(self, eb: int):
        self.eb = eb
        self.fwd: list[tuple[Phase, tuple[float, float, float] | None]] = []

    def add(self, name, flops, nbytes, kind, launches=1.0, bwd=(2.0, 2.0, 2.0)):
        # bwd: (flops, bytes, launches) multipliers of the backward, or None (no gradient)
        self.fwd.append((Phase(name, float(flops), float(nbytes), kind, float(launches)), bwd))

    def linear(self, name, rows, k_in, n_out, bias=False, launches=1.0):
        flops = 2 * rows * k_in * n_out + (rows * n_out if bias else 0)
        nbytes = self.eb * (rows * k_in + k_in * n_out + rows * n_out + (n_out if bias else 0))
        # backward: dX = dY W^T and dW = X^T dY, each the forward's size
        self.add(name, flops, nbytes, "matmul", launches, (2.0, 2.0, 2.0))

    def elementwise(self, name, nbytes, flops=0.0, launches=1.0, grad=True):
        self.add(name, flops, nbytes, "elementwise", launches, (2.0, 2.0, 2.0) if grad else None)

    def phases(self, train: bool) -> list[Phase]:
        out = [p for p, _ in self.fwd]
        if train:
            for p, mult in reversed(self.fwd):
                if mult is None:
                    continue
                fm, bm, lm = mult
                out.append(Phase(p.name + ".bwd", p.flops * fm, p.bytes * bm, p.kind, p.launches * lm))
        return out


def _tiled_causal_pairs(n: int, q_tile: int, kv_tile: int) -> int:
    """Pairs a tiled causal kernel computes: each query tile reads key tiles up to its diagonal."""
    total = 0
    for start in range(0, n, q_tile):
        rows = min(q_tile, n - start)
        end = start + rows  # keys [0, end) are needed
        total += rows * min(n, -(-end // kv_tile) * kv_tile)
    return total


def _cpu_q_split(n: int) -> int:
    # torch's CPU flash attention picks its query block from the query length
    return 256 if n >= 768 else (64 if n >= 192 else 32)


def _flex_pairs(spec: AttentionSpec, n: int, tile: int) -> int:
    """Pairs a block-sparse (flex) kernel computes: every (query tile, key tile) the rule
    touches, in full, over keys [sequence; global tokens] (the tiles `masks.flex_kv_blocks`
    marks, whether full or partial). Spans come from the rule itself (`Visibility.key_span`)."""
    rule, g = _rule(spec), spec.n_global
    g_first, g_last = n // tile, (n + g - 1) // tile  # the tiles holding the global keys
    total = 0
    for start in range(0, n, tile):
        rows = min(tile, n - start)
        # spans grow with the query: the tile's first query has the lowest, its last the highest
        first_blk, last_blk = rule.key_span(start, n)[0] // tile, rule.key_span(start + rows - 1, n)[1] // tile
        blocks = last_blk - first_blk + 1
        if g:  # a global tile the sequence's span already covers is computed once
            blocks += sum(1 for t in range(g_first, g_last + 1) if t > last_blk or t < first_blk)
        total += rows * blocks * tile
    return total


def _rule(spec: AttentionSpec) -> Visibility:
    return Visibility(spec.causal, spec.window)


def _attention_path(spec: AttentionSpec, n: int, device_type: str | None) -> str:
    """The path SparseQueryAttention takes (mirrors its choose_backend with backend='auto')."""
    if device_type is None:
        return "ideal"
    windowed = spec.window is not None and spec.window < n
    if not windowed and spec.n_global == 0:
        return "sdpa"
    if device_type == "cuda" and spec.head_dim >= FLEX_MIN_HEAD_DIM:
        return "flex"
    return "blocked" if windowed else "sdpa-masked"


def _expands_kv(spec: AttentionSpec, path: str, device_type: str | None, peak_key: str) -> bool:
    """Whether K/V are copied out to one per query head before the kernel."""
    if device_type is None or spec.grouping == "reverse" or spec.n_q_heads == spec.n_kv_heads:
        return False
    if path == "flex":
        return spec.grouping == "uneven"
    if path == "sdpa":
        if device_type == "cpu":
            return True  # attention._native_gqa_ok: CPU always expands
        # CUDA keeps enable_gqa unless the kernel would be math; float32 falls off flash
        return spec.grouping == "uneven" or peak_key in ("fp32", "tf32")
    return True  # blocked and sdpa-masked group with allow_native_gqa=False


def _rope_phases(b: _Builder, spec: AttentionSpec, rows: int, positions: int, impl: bool, p: str,
                 tables: bool = True, multiply: bool = True) -> None:
    """RoPE on q and k: one complex multiply per rotated pair (attention._rope_paired).

    tables: the factors are computed in this step (decode; prefill and train cache them per
    length). multiply: the multiply is a phase of its own (not when the blocked path applies it
    while copying q and k into its layout, counted there)."""
    hd, eb = spec.head_dim, b.eb
    elems = rows * (spec.n_q_heads + spec.n_kv_heads) * hd
    if not impl:
        b.elementwise(p + "rope", eb * 2 * elems, 3 * elems, 1)
        return
    # q and k are projected with their rows in pair order: reorder the (smaller) weight rows,
    # or the outputs when there are fewer tokens than d_model (decode); backward is a zero
    # fill plus an index_add
    few = rows <= spec.d_model
    reordered = rows if few else spec.d_model
    b.add(p + "qk_reorder", 0, eb * 2 * reordered * (spec.n_q_heads + spec.n_kv_heads) * hd, "elementwise",
          2 + (2 if spec.bias and not few else 0), (0.0, 1.5, 2.0))
    if tables:
        # rope_tables runs once, for q and k together (no gradient): 10 small ops, then torch.complex;
        # float32 tables of (positions, hd): angles, cat, cos, sin, complex ~ 8 table-sized passes
        b.elementwise(p + "rope_tables", 4 * 8 * positions * hd, 8 * positions * hd, 11, grad=False)
    if not multiply:
        return
    # the multiply reads and writes each element once in float32; other dtypes add a cast to
    # float32 and back (no complex bf16/fp16). Backward: conj, clone (tiny), multiply
    if eb == 4:
        nbytes, launches = eb * 2 * elems, 2
    else:
        nbytes, launches = elems * (2 * eb + 16), 6
    b.add(p + "rope", 3 * elems, nbytes, "elementwise", launches, (1.0, 1.0, 2 * 3 / launches))


def _decode_phases(b: _Builder, spec: AttentionSpec, batch: int, n: int, impl: bool, p: str) -> str:
    """One token against a cache holding n tokens (attention.decode): the global tokens sit in
    the cache's first slots (written once by new_cache), the step reads the cache as it is."""
    eb, hd, hkv, heads, g = b.eb, spec.head_dim, spec.n_kv_heads, spec.n_attn_heads, spec.n_global
    cached = n + 1 if spec.window is None else min(n + 1, spec.window)  # the cache plus the new token
    keys = cached + g
    b.elementwise(p + "cache_write", eb * 2 * 2 * batch * hkv * hd, 0, 2 if impl else 1, grad=False)
    q_rows = heads  # query rows the kernel scores, per sequence
    if impl and spec.n_q_heads > hkv:
        # query heads folded into (H_kv, rows) groups: uneven groups pad the short ones with a
        # repeated head and gather q before, and the output after (tiny index_selects)
        q_rows = hkv * -(-spec.n_q_heads // hkv)
        if spec.grouping == "uneven":
            b.elementwise(p + "fold_q", eb * 2 * batch * (spec.n_q_heads + q_rows) * hd, 0, 2, grad=False)
    elif impl and spec.grouping == "reverse":
        b.elementwise(p + "q_gather", eb * batch * (spec.n_q_heads + heads) * hd, 0, 1, grad=False)
    # every KV head's cache is read once: grouped and uneven heads never copy it
    q_read = eb * batch * q_rows * hd
    b.add(p + "scores", 2 * batch * q_rows * hd * keys, q_read + eb * batch * hkv * keys * hd, "attention", 1, None)
    b.add(p + "softmax", SOFTMAX_FLOPS_PER_PAIR * batch * q_rows * keys, 0, "elementwise", 0, None)
    b.add(p + "av", 2 * batch * q_rows * hd * keys, eb * batch * (hkv * keys + q_rows) * hd, "attention", 0, None)
    # no merge copy: one token's (B, H, 1, hd) output is already laid out as (B, 1, H * hd)
    b.linear(p + "o_proj", batch, heads * hd, spec.d_model, spec.bias)
    return "decode" if impl else "ideal"


def _global_phases(b: _Builder, spec: AttentionSpec, batch: int, n: int, impl: bool, p: str,
                   in_buffers: BlockedLayout | None = None) -> None:
    """Global tokens' keys and values (and, bidirectional, their pass over the sequence).

    in_buffers: the blocked path's forward-only layout whose key/value buffers the tokens' own
    pass reads under a mask (attention._buffers_with_globals) instead of a concatenation."""
    eb, d, hd, g = b.eb, spec.d_model, spec.head_dim, spec.n_global
    hq, hkv, heads = spec.n_q_heads, spec.n_kv_heads, spec.n_attn_heads
    bg = batch * g
    reorder = 1 if impl and spec.rope else 0  # q and k outputs put in RoPE's pair order (no RoPE: no position)
    # the learned tokens, expanded over the batch, are copied before each of their first projections
    copies = 1 if impl and batch > 1 else 0
    expands = spec.grouping != "reverse" and hq != hkv  # attention._expand_kv copies
    if not spec.causal:
        b.linear(p + "global_q", bg, d, hq * hd, spec.bias, launches=1 + reorder + copies)
        b.linear(p + "global_kv_in", bg, d, 2 * hkv * hd, spec.bias, launches=2 + reorder + 2 * copies)
        g_kv_heads, keys, mask = hkv, n + g, 0
        if in_buffers is not None:
            # the first keys/values expanded into the buffers; _group's own expansion of them
            # (discarded: the buffers are expanded already) or, rSQA, the queries' gather
            keys = (in_buffers.nb // in_buffers.phases + 1) * in_buffers.period  # every buffer slot, masked
            g_kv_heads, mask = heads, eb * keys
            if expands:
                b.elementwise(p + "global_expand", eb * 2 * 2 * batch * g * hd * (hkv + heads), 0, 4)
        elif impl:
            b.elementwise(p + "global_concat", eb * 2 * 2 * batch * hkv * (n + g) * hd, 0, 2)
            if expands:
                g_kv_heads = heads
                b.elementwise(p + "global_expand", eb * 2 * batch * (n + g) * hd * (hkv + heads), 0, 2)
        if impl and spec.grouping == "reverse":
            # rSQA: the tokens' queries gathered to the KV heads, their head-major output merged back
            b.elementwise(p + "global_q_gather", eb * batch * g * hd * (hq + 3 * heads), 0, 2)
        g_pairs = g * keys
        b.add(p + "global_attn", 4 * batch * heads * hd * g_pairs,
              eb * batch * hd * (2 * heads * g + 2 * g_kv_heads * keys) + mask, "attention", 1, (2.5, 2.0, 1.0))
        b.linear(p + "global_o", bg, heads * hd, d, spec.bias)
        if impl:  # the tokens' updated states: token + attention output
            b.elementwise(p + "global_residual", eb * 3 * bg * d, bg * d, 1)
    b.linear(p + "global_kv", bg, d, 2 * hkv * hd, spec.bias,
             launches=2 + reorder + (0 if not spec.causal else 2 * copies))


def _blocked_phases(b: _Builder, spec: AttentionSpec, batch: int, n: int, heads: int, p: str,
                    lay: BlockedLayout, grad: bool, rope_in_layout: bool = False, globals_in_buffers: bool = False):
    """The blocked window path's copies (attention._blocked with masks.BlockedLayout `lay`, made
    with the layer's own ``grad`` choice: train has grad, prefill has none).

    Returns (pairs, query rows, key rows the kernel reads, mask bytes, SDPA calls) per
    (batch, head): every query row, padding included, scores the P = p*blk + G keys of its run.
    q, k and v all have `heads` heads here (K/V were expanded, or rSQA's queries gathered).
    rope_in_layout: RoPE is applied while q and k are copied in; globals_in_buffers: the global
    tokens' first and updated keys/values are both written into the buffers (both forward-only).
    """
    scale = b.eb * batch * heads * spec.head_dim  # bytes of one element per (batch, head, dim)
    if grad:
        _grad_layout_copies(b, lay, batch, n, scale, p)
        calls, mask_runs = lay.phases, lay.nb  # one call per phase, a mask per run
    else:
        calls, mask_runs = _forward_only_copies(b, spec, lay, batch, n, heads, scale, p, rope_in_layout,
                                                globals_in_buffers)
    # the additive masks are built once per shape and cached by the layer; the kernel reads
    # them (broadcast over batch and heads) at every call
    mask_bytes = b.eb * mask_runs * lay.blk * lay.period
    return lay.nb * lay.blk * lay.period, lay.nb * lay.blk, lay.nb * lay.period, mask_bytes, calls


def _grad_layout_copies(b: _Builder, lay: BlockedLayout, batch: int, n: int, scale: int, p: str) -> None:
    """With grad: pad q; pad k and v (and with globals, cat each into periods); stack the
    phases' outputs back in token order. Backward: each phase's slice of q, k and v gets a
    full-size zero gradient (slice_backward) that p - 1 adds sum up, then the pads are cut off
    again (and the globals summed)."""
    g, ph, npad, period = lay.n_global, lay.phases, lay.nb * lay.blk, lay.period
    seq_buf = (lay.nb // ph + 1) * ph * lay.blk  # padded keys (one period past the last run)
    buf = (lay.nb // ph + 1) * period  # the key buffer: seq_buf plus one copy of the globals per period
    # in elements per (batch, head, dim). The output projection reads the stacked outputs as
    # they are, unless batch > 1 and padding must be cut off (one more copy).
    fwd = (n + npad) + 2 * (n + seq_buf) + (2 * 2 * buf if g else 0) + 2 * npad
    fwd_launches = 4 + (2 if g else 0)
    cut = batch > 1 and npad != n
    if cut:
        fwd, fwd_launches = fwd + 2 * n, fwd_launches + 1
    bwd = (ph * npad + 2 * npad + 3 * (ph - 1) * npad + 2 * n) + 2 * (ph * buf + 2 * lay.nb * period
                                                                    + 3 * (ph - 1) * buf + 2 * n)
    bwd += npad + 2 * n + (2 * 2 * seq_buf if g else 0) + (2 * n if cut else 0)
    bwd_launches = 1 + 3 * 2 * ph + (4 if g else 0) + (1 if cut else 0)
    b.add(p + "window_blocks", 0, scale * fwd, "elementwise", fwd_launches,
          (0.0, bwd / fwd, bwd_launches / fwd_launches))


def _forward_only_copies(b: _Builder, spec, lay: BlockedLayout, batch: int, n: int, heads: int, scale: int, p: str,
                         rope_in_layout: bool, globals_in_buffers: bool) -> tuple[int, int]:
    """Without grad: q and the key/value buffers written once (BlockedLayout.queries and
    key_buffer: new_empty, slice writes, only the padding zeroed); each phase's runs in
    pieces (BlockedLayout.pieces: interior runs share one broadcast mask row, edge runs keep
    their own), each piece one SDPA call whose output is copied into the merged output
    (BlockedLayout.unblock). Returns (SDPA calls, mask rows of blk x P the kernel reads)."""
    g, ph, npad = lay.n_global, lay.phases, lay.nb * lay.blk
    periods, width = lay.nb // ph + 1, ph * lay.blk
    global_writes = 2 if globals_in_buffers else 1  # first, then the updated globals
    per_buffer = (n + periods * width) + (global_writes * (periods + 1) * g if g else 0)
    elems = (n + npad) + 2 * per_buffer + 2 * npad  # q, k and v written in, outputs merged
    launches = 3 + 2 * (_key_buffer_ops(lay) + (1 if globals_in_buffers else 0))
    calls = mask_rows = 0
    runs = lay.nb // ph
    for phase in range(ph):
        lo, hi = lay.interior(phase)
        calls += (lo > 0) + (hi > lo) + (runs > hi)
        mask_rows += lo + (hi > lo) + (runs - hi)
    launches += 1 + calls  # the merged output's new_empty, a copy per piece
    if batch > 1 and npad != n:  # the output projection's input cut out of the padded one
        elems, launches = elems + 2 * n, launches + 1
    flops = nbytes_rot = 0
    if rope_in_layout:  # q and k (expanded heads) multiplied by the complex factors on the way
        flops = 3 * 2 * batch * heads * n * spec.head_dim
        nbytes_rot = 2 * 8 * n * (spec.head_dim // 2)
    b.add(p + "window_blocks", flops, scale * elems + nbytes_rot, "elementwise", launches, None)
    return calls, mask_rows


def _key_buffer_ops(lay: BlockedLayout) -> int:
    """Ops of one BlockedLayout.key_buffer without grad (masks._fill_slots): new_empty, the
    globals' copy, zeros before the first key, two or three slice writes, zeros after the last
    (two fills, dispatched even when empty) unless the keys end in the last period."""
    ph, offset = lay.phases, lay.before * lay.blk
    periods, width = lay.nb // ph + 1, ph * lay.blk
    first = min(lay.n, width - offset)
    rest = first + (lay.n - first) // width * width < lay.n
    tail = (offset + lay.n) // width < periods
    return 1 + (1 if lay.n_global else 0) + 1 + 2 + rest + 2 * tail


def _layer_phases(b: _Builder, spec, batch, n, mode, device_type, peak_key, tile, prefix="attn.") -> str:
    """Attention layer phases into builder `b`; returns the attention path name."""
    eb = b.eb
    impl = device_type is not None
    d, hd, g = spec.d_model, spec.head_dim, spec.n_global
    hq, hkv, heads = spec.n_q_heads, spec.n_kv_heads, spec.n_attn_heads
    decode = mode == "decode"
    rows = batch if decode else batch * n  # tokens going through the projections
    p = prefix

    path = "decode" if decode else _attention_path(spec, n, device_type)
    # the blocked path's layout as the layer makes it: with grad (train) coarser blocks and
    # pad/stack copies; without (prefill) finer blocks. `late` (attention.forward's `inference`:
    # blocked, no grad, float32): RoPE is applied while laying out q and k and, bidirectional,
    # the global tokens' pass reads the layout's buffers
    lay = None
    if path == "blocked":
        lay = BlockedLayout.of(_rule(spec), n, g, grad=mode == "train")
    late = lay is not None and mode == "prefill" and eb == 4
    globals_in_buffers = late and g > 0 and not spec.causal
    if impl and decode:  # the token's position (prefill and train cache RoPE's factors per length)
        b.elementwise(p + "positions", 8, 0, 1, grad=False)
    b.linear(p + "q_proj", rows, d, hq * hd, spec.bias)
    b.linear(p + "k_proj", rows, d, hkv * hd, spec.bias)
    b.linear(p + "v_proj", rows, d, hkv * hd, spec.bias)
    if spec.rope:
        _rope_phases(b, spec, rows, 1 if decode else n, impl, p, tables=decode, multiply=not late)
    if decode:
        return _decode_phases(b, spec, batch, n, impl, p)

    if g:
        _global_phases(b, spec, batch, n, impl, p, in_buffers=lay if globals_in_buffers else None)
    expand = _expands_kv(spec, path, device_type, peak_key)
    kv_heads_read = heads if expand else hkv  # rSQA: heads == hkv, the query heads are gathered
    if spec.grouping == "reverse" and impl:
        b.elementwise(p + "q_gather", eb * batch * n * hd * (hq + hkv), 0, 1)
    if expand:
        b.elementwise(p + "expand_kv", eb * 2 * batch * n * hd * (hkv + heads), 0, 2)
        if g:
            b.elementwise(p + "global_expand_kv", eb * 2 * batch * g * hd * (hkv + heads), 0, 2)

    # pairs the kernel computes per (batch, attention head), the query/key rows it reads,
    # the bytes of a mask it reads and how many calls it takes
    q_len, k_len, mask_bytes, calls = n, n + g, 0, 1
    if path == "ideal":
        pairs = spec.visible_pairs(n) + n * g
    elif path == "sdpa":
        if not spec.causal:
            pairs = n * n
        elif device_type == "cpu":
            pairs = _tiled_causal_pairs(n, _cpu_q_split(n), CPU_FLASH_KV_SPLIT)
        else:
            pairs = _tiled_causal_pairs(n, tile, tile)
    elif path == "flex":
        pairs = _flex_pairs(spec, n, tile)
        if g:
            b.elementwise(p + "kv_concat", eb * 2 * 2 * batch * kv_heads_read * (n + g) * hd, 0, 2)
    elif path == "blocked":
        pairs, q_len, k_len, mask_bytes, calls = _blocked_phases(
            b, spec, batch, n, heads, p, lay, grad=mode == "train", rope_in_layout=late and spec.rope,
            globals_in_buffers=globals_in_buffers)
    else:  # sdpa-masked: dense (N, N+G) mask built every call, every pair computed
        pairs = n * (n + g)
        b.elementwise(p + "kv_concat", eb * 2 * 2 * batch * kv_heads_read * (n + g) * hd, 0, 2)
        b.elementwise(p + "mask", 8 * n * (n + g), 2 * n * (n + g), 6, grad=False)

    # fused attention: scores, softmax, AV in one kernel per call (SDPA paths add the
    # kernel-choice query that names last_backend); backward recomputes the scores: 3
    # score-sized matmuls (S, dQ, dK) and 2 AV-sized (dV, dP), one backward kernel per call
    launches = calls + (1 if impl and path != "flex" else 0)
    b.add(p + "scores", 2 * batch * heads * hd * pairs,
          eb * batch * hd * (heads * q_len + kv_heads_read * k_len) + mask_bytes,
          "attention", launches, (3.0, 2.0, calls / launches))
    b.add(p + "softmax", SOFTMAX_FLOPS_PER_PAIR * batch * heads * pairs, 0, "elementwise", 0, (1.6, 0.0, 0.0))
    b.add(p + "av", 2 * batch * heads * hd * pairs, eb * batch * hd * (kv_heads_read * k_len + heads * q_len),
          "attention", 0, (2.0, 2.0, 0.0))
    if impl and spec.grouping == "reverse" and path != "blocked":
        # the kernels' output follows the query's layout: gathered (rSQA) queries are
        # head-major, so merging heads copies; otherwise the output is token-major already
        b.elementwise(p + "merge", eb * 2 * batch * n * heads * hd, 0, 1)
    b.linear(p + "o_proj", rows, heads * hd, d, spec.bias)
    return path


def _norm(b: _Builder, name, rows, d, impl):
    # RMSNorm: read x (twice in eager: square-mean, then scale), write y
    b.elementwise(name, b.eb * (3 if impl else 2) * rows * d, 4 * rows * d, 3 if impl else 1)


def _build(spec, *, batch, seq_len, mode, what, n_layers, d_ff, vocab_size, dtype, device_type, tile):
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
    peak_key, eb = _dtype(dtype)
    d = spec.d_model
    if d_ff is None:
        d_ff = default_d_ff(d)
    d_ff = _positive_int("d_ff", d_ff)
    tile = _positive_int("attention_tile", tile if tile is not None else 128)
    impl = device_type is not None
    rows = batch if mode == "decode" else batch * n

    layer = _Builder(eb)
    if what != "layer":
        _norm(layer, "attn_norm", rows, d, impl)
    path = _layer_phases(layer, spec, batch, n, mode, device_type, peak_key, tile,
                         prefix="attn." if what != "layer" else "")
    if what != "layer":
        layer.elementwise("attn_residual", eb * 3 * rows * d, rows * d, 1)
        _norm(layer, "ff_norm", rows, d, impl)
        layer.linear("ff.gate", rows, d, d_ff)
        layer.linear("ff.up", rows, d, d_ff)
        layer.elementwise("ff.act", eb * 5 * rows * d_ff, 6 * rows * d_ff, 2)  # silu(gate) * up
        layer.linear("ff.down", rows, d_ff, d)
        layer.elementwise("ff_residual", eb * 3 * rows * d, rows * d, 1)
    train = mode == "train"
    per_layer = layer.phases(train)
    phases = [ph.scaled(n_layers) for ph in per_layer] if n_layers > 1 else per_layer

    if what == "model":
        head = _Builder(eb)
        head.elementwise("embed", eb * 2 * rows * d + 8 * rows, 0, 1)
        _norm(head, "final_norm", rows, d, impl)
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
    phases, _ = _build(spec, batch=batch, seq_len=seq_len, mode=mode, what=what, n_layers=n_layers, d_ff=d_ff,
                       vocab_size=vocab_size, dtype=dtype, device_type=device_type, tile=attention_tile)
    return phases


# ----- hardware profiles -----------------------------------------------------------------------
@dataclass
class HardwareProfile:
    """A device's datasheet figures plus efficiency factors and overhead (guessed or calibrated).

    peak_flops: dense FLOP/s per dtype key (fp32 = non-Tensor-Core vector rate, tf32, bf16,
    fp16). mem_bandwidth: bytes/s. efficiency: fraction of peak reached per kind (matmul,
    attention, elementwise) and of bandwidth (memory); calibrated values may exceed 1 where
    data stays in cache. overhead_s: seconds per kernel launch / eager op. sources: where each
    figure comes from. calibration: None, or what the factors were fitted on.
    """

    name: str
    display_name: str
    peak_flops: dict
    mem_bandwidth: float
    mem_bytes: float
    l2_bytes: float
    efficiency: dict
    overhead_s: float
    sources: dict
    calibration: dict | None = None
    device_type: str = "cuda"
    attention_tile: int = 128

    @property
    def calibration_label(self) -> str:
        cal = self.calibration
        if not cal:
            return "uncalibrated datasheet figures"
        mape = cal.get("heldout_mape")
        mape_text = "n/a" if mape is None or not math.isfinite(mape) else f"{100 * mape:.1f}%"
        return (f"calibrated on {cal.get('fingerprint', 'unknown device')} {cal.get('date', '?')}, "
                f"{cal.get('n_points', '?')} points, held-out MAPE {mape_text}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "device_type": self.device_type,
            "peak_flops": {k: float(v) for k, v in self.peak_flops.items()},
            "mem_bandwidth": float(self.mem_bandwidth),
            "mem_bytes": int(self.mem_bytes),
            "l2_bytes": int(self.l2_bytes),
            "efficiency": {k: float(v) for k, v in self.efficiency.items()},
            "overhead_s": float(self.overhead_s),
            "attention_tile": int(self.attention_tile),
            "sources": dict(self.sources),
            "calibration": _plain(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> "HardwareProfile":
        if not isinstance(data, dict):
            raise CostError(f"{where}: a profile must be a mapping, got {type(data).__name__}")
        required = ("name", "peak_flops", "mem_bandwidth", "efficiency")
        missing = [k for k in required if k not in data]
        if missing:
            raise CostError(f"{where}: missing field(s) {missing}; a profile needs {list(required)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CostError(f"{where}: unknown field(s) {unknown}; allowed are {sorted(known)}")

        def number(field_name, value, positive=True):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise CostError(f"{where}: {field_name}={value!r} is not a number") from None
            if not math.isfinite(value) or (positive and value <= 0) or value < 0:
                bound = "> 0" if positive else ">= 0"
                raise CostError(f"{where}: {field_name}={value!r} must be a finite number {bound}")
            return value

        peaks = data["peak_flops"]
        if not isinstance(peaks, dict) or set(peaks) != set(PEAK_KEYS):
            raise CostError(f"{where}: peak_flops must give exactly {list(PEAK_KEYS)}, got {peaks!r}")
        eff = data["efficiency"]
        if not isinstance(eff, dict) or set(eff) != set(EFFICIENCY_KEYS):
            raise CostError(f"{where}: efficiency must give exactly {list(EFFICIENCY_KEYS)}, got {eff!r}")
        device_type = data.get("device_type", "cuda")
        if device_type not in DEVICE_TYPES:
            raise CostError(f"{where}: device_type={device_type!r} is not allowed: choose one of {DEVICE_TYPES}")
        return cls(
            name=str(data["name"]),
            display_name=str(data.get("display_name", data["name"])),
            peak_flops={k: number(f"peak_flops.{k}", v) for k, v in peaks.items()},
            mem_bandwidth=number("mem_bandwidth", data["mem_bandwidth"]),
            mem_bytes=number("mem_bytes", data.get("mem_bytes", 0), positive=False),
            l2_bytes=number("l2_bytes", data.get("l2_bytes", 0), positive=False),
            efficiency={k: number(f"efficiency.{k}", v) for k, v in eff.items()},
            overhead_s=number("overhead_s", data.get("overhead_s", 0.0), positive=False),
            sources=dict(data.get("sources") or {}),
            calibration=data.get("calibration"),
            device_type=device_type,
            attention_tile=_positive_int(f"{where}: attention_tile", data.get("attention_tile", 128)),
        )


def _plain(obj):
    """numpy scalars and tuples -> plain Python, so YAML stays readable."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def user_profile_dir() -> Path:
    """Where calibrated profiles live: ``$SQA_SEARCH_CACHE/profiles`` or ``~/.cache/sqa_search/profiles``."""
    root = os.environ.get("SQA_SEARCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sqa_search"
    return base / "profiles"


def _normalise_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    return _ALIASES.get(key, key)


def _names_in(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.yaml")}


def list_profiles() -> list[str]:
    """Names `load_profile` accepts: shipped profiles and calibrated ones in `user_profile_dir`."""
    return sorted(_names_in(_SHIPPED_DIR) | _names_in(user_profile_dir()))


def _read_profile(path: Path) -> HardwareProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CostError(f"profile file {path} is not valid YAML: {exc}") from None
    return HardwareProfile.from_dict(data, where=str(path))


def load_profile(name_or_path, *, calibrated: bool = True) -> HardwareProfile:
    """A profile by name (e.g. "h100-sxm") or from a YAML path.

    Names look in the user calibration directory first (when `calibrated`), then in the
    shipped profiles; aliases like "h100", "a100", "4090", "cpu" resolve to shipped names.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else str(name_or_path)
    looks_like_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise CostError(f"profile={text!r}: no profile file there")
        return _read_profile(path)
    name = _normalise_name(text)
    if calibrated:
        user = user_profile_dir() / f"{name}.yaml"
        if user.is_file():
            return _read_profile(user)
    shipped = _SHIPPED_DIR / f"{name}.yaml"
    if shipped.is_file():
        return _read_profile(shipped)
    raise CostError(f"profile={text!r} is not known: choose one of {', '.join(list_profiles())} (or give a .yaml path)")


def save_profile(profile: HardwareProfile, path=None) -> Path:
    """Write `profile` as YAML; path None (or a directory) -> ``<dir>/<name>.yaml`` in
    `user_profile_dir` (or that directory), where `load_profile(name)` finds it first."""
    if path is None:
        path = user_profile_dir()
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix not in (".yaml", ".yml"):
        path = path / f"{profile.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# sqa-search hardware profile {profile.name}: {profile.calibration_label}\n"
    path.write_text(header + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return path


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

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _phase_times(phases, profile: HardwareProfile, peak_key: str, eff: dict, overhead: float):
    bw = profile.mem_bandwidth * eff["memory"]
    rows = []
    for ph in phases:
        peak = profile.peak_flops["fp32" if ph.kind == "elementwise" else peak_key]
        compute = ph.flops / (peak * eff[ph.kind])
        memory = ph.bytes / bw
        rows.append((ph, compute, memory, ph.launches * overhead))
    return rows


def predict(spec, profile, *, batch, seq_len, mode, dtype, what="layer", n_layers=1, d_ff=None,
            vocab_size=256) -> Prediction:
    """Roofline prediction of one step on `profile` (a HardwareProfile or a name for `load_profile`)."""
    profile = load_profile(profile) if not isinstance(profile, HardwareProfile) else profile
    spec = AttentionSpec.coerce(spec)
    peak_key, _ = _dtype(dtype)
    phases, path = _build(spec, batch=batch, seq_len=seq_len, mode=mode, what=what, n_layers=n_layers, d_ff=d_ff,
                          vocab_size=vocab_size, dtype=dtype, device_type=profile.device_type,
                          tile=profile.attention_tile)
    rows = _phase_times(phases, profile, peak_key, profile.efficiency, profile.overhead_s)
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
    )


# ----- calibration ----------------------------------------------------------------------------------
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
    points: list  # one dict per point: config, measured, predicted before/after/held-out

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

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
            f"  efficiency: {eff}; overhead {self.overhead_before:.3g}s->{self.overhead_after:.3g}s\n"
            f"  median abs error: uncalibrated {pct(self.fit_mape_before)}, fitted {pct(self.fit_mape_after)}, "
            f"held-out {pct(self.heldout_mape)} ({self.heldout_method})"
        )


def _get(rec, name, default=None):
    if isinstance(rec, dict):
        return rec.get(name, default)
    return getattr(rec, name, default)


def _fingerprint_label(fp) -> str:
    if fp is None or fp == {}:
        return "unknown device"
    if isinstance(fp, str):
        return fp
    if isinstance(fp, dict):
        parts = []
        for key in ("device_name", "gpu_name", "gpu", "cpu_model", "cpu", "processor", "host", "hostname"):
            value = fp.get(key)
            if value and str(value) not in parts:
                parts.append(str(value))
        for key in ("threads", "num_threads", "torch_threads"):
            if fp.get(key):
                parts.append(f"{fp[key]} threads")
                break
        if fp.get("clock"):
            parts.append(f"{fp['clock']} clock")
        digest = hashlib.sha1(json.dumps(_plain(fp), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return (" / ".join(parts) + f" [{digest}]") if parts else f"fingerprint {digest}"
    return str(fp)


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
    vocab_size: int
    measured: float
    group: str
    fingerprint: object


def _parse_results(results, device_type: str) -> tuple[list[_Point], list[str]]:
    points, skipped = [], []
    for i, rec in enumerate(results):
        status = _get(rec, "status", "ok")
        if status != "ok":
            skipped.append(f"#{i}: status {status!r}")
            continue
        if _get(rec, "predicted", False):
            skipped.append(f"#{i}: a prediction, not a measurement")
            continue
        device = str(_get(rec, "device", "") or "")
        family = "cuda" if device.startswith("cuda") else ("cpu" if device.startswith("cpu") else None)
        if family and family != device_type:
            skipped.append(f"#{i}: measured on {device!r}, but the profile is a {device_type} profile")
            continue
        try:
            spec = AttentionSpec.coerce(_get(rec, "spec"))
            seconds = _get(rec, "median_s", _get(rec, "seconds"))
            seconds = float(seconds)
            if not (math.isfinite(seconds) and seconds > 0):
                raise CostError(f"median_s={seconds!r} must be a positive time")
            model = _get(rec, "model") or {}
            pt = _Point(
                spec=spec,
                mode=_get(rec, "mode"),
                what=_get(rec, "what", "layer") or "layer",
                batch=int(_get(rec, "batch")),
                seq_len=int(_get(rec, "seq_len")),
                dtype=str(_get(rec, "dtype", "float32")).replace("torch.", ""),
                n_layers=int(_get(rec, "n_layers", model.get("n_layers", 1)) or 1),
                d_ff=_get(rec, "d_ff", model.get("d_ff")),
                vocab_size=int(_get(rec, "vocab_size", model.get("vocab_size", 256)) or 256),
                measured=seconds,
                group="",
                fingerprint=_get(rec, "fingerprint"),
            )
            # validate now, so a bad record is skipped with a reason rather than failing the fit
            _build(pt.spec, batch=pt.batch, seq_len=pt.seq_len, mode=pt.mode, what=pt.what, n_layers=pt.n_layers,
                   d_ff=pt.d_ff, vocab_size=pt.vocab_size, dtype=pt.dtype, device_type=None, tile=None)
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
            peak_key, _ = _dtype(pt.dtype)
            phases, _ = _build(pt.spec, batch=pt.batch, seq_len=pt.seq_len, mode=pt.mode, what=pt.what,
                               n_layers=pt.n_layers, d_ff=pt.d_ff, vocab_size=pt.vocab_size, dtype=pt.dtype,
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

    results: TimingResult objects or dicts with spec (dict), mode, what, batch, seq_len, dtype,
    median_s, status, fingerprint (and optionally n_layers, d_ff, vocab_size). Records whose
    status is not "ok", that are predictions, or whose device is of another kind than the
    profile's (a cuda timing for a cpu profile) are skipped (listed in the report).
    The fit minimises a robust (soft-L1) loss on log time with a weak pull towards the
    starting factors. Held-out error: every configuration (spec + shape, all its modes
    together) is predicted by a fit that did not see it: leave-one-out up to 25
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
    everything = np.arange(len(points))
    theta = _fit(design, measured, everything, theta0)
    before = design.predict(theta0)
    after = design.predict(theta)

    groups = sorted({p.group for p in points})
    group_of = np.array([groups.index(p.group) for p in points])
    heldout = np.full(len(points), np.nan)
    if len(groups) >= 2:
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
    else:
        method = "none (needs at least two configurations)"
    heldout_mape = _mdape(heldout, measured) if np.isfinite(heldout).all() else math.nan

    fps = [p.fingerprint for p in points]
    counted = Counter(json.dumps(_plain(fp), sort_keys=True, default=str) for fp in fps)
    main_fp = json.loads(counted.most_common(1)[0][0])
    label = _fingerprint_label(main_fp)
    if len(counted) > 1:
        label += f" (+{len(counted) - 1} other fingerprint(s))"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    eff_after = {k: float(np.exp(theta[i])) for i, k in enumerate(EFFICIENCY_KEYS)}
    overhead_after = float(np.exp(theta[4]))
    modes = sorted({p.mode for p in points})
    dtypes = sorted({p.dtype for p in points})

    report = CalibrationReport(
        profile=profile.name,
        fingerprint=label,
        date=date,
        n_points=len(points),
        n_skipped=len(skipped),
        skipped=skipped,
        modes=modes,
        dtypes=dtypes,
        efficiency_before=dict(profile.efficiency),
        efficiency_after=eff_after,
        overhead_before=float(profile.overhead_s),
        overhead_after=overhead_after,
        fit_mape_before=_mdape(before, measured),
        fit_mape_after=_mdape(after, measured),
        heldout_mape=heldout_mape,
        heldout_method=method,
        points=[
            {"label": p.spec.label, "mode": p.mode, "what": p.what, "batch": p.batch, "seq_len": p.seq_len,
             "dtype": p.dtype, "measured_s": p.measured, "predicted_uncalibrated_s": float(before[i]),
             "predicted_fitted_s": float(after[i]), "predicted_heldout_s": float(heldout[i])}
            for i, p in enumerate(points)
        ],
    )
    sources = dict(profile.sources)
    sources["efficiency"] = sources["overhead_s"] = f"calibrated on {label} {date} ({len(points)} timings)"
    calibrated = dataclasses.replace(
        profile,
        efficiency=eff_after,
        overhead_s=overhead_after,
        sources=sources,
        calibration={
            "fingerprint": label,
            "fingerprint_detail": main_fp,
            "date": date,
            "n_points": len(points),
            "modes": modes,
            "dtypes": dtypes,
            "scopes": sorted({p.what for p in points}),
            "heldout_mape": heldout_mape,
            "heldout_method": method,
            "fit_mape": report.fit_mape_after,
            "uncalibrated_mape": report.fit_mape_before,
            "efficiency_before": dict(profile.efficiency),
            "overhead_before": float(profile.overhead_s),
        },
    )
    return calibrated, report


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


def _machine_fingerprint(device: str, threads: int) -> dict:
    import platform

    import torch

    fp = {"device": device, "torch": torch.__version__, "threads": threads, "host": platform.node()}
    if device.startswith("cuda"):
        fp["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        fp["cpu_model"] = cpu
        fp["cpu_count"] = os.cpu_count()
    return fp


def _layer_step(spec, *, mode, batch, seq_len, dtype, device):
    """A closure running one SparseQueryAttention step (synchronised), and the layer."""
    import torch

    from ..layer.attention import SparseQueryAttention

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    layer = SparseQueryAttention(spec).to(device=device, dtype=torch_dtype)
    if str(device).startswith("cuda"):
        # synchronise the layer's own device: a bare synchronize() waits for the *current*
        # device, so a cuda:1 timing from a process on cuda:0 would time the launches only
        cuda_device = torch.device(device)

        def sync():
            torch.cuda.synchronize(cuda_device)
    else:
        def sync():
            pass
    gen = torch.Generator().manual_seed(0)
    if mode == "decode":
        x_prompt = torch.randn(batch, seq_len, spec.d_model, generator=gen).to(device, torch_dtype)
        x = torch.randn(batch, 1, spec.d_model, generator=gen).to(device, torch_dtype)
        cache = layer.new_cache(batch, seq_len + 1, device=device, dtype=torch_dtype)
        with torch.no_grad():
            layer.prefill_cache(x_prompt, cache)

        def step():
            cache.length = seq_len  # N cached tokens; the step decodes position N
            with torch.no_grad():
                layer.decode(x, cache)
            sync()
    elif mode == "prefill":
        x = torch.randn(batch, seq_len, spec.d_model, generator=gen).to(device, torch_dtype)

        def step():
            with torch.no_grad():
                layer(x)
            sync()
    else:
        x = torch.randn(batch, seq_len, spec.d_model, generator=gen).to(device, torch_dtype)
        grad = torch.randn(batch, seq_len, spec.d_model, generator=gen).to(device, torch_dtype)
        x.requires_grad_(True)  # as inside a model: the input gradient is computed too

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)
            sync()
    return step, layer


def _time_min(step, repeats: int, clock, min_time_s: float = 0.02) -> float:
    best, spent, count = math.inf, 0.0, 0
    while count < repeats or (spent < min_time_s and count < 20 * repeats):
        t0 = clock()
        step()
        dt = clock() - t0
        best, spent, count = min(best, dt), spent + dt, count + 1
    return best


def calibrate_from_measurements(profile="cpu-generic", *, configs=None, modes=MODES, dtype="float32",
                                device="cpu", repeats=3, passes=3, threads: int | None = 1, clock: str = "auto",
                                save: bool = False, progress=None, speed_correction: bool | None = None):
    """Time a spread of attention layers here, calibrate `profile` on them, optionally save it.

    The script-like path to a calibrated profile for this machine (also
    ``python -m sqa_search.speed.cost calibrate --profile cpu-generic --save``). configs: dicts with
    variant, d_model, n_heads, seq_len, batch and optional window (default
    `default_calibration_configs`). threads: torch threads while timing (1 by default: on a
    busy 2-core machine multi-threaded ops stall on each other; the fingerprint records it).

    Each configuration is timed `repeats` times in each of `passes` round-robin passes over all
    of them, and keeps its fastest time: on a shared machine other processes only ever add time,
    and interleaving spreads a busy spell over every configuration instead of a few.
    clock: "wall" (perf_counter) or "thread" (this thread's CPU time, which leaves out the time
    other processes hold the core; valid only on CPU with one torch thread, where every op runs
    on the calling thread). "auto" picks "thread" there and "wall" otherwise. Thread time
    estimates the step on an idle core: on a loaded machine wall time is longer by the load.
    The clock is recorded in the fingerprint.
    speed_correction (default: on for CPU): each timing is scaled by the machine's speed at
    that moment against its stored reference, as `sqa_search.speed.timing` does (see
    `sqa_search.speed.probe`), so the profile predicts the figures `sqa-search bench` measures.
    Returns (calibrated profile, report, records); records are TimingResult-shaped dicts
    (their ``median_s`` holds that fastest time).
    """
    import torch

    configs = default_calibration_configs() if configs is None else configs
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        on_cpu = not str(device).startswith("cuda")
        if clock == "auto":
            clock = "thread" if on_cpu and torch.get_num_threads() == 1 else "wall"
        if clock not in ("wall", "thread"):
            raise _fail("clock", clock, ("auto", "wall", "thread"))
        if clock == "thread" and not (on_cpu and torch.get_num_threads() == 1):
            raise _fail("clock", clock, "'thread' needs device='cpu' and threads=1 (ops on other threads go uncounted)")
        if speed_correction is None:
            speed_correction = on_cpu
        if speed_correction and not on_cpu:
            raise _fail("speed_correction", speed_correction, "True only with device='cpu' (the probe is a CPU kernel)")
        import time

        timer = time.thread_time if clock == "thread" else time.perf_counter
        fp = _machine_fingerprint(str(device), torch.get_num_threads())
        fp["clock"] = "thread-cpu-time" if clock == "thread" else "wall"
        probes: dict = {}  # mode -> (probe, its reference seconds): the probes timing.py uses
        if speed_correction:
            from .probe import SpeedProbe, machine_reference, probe_kind
            from .timing import default_cache_dir, fingerprint, fingerprint_id

            fp_id = fingerprint_id(fingerprint(device, dtype, torch.get_num_threads()))
            for mode in modes:
                probe = SpeedProbe(probe_kind(mode), clock=timer)
                probes[mode] = probe, machine_reference(probe, cache_dir=default_cache_dir(), fingerprint_id=fp_id).probe_s
            fp["speed_corrected"] = True
            fp["reference_probe_s"] = {mode: ref for mode, (_, ref) in probes.items()}
        jobs = []
        for cfg in configs:
            overrides = {"window": cfg["window"]} if cfg.get("window") else {}
            spec = AttentionSpec.variant(cfg["variant"], cfg["d_model"], cfg["n_heads"], **overrides)
            for mode in modes:
                step, layer = _layer_step(spec, mode=mode, batch=cfg.get("batch", 1), seq_len=cfg["seq_len"],
                                          dtype=dtype, device=device)
                step()  # warm-up
                jobs.append({"spec": spec, "mode": mode, "cfg": cfg, "step": step, "layer": layer, "best": math.inf})
        for _ in range(max(1, passes)):
            for job in jobs:
                probe, reference = probes.get(job["mode"], (None, None))
                before = probe() if probe else None
                best = _time_min(job["step"], repeats, timer)
                if probe:
                    best *= reference / ((before + probe()) / 2)  # at the machine's reference speed
                job["best"] = min(job["best"], best)
        records = []
        for job in jobs:
            cfg = job["cfg"]
            records.append({"spec": job["spec"].to_dict(), "mode": job["mode"], "what": "layer",
                            "batch": cfg.get("batch", 1), "seq_len": cfg["seq_len"], "dtype": dtype,
                            "device": str(device), "median_s": job["best"], "status": "ok", "fingerprint": fp,
                            "predicted": False, "backend": job["layer"].last_backend})
            if progress:
                progress(records[-1])
    finally:
        torch.set_num_threads(old_threads)
    calibrated, report = calibrate(profile, records)
    if save:
        save_profile(calibrated)
    return calibrated, report, records


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sqa_search.speed.cost", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="time attention layers here and calibrate a profile")
    cal.add_argument("--profile", default="cpu-generic")
    cal.add_argument("--modes", default=",".join(MODES), help="comma-separated: train,prefill,decode")
    cal.add_argument("--dtype", default="float32")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--passes", type=int, default=3)
    cal.add_argument("--threads", type=int, default=1)
    cal.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"))
    cal.add_argument("--save", action="store_true", help=f"write it to {user_profile_dir()}")
    sub.add_parser("list", help="list known profiles")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in list_profiles():
            prof = load_profile(name)
            print(f"{name:14s} {prof.display_name}  [{prof.calibration_label}]")
        return 0
    profile, report, _ = calibrate_from_measurements(
        args.profile, modes=tuple(m for m in args.modes.split(",") if m), dtype=args.dtype, device=args.device,
        repeats=args.repeats, passes=args.passes, threads=args.threads, clock=args.clock, save=args.save)
    print(report.summary())
    if args.save:
        print(f"saved to {user_profile_dir() / (profile.name + '.yaml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
