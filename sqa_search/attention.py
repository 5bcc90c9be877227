"""The attention layer: every head configuration an `AttentionSpec` describes, on its fastest path.

Paths (the one that ran is in ``layer.last_backend``, so timings can name their kernel):

* ``sdpa``: full attention through ``F.scaled_dot_product_attention``. Grouped heads use the
  kernel's own ``enable_gqa`` where that keeps a fused kernel, and expand K/V where the grouped
  call would fall to the math path (or, on CPU, where expanding is measurably faster).
* ``blocked``: sliding window (and global tokens) without an N x N mask: queries in blocks of
  ``b >= W`` tokens each attend to their own and the neighbouring key blocks in one batched
  SDPA call, so cost is linear in N, forward and backward, on any device.
* ``flex``: FlexAttention with a block mask; the default for windows and global tokens on CUDA,
  where the compiled kernel runs forward and backward. On CPU it can be forced for checking:
  eager flex materialises N x N and, in torch 2.13, has no backward on CPU (forward only).
* ``sdpa-masked``: full attention plus global tokens off CUDA: an (N, N+G) boolean mask.

Head grouping and mask conventions are defined in `sqa_search.spec`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import AttentionSpec, SpecError

__all__ = ["SparseQueryAttention", "KVCache", "apply_rope", "rope_tables", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "blocked", "flex")
ROPE_BASE = 10000.0
# Smallest query block for the blocked path: tiny windows would otherwise mean many tiny
# matmuls whose overhead dominates; a larger block wastes a little arithmetic instead.
MIN_BLOCK = 64

_SDP_KERNELS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


# ----- RoPE ----------------------------------------------------------------------------------
def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos, sin of shape (len(positions), head_dim) for the rotate-half (GPT-NeoX) layout.

    Angles are computed in float32 (float64 for float64 inputs): low-precision angles drift
    visibly at long positions.
    """
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=exact) / head_dim))
    angles = positions.to(exact)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., N, head_dim); cos/sin: (N, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----- helpers -------------------------------------------------------------------------------
def _sdp_kernel(q, k, v, **kw) -> str:
    """Name of the SDPA kernel PyTorch will pick for these inputs (private API; best effort)."""
    try:
        return _SDP_KERNELS.get(int(torch._fused_sdp_choice(q, k, v, **kw)), "unknown")
    except Exception:  # the private API moved: say so rather than guess
        return "unknown"


def _tracing() -> bool:
    return torch.compiler.is_compiling()


@dataclass
class KVCache:
    """Keys and values for decode, (B, H_kv, capacity, head_dim) each.

    A windowed spec keeps at most W tokens (a ring buffer: slot = position % W); RoPE is
    applied before caching, so the order of slots does not matter to attention.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # tokens seen so far

    @property
    def filled(self) -> int:
        return min(self.length, self.k.shape[2])


# ----- the layer -----------------------------------------------------------------------------
class SparseQueryAttention(nn.Module):
    """Attention with H_q query heads and H_kv key/value heads, optional window and global tokens.

    Input and output are (batch, N, d_model). See `AttentionSpec` for the head grouping
    (query head h reads KV head h * H_kv // H_q; rSQA shares query heads instead) and for the
    window and global-token conventions.
    """

    def __init__(self, spec: AttentionSpec, backend: str = "auto"):
        super().__init__()
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
        if backend not in BACKENDS:
            raise SpecError(f"backend={backend!r} is not known: choose one of {', '.join(BACKENDS)}")
        if backend == "flex" and spec.window is None and spec.n_global == 0:
            raise SpecError("backend='flex' needs a window or global tokens; full attention runs on sdpa")
        self.spec = spec
        self.backend = backend
        d, hd = spec.d_model, spec.head_dim
        self.q_proj = nn.Linear(d, spec.n_q_heads * hd, bias=spec.bias)
        self.k_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.bias)
        self.v_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.bias)
        self.o_proj = nn.Linear(spec.n_attn_heads * hd, d, bias=spec.bias)
        if spec.n_global:
            self.global_tokens = nn.Parameter(torch.randn(spec.n_global, d) * 0.02)
        else:
            self.register_parameter("global_tokens", None)
        self.register_buffer("_kv_index", torch.tensor(spec.kv_head_of_query), persistent=False)
        self.register_buffer("_q_index", torch.tensor(spec.query_head_of_kv), persistent=False)
        self.last_backend: str | None = None
        self._mask_cache: dict = {}  # blocked-path masks by shape; not state, not saved

    # -- shapes --
    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.spec.head_dim).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, hd = o.shape
        return o.transpose(1, 2).reshape(b, n, h * hd)

    def _group(self, q, k, v, allow_native_gqa: bool):
        """Bring q and k/v to the same head count, or leave k/v grouped for enable_gqa.

        Returns q, k, v, enable_gqa.
        """
        spec = self.spec
        if spec.grouping == "reverse":
            return q.index_select(1, self._q_index), k, v, False
        if spec.n_q_heads == spec.n_kv_heads or (spec.grouping == "gqa" and allow_native_gqa):
            return q, k, v, spec.n_q_heads != spec.n_kv_heads
        return q, self._expand_kv(k), self._expand_kv(v), False

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """KV heads (B, H_kv, L, hd) -> one per attention head (B, H_attn, L, hd)."""
        spec = self.spec
        if spec.grouping == "reverse" or spec.n_q_heads == spec.n_kv_heads:
            return t
        if spec.grouping == "gqa":  # contiguous equal groups: the enable_gqa layout
            return t.repeat_interleave(spec.n_q_heads // spec.n_kv_heads, dim=1)
        return t.index_select(1, self._kv_index)

    def _global_kv(self, batch: int, k_seq=None, v_seq=None, dtype=None):
        """Global tokens' keys and values, (B, H_kv, G, hd) each.

        Causal: projections of the learned tokens (they see nothing). Bidirectional: the
        tokens first attend to the whole sequence and themselves; their updated states
        (token + attention output) give the keys and values the sequence then reads.
        """
        spec = self.spec
        tokens = self.global_tokens.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if not spec.causal:
            q_g = self._heads(self.q_proj(tokens), spec.n_q_heads)
            k_all = torch.cat([k_seq, self._heads(self.k_proj(tokens), spec.n_kv_heads)], dim=2)
            v_all = torch.cat([v_seq, self._heads(self.v_proj(tokens), spec.n_kv_heads)], dim=2)
            q_g, k_all, v_all, _ = self._group(q_g, k_all, v_all, allow_native_gqa=False)
            o_g = F.scaled_dot_product_attention(q_g, k_all, v_all)
            tokens = tokens + self.o_proj(self._merge(o_g))
        return (
            self._heads(self.k_proj(tokens), spec.n_kv_heads),
            self._heads(self.v_proj(tokens), spec.n_kv_heads),
        )

    def choose_backend(self, x: torch.Tensor) -> str:
        spec, n = self.spec, x.shape[1]
        if self.backend != "auto":
            return self.backend
        windowed = spec.window is not None and spec.window < n
        if not windowed and spec.n_global == 0:
            return "sdpa"
        if x.is_cuda and _flex_available():
            return "flex"
        return "blocked" if windowed else "sdpa-masked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if x.dim() != 3 or x.shape[-1] != spec.d_model:
            raise ValueError(f"input must be (batch, N, d_model={spec.d_model}); got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), spec.n_q_heads)
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.arange(n, device=x.device), spec.head_dim, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g_kv = self._global_kv(b, k, v, q.dtype) if spec.n_global else None

        backend = self.choose_backend(x)
        if backend == "sdpa" and spec.n_global == 0:
            o, name = self._full(q, k, v)
        elif backend == "flex":
            o, name = self._flex(q, k, v, g_kv)
        elif backend == "blocked" or (backend == "sdpa" and spec.window is not None):
            o, name = self._blocked(q, k, v, g_kv)
        else:
            o, name = self._masked(q, k, v, g_kv)
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))

    # -- full attention --
    def _full(self, q, k, v):
        causal = self.spec.causal
        native = _native_gqa_ok(q, k, v, causal)
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=native)
        name = "sdpa"
        if not _tracing():
            name = f"sdpa/{_sdp_kernel(q, k, v, is_causal=causal, enable_gqa=gqa)}" + ("+gqa" if gqa else "")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), name

    # -- full attention plus global tokens, dense mask (off CUDA only) --
    def _masked(self, q, k, v, g_kv):
        n = q.shape[2]
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
        k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        pos = torch.arange(n, device=q.device)
        seq_mask = _pair_mask(pos[:, None], pos[None, :], self.spec.causal, self.spec.window)
        mask = torch.cat([seq_mask, seq_mask.new_ones(n, g_kv[0].shape[2])], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "sdpa-masked"

    # -- sliding window without an N x N mask --
    def _blocked(self, q, k, v, g_kv):
        spec = self.spec
        w = spec.window
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        bsz, h, n, hd = q.shape
        blk = max(w, MIN_BLOCK)
        nb = -(-n // blk)
        before, after = blk, (blk if not spec.causal else 0)
        span = (before + blk + after) // blk  # key blocks per query block
        pad_q = nb * blk - n

        qb = F.pad(q, (0, 0, 0, pad_q)).view(bsz, h, nb, blk, hd)
        kp = F.pad(k, (0, 0, before, pad_q + after))
        vp = F.pad(v, (0, 0, before, pad_q + after))
        # key block i covers padded positions [i*blk, i*blk + span*blk): unfold makes the view
        kb = kp.unfold(2, span * blk, blk).transpose(-1, -2)  # (B, H, nb, span*blk, hd)
        vb = vp.unfold(2, span * blk, blk).transpose(-1, -2)

        mask = self._block_mask(n, blk, span, before, q.device, q.dtype)

        # fold the blocks into the batch: (B*nb, H, blk, hd) queries, (B*nb, H, span*blk, hd) keys
        qf = qb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, blk, hd)
        kf = kb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        vf = vb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        maskf = mask.unsqueeze(0).expand(bsz, -1, -1, -1).reshape(bsz * nb, 1, blk, span * blk)
        if g_kv is not None:
            gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
            g = gk.shape[2]
            kf = torch.cat([kf, gk.repeat_interleave(nb, dim=0)], dim=2)
            vf = torch.cat([vf, gv.repeat_interleave(nb, dim=0)], dim=2)
            maskf = torch.cat([maskf, maskf.new_zeros(bsz * nb, 1, blk, g)], dim=-1)  # globals: visible
        name = "blocked"
        if not _tracing():
            name = f"blocked/{_sdp_kernel(qf, kf, vf, attn_mask=maskf)}"
        of = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=maskf)
        o = of.view(bsz, nb, h, blk, hd).permute(0, 2, 1, 3, 4).reshape(bsz, h, nb * blk, hd)
        return o[:, :, :n], name

    def _block_mask(self, n, blk, span, before, device, dtype):
        """Additive mask (0 visible, -inf hidden) of the blocked path, (nb, blk, span*blk).

        Cached per shape: building it each call cost as much as the attention itself on CPU,
        and handing SDPA a float mask spares its own bool-to-float conversion.
        """
        key = (n, blk, span, before, str(device), dtype)
        cached = None if _tracing() else self._mask_cache.get(key)
        if cached is not None:
            return cached
        nb = -(-n // blk)
        q_pos = torch.arange(nb * blk, device=device).view(nb, blk, 1)
        k_pos = (torch.arange(nb, device=device).view(nb, 1, 1) * blk - before
                 + torch.arange(span * blk, device=device).view(1, 1, -1))
        visible = _pair_mask(q_pos, k_pos, self.spec.causal, self.spec.window) & (k_pos >= 0) & (k_pos < n)
        visible = visible | (q_pos >= n)  # padded query rows: anything, so no row is empty (discarded)
        mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
        if not _tracing():
            if len(self._mask_cache) >= 8:  # a few shapes at most: sweeps over N would grow it
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    # -- FlexAttention --
    def _flex(self, q, k, v, g_kv):
        from torch.nn.attention.flex_attention import flex_attention

        spec = self.spec
        n = q.shape[2]
        gqa_native = spec.grouping == "gqa" and spec.n_q_heads != spec.n_kv_heads
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=gqa_native)
        n_global = 0
        if g_kv is not None:
            gk, gv = g_kv if gqa else (self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1]))
            n_global = gk.shape[2]
            k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        block_mask = _flex_block_mask(n, n_global, spec.window, spec.causal, str(q.device))
        compiled = q.is_cuda
        fn = _compiled_flex() if compiled else flex_attention
        o = fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return o, "flex-compiled" if compiled else "flex-eager"

    # -- decode: one new token against the cache --
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty cache for up to `capacity` tokens (a window caps it at W)."""
        spec = self.spec
        if spec.window is not None:
            capacity = min(capacity, spec.window)
        shape = (batch, spec.n_kv_heads, capacity, spec.head_dim)
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def prefill_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """Write the keys and values of a whole prompt x (B, N, d) into the cache."""
        spec = self.spec
        n = x.shape[1]
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.arange(n, device=x.device), spec.head_dim, k.dtype)
            k = apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        keep = min(n, cap)
        slots = torch.arange(n - keep, n, device=x.device) % cap
        cache.k[:, :, slots] = k[:, :, n - keep:]
        cache.v[:, :, slots] = v[:, :, n - keep:]
        cache.length = n

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token x (B, 1, d) at position cache.length; updates the cache in place."""
        spec = self.spec
        if not spec.causal:
            raise SpecError("decode needs causal=True: a bidirectional layer has no next token")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode takes one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        b = x.shape[0]
        pos = cache.length
        q = self._heads(self.q_proj(x), spec.n_q_heads)
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.tensor([pos], device=x.device), spec.head_dim, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        if spec.window is None and pos >= cap:
            raise ValueError(f"KV cache is full: capacity {cap} tokens, position {pos}")
        slot = pos % cap
        cache.k[:, :, slot] = k[:, :, 0]
        cache.v[:, :, slot] = v[:, :, 0]
        cache.length = pos + 1
        ks, vs = cache.k[:, :, : cache.filled], cache.v[:, :, : cache.filled]
        if spec.n_global:
            gk, gv = self._global_kv(b, dtype=q.dtype)
            ks, vs = torch.cat([ks, gk], dim=2), torch.cat([vs, gv], dim=2)
        if spec.grouping == "gqa" and spec.n_q_heads > spec.n_kv_heads:
            # One query token and no mask: fold each group of query heads into the query axis
            # and read the grouped cache as it is. Expanding K/V instead would copy the whole
            # cache every step and make GQA/MQA decode slower than MHA, the opposite of their point.
            group = spec.n_q_heads // spec.n_kv_heads
            o = F.scaled_dot_product_attention(q.view(b, spec.n_kv_heads, group, spec.head_dim), ks, vs)
            o, name = o.reshape(b, spec.n_q_heads, 1, spec.head_dim), "decode/sdpa-grouped"
        else:
            q, ks, vs, _ = self._group(q, ks, vs, allow_native_gqa=False)
            o, name = F.scaled_dot_product_attention(q, ks, vs), "decode/sdpa"
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))


def _pair_mask(q_pos, k_pos, causal: bool, window: int | None):
    """True where key k_pos is visible to query q_pos (broadcasting); see AttentionSpec."""
    if causal:
        ok = k_pos <= q_pos
        if window is not None:
            ok = ok & (q_pos - k_pos < window)
        return ok
    if window is None:
        return torch.ones_like(q_pos - k_pos, dtype=torch.bool)
    return (q_pos - k_pos).abs() < window


def _native_gqa_ok(q, k, v, causal: bool) -> bool:
    """Use SDPA's enable_gqa only where it keeps a fused kernel and is not slower.

    On CPU, expanding K/V measured faster than the grouped flash kernel (torch 2.13, 2 cores),
    so CPU always expands. On CUDA, enable_gqa is kept unless the kernel choice would be math
    (fp32, head_dim > 256, old GPUs), where expanding lets a fused kernel run.
    """
    if not q.is_cuda or q.shape[1] == k.shape[1] or q.shape[1] % k.shape[1]:
        return False
    if _tracing():
        return True
    return _sdp_kernel(q, k, v, is_causal=causal, enable_gqa=True) not in ("math", "unknown")


@functools.lru_cache(maxsize=1)
def _flex_available() -> bool:
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
def _flex_block_mask(n: int, n_global: int, window: int | None, causal: bool, device: str):
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
