"""The phases (kernels) of one step of an `AttentionSpec`: FLOPs, bytes and launches of each.

`layer_phases` adds the attention layer's phases to a `Builder`, mirroring the path
`SparseQueryAttention` takes on a device type (or, without one, the algorithm's ideal counts);
`sqa_search.speed.cost` adds the block and model around it and turns phases into time. The
counting conventions are described in `sqa_search.speed.cost`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..layer.masks import BlockedLayout, Visibility
from ..layer.spec import AttentionSpec

__all__ = ["Phase", "Builder", "layer_phases", "norm", "attention_path", "flex_pairs", "CPU_FLASH_KV_SPLIT",
           "FLEX_MIN_HEAD_DIM", "SOFTMAX_FLOPS_PER_PAIR"]

# Kernel facts the implementation-mirroring counts rely on (see sqa_search.speed.cost's docstring).
CPU_FLASH_KV_SPLIT = 512  # torch's CPU flash kernel walks keys in blocks of 512
# attention.FLEX_MIN_HEAD_DIM (not imported: attention imports torch, this module must not):
# below it, auto takes the blocked path on CUDA too. tests/test_cost.py checks they agree.
FLEX_MIN_HEAD_DIM = 16
SOFTMAX_FLOPS_PER_PAIR = 5


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


class Builder:
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


def flex_pairs(spec: AttentionSpec, n: int, tile: int) -> int:
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


def attention_path(spec: AttentionSpec, n: int, device_type: str | None) -> str:
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


def _rope_phases(b: Builder, spec: AttentionSpec, rows: int, positions: int, impl: bool, p: str,
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


def _decode_phases(b: Builder, spec: AttentionSpec, batch: int, n: int, impl: bool, p: str) -> str:
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


def _global_phases(b: Builder, spec: AttentionSpec, batch: int, n: int, impl: bool, p: str,
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


def _blocked_phases(b: Builder, spec: AttentionSpec, batch: int, n: int, heads: int, p: str,
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


def _grad_layout_copies(b: Builder, lay: BlockedLayout, batch: int, n: int, scale: int, p: str) -> None:
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


def _forward_only_copies(b: Builder, spec, lay: BlockedLayout, batch: int, n: int, heads: int, scale: int, p: str,
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


def layer_phases(b: Builder, spec, batch, n, mode, device_type, peak_key, tile, prefix="attn.") -> str:
    """Attention layer phases into builder `b`; returns the attention path name."""
    eb = b.eb
    impl = device_type is not None
    d, hd, g = spec.d_model, spec.head_dim, spec.n_global
    hq, hkv, heads = spec.n_q_heads, spec.n_kv_heads, spec.n_attn_heads
    decode = mode == "decode"
    rows = batch if decode else batch * n  # tokens going through the projections
    p = prefix

    path = "decode" if decode else attention_path(spec, n, device_type)
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
    pairs, q_len, k_len, mask_bytes, calls = _kernel_pairs(b, spec, batch, n, mode, path, device_type, tile, lay,
                                                           kv_heads_read, late, globals_in_buffers, p)
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


def _kernel_pairs(b: Builder, spec, batch, n, mode, path, device_type, tile, lay, kv_heads_read, late,
                  globals_in_buffers, p) -> tuple:
    """(pairs per (batch, head), query rows, key rows, mask bytes, calls) of the attention kernel
    on `path`, adding the path's own copies and masks to `b`."""
    eb, g, heads, hd = b.eb, spec.n_global, spec.n_attn_heads, spec.head_dim
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
        pairs = flex_pairs(spec, n, tile)
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

    return pairs, q_len, k_len, mask_bytes, calls


def norm(b: Builder, name, rows, d, impl):
    # RMSNorm: read x (twice in eager: square-mean, then scale), write y
    b.elementwise(name, b.eb * (3 if impl else 2) * rows * d, 4 * rows * d, 3 if impl else 1)
