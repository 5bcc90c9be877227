"""The visibility rule, defined once: which keys a query may read (causal, window, global tokens).

Every path that needs the rule takes it from here: the blocked path's layout and additive
masks (`BlockedLayout`), the FlexAttention ``mask_mod`` and its block indices, and the analytic
counts of `AttentionSpec` (FLOPs over visible pairs). Only the float64 reference in `sqa_search.layer.reference` writes the
rule out again, on purpose, so that it can catch a mistake here.

The rule (see `AttentionSpec`): key j of the sequence is visible to query i iff
``i - back <= j <= i + ahead`` where

* ``back``  = W - 1 with a window, else unbounded;
* ``ahead`` = 0 when causal; W - 1 bidirectional with a window; else unbounded.

So a causal window admits W keys (the query's own included) and a bidirectional one 2W - 1.
(attention-gym's ``q - kv <= W`` admits W + 1: this package's W is one smaller in that sense.)
Global tokens sit after the sequence in the key axis (index >= n_seq) and every query reads them.

Mask functions follow attention-gym's style: small functions that return a
``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, composed with `and_masks` / `or_masks`. They use
only tensor operators, so they broadcast over index grids (the blocked path) and trace under
torch.compile (FlexAttention); this module needs torch only where it builds tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported inside the functions that build tensors: `spec` imports this module for
# its counts, and importing `spec` must not pay for importing torch (see sqa_search/__init__).

__all__ = [
    "BlockedLayout",
    "Visibility",
    "and_masks",
    "or_masks",
    "causal_mask",
    "sliding_window_mask",
    "sequence_keys",
    "global_keys",
    "visibility_mask",
    "visible_pairs",
    "flex_kv_blocks",
]

FLEX_BLOCK = 128  # FlexAttention's default sparse block (torch 2.13)
# Smallest query block of the blocked path, without and with grad: tiny windows would
# otherwise mean many tiny matmuls whose overhead dominates; a larger block wastes a little
# arithmetic instead.
MIN_BLOCK, MIN_BLOCK_GRAD = 32, 64


@dataclass(frozen=True)
class Visibility:
    """The rule's parameters: how far back and ahead a query sees (None: unbounded)."""

    causal: bool
    window: int | None = None

    @property
    def back(self) -> int | None:
        return None if self.window is None else self.window - 1

    @property
    def ahead(self) -> int | None:
        if self.causal:
            return 0
        return None if self.window is None else self.window - 1

    def key_span(self, q: int, n_seq: int) -> tuple[int, int]:
        """First and last sequence key query q sees (inclusive), clipped to [0, n_seq)."""
        lo = 0 if self.back is None else max(0, q - self.back)
        hi = n_seq - 1 if self.ahead is None else min(n_seq - 1, q + self.ahead)
        return lo, hi


# ----- composable mask_mods (attention-gym style) ------------------------------------------
def and_masks(*mods):
    def mask_mod(b, h, q_idx, kv_idx):
        result = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return mask_mod


def or_masks(*mods):
    def mask_mod(b, h, q_idx, kv_idx):
        result = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return mask_mod


def causal_mask():
    """Keys at or before the query."""
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


def sliding_window_mask(window: int, causal: bool):
    """Keys within the window: ``q - kv < W`` (causal: the causal mask adds ``kv <= q``);
    bidirectional ``|q - kv| < W``."""
    if causal:
        return lambda b, h, q_idx, kv_idx: q_idx - kv_idx < window
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < window


def sequence_keys(n_seq: int):
    """Keys of the sequence itself (index < n_seq), not padding or global tokens."""
    return lambda b, h, q_idx, kv_idx: (kv_idx >= 0) & (kv_idx < n_seq)


def global_keys(n_seq: int, n_global: int):
    """The global tokens, placed after the sequence in the key axis."""
    return lambda b, h, q_idx, kv_idx: (kv_idx >= n_seq) & (kv_idx < n_seq + n_global)


def visibility_mask(rule: Visibility, n_seq: int, n_global: int = 0):
    """The whole rule as one mask_mod over keys ``[sequence (n_seq); global tokens]``."""
    parts = [sequence_keys(n_seq)]
    if rule.causal:
        parts.append(causal_mask())
    if rule.window is not None:
        parts.append(sliding_window_mask(rule.window, rule.causal))
    seq = and_masks(*parts)
    return or_masks(seq, global_keys(n_seq, n_global)) if n_global else seq


# ----- analytic counts ---------------------------------------------------------------------
def _sum_min(n: int, cap: int | None) -> int:
    """sum over i in [0, n) of min(i, cap)."""
    if cap is None or cap >= n - 1:
        return n * (n - 1) // 2
    return cap * (cap + 1) // 2 + (n - 1 - cap) * cap


def visible_pairs(rule: Visibility, n_seq: int) -> int:
    """(query, key) pairs among the sequence's tokens the rule admits, exactly.

    Query i sees ``1 + min(i, back) + min(n - 1 - i, ahead)`` keys (its span, clipped at both
    ends); summed over i.
    """
    return n_seq + _sum_min(n_seq, rule.back) + _sum_min(n_seq, rule.ahead)


# ----- FlexAttention block indices ---------------------------------------------------------
def flex_kv_blocks(rule: Visibility, n_seq: int, n_global: int, block: int = FLEX_BLOCK, device=None):
    """KV block indices of the rule over keys [sequence; globals], without an N x N mask.

    Returns ``kv_num_blocks, kv_indices, full_num_blocks, full_indices`` shaped like
    `BlockMask.from_kv_blocks` wants them ((1, 1, Q blocks[, KV blocks]) int32). A block is
    "full" (no mask_mod needed) only when every query row of the query block sees every key
    of the KV block and both lie wholly inside the sequence; every other touched block is
    partial and gets the mask_mod. Work and memory are O((N / block)^2) integers.
    """
    import torch

    n_kv = n_seq + n_global
    nq, nkv = -(-n_seq // block), -(-n_kv // block)
    q_first = torch.arange(nq, device=device) * block
    q_last = torch.clamp(q_first + block - 1, max=n_seq - 1)
    k_first = (torch.arange(nkv, device=device) * block)[None, :]
    k_last = torch.clamp(k_first + block - 1, max=n_kv - 1)
    # spans are monotone in q: a block's first query has the lowest lo and hi, its last the highest
    def lo(q):
        return torch.zeros_like(q) if rule.back is None else torch.clamp(q - rule.back, min=0)

    def hi(q):
        return torch.full_like(q, n_seq - 1) if rule.ahead is None else torch.clamp(q + rule.ahead, max=n_seq - 1)

    lo_of_first, lo_of_last, hi_of_first, hi_of_last = lo(q_first), lo(q_last), hi(q_first), hi(q_last)
    in_seq = k_first < n_seq
    touches_seq = in_seq & (k_first <= hi_of_last[:, None]) & (torch.clamp(k_last, max=n_seq - 1) >= lo_of_first[:, None])
    touches_global = (k_last >= n_seq) & (n_global > 0)
    touched = touches_seq | touches_global
    full = (in_seq & (k_last < n_seq) & (q_last - q_first + 1 == block)[:, None]
            & (lo_of_last[:, None] <= k_first) & (hi_of_first[:, None] >= k_last))
    partial = touched & ~full
    return (*_indices(partial), *_indices(full))


def _indices(blocks: torch.Tensor):
    """(nq, nkv) bool -> counts (1, 1, nq) and indices (1, 1, nq, nkv), chosen blocks first."""
    import torch

    counts = blocks.sum(-1, dtype=torch.int32)
    # a stable sort puts the chosen block indices first, in increasing order
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts[None, None], order[None, None]


# ----- the blocked path's layout --------------------------------------------------------------
def _write(dest: torch.Tensor, src: torch.Tensor, rotation: torch.Tensor | None = None) -> None:
    """dest[...] = src, or src with RoPE applied on the way (one pass instead of two): dims in
    pair order, rotation the complex (tokens, hd / 2) factors of src's tokens (see attention)."""
    import torch

    if rotation is None:
        dest.copy_(src)
        return
    half = src.shape[-1] // 2
    torch.mul(torch.view_as_complex(src.unflatten(-1, (half, 2))), rotation,
              out=torch.view_as_complex(dest.unflatten(-1, (half, 2))))


def _rotated(src: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """src with RoPE applied out of place (the path with grad: out= has no backward)."""
    import torch

    if rotation is None:
        return src
    half = src.shape[-1] // 2
    return torch.view_as_real(torch.view_as_complex(src.unflatten(-1, (half, 2))) * rotation).flatten(-2)


def _fill_slots(slots: torch.Tensor, k: torch.Tensor, offset: int, rotation=None) -> None:
    """Write k (B, H, N, hd) (rotated by `rotation`, if given) into slots (B, H, periods, width, hd)
    read as one row of periods * width positions starting at `offset`; zero the positions before
    and after. Three slice copies: the first period's part, the whole periods, the last period's part."""
    n, width = k.shape[2], slots.shape[3]

    def rot(a, b, *shape):
        return None if rotation is None else rotation[a:b].view(*shape, rotation.shape[-1])

    slots[:, :, 0, :offset] = 0
    first = min(n, width - offset)
    _write(slots[:, :, 0, offset:offset + first], k[:, :, :first], rot(0, first, first))
    whole = (n - first) // width
    _write(slots[:, :, 1:1 + whole], k[:, :, first:first + whole * width].unflatten(2, (whole, width)),
           rot(first, first + whole * width, whole, width))
    done, period = first + whole * width, 1 + whole  # keys left over start period `period` (n > first)
    if done < n:
        _write(slots[:, :, period, :n - done], k[:, :, done:], rot(done, n, n - done))
    end = offset + n  # position after the last key
    if end // width < slots.shape[2]:
        slots[:, :, end // width, end % width:] = 0
        slots[:, :, end // width + 1:] = 0


@dataclass(frozen=True)
class BlockedLayout:
    """The blocked path's layout for one sequence length.

    Queries: nb blocks of blk tokens. Query block i reads the key blocks i - before .. i + after
    (p = before + 1 + after blocks, enough for the window) and the G global tokens. Keys live
    in one buffer of periods, each [G globals; p key blocks], so that any p consecutive key
    blocks plus exactly one copy of the globals are one contiguous run of P = p*blk + G keys.
    Query blocks of the same phase (i mod p) read non-overlapping runs at a fixed stride P, so
    each phase is one SDPA call on a plain view: no copy per block, and the globals are scored
    once per query row, not p times.
    """

    n: int
    n_global: int
    blk: int
    before: int
    after: int

    @classmethod
    def of(cls, rule: Visibility, n: int, n_global: int, grad: bool = False) -> "BlockedLayout":
        # Smaller blocks waste fewer keys (a row scores p*blk + G keys; at W=128, G=16,
        # bidirectional: 304 with blocks of W/4, 336 of W/2, 432 of W; causal 176, 208, 288).
        # Forward only, blocks of ~W/4: measured fastest at W=128 on CPU (1 thread). With grad,
        # ~W/2: backward pays a full-size zero gradient per phase's slice of q, k and v, and W/4
        # blocks have 9 phases instead of 5 (measured 1.35-1.54x slower fwd+bwd). A multiple of 16
        # keeps SDPA's inner loops whole.
        size, smallest = (2, MIN_BLOCK_GRAD) if grad else (4, MIN_BLOCK)
        blk = -(-max(smallest, -(-rule.window // size)) // 16) * 16
        return cls(n, n_global, blk, -(-rule.back // blk), -(-rule.ahead // blk))

    @property
    def phases(self) -> int:
        return self.before + 1 + self.after

    @property
    def nb(self) -> int:
        """Query blocks, padded to a whole number of phases."""
        return -(-self.n // (self.blk * self.phases)) * self.phases

    @property
    def period(self) -> int:
        return self.n_global + self.phases * self.blk

    def queries(self, q: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, N, hd) -> (nb, B*H, blk, hd): one copy (without grad: RoPE by `rotation` on the
        way, see `_write`), only the padded tail rows zeroed."""
        import torch
        import torch.nn.functional as F

        b, h, n, hd = q.shape
        if torch.is_grad_enabled() and q.requires_grad:  # a slice write would clone the gradient in backward
            out = F.pad(_rotated(q, rotation), (0, 0, 0, self.nb * self.blk - n))
        else:
            out = q.new_empty(b, h, self.nb * self.blk, hd)
            _write(out[:, :, :n], q, rotation)
            out[:, :, n:] = 0
        return out.reshape(b * h, self.nb, self.blk, hd).transpose(0, 1)

    def keys(self, k: torch.Tensor, g: torch.Tensor | None, rotation: torch.Tensor | None = None) -> list:
        """(B, H, N, hd) keys (+ (B, H, G, hd) globals) -> per phase, (nb / p, B*H, P, hd) views."""
        return self.phase_views(self.key_buffer(k, g, rotation))

    def key_buffer(self, k: torch.Tensor, g: torch.Tensor | None, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """The keys' buffer of periods [G globals; p key blocks], (B, H, periods, P, hd).

        Without grad each key is copied once (RoPE by `rotation` on the way, see `_write`) and
        only the padding is zeroed (pad, then concatenate, copies the keys twice and zeroes the
        whole padded tensor first)."""
        import torch
        import torch.nn.functional as F

        b, h, n, hd = k.shape
        periods = self.nb // self.phases + 1  # phases past 0 start inside a period and run into the next
        width = self.phases * self.blk  # sequence slots per period
        if torch.is_grad_enabled() and (k.requires_grad or (g is not None and g.requires_grad)):
            # in backward, each slice write would clone the whole buffer's gradient: pad + concatenate
            seq = F.pad(_rotated(k, rotation), (0, 0, self.before * self.blk, periods * width - self.before * self.blk - n))
            seq = seq.reshape(b, h, periods, width, hd)
            return seq if g is None else torch.cat([g.unsqueeze(2).expand(-1, -1, periods, -1, -1), seq], dim=3)
        buffer = k.new_empty(b, h, periods, self.period, hd)
        if g is not None:
            self.set_globals(buffer, g)
        _fill_slots(buffer[:, :, :, self.n_global:], k, self.before * self.blk, rotation)
        return buffer

    def set_globals(self, buffer: torch.Tensor, g: torch.Tensor) -> None:
        """Write the globals (B, H, G, hd) into every period of a key buffer, in place."""
        buffer[:, :, :, :self.n_global] = g.unsqueeze(2)

    def phase_views(self, buffer: torch.Tensor) -> list:
        """A key buffer -> per phase, (nb / p, B*H, P, hd) views of it."""
        b, h, periods, period, hd = buffer.shape
        flat = buffer.reshape(b * h, periods * period, hd)
        runs = self.nb // self.phases
        return [flat[:, start:start + runs * period].reshape(b * h, runs, period, hd).transpose(0, 1)
                for start in map(self._start, range(self.phases))]

    def whole_sequence_mask(self, device, dtype) -> torch.Tensor:
        """Additive mask (1, 1, 1, periods * P) over a flattened key buffer that shows every key
        of the sequence once and the first period's copy of the globals: lets the global tokens'
        own queries read the buffer instead of a concatenation of the keys."""
        import torch

        periods = self.nb // self.phases + 1
        pos = torch.arange(periods * self.period, device=device)
        period, offset = pos // self.period, pos % self.period
        token = period * (self.phases * self.blk) + offset - self.n_global - self.before * self.blk
        visible = torch.where(offset < self.n_global, period == 0, (token >= 0) & (token < self.n))
        return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf")).view(1, 1, 1, -1)

    def _start(self, phase: int) -> int:
        """Buffer offset of a phase's first run: phase 0 starts at a copy of the globals."""
        return 0 if phase == 0 else self.n_global + phase * self.blk

    def unblock(self, outs: list, shape) -> torch.Tensor:
        """Per phase, its outputs in run order (pieces of (runs, B*H, blk, hd), see `pieces`) ->
        (B, H, N, hd), a view of a (B, N, H, hd) tensor: the one copy here is the layout the
        output projection reads (query block i is phase i mod p)."""
        import torch

        b, h, n, hd = shape
        if all(len(pieces) == 1 for pieces in outs):  # one call per phase (with grad): stack them
            tokens_first = [o.view(-1, b, h, self.blk, hd).permute(1, 0, 3, 2, 4) for (o,) in outs]
            merged = torch.stack(tokens_first, dim=2).reshape(b, self.nb * self.blk, h, hd)
            return merged[:, :n].transpose(1, 2)
        merged = outs[0][0].new_empty(b, self.nb // self.phases, self.phases, self.blk, h, hd)
        for phase, pieces in enumerate(outs):
            start = 0
            for o in pieces:
                runs = o.shape[0]
                merged[:, start:start + runs, phase] = o.view(runs, b, h, self.blk, hd).permute(1, 0, 3, 2, 4)
                start += runs
        return merged.view(b, self.nb * self.blk, h, hd)[:, :n].transpose(1, 2)

    def interior(self, phase: int) -> tuple[int, int]:
        """Runs [lo, hi) of a phase whose query block and key blocks lie wholly inside the
        sequence: their masks are all the same (the window's band and the globals' columns)."""
        runs, p = self.nb // self.phases, self.phases
        lo = min(runs, max(0, -(-(self.before - phase) // p)))
        hi = (self.n // self.blk - self.after - 1 - phase) // p + 1
        return lo, max(lo, min(runs, hi))

    def pieces(self, rule: Visibility, phase: int, device, dtype, whole: bool = False) -> list:
        """A phase's runs as (start, stop, additive mask) pieces: the interior runs share one
        (1, 1, blk, P) mask row, broadcast (a small mask stays in cache: measured ~10% faster
        SDPA on CPU than one mask per run); the few edge runs keep their own. ``whole``: one
        piece, a mask per run."""
        full = self.mask(rule, phase, device, dtype)
        if whole:
            return [(0, len(full), full)]
        lo, hi = self.interior(phase)
        parts = [(0, lo, full[:lo].clone()), (lo, hi, full[lo:lo + 1].clone()), (hi, len(full), full[hi:].clone())]
        return [(start, stop, m) for start, stop, m in parts if stop > start]

    def key_index(self, phase: int, device=None):
        """Query positions (runs, 1, blk, 1) of one phase and, for each position of their runs,
        the key's index in the rule's key axis [sequence; globals] (runs, 1, 1, P), -1 for padding."""
        import torch

        n, g, blk, p = self.n, self.n_global, self.blk, self.phases
        block = (torch.arange(self.nb // p, device=device) * p + phase).view(-1, 1, 1, 1)  # query block index
        q_idx = block * blk + torch.arange(blk, device=device).view(1, 1, blk, 1)
        col = torch.arange(self.period, device=device)
        g_start = 0 if phase == 0 else (p - phase) * blk  # where this phase's runs hold the globals
        is_global = (col >= g_start) & (col < g_start + g)
        t = torch.where(col < g_start, col, col - g)  # position among the run's p key blocks
        token = (block + t // blk - self.before) * blk + t % blk
        kv_idx = torch.where(is_global, n + col - g_start, torch.where(token < n, token, torch.full_like(token, -1)))
        return q_idx, kv_idx

    def mask(self, rule: Visibility, phase: int, device, dtype) -> torch.Tensor:
        """Additive mask (0 visible, -inf hidden) of one phase, (runs, 1, blk, P): the rule
        applied to `key_index`."""
        import torch

        q_idx, kv_idx = self.key_index(phase, device)
        visible = visibility_mask(rule, self.n, self.n_global)(None, None, q_idx, kv_idx)
        visible = visible | (q_idx >= self.n)  # padded query rows: anything, so no row is empty (discarded)
        return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
