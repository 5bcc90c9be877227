"""The attention layer: every head configuration an `AttentionSpec` describes, on its fastest path.

Paths (the one that ran is in ``layer.last_backend``, so timings can name their kernel):

* ``sdpa``: full attention through ``F.scaled_dot_product_attention``. Grouped heads use the
  kernel's own ``enable_gqa`` where that keeps a fused kernel, and expand K/V where the grouped
  call would fall to the math path (or, on CPU, where expanding is measurably faster).
* ``blocked``: sliding window (and global tokens) without an N x N mask: queries in blocks of
  ~W/4 tokens (~W/2 with grad) each read the few key blocks their window needs plus the global
  tokens, as one contiguous run of a key buffer (`sqa_search.layer.masks.BlockedLayout`), a few
  batched SDPA calls on plain views: cost linear in N, forward and backward, on any device,
  keys copied once. Without grad, RoPE is applied during that copy, interior runs share one
  broadcast mask, and the global tokens' own pass reads the same buffers.
* ``flex``: compiled FlexAttention with a BlockMask built from KV block indices (never an N x N
  mask); the default for windows and global tokens on CUDA (head_dim >= 16), forward and
  backward. On CPU torch 2.13 compiles the forward only. ``last_backend`` is ``flex-compiled``
  only when the compiled graph ran: the compiled call reports it itself, and an eager fallback
  (dynamo's recompile limit, dynamo disabled) raises `FlexFallbackError` instead of running
  N x N eagerly under a compiled label.
* ``flex-eager``: uncompiled FlexAttention, forced only (it materialises N x N): for checking.
* ``sdpa-masked``: SDPA with a dense (N, N+G) mask: full attention plus global tokens off CUDA,
  or a forced ``sdpa`` on a windowed spec.

Head grouping is defined in `sqa_search.layer.spec`; the visibility rule (causal, window, global
tokens) in `sqa_search.layer.masks`, which every path here uses.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .rope import apply_rope, pair_halves, rope_paired, rope_tables, rotation_factors
from .masks import FLEX_BLOCK, BlockedLayout, Visibility, flex_kv_blocks, visibility_mask
from .spec import AttentionSpec, SpecError

__all__ = ["SparseQueryAttention", "KVCache", "FlexFallbackError", "apply_rope", "rope_tables", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "blocked", "flex", "flex-eager")
# Inductor's CPU and CUDA flex kernels are not implemented below this head size (torch 2.13).
FLEX_MIN_HEAD_DIM = 16

_SDP_KERNELS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


# ----- helpers -------------------------------------------------------------------------------
def _sdp_kernel(q, k, v, **kw) -> str:
    """Name of the SDPA kernel PyTorch will pick for these inputs (private API; best effort)."""
    try:
        return _SDP_KERNELS.get(int(torch._fused_sdp_choice(q, k, v, **kw)), "unknown")
    except Exception:  # the private API moved: say so rather than guess
        return "unknown"


def _tracing() -> bool:
    return torch.compiler.is_compiling()


class FlexFallbackError(RuntimeError):
    """Compiled FlexAttention would run (or ran) eagerly: refused, since eager flex
    materialises N x N scores and its timing is not the compiled kernel's."""


@dataclass
class KVCache:
    """Keys and values for decode, (B, H_kv, n_global + capacity, head_dim) each.

    The first ``n_global`` slots hold the global tokens' keys and values (causal: fixed
    projections, written once), so a step reads one contiguous slice and copies nothing. A
    windowed spec keeps at most W sequence tokens after them (a ring buffer: slot = n_global +
    position % W); RoPE is applied before caching, so the order of slots does not matter.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # sequence tokens seen so far
    n_global: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2] - self.n_global

    @property
    def filled(self) -> int:
        return min(self.length, self.capacity)


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
        _check_forced_backend(spec, backend)
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
        # With RoPE, q and k are projected with their output rows reordered (pair_halves) so that
        # RoPE is one complex multiply. Scores are sums over head dims, so the order of dims,
        # the same for q and k, changes nothing; v and the output projection keep theirs.
        q_order = pair_halves(spec.n_q_heads, hd) if spec.rope else torch.zeros(0, dtype=torch.long)
        k_order = pair_halves(spec.n_kv_heads, hd) if spec.rope else torch.zeros(0, dtype=torch.long)
        self.register_buffer("_q_order", q_order, persistent=False)
        self.register_buffer("_k_order", k_order, persistent=False)
        self.register_buffer("_kv_index", torch.tensor(spec.kv_head_of_query), persistent=False)
        self.register_buffer("_q_index", torch.tensor(spec.query_head_of_kv), persistent=False)
        self.rule = Visibility(spec.causal, spec.window)
        # Decode folds query heads into groups per KV head: slot s of group g is query head
        # _fold_q[g, s] (a short group repeats its last head); _unfold picks each head's slot back.
        fold, unfold = _decode_folding(spec)
        self.register_buffer("_fold_q", fold, persistent=False)
        self.register_buffer("_unfold", unfold, persistent=False)
        self.last_backend: str | None = None
        self._mask_cache: dict = {}  # blocked-path masks and RoPE factors by shape; not state, not saved

    # -- projections: (B, N, d) -> (B, H, N, hd), roped by `rotation` (None: no RoPE) --
    def _project_qk(self, x, proj: nn.Linear, order: torch.Tensor, n_heads: int, rotation=None):
        if not self.spec.rope:
            return self._heads(proj(x), n_heads)
        # few tokens (decode): reorder the outputs; not while tracing, where a branch on the
        # length would pin torch.export's dynamic sequence length to one side of it
        if not _tracing() and x.shape[0] * x.shape[1] <= x.shape[2]:
            t = proj(x).index_select(-1, order)
        else:  # many tokens: reorder the (smaller) weight rows
            bias = None if proj.bias is None else proj.bias.index_select(0, order)
            t = F.linear(x, proj.weight.index_select(0, order), bias)
        t = t.unflatten(-1, (n_heads, self.spec.head_dim))
        if rotation is not None:
            t = rope_paired(t, rotation)
        return t.transpose(1, 2)

    # rotation: `_rotation` of the tokens' positions (None: no RoPE)
    def _q(self, x, rotation=None):
        return self._project_qk(x, self.q_proj, self._q_order, self.spec.n_q_heads, rotation)

    def _k(self, x, rotation=None):
        return self._project_qk(x, self.k_proj, self._k_order, self.spec.n_kv_heads, rotation)

    def _rotation(self, positions, dtype):
        return None if not self.spec.rope else rotation_factors(positions, self.spec.head_dim, dtype)

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

    def _global_kv(self, batch: int, k_seq=None, v_seq=None, dtype=None, attend=None):
        """Global tokens' keys and values, (B, H_kv, G, hd) each.

        Causal: projections of the learned tokens (they see nothing). Bidirectional: the
        tokens first attend to the whole sequence and themselves; their updated states
        (token + attention output) give the keys and values the sequence then reads.
        ``attend(q_g, k_g, v_g)`` runs that pass (default: over [k_seq; k_g], concatenated).
        """
        spec = self.spec
        tokens = self.global_tokens.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if not spec.causal:
            q_g = self._q(tokens)  # global tokens have no position: no RoPE
            k_g, v_g = self._k(tokens), self._heads(self.v_proj(tokens), spec.n_kv_heads)
            if attend is None:
                o_g = self._attend_all(q_g, torch.cat([k_seq, k_g], dim=2), torch.cat([v_seq, v_g], dim=2))
            else:
                o_g = attend(q_g, k_g, v_g)
            tokens = tokens + self.o_proj(self._merge(o_g))
        return (
            self._k(tokens),
            self._heads(self.v_proj(tokens), spec.n_kv_heads),
        )

    def _attend_all(self, q, k, v):
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        return F.scaled_dot_product_attention(q, k, v)

    def choose_backend(self, x: torch.Tensor) -> str:
        """The path forward takes for x: 'sdpa', 'sdpa-masked', 'blocked', 'flex' or 'flex-eager'."""
        spec, n = self.spec, x.shape[1]
        windowed = spec.window is not None and spec.window < n
        sparse = spec.window is not None or spec.n_global > 0
        if self.backend == "sdpa":
            return "sdpa-masked" if sparse else "sdpa"  # the spec's mask, densely: correct, O(N^2)
        if self.backend != "auto":
            return self.backend
        if not windowed and spec.n_global == 0:
            return "sdpa"
        if x.is_cuda and spec.head_dim >= FLEX_MIN_HEAD_DIM:
            return "flex"
        return "blocked" if windowed else "sdpa-masked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if x.dim() != 3 or x.shape[-1] != spec.d_model:
            raise ValueError(f"input must be (batch, N, d_model={spec.d_model}); got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        backend = self.choose_backend(x)
        rotation = None
        if spec.rope:  # the same for every call at this length: cached
            rotation = self._cached(("rope", n, str(x.device), x.dtype),
                                    lambda: self._rotation(torch.arange(n, device=x.device), x.dtype))
        # blocked, no grad: RoPE is applied while copying q and k into the blocked layout (one pass
        # instead of two); bidirectional, the global tokens' pass reads the blocked path's key
        # buffers instead of a concatenation of every key and value (see _blocked)
        inference = (backend == "blocked" and not _tracing() and x.dtype in (torch.float32, torch.float64)
                     and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))))
        in_buffers = inference and spec.n_global > 0 and not spec.causal
        late_rope = rotation if inference else None
        q, k = self._q(x, None if inference else rotation), self._k(x, None if inference else rotation)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        g_kv = self._global_kv(b, k, v, q.dtype) if spec.n_global and not in_buffers else None

        if backend == "sdpa":
            o, name = self._full(q, k, v)
        elif backend in ("flex", "flex-eager"):
            o, name = self._flex(q, k, v, g_kv, compiled=backend == "flex")
        elif backend == "blocked":
            o, name = self._blocked(q, k, v, g_kv, globals_in_buffers=in_buffers, rotation=late_rope)
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

    # -- the spec's mask, densely: full attention plus global tokens off CUDA, forced sdpa --
    def _masked(self, q, k, v, g_kv):
        n = q.shape[2]
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        n_global = 0
        if g_kv is not None:
            n_global = g_kv[0].shape[2]
            k = torch.cat([k, self._expand_kv(g_kv[0])], dim=2)
            v = torch.cat([v, self._expand_kv(g_kv[1])], dim=2)
        q_idx = torch.arange(n, device=q.device)[:, None]
        kv_idx = torch.arange(n + n_global, device=q.device)[None, :]
        mask = visibility_mask(self.rule, n, n_global)(None, None, q_idx, kv_idx)
        name = "sdpa-masked"
        if not _tracing():
            name += f"/{_sdp_kernel(q, k, v, attn_mask=mask)}"
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), name

    # -- sliding window without an N x N mask --
    def _blocked(self, q, k, v, g_kv, globals_in_buffers: bool = False, rotation=None):
        """rotation: RoPE still to apply to q and k (without grad: while laying them out)."""
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        if globals_in_buffers:
            plan = BlockedLayout.of(self.rule, q.shape[2], self.spec.n_global)
            kb, vb = self._buffers_with_globals(plan, k, v, rotation)
            grad = False
        else:
            gk = gv = None
            if g_kv is not None:
                gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
            # With grad, one call per phase and coarser blocks: in backward each slice of q, k, v
            # costs a full-size zero gradient (see BlockedLayout.of), more than a small mask saves
            grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gk, gv))
            plan = BlockedLayout.of(self.rule, q.shape[2], 0 if gk is None else gk.shape[2], grad)
            kb, vb = plan.keys(k, gk, rotation), plan.keys(v, gv)
        qb = plan.queries(q, rotation)
        pieces = self._slot_mask(plan, q.device, q.dtype, whole=grad)
        p = plan.phases
        outs = [[F.scaled_dot_product_attention(*_runs(a, z, qb[ph::p], kb[ph], vb[ph]), attn_mask=m.expand(z - a, -1, -1, -1))
                 for a, z, m in pieces[ph]] for ph in range(p)]
        name = "blocked"
        if not _tracing():
            a, z, m = pieces[0][0]
            name = f"blocked/{_sdp_kernel(qb[0:z * p:p], kb[0][:z], vb[0][:z], attn_mask=m.expand(z - a, -1, -1, -1))}"
        return plan.unblock(outs, q.shape), name

    def _buffers_with_globals(self, plan, k, v, rotation=None):
        """Bidirectional, no grad: key and value buffers (expanded heads) holding the global
        tokens' updated keys and values. The tokens' own pass reads the buffers while they hold
        the tokens' first keys and values (a mask shows each key once), then the updated ones
        are written over them: no concatenation of the sequence's keys and values."""
        buffers = []

        def attend(q_g, k_g, v_g):
            buffers.extend([plan.key_buffer(k, self._expand_kv(k_g), rotation), plan.key_buffer(v, self._expand_kv(v_g))])
            b, h, periods, period, hd = buffers[0].shape
            flat_k, flat_v = (t.view(b, h, periods * period, hd) for t in buffers)
            mask = self._cached(("whole", plan, str(k.device), k.dtype), lambda: plan.whole_sequence_mask(k.device, k.dtype))
            q_g = self._group(q_g, k_g, v_g, allow_native_gqa=False)[0]  # the buffers' heads are expanded already
            return F.scaled_dot_product_attention(q_g, flat_k, flat_v, attn_mask=mask.expand(b, h, q_g.shape[2], -1))

        gk, gv = self._global_kv(k.shape[0], dtype=k.dtype, attend=attend)
        plan.set_globals(buffers[0], self._expand_kv(gk))
        plan.set_globals(buffers[1], self._expand_kv(gv))
        return plan.phase_views(buffers[0]), plan.phase_views(buffers[1])

    def _cached(self, key, build):
        """A value of the per-shape cache (blocked-path masks, RoPE factors), built outside
        inference mode so that one first made under a no-grad timing can serve a later training step."""
        cached = None if _tracing() else self._mask_cache.get(key)
        if cached is not None:
            return cached
        with torch.inference_mode(False):
            value = build()
        if not _tracing():
            if len(self._mask_cache) >= 16:  # a few shapes at most: sweeps over N would grow it
                self._mask_cache.clear()
            self._mask_cache[key] = value
        return value

    def _slot_mask(self, plan, device, dtype, whole: bool):
        """The blocked path's additive masks (per phase, (start, stop, mask) pieces of its runs),
        cached per shape: building them each call cost as much as the attention itself on CPU."""
        return self._cached((plan, str(device), dtype, whole),
                            lambda: tuple(plan.pieces(self.rule, ph, device, dtype, whole) for ph in range(plan.phases)))

    # -- FlexAttention --
    def _flex(self, q, k, v, g_kv, compiled: bool):
        spec = self.spec
        n = q.shape[2]
        gqa_native = spec.grouping == "gqa" and spec.n_q_heads != spec.n_kv_heads
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=gqa_native)
        n_global = 0
        if g_kv is not None:
            gk, gv = g_kv if gqa else (self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1]))
            n_global = gk.shape[2]
            k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        block_mask = _flex_block_mask(self.rule, n, n_global, str(q.device))
        if not compiled:
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa), "flex-eager"
        return _run_compiled_flex(q, k, v, block_mask, gqa), "flex-compiled"

    # -- decode: one new token against the cache --
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty cache for up to `capacity` tokens (a window caps it at W), global tokens
        written in (causal: their keys and values never change, so a step does not recompute them)."""
        spec = self.spec
        if spec.window is not None:
            capacity = min(capacity, spec.window)
        shape = (batch, spec.n_kv_heads, spec.n_global + capacity, spec.head_dim)
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        cache = KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                        n_global=spec.n_global)
        if spec.n_global and spec.causal:
            with torch.no_grad():  # a decode cache is state, not part of a graph to train through
                gk, gv = self._global_kv(batch, dtype=dtype)
                cache.k[:, :, : spec.n_global] = gk
                cache.v[:, :, : spec.n_global] = gv
        return cache

    def prefill_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """Write the keys and values of a whole prompt x (B, N, d) into the cache."""
        spec = self.spec
        n = x.shape[1]
        k = self._k(x, self._rotation(torch.arange(n, device=x.device), x.dtype))
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        cap = cache.capacity
        keep = min(n, cap)
        slots = cache.n_global + torch.arange(n - keep, n, device=x.device) % cap
        cache.k[:, :, slots] = k[:, :, n - keep:]
        cache.v[:, :, slots] = v[:, :, n - keep:]
        cache.length = n

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token x (B, 1, d) at position cache.length; updates the cache in place.

        Reads the cache as it is (no copy, no host-to-device transfer per step): query heads are
        folded into groups per KV head, so grouped and uneven heads cost what their KV heads do.
        """
        spec = self.spec
        if not spec.causal:
            raise SpecError("decode needs causal=True: a bidirectional layer has no next token")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode takes one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        pos, cap = cache.length, cache.capacity
        if spec.window is None and pos >= cap:
            raise ValueError(f"KV cache is full: capacity {cap} tokens, position {pos}")
        position = torch.arange(pos, pos + 1, device=x.device)
        rotation = self._rotation(position, x.dtype)
        q, k = self._q(x, rotation), self._k(x, rotation)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        slot = cache.n_global + pos % cap
        cache.k[:, :, slot] = k[:, :, 0]
        cache.v[:, :, slot] = v[:, :, 0]
        cache.length = pos + 1
        end = cache.n_global + cache.filled
        ks, vs = cache.k[:, :, :end], cache.v[:, :, :end]
        if spec.n_q_heads > spec.n_kv_heads:
            o, name = self._decode_folded(q, ks, vs), "decode/sdpa-grouped"
        else:
            q, ks, vs, _ = self._group(q, ks, vs, allow_native_gqa=False)
            o, name = F.scaled_dot_product_attention(q, ks, vs), "decode/sdpa"
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))

    def _decode_folded(self, q, ks, vs):
        """One query token, no mask: each KV head's query heads become its query rows."""
        b, hd, h_kv = q.shape[0], self.spec.head_dim, self.spec.n_kv_heads
        rows = self._fold_q.shape[1]
        if self.spec.grouping == "gqa":  # equal contiguous groups: a view
            folded = q.view(b, h_kv, rows, hd)
        else:  # uneven groups: gather q (tiny), never the cache
            folded = q.index_select(1, self._fold_q.flatten()).view(b, h_kv, rows, hd)
        o = F.scaled_dot_product_attention(folded, ks, vs).reshape(b, h_kv * rows, hd)
        if self.spec.grouping != "gqa":
            o = o.index_select(1, self._unfold)
        return o.view(b, self.spec.n_q_heads, 1, hd)


def _runs(start: int, stop: int, *tensors):
    """Runs [start, stop) of each tensor; the tensors themselves when that is all of them (a
    slice, even a whole one, costs a full-size zero gradient in backward)."""
    if start == 0 and stop == tensors[0].shape[0]:
        return tensors
    return tuple(t[start:stop] for t in tensors)


def _check_forced_backend(spec: AttentionSpec, backend: str) -> None:
    """Refuse a forced backend that cannot run this spec, naming the field, value and choices."""
    if backend not in BACKENDS:
        raise SpecError(f"backend={backend!r} is not known: choose one of {', '.join(BACKENDS)}")
    if backend in ("flex", "flex-eager") and spec.window is None and spec.n_global == 0:
        raise SpecError(f"backend={backend!r} needs a window or global tokens (spec has window=None, "
                        "n_global=0): full attention runs on 'sdpa' or 'auto'")
    if backend == "flex" and spec.head_dim < FLEX_MIN_HEAD_DIM:
        raise SpecError(f"backend='flex' needs head_dim >= {FLEX_MIN_HEAD_DIM} (compiled FlexAttention, torch 2.13); "
                        f"spec has head_dim={spec.head_dim}: use 'auto', 'blocked' or 'flex-eager'")
    if backend == "blocked" and spec.window is None:
        raise SpecError("backend='blocked' needs a window (spec has window=None): use 'auto' or 'sdpa'")


def _decode_folding(spec: AttentionSpec):
    """Index maps for folding H_q query heads into (H_kv, rows) groups and back (H_q > H_kv)."""
    if spec.n_q_heads <= spec.n_kv_heads:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    groups = [[] for _ in range(spec.n_kv_heads)]
    for h, g in enumerate(spec.kv_head_of_query):
        groups[g].append(h)
    rows = max(len(members) for members in groups)
    fold = [members + [members[-1]] * (rows - len(members)) for members in groups]
    unfold = [g * rows + members.index(h) for g, members in enumerate(groups) for h in members]
    return torch.tensor(fold), torch.tensor(unfold)


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


# ----- FlexAttention ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _flex_block_mask(rule: Visibility, n: int, n_global: int, device: str) -> BlockMask:
    """BlockMask over keys [sequence (n); global tokens], from KV block indices.

    Built from the rule's block ranges (O((N/128)^2) integers), never by evaluating mask_mod
    over N x N pairs as an uncompiled create_block_mask does (hundreds of GB at N=131k). Built
    outside inference mode and without grad, so a mask cached during a no-grad timing can serve
    a later training step.
    """
    with torch.inference_mode(False), torch.no_grad():
        kv_num, kv_idx, full_num, full_idx = flex_kv_blocks(rule, n, n_global, device=device)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=visibility_mask(rule, n, n_global), seq_lengths=(n, n + n_global),
        )


def _flex_call(q, k, v, block_mask, enable_gqa):
    # is_compiling() is the constant True inside a compiled graph and False when this frame
    # runs eagerly, so the result itself says what ran.
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa), torch.compiler.is_compiling()


_COMPILED_FLEX: dict = {}


def _compiled_flex(signature):
    """One compiled callable per input signature, each on its own code object: dynamo keeps its
    cache and recompile count per code object, so a process sweeping many specs and shapes
    compiles each once instead of piling recompiles onto one function until it goes eager."""
    fn = _COMPILED_FLEX.get(signature)
    if fn is None:
        fresh = types.FunctionType(_flex_call.__code__.replace(), _flex_call.__globals__,
                                   f"_flex_call_{len(_COMPILED_FLEX)}")
        fn = _COMPILED_FLEX[signature] = torch.compile(fresh, dynamic=False, fullgraph=True)
    return fn


def _run_compiled_flex(q, k, v, block_mask, enable_gqa):
    if _tracing():  # already inside the caller's compiled graph
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and not q.is_cuda:
        raise NotImplementedError("compiled FlexAttention has no backward on CPU (torch 2.13): run it without "
                                  "grad (prefill) or train with backend='blocked' or 'auto'")
    signature = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), enable_gqa, needs_grad,
                 torch.is_inference_mode_enabled(), block_mask.seq_lengths, id(block_mask.mask_mod))
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out, compiled = _compiled_flex(signature)(q, k, v, block_mask, enable_gqa)
    except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
        raise FlexFallbackError(f"compiled FlexAttention hit dynamo's recompile limit and would run eagerly: {exc}") from exc
    except RuntimeError as exc:  # fullgraph=True's own check when every frame was skipped
        if "no compiled frames" not in str(exc):
            raise
        raise FlexFallbackError(f"compiled FlexAttention ran eagerly (torch.compile disabled?): {exc}"[:600]) from exc
    if not compiled:
        raise FlexFallbackError(
            "compiled FlexAttention ran eagerly (torch.compile disabled? TORCH_COMPILE_DISABLE or "
            "torch._dynamo.config.disable): refused, eager flex materialises N x N; use backend='blocked'"
        )
    return out
