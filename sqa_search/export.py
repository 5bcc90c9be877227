"""`sqa-search export`: a chosen head configuration as a ready-to-use layer.

Which configuration: a study's trial (``--study S --trial N``), a rule over a study's complete
trials (``--pick knee``, ``--pick "fastest-within 1%"``, ``--pick "best-under-latency 5ms"``),
or a spec given directly (``--spec sqa --d-model 256 --heads 16``, ``--spec 8/4/128/4``).

What it writes into ``--out DIR``:

1. ``sqa_layer.py``: one standalone module that depends only on torch. It holds the
   configuration as constants and the layer (`SparseQueryAttention`, with ``new_cache`` /
   ``prefill_cache`` / ``decode``), generated from the template in this file. It keeps the
   library's conventions (head grouping, RoPE, window and global-token masks), chooses its
   backend as the library does (fused SDPA; FlexAttention on CUDA; the blocked window path
   elsewhere) and uses the library's parameter names, so one state_dict loads into either.
2. ``config.json``: the spec and where it came from; `load_layer` turns it back into the
   library's `SparseQueryAttention` (with the weights, when the export has them).
3. ``weights.pt`` (with ``--weights`` / ``--weights-from FILE``): a state_dict loadable into
   either layer. Studies do not save trained weights, so these are either taken from a
   state_dict file you give or freshly initialised with ``--seed``; the README says which.
4. ``README.md``: the configuration, its provenance (study, trial, fingerprint, date), its
   figures with their sources, and a usage example.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .spec import VARIANTS, AttentionSpec, SpecError, normalise_variant
from ._format import fmt_bytes as _fmt_bytes, fmt_s as _fmt_s
from .errors import UserError

__all__ = [
    "ExportError",
    "ExportResult",
    "CONFIG_FILE",
    "FORMAT",
    "export_layer",
    "export_trial",
    "export_recommendation",
    "select_trial",
    "parse_pick",
    "parse_spec",
    "render_module",
    "load_config",
    "load_layer",
    "add_arguments",
    "run",
]

FORMAT = "sqa-search/attention-layer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
README_FILE = "README.md"
DEFAULT_MODULE = "sqa_layer"


class ExportError(UserError):
    """An export that cannot be done as asked; the message names the option, the value and what is allowed."""


@dataclass
class ExportResult:
    directory: Path
    module_path: Path
    config_path: Path
    readme_path: Path
    weights_path: Path | None
    spec: AttentionSpec
    source: dict = field(default_factory=dict)

    def summary(self) -> str:
        files = [self.module_path, self.config_path] + ([self.weights_path] if self.weights_path else []) + [
            self.readme_path]
        return f"exported {self.spec.label} to {self.directory}: " + ", ".join(p.name for p in files)


# ===== the standalone module ======================================================================
# The module is a generated header (provenance), the imports, the constants, then _TEMPLATE_BODY,
# which reads only those constants. It mirrors sqa_search.attention path for path, so the two agree to
# rounding: any change to the library's numerics must be made here too (tests/test_export.py
# compares them in a fresh interpreter that cannot import sqa_search).
_TEMPLATE_IMPORTS = """
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
"""

_TEMPLATE_BODY = r'''
__all__ = ["SparseQueryAttention", "KVCache", "CONFIG", "load", "rope_tables", "apply_rope"]

CONFIG = dict(
    d_model=D_MODEL, n_heads=N_HEADS, n_q_heads=N_Q_HEADS, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM,
    window=WINDOW, n_global=N_GLOBAL, causal=CAUSAL, rope=ROPE, bias=BIAS,
)
N_ATTN_HEADS = max(N_Q_HEADS, N_KV_HEADS)  # heads the attention itself runs with
# "gqa": query head h reads KV head h // (H_q / H_kv), SDPA's enable_gqa layout;
# "uneven": H_kv does not divide H_q, query head h reads KV head h * H_kv // H_q;
# "reverse": H_q < H_kv, KV head g is read by query head g * H_q // H_kv (query heads shared).
if N_Q_HEADS < N_KV_HEADS:
    GROUPING = "reverse"
elif N_Q_HEADS % N_KV_HEADS == 0:
    GROUPING = "gqa"
else:
    GROUPING = "uneven"
KV_HEAD_OF_QUERY = [h * N_KV_HEADS // N_Q_HEADS for h in range(N_Q_HEADS)]
QUERY_HEAD_OF_KV = [g * N_Q_HEADS // N_KV_HEADS for g in range(N_KV_HEADS)]

ROPE_BASE = 10000.0
MIN_BLOCK = 64  # smallest query block of the blocked window path
BACKENDS = ("auto", "sdpa", "blocked", "flex")
_SDP_KERNELS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


# ----- RoPE (rotate-half layout; angles in float32, float64 for float64 inputs) -------------------
def rope_tables(positions, head_dim, dtype):
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=exact) / head_dim))
    angles = positions.to(exact)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----- helpers ---------------------------------------------------------------------------------
def _tracing():
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    if getattr(compiler, "is_exporting", lambda: False)():
        return True
    return getattr(compiler, "is_compiling", lambda: False)()


def _sdp_kernel(q, k, v, **kw):
    """Name of the SDPA kernel PyTorch will pick (private API; best effort)."""
    try:
        return _SDP_KERNELS.get(int(torch._fused_sdp_choice(q, k, v, **kw)), "unknown")
    except Exception:
        return "unknown"


def _native_gqa_ok(q, k, v, causal):
    """SDPA's enable_gqa only on CUDA and only where it keeps a fused kernel (CPU expands K/V:
    measured faster there)."""
    if not q.is_cuda or q.shape[1] == k.shape[1] or q.shape[1] % k.shape[1]:
        return False
    if _tracing():
        return True
    return _sdp_kernel(q, k, v, is_causal=causal, enable_gqa=True) not in ("math", "unknown")


def _pair_mask(q_pos, k_pos, causal, window):
    """True where key k_pos is visible to query q_pos. Causal: i - W < j <= i (W keys, itself
    included); bidirectional: |i - j| < W."""
    if causal:
        ok = k_pos <= q_pos
        if window is not None:
            ok = ok & (q_pos - k_pos < window)
        return ok
    if window is None:
        return torch.ones_like(q_pos - k_pos, dtype=torch.bool)
    return (q_pos - k_pos).abs() < window


@functools.lru_cache(maxsize=1)
def _flex_available():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(n, n_global, window, causal, device):
    """Block mask over keys [sequence (n); global tokens (n_global)], cached per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        is_global = kv_idx >= n
        if causal:
            ok = kv_idx <= q_idx
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
        elif window is not None:
            ok = (q_idx - kv_idx).abs() < window
        else:
            ok = kv_idx >= 0
        return is_global | ok

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n + n_global, device=device)


@dataclass
class KVCache:
    """Keys and values for decode, (B, H_kv, capacity, head_dim) each; a window keeps a ring of W."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def filled(self):
        return min(self.length, self.k.shape[2])


# ----- the layer -------------------------------------------------------------------------------
class SparseQueryAttention(nn.Module):
    """(batch, N, D_MODEL) -> (batch, N, D_MODEL) with N_Q_HEADS query and N_KV_HEADS key/value heads.

    backend: "auto" (fused SDPA for full attention; FlexAttention on CUDA for windows and
    global tokens; the blocked window path elsewhere), or force "sdpa", "blocked" or "flex".
    The path that ran is in ``last_backend``.
    """

    def __init__(self, backend="auto", device=None, dtype=None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not known: choose one of {', '.join(BACKENDS)}")
        if backend == "flex" and WINDOW is None and N_GLOBAL == 0:
            raise ValueError("backend='flex' needs a window or global tokens; full attention runs on sdpa")
        self.backend = backend
        d, hd = D_MODEL, HEAD_DIM
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d, N_Q_HEADS * hd, bias=BIAS, **kw)
        self.k_proj = nn.Linear(d, N_KV_HEADS * hd, bias=BIAS, **kw)
        self.v_proj = nn.Linear(d, N_KV_HEADS * hd, bias=BIAS, **kw)
        self.o_proj = nn.Linear(N_ATTN_HEADS * hd, d, bias=BIAS, **kw)
        if N_GLOBAL:
            self.global_tokens = nn.Parameter(torch.randn(N_GLOBAL, d, **kw) * 0.02)
        else:
            self.register_parameter("global_tokens", None)
        self.register_buffer("_kv_index", torch.tensor(KV_HEAD_OF_QUERY, device=device), persistent=False)
        self.register_buffer("_q_index", torch.tensor(QUERY_HEAD_OF_KV, device=device), persistent=False)
        self.last_backend = None

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in CONFIG.items()) + f", backend={self.backend!r}"

    # -- shapes --
    def _heads(self, x, n_heads):
        b, n, _ = x.shape
        return x.view(b, n, n_heads, HEAD_DIM).transpose(1, 2)

    def _merge(self, o):
        b, h, n, hd = o.shape
        return o.transpose(1, 2).reshape(b, n, h * hd)

    def _group(self, q, k, v, allow_native_gqa):
        """q, k, v brought to the same head count (or k/v left grouped for enable_gqa)."""
        if GROUPING == "reverse":
            return q.index_select(1, self._q_index), k, v, False
        if N_Q_HEADS == N_KV_HEADS or (GROUPING == "gqa" and allow_native_gqa):
            return q, k, v, N_Q_HEADS != N_KV_HEADS
        return q, self._expand_kv(k), self._expand_kv(v), False

    def _expand_kv(self, t):
        if GROUPING == "reverse" or N_Q_HEADS == N_KV_HEADS:
            return t
        if GROUPING == "gqa":
            return t.repeat_interleave(N_Q_HEADS // N_KV_HEADS, dim=1)
        return t.index_select(1, self._kv_index)

    def _global_kv(self, batch, k_seq=None, v_seq=None, dtype=None):
        """Global tokens' keys and values. Causal: the learned tokens (they see nothing).
        Bidirectional: they first read the whole sequence (Longformer style)."""
        tokens = self.global_tokens.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if not CAUSAL:
            q_g = self._heads(self.q_proj(tokens), N_Q_HEADS)
            k_all = torch.cat([k_seq, self._heads(self.k_proj(tokens), N_KV_HEADS)], dim=2)
            v_all = torch.cat([v_seq, self._heads(self.v_proj(tokens), N_KV_HEADS)], dim=2)
            q_g, k_all, v_all, _ = self._group(q_g, k_all, v_all, allow_native_gqa=False)
            o_g = F.scaled_dot_product_attention(q_g, k_all, v_all)
            tokens = tokens + self.o_proj(self._merge(o_g))
        return self._heads(self.k_proj(tokens), N_KV_HEADS), self._heads(self.v_proj(tokens), N_KV_HEADS)

    def choose_backend(self, x):
        if self.backend != "auto":
            return self.backend
        windowed = WINDOW is not None and WINDOW < x.shape[1]
        if not windowed and N_GLOBAL == 0:
            return "sdpa"
        if x.is_cuda and _flex_available():
            return "flex"
        return "blocked" if windowed else "sdpa-masked"

    def forward(self, x):
        if x.dim() != 3 or x.shape[-1] != D_MODEL:
            raise ValueError(f"input must be (batch, N, d_model={D_MODEL}); got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), N_Q_HEADS)
        k = self._heads(self.k_proj(x), N_KV_HEADS)
        v = self._heads(self.v_proj(x), N_KV_HEADS)
        if ROPE:
            cos, sin = rope_tables(torch.arange(n, device=x.device), HEAD_DIM, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g_kv = self._global_kv(b, k, v, q.dtype) if N_GLOBAL else None

        backend = self.choose_backend(x)
        if backend == "sdpa" and N_GLOBAL == 0:
            o, name = self._full(q, k, v)
        elif backend == "flex":
            o, name = self._flex(q, k, v, g_kv)
        elif backend == "blocked" or (backend == "sdpa" and WINDOW is not None):
            o, name = self._blocked(q, k, v, g_kv)
        else:
            o, name = self._masked(q, k, v, g_kv)
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))

    # -- full attention: SDPA's fused kernels --
    def _full(self, q, k, v):
        native = _native_gqa_ok(q, k, v, CAUSAL)
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=native)
        name = "sdpa"
        if not _tracing():
            name = f"sdpa/{_sdp_kernel(q, k, v, is_causal=CAUSAL, enable_gqa=gqa)}" + ("+gqa" if gqa else "")
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL, enable_gqa=True), name
        return F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL), name

    # -- full attention plus global tokens, dense (N, N+G) mask (off CUDA) --
    def _masked(self, q, k, v, g_kv):
        n = q.shape[2]
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
        k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        pos = torch.arange(n, device=q.device)
        seq_mask = _pair_mask(pos[:, None], pos[None, :], CAUSAL, WINDOW)
        mask = torch.cat([seq_mask, seq_mask.new_ones(n, g_kv[0].shape[2])], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "sdpa-masked"

    # -- sliding window without an N x N mask: query blocks attend to their neighbouring key blocks --
    def _blocked(self, q, k, v, g_kv):
        w = WINDOW
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        bsz, h, n, hd = q.shape
        blk = max(w, MIN_BLOCK)
        nb = -(-n // blk)
        before, after = blk, (blk if not CAUSAL else 0)
        span = (before + blk + after) // blk
        pad_q = nb * blk - n

        qb = F.pad(q, (0, 0, 0, pad_q)).view(bsz, h, nb, blk, hd)
        kp = F.pad(k, (0, 0, before, pad_q + after))
        vp = F.pad(v, (0, 0, before, pad_q + after))
        kb = kp.unfold(2, span * blk, blk).transpose(-1, -2)  # (B, H, nb, span*blk, hd)
        vb = vp.unfold(2, span * blk, blk).transpose(-1, -2)

        q_pos = torch.arange(nb * blk, device=q.device).view(nb, blk, 1)
        k_pos = (torch.arange(nb, device=q.device).view(nb, 1, 1) * blk - before
                 + torch.arange(span * blk, device=q.device).view(1, 1, -1))
        mask = _pair_mask(q_pos, k_pos, CAUSAL, w) & (k_pos >= 0) & (k_pos < n)
        mask = mask | (q_pos >= n)  # padded query rows see anything (they are discarded)

        qf = qb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, blk, hd)
        kf = kb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        vf = vb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        maskf = mask.unsqueeze(0).expand(bsz, -1, -1, -1).reshape(bsz * nb, 1, blk, span * blk)
        if g_kv is not None:
            gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
            g = gk.shape[2]
            kf = torch.cat([kf, gk.repeat_interleave(nb, dim=0)], dim=2)
            vf = torch.cat([vf, gv.repeat_interleave(nb, dim=0)], dim=2)
            maskf = torch.cat([maskf, maskf.new_ones(bsz * nb, 1, blk, g)], dim=-1)
        name = "blocked"
        if not _tracing():
            name = f"blocked/{_sdp_kernel(qf, kf, vf, attn_mask=maskf)}"
        of = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=maskf)
        o = of.view(bsz, nb, h, blk, hd).permute(0, 2, 1, 3, 4).reshape(bsz, h, nb * blk, hd)
        return o[:, :, :n], name

    # -- FlexAttention (compiled on CUDA; eager elsewhere, which materialises N x N) --
    def _flex(self, q, k, v, g_kv):
        from torch.nn.attention.flex_attention import flex_attention

        n = q.shape[2]
        gqa_native = GROUPING == "gqa" and N_Q_HEADS != N_KV_HEADS
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=gqa_native)
        n_global = 0
        if g_kv is not None:
            gk, gv = g_kv if gqa else (self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1]))
            n_global = gk.shape[2]
            k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        block_mask = _flex_block_mask(n, n_global, WINDOW, CAUSAL, str(q.device))
        compiled = q.is_cuda
        fn = _compiled_flex() if compiled else flex_attention
        o = fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return o, "flex-compiled" if compiled else "flex-eager"

    # -- decode: one new token against the cache --
    def new_cache(self, batch, capacity, device=None, dtype=None):
        """An empty cache for up to `capacity` tokens (a window caps it at W)."""
        if WINDOW is not None:
            capacity = min(capacity, WINDOW)
        shape = (batch, N_KV_HEADS, capacity, HEAD_DIM)
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def prefill_cache(self, x, cache):
        """Write the keys and values of a whole prompt x (B, N, d) into the cache."""
        n = x.shape[1]
        k = self._heads(self.k_proj(x), N_KV_HEADS)
        v = self._heads(self.v_proj(x), N_KV_HEADS)
        if ROPE:
            cos, sin = rope_tables(torch.arange(n, device=x.device), HEAD_DIM, k.dtype)
            k = apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        keep = min(n, cap)
        slots = torch.arange(n - keep, n, device=x.device) % cap
        cache.k[:, :, slots] = k[:, :, n - keep:]
        cache.v[:, :, slots] = v[:, :, n - keep:]
        cache.length = n

    def decode(self, x, cache):
        """One new token x (B, 1, d) at position cache.length; updates the cache in place."""
        if not CAUSAL:
            raise ValueError("decode needs a causal layer: a bidirectional layer has no next token")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode takes one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        b = x.shape[0]
        pos = cache.length
        q = self._heads(self.q_proj(x), N_Q_HEADS)
        k = self._heads(self.k_proj(x), N_KV_HEADS)
        v = self._heads(self.v_proj(x), N_KV_HEADS)
        if ROPE:
            cos, sin = rope_tables(torch.tensor([pos], device=x.device), HEAD_DIM, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        if WINDOW is None and pos >= cap:
            raise ValueError(f"KV cache is full: capacity {cap} tokens, position {pos}")
        slot = pos % cap
        cache.k[:, :, slot] = k[:, :, 0]
        cache.v[:, :, slot] = v[:, :, 0]
        cache.length = pos + 1
        ks, vs = cache.k[:, :, : cache.filled], cache.v[:, :, : cache.filled]
        if N_GLOBAL:
            gk, gv = self._global_kv(b, dtype=q.dtype)
            ks, vs = torch.cat([ks, gk], dim=2), torch.cat([vs, gv], dim=2)
        if GROUPING == "gqa" and N_Q_HEADS > N_KV_HEADS:
            # fold each group of query heads onto the query axis: the grouped cache is read as is
            group = N_Q_HEADS // N_KV_HEADS
            o = F.scaled_dot_product_attention(q.view(b, N_KV_HEADS, group, HEAD_DIM), ks, vs)
            o, name = o.reshape(b, N_Q_HEADS, 1, HEAD_DIM), "decode/sdpa-grouped"
        else:
            q, ks, vs, _ = self._group(q, ks, vs, allow_native_gqa=False)
            o, name = F.scaled_dot_product_attention(q, ks, vs), "decode/sdpa"
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))


def load(weights=None, backend="auto", device=None, dtype=None):
    """The layer, with weights from a state_dict file (e.g. the export's weights.pt) if given."""
    layer = SparseQueryAttention(backend=backend, device=device, dtype=dtype)
    if weights is not None:
        state = torch.load(weights, map_location=device or "cpu", weights_only=True)
        layer.load_state_dict(state)
    return layer
'''


def _py(value) -> str:
    return repr(value)


def render_module(spec: AttentionSpec, *, provenance: str = "", module_name: str = DEFAULT_MODULE) -> str:
    """The standalone module's source for `spec` (depends only on torch)."""
    if not isinstance(spec, AttentionSpec):
        raise ExportError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    lines = [
        f'"""{spec.label}: a Sparse Query Attention layer exported by sqa-search (standalone: needs only torch).',
        "",
        f"{spec.n_q_heads} query heads, {spec.n_kv_heads} key/value heads, head_dim {spec.head_dim}, "
        f"d_model {spec.d_model} (baseline H={spec.n_heads}),",
        f"{'causal' if spec.causal else 'bidirectional'}"
        + (f", sliding window W={spec.window}" if spec.window is not None else ", full attention")
        + (f", {spec.n_global} learned global tokens" if spec.n_global else "")
        + (", RoPE" if spec.rope else ", no RoPE") + (", with biases." if spec.bias else "."),
        "",
        "Conventions (those of sqa_search): query head h reads KV head h * H_kv // H_q (SDPA's enable_gqa",
        "layout when H_kv divides H_q); rSQA (H_q < H_kv) shares query heads instead. Causal window:",
        "key j is visible to query i iff i - W < j <= i; bidirectional: |i - j| < W. Global tokens have",
        "no position; causal ones see nothing of the sequence, bidirectional ones read it first.",
        "Parameter names match sqa_search.SparseQueryAttention, so a state_dict loads into either.",
        "torch.export traces every path at a fixed shape; a dynamic sequence length works for full",
        "attention (the windowed path specialises on its number of blocks).",
        "",
        "Usage:",
        f"    from {module_name} import load",
        f"    layer = load(\"weights.pt\")            # or SparseQueryAttention() for fresh weights",
        f"    y = layer(torch.randn(2, 1024, {spec.d_model}))",
    ]
    if provenance:
        lines += ["", *provenance.strip().splitlines()]
    lines.append('"""')
    header = "\n".join(lines) + "\n"
    constants = "\n".join([
        "",
        "# ----- the configuration ---------------------------------------------------------------------",
        f"D_MODEL = {_py(spec.d_model)}",
        f"N_HEADS = {_py(spec.n_heads)}  # the baseline H the configuration was chosen against",
        f"N_Q_HEADS = {_py(spec.n_q_heads)}",
        f"N_KV_HEADS = {_py(spec.n_kv_heads)}",
        f"HEAD_DIM = {_py(spec.head_dim)}",
        f"WINDOW = {_py(spec.window)}  # None: full attention",
        f"N_GLOBAL = {_py(spec.n_global)}",
        f"CAUSAL = {_py(spec.causal)}",
        f"ROPE = {_py(spec.rope)}",
        f"BIAS = {_py(spec.bias)}",
        f"LABEL = {_py(spec.label)}",
    ]) + "\n"
    return header + _TEMPLATE_IMPORTS + constants + _TEMPLATE_BODY


# ===== choosing the configuration =================================================================
_PICK_HELP = "knee | 'fastest-within X%' | 'best-under-latency SECONDS' (units s, ms, us allowed)"


def parse_pick(text: str) -> tuple[str, float | None]:
    """'knee' -> ('knee', None); 'fastest-within 1%' -> ('fastest-within', 0.01);
    'best-under-latency 5ms' -> ('best-under-latency', 0.005). Raises ExportError."""
    raw = str(text).strip()
    parts = raw.replace("=", " ").split(None, 1)
    if not parts:
        raise ExportError(f"--pick {text!r} is not a rule: choose {_PICK_HELP}")
    rule = parts[0].lower().replace("_", "-")
    arg = parts[1].strip() if len(parts) > 1 else ""
    if rule == "knee":
        if arg:
            raise ExportError(f"--pick {text!r}: 'knee' takes no argument")
        return "knee", None
    if rule == "fastest-within":
        return rule, parse_fraction(arg, "--pick fastest-within")
    if rule == "best-under-latency":
        return rule, parse_seconds(arg, "--pick best-under-latency")
    raise ExportError(f"--pick {text!r} is not a rule: choose {_PICK_HELP}")


def parse_fraction(text, what: str = "tolerance") -> float:
    """'1%' -> 0.01; '0.01' -> 0.01 (a bare number is a fraction and must be < 1). Raises ExportError."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1].strip()) / 100.0
        else:
            value = float(raw)
            if value >= 1:
                raise ExportError(f"{what} {raw!r} is ambiguous: a bare number is a fraction of the loss "
                                  f"(0.01 = 1%) and must be < 1; write {raw}% for percent")
    except ValueError as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{what} {raw!r} cannot be parsed: give a percentage like 1% "
                          f"or a fraction like 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise ExportError(f"{what} {raw!r} is not allowed: must be a finite loss increase >= 0")
    return value


_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_seconds(text, what: str = "latency") -> float:
    """'0.01', '10ms', '250 us' -> seconds. Raises ExportError."""
    raw = str(text).strip().lower()
    m = re.fullmatch(r"([0-9.eE+-]+)\s*(s|sec|ms|us|µs)?", raw)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else float("nan")
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ExportError(f"{what} {text!r} cannot be parsed: give seconds > 0, e.g. 0.01, 10ms or 250us")
    return value


def _trial_summary(handle) -> str:
    trials = handle.study.get_trials(deepcopy=False)
    if not trials:
        return "it has no trials"
    from optuna.trial import TrialState

    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    return (f"it has trials 0-{trials[-1].number}; complete: "
            f"{', '.join(map(str, complete)) if complete else 'none'}")


def _complete_rows(handle):
    """Complete trials with finite quality and latency, one per distinct spec (lowest number)."""
    from optuna.trial import TrialState

    rows, seen = [], set()
    for t in handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        quality, latency = attrs.get("quality"), attrs.get("latency_s")
        if "spec" not in attrs or quality is None or latency is None:
            continue
        if not (math.isfinite(quality) and math.isfinite(latency)):
            continue
        key = attrs.get("spec_key") or json.dumps(attrs["spec"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        rows.append(t)
    return rows


def _quality_direction(handle) -> str:
    return handle.space.directions[0]


def select_trial(handle, *, trial: int | None = None, pick: str | None = None):
    """The trial to export and why: (FrozenTrial, reason). Exactly one of trial / pick.

    Raises ExportError for a trial not in the study, an incomplete trial, an unknown rule,
    or a rule that matches nothing (the message says what the study has).
    """
    from optuna.trial import TrialState

    if (trial is None) == (pick is None):
        raise ExportError("choose the configuration with exactly one of --trial N or --pick RULE")
    name = handle.space.name
    if trial is not None:
        trials = handle.study.get_trials(deepcopy=False)
        found = [t for t in trials if t.number == trial]
        if not found:
            raise ExportError(f"--trial {trial} is not in study {name!r} ({handle.directory}): "
                              f"{_trial_summary(handle)}")
        t = found[0]
        if t.state != TrialState.COMPLETE or "spec" not in t.user_attrs:
            why = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or "no result"
            raise ExportError(f"--trial {trial} of study {name!r} is {t.state.name} ({why}): only complete trials "
                              f"can be exported; {_trial_summary(handle)}")
        return t, f"trial {trial} of study {name!r}, chosen by number"

    rule, arg = parse_pick(pick)
    rows = _complete_rows(handle)
    if not rows:
        raise ExportError(f"--pick {pick!r}: study {name!r} has no complete trial with a quality and a latency")
    direction = _quality_direction(handle)
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    quality = handle.space.objectives.quality
    if rule == "knee":
        from .pareto import knee_point

        points = [[t.user_attrs["quality"], t.user_attrs["latency_s"]] for t in rows]
        t = rows[knee_point(points, [direction, "minimize"])]
        return t, f"knee of the {quality}/latency front of study {name!r} (trial {t.number})"
    if rule == "fastest-within":
        ref = [t for t in rows if t.user_attrs.get("variant") == "mha"]
        if ref:
            ref_t, ref_name = ref[0], f"MHA (trial {ref[0].number})"
        else:
            ref_t = rows[0]
            for t in rows[1:]:
                if better(t.user_attrs["quality"], ref_t.user_attrs["quality"]):
                    ref_t = t
            ref_name = f"the best trial {ref_t.number} ({ref_t.user_attrs.get('label')}; MHA is not in the study)"
        ref_q = ref_t.user_attrs["quality"]
        limit = ref_q + arg * abs(ref_q) if direction == "minimize" else ref_q - arg * abs(ref_q)
        ok = [t for t in rows if (t.user_attrs["quality"] <= limit if direction == "minimize"
                                  else t.user_attrs["quality"] >= limit)]
        if not ok:  # cannot happen with a reference in rows, kept for safety
            raise ExportError(f"--pick {pick!r}: no trial of study {name!r} has {quality} within {100 * arg:g}% of "
                              f"{ref_name} ({ref_q:.4g})")
        t = min(ok, key=lambda t: (t.user_attrs["latency_s"], t.number))
        return t, (f"fastest trial of study {name!r} with {quality} within {100 * arg:g}% of {ref_name}, "
                   f"{ref_q:.4g} -> limit {limit:.4g} (trial {t.number})")
    # best-under-latency
    ok = [t for t in rows if t.user_attrs["latency_s"] <= arg]
    if not ok:
        fastest = min(rows, key=lambda t: t.user_attrs["latency_s"])
        raise ExportError(f"--pick {pick!r} matches nothing: no complete trial of study {name!r} has latency <= "
                          f"{arg:.4g} s; the fastest is trial {fastest.number} ({fastest.user_attrs.get('label')}) "
                          f"at {fastest.user_attrs['latency_s']:.4g} s")
    best = ok[0]
    for t in ok[1:]:
        if better(t.user_attrs["quality"], best.user_attrs["quality"]):
            best = t
    return best, (f"best {quality} of study {name!r} with latency <= {arg:.4g} s "
                  f"({best.user_attrs['latency_s']:.4g} s, trial {best.number})")


def parse_spec(text: str, *, d_model: int | None = None, n_heads: int | None = None, **overrides) -> AttentionSpec:
    """A spec given directly: a variant name ('sqa', 'SW-SQA'), 'q/kv[/W[/G]]' (W may be 'none'),
    or a JSON object of AttentionSpec fields. d_model / n_heads default to the SQA paper's 256 / 16
    for names and head counts. overrides: window, n_global, causal, rope, bias. Raises ExportError."""
    raw = str(text).strip()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ExportError(f"--spec {raw!r} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ExportError(f"--spec {raw!r}: a JSON spec must be an object of AttentionSpec fields")
            return AttentionSpec.from_dict({**data, **overrides})
        d = 256 if d_model is None else d_model
        h = 16 if n_heads is None else n_heads
        if "/" in raw:
            parts = [p.strip() for p in raw.split("/")]
            if not 2 <= len(parts) <= 4:
                raise ExportError(f"--spec {raw!r} is not 'q/kv[/W[/G]]'")
            try:
                q, kv = int(parts[0]), int(parts[1])
                window = None
                if len(parts) > 2 and parts[2].lower() not in ("none", "full", "-", ""):
                    window = int(parts[2])
                n_global = int(parts[3]) if len(parts) > 3 else 0
            except ValueError:
                raise ExportError(f"--spec {raw!r}: the parts of 'q/kv[/W[/G]]' must be integers "
                                  f"(W may be 'none')") from None
            fields = {"window": window, "n_global": n_global, **overrides}
            return AttentionSpec(d_model=d, n_heads=h, n_q_heads=q, n_kv_heads=kv, **fields)
        try:
            normalise_variant(raw)
        except SpecError:
            raise ExportError(f"--spec {raw!r} is not known: give a variant name ({', '.join(VARIANTS)}), "
                              f"'q/kv[/W[/G]]' or a JSON object of AttentionSpec fields") from None
        return AttentionSpec.variant(raw, d, h, **overrides)
    except SpecError as exc:
        raise ExportError(f"--spec {raw!r}: {exc}") from None


# ===== writing =======================================================================================


def _resolve_state_dict(obj, prefix: str | None, source: str) -> dict:
    """A layer's state_dict out of a saved object: a state_dict, a checkpoint dict holding one
    ('state_dict' / 'model'), or a whole model's state_dict with `prefix` (e.g. 'blocks.0.attn.')."""
    import torch

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ExportError(f"--weights-from {source}: holds a {type(obj).__name__}, not a state_dict")
    wanted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    if prefix is None:
        if all(k in obj for k in wanted):
            prefix = ""
        else:
            prefixes = sorted({k[: -len("q_proj.weight")] for k in obj if k.endswith("q_proj.weight")})
            if len(prefixes) != 1:
                found = ", ".join(repr(p) for p in prefixes[:8]) or "none"
                raise ExportError(f"--weights-from {source}: cannot tell which attention layer to take "
                                  f"(layer prefixes found: {found}); pass --weights-prefix, e.g. 'blocks.0.attn.'")
            prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    if not state:
        raise ExportError(f"--weights-from {source}: no key starts with --weights-prefix {prefix!r}")
    keep = ("q_proj.", "k_proj.", "v_proj.", "o_proj.", "global_tokens")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def _make_weights(spec: AttentionSpec, weights, prefix: str | None, seed: int | None):
    """(state_dict, description) checked against the spec by loading it into the library layer."""
    import torch

    from .attention import SparseQueryAttention

    if weights is None:
        seed = 0 if seed is None else int(seed)
        torch.manual_seed(seed)
        layer = SparseQueryAttention(spec)
        how = (f"freshly initialised with torch.manual_seed({seed}) (PyTorch's nn.Linear default init; "
               f"NOT trained: studies do not save model weights)")
    else:
        if isinstance(weights, (str, Path)):
            path = Path(weights)
            if not path.is_file():
                raise ExportError(f"--weights-from {str(path)!r}: no such file")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a pickle that is not plain tensors, a corrupt file
                raise ExportError(f"--weights-from {str(path)!r}: cannot be read as a state_dict ({exc})") from None
            source = str(path)
        else:
            obj, source = weights, "the given state_dict"
        state = _resolve_state_dict(obj, prefix, source)
        layer = SparseQueryAttention(spec)
        try:
            layer.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ExportError(f"--weights-from {source}: does not fit {spec.label}: "
                              f"{' '.join(first[:3])}") from None
        how = f"taken from {source}" + (f" (prefix {prefix!r})" if prefix else "")
    return {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}, how


def _readme(spec: AttentionSpec, module_name: str, source: dict, figures: dict, weights_note: str | None) -> str:
    lines = [f"# {spec.label}", "",
             f"An attention head configuration exported by sqa-search on {source.get('exported', '?')}.", "",
             "## Configuration", "",
             "| field | value |", "|---|---|"]
    for key, value in spec.to_dict().items():
        lines.append(f"| {key} | {value} |")
    lines += ["", f"Attention runs with {spec.n_attn_heads} head(s); grouping: {spec.grouping} "
                  f"(query head h reads KV head h * H_kv // H_q; rSQA shares query heads).", "",
              "## Where it came from", ""]
    for key in ("origin", "study", "study_path", "trial", "chosen_by", "fingerprint", "fingerprint_id",
                "trial_date", "target", "model"):
        if source.get(key) not in (None, ""):
            lines.append(f"- {key.replace('_', ' ')}: {source[key]}")
    lines += ["", "## Figures", ""]
    if figures:
        lines += ["| figure | value | source |", "|---|---|---|"]
        for row in figures.get("rows", []):
            lines.append(f"| {row['name']} | {row['value']} | {row['source']} |")
    else:
        lines.append("None: this configuration was given directly, not measured.")
    lines += ["", "## Files", "",
              f"- `{module_name}.py`: the layer, standalone (needs only torch), configuration as constants.",
              f"- `{CONFIG_FILE}`: the configuration; `sqa_search.export.load_layer(\"{CONFIG_FILE}\")` "
              f"(or the folder) builds the library's layer from it.",
              ]
    if weights_note:
        lines.append(f"- `{WEIGHTS_FILE}`: a state_dict for either layer, {weights_note}.")
    else:
        lines.append("- no weights: the layer starts freshly initialised (export with --weights or "
                     "--weights-from FILE to include a state_dict).")
    load_arg = f'"{WEIGHTS_FILE}"' if weights_note else ""
    lines += ["", "## Usage", "", "```python",
              "import torch",
              f"from {module_name} import load          # this folder on sys.path; sqa-search not needed",
              f"layer = load({load_arg})" + ("" if weights_note else "                           # fresh weights"),
              f"y = layer(torch.randn(2, 1024, {spec.d_model}))",
              "```", "",
              "With sqa-search installed, the same layer from the library: "
              "`from sqa_search.export import load_layer; layer = load_layer(\"path/to/this/folder\")`.", ""]
    return "\n".join(lines)


def export_layer(spec: AttentionSpec, out, *, weights=None, weights_prefix: str | None = None,
                 with_weights: bool = False, seed: int | None = None, source: dict | None = None,
                 figures: dict | None = None, module_name: str = DEFAULT_MODULE) -> ExportResult:
    """Write the standalone module, config.json, optional weights.pt and README.md into `out`.

    weights: a state_dict, or a path to a file holding one (a whole model's too, with
    `weights_prefix`); with_weights=True and no weights: fresh weights from `seed`.
    source / figures: provenance and figures for the README and the config (see export_trial).
    """
    if not isinstance(spec, AttentionSpec):
        raise ExportError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module_name or ""):
        raise ExportError(f"module_name={module_name!r} is not a Python module name")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a folder")
    weights_path, weights_note = None, None
    state = None
    if weights is not None or with_weights:  # checked before anything is written
        state, weights_note = _make_weights(spec, weights, weights_prefix, seed)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(source or {})
    source.setdefault("origin", "spec given directly")
    source["exported"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = dict(figures or {})

    provenance = [f"Exported {source['exported']} from {source['origin']}"]
    for key in ("study", "trial", "chosen_by", "fingerprint"):
        if source.get(key) not in (None, ""):
            provenance.append(f"  {key.replace('_', ' ')}: {source[key]}")
    for row in figures.get("rows", []):
        provenance.append(f"  {row['name']}: {row['value']} ({row['source']})")
    if weights_note:
        provenance.append(f"Weights ({WEIGHTS_FILE}): {weights_note}.")

    module_path = out / f"{module_name}.py"
    module_path.write_text(render_module(spec, provenance="\n".join(provenance), module_name=module_name))
    if state is not None:
        import torch

        weights_path = out / WEIGHTS_FILE
        torch.save(state, weights_path)
    elif (out / WEIGHTS_FILE).exists():
        (out / WEIGHTS_FILE).unlink()  # a stale file from an earlier export would not match this spec

    from . import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sqa_search_version": __version__,
        "spec": spec.to_dict(),
        "label": spec.label,
        "variant": spec.variant_name,
        "family": spec.family,
        "module": module_path.name,
        "weights": WEIGHTS_FILE if weights_path else None,
        "weights_note": weights_note,
        "source": source,
        "figures": figures,
    }
    config_path = out / CONFIG_FILE
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n")
    readme_path = out / README_FILE
    readme_path.write_text(_readme(spec, module_name, source, figures, weights_note))
    return ExportResult(out, module_path, config_path, readme_path, weights_path, spec, source)


def _trial_source_and_figures(handle, t, reason: str) -> tuple[dict, dict]:
    attrs = t.user_attrs
    space = handle.space
    target = space.target
    fp = attrs.get("fingerprint") or {}
    timing = attrs.get("timing") or []
    fp_id = next((r.get("fingerprint_id") for r in timing if r.get("fingerprint_id")), None)
    device = fp.get("device_name") or fp.get("device_type")
    source = {
        "origin": f"study {space.name!r}",
        "study": space.name,
        "study_path": str(Path(handle.directory).resolve()),
        "trial": t.number,
        "chosen_by": reason,
        "fingerprint": (f"{device}, torch {fp.get('torch_version')}, {fp.get('threads')} threads"
                        if fp else f"none (latency {attrs.get('latency_source', 'not measured')})"),
        "fingerprint_id": fp_id,
        "trial_date": t.datetime_complete.strftime("%Y-%m-%d %H:%M") if t.datetime_complete else None,
        "target": (f"{target.hardware}, {target.mode}, {target.dtype}, batch {target.batch}, "
                   f"N={list(target.seq_len)}, timing the {target.what}"),
        "model": {"d_model": space.model.d_model, "n_heads": space.model.n_heads, "n_layers": space.model.n_layers,
                  "d_ff": space.model.d_ff, "causal": space.model.causal},
    }
    quality_name = space.objectives.quality
    train = attrs.get("train") or {}
    rows = [{"name": f"latency per step ({target.mode}, {target.what}, N={'+'.join(map(str, target.seq_len))})",
             "value": _fmt_s(attrs.get("latency_s")), "source": attrs.get("latency_source", "?")}]
    for rec in timing:
        if len(timing) > 1 and "median_s" in rec:
            rows.append({"name": f"latency at N={rec['seq_len']}", "value": _fmt_s(rec["median_s"]),
                         "source": f"measured, backend {rec.get('backend')}"})
    rows.append({"name": quality_name, "value": f"{attrs.get('quality'):.4f}",
                 "source": f"proxy model trained {train.get('steps', '?')} steps / {train.get('tokens', '?')} tokens "
                           f"(data {train.get('data_source', '?')}, seed {train.get('seed', '?')})"})
    rows.append({"name": "KV cache (model, largest N, batch 1)", "value": _fmt_bytes(attrs.get("kv_cache_bytes")),
                 "source": "analytic"})
    figures = {"latency_s": attrs.get("latency_s"), "latency_source": attrs.get("latency_source"),
               "quality": attrs.get("quality"), "quality_metric": quality_name,
               "kv_cache_bytes": attrs.get("kv_cache_bytes"), "timing": timing, "rows": rows}
    return source, figures


def export_trial(study, out, *, trial: int | None = None, pick: str | None = None, **kwargs) -> ExportResult:
    """Export a study's trial (by number or by a --pick rule) with its provenance and figures."""
    from .study import StudyError, open_study

    path = Path(study)
    if not path.exists():
        raise ExportError(f"--study {str(path)!r} does not exist (a study folder, e.g. studies/quickstart)")
    try:
        import warnings

        from optuna.exceptions import ExperimentalWarning

        with warnings.catch_warnings():  # optuna's "heartbeat is experimental" says nothing to the user
            warnings.simplefilter("ignore", category=ExperimentalWarning)
            handle = open_study(path)
    except StudyError as exc:
        raise ExportError(f"--study {str(path)!r}: {exc}") from None
    t, reason = select_trial(handle, trial=trial, pick=pick)
    spec = AttentionSpec.from_dict(t.user_attrs["spec"])
    source, figures = _trial_source_and_figures(handle, t, reason)
    return export_layer(spec, out, source=source, figures=figures, **kwargs)


def export_recommendation(recommendation, out, **kwargs) -> ExportResult:
    """Export the configuration a `sqa_search.recommend.Recommendation` chose, with its figures
    and their sources (measured or predicted, loss from a study or from the prior)."""
    c = recommendation.choice
    source = {"origin": "sqa-search recommend", "chosen_by": recommendation.why,
              "study": recommendation.study, "trial": c.trial,
              "target": (f"{recommendation.hardware_name}, {recommendation.mode}, N={recommendation.seq_len}, "
                         f"batch {recommendation.batch}, {recommendation.dtype}")}
    rows = [{"name": f"latency per step ({recommendation.mode}, {recommendation.what})", "value": _fmt_s(c.latency_s),
             "source": c.latency_source},
            {"name": "loss", "value": "-" if c.loss is None else f"{c.loss:.4f}", "source": c.loss_source},
            {"name": "KV cache", "value": _fmt_bytes(c.kv_cache_bytes), "source": "analytic"}]
    figures = {"latency_s": c.latency_s, "latency_source": c.latency_source, "quality": c.loss,
               "quality_source": c.loss_source, "kv_cache_bytes": c.kv_cache_bytes, "rows": rows}
    return export_layer(c.spec, out, source=source, figures=figures, **kwargs)


# ===== loading ======================================================================================
def load_config(path) -> tuple[dict, Path]:
    """(config dict, its folder) from an export folder or its config.json. Raises ExportError."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
        raise ExportError(f"no exported layer at {str(path)!r}: {config_path.name} is missing "
                          f"(give the export folder or its {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ExportError(f"{config_path} is not an sqa-search export (format {FORMAT!r} expected)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{config_path} has format_version {config['format_version']}; this sqa-search reads "
                          f"up to {FORMAT_VERSION}: upgrade sqa-search")
    return config, config_path.parent


def load_layer(path, *, backend: str = "auto", weights: bool = True, map_location="cpu"):
    """An export folder (or its config.json) -> the library's `SparseQueryAttention`, with the
    exported weights when there are some (weights=False: freshly initialised)."""
    import torch

    from .attention import SparseQueryAttention

    config, folder = load_config(path)
    try:
        spec = AttentionSpec.from_dict(config["spec"])
    except (KeyError, TypeError, SpecError) as exc:
        raise ExportError(f"{folder / CONFIG_FILE}: bad spec: {exc}") from None
    layer = SparseQueryAttention(spec, backend=backend)
    if weights and config.get("weights"):
        wpath = folder / config["weights"]
        if not wpath.is_file():
            raise ExportError(f"{folder / CONFIG_FILE} names weights {config['weights']!r} but {wpath} is missing")
        layer.load_state_dict(torch.load(wpath, map_location=map_location, weights_only=True))
    return layer.to(map_location) if map_location is not None else layer


# ===== `sqa-search export` ==========================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("which configuration (one of --trial, --pick, --spec)")
    what.add_argument("--study", help="a study folder, e.g. studies/quickstart (with --trial or --pick)")
    what.add_argument("--trial", type=int, help="the study's trial number to export")
    what.add_argument("--pick", help="a rule over the study's complete trials: " + _PICK_HELP.replace("%", "%%"))  # argparse formats help with %
    what.add_argument("--spec", help="a spec given directly: a variant name (sqa, ssqa, swsqa, ...), "
                                     "'q/kv[/W[/G]]', or a JSON object of AttentionSpec fields")
    spec = parser.add_argument_group("with --spec")
    spec.add_argument("--d-model", type=int, default=None, help="model width (default 256, the SQA paper's)")
    spec.add_argument("--heads", type=int, default=None, help="baseline heads H (default 16)")
    spec.add_argument("--window", type=int, default=None, help="sliding window W")
    spec.add_argument("--n-global", type=int, default=None, help="learned global tokens (with a window)")
    spec.add_argument("--bidirectional", action="store_true", help="an encoder layer (default causal)")
    spec.add_argument("--bias", action="store_true", help="projections with biases")
    spec.add_argument("--no-rope", action="store_true", help="no rotary position embedding")
    parser.add_argument("--out", required=True, help="folder to write the module, config, weights and README into")
    parser.add_argument("--module-name", default=DEFAULT_MODULE, help=f"module file name (default {DEFAULT_MODULE})")
    w = parser.add_argument_group("weights")
    w.add_argument("--weights", action="store_true",
                   help=f"write {WEIGHTS_FILE}: freshly initialised (--seed), since studies do not save weights")
    w.add_argument("--weights-from", metavar="FILE", help="write the weights from this state_dict file (a layer's, "
                                                          "or a whole model's with --weights-prefix)")
    w.add_argument("--weights-prefix", help="key prefix of the layer in --weights-from, e.g. blocks.0.attn.")
    w.add_argument("--seed", type=int, default=0, help="seed of fresh weights (default 0)")


def run(args) -> int:
    try:
        chosen = [name for name in ("trial", "pick", "spec") if getattr(args, name) is not None]
        if len(chosen) != 1:
            raise ExportError("choose the configuration with exactly one of --study S --trial N, "
                              "--study S --pick RULE or --spec SPEC" + (f" (got {', '.join('--' + c for c in chosen)})"
                                                                        if chosen else ""))
        kwargs = dict(weights=args.weights_from, weights_prefix=args.weights_prefix,
                      with_weights=args.weights, seed=args.seed, module_name=args.module_name)
        if args.spec is not None:
            if args.study:
                raise ExportError("--spec is given directly: drop --study (or use --trial / --pick with it)")
            spec = parse_spec(args.spec, d_model=args.d_model, n_heads=args.heads, window=args.window,
                              n_global=args.n_global, causal=False if args.bidirectional else None,
                              bias=True if args.bias else None, rope=False if args.no_rope else None)
            result = export_layer(spec, args.out, **kwargs)
        else:
            if not args.study:
                raise ExportError(f"--{chosen[0]} needs --study S (a study folder)")
            result = export_trial(args.study, args.out, trial=args.trial, pick=args.pick, **kwargs)
    except (ExportError, SpecError) as exc:
        print(f"error: {exc}")
        return 2
    print(result.summary())
    print(f"  chosen: {result.source.get('chosen_by', result.source.get('origin'))}")
    if result.weights_path is None:
        print("  no weights written (add --weights or --weights-from FILE)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sqa_search.export", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
