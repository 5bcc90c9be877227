"""The visibility rule, defined once: which keys a query may read (causal, window, global tokens).

Every path that needs the rule takes it from here: the blocked path's additive mask, the
FlexAttention ``mask_mod`` and its block indices, and the analytic counts of `AttentionSpec`
(FLOPs over visible pairs). Only the float64 reference in `sqa_search.reference` writes the
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
torch.compile (FlexAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
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
    counts = blocks.sum(-1, dtype=torch.int32)
    # a stable sort puts the chosen block indices first, in increasing order
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts[None, None], order[None, None]
