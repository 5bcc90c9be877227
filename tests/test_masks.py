"""The visibility rule against a brute-force reading of its definition; the block indices
FlexAttention gets against a dense classification of every block."""

import pytest
import torch

from sqa_search.layer.masks import BlockedLayout, Visibility, flex_kv_blocks, visibility_mask, visible_pairs

RULES = [Visibility(c, w) for c in (True, False) for w in (None, 1, 3, 8, 13)]


def _by_definition(rule, i, j, n, n_global):
    """The rule as AttentionSpec's docstring states it, written out per pair."""
    if j >= n:
        return j < n + n_global
    if rule.causal:
        return j <= i and (rule.window is None or i - j < rule.window)
    return rule.window is None or abs(i - j) < rule.window


def _dense(rule, n, n_global):
    q = torch.arange(n)[:, None]
    kv = torch.arange(n + n_global)[None, :]
    return visibility_mask(rule, n, n_global)(None, None, q, kv).expand(n, n + n_global)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_mask_mod_and_counts_follow_the_definition(rule):
    n, g = 21, 2
    dense = _dense(rule, n, g)
    expected = torch.tensor([[_by_definition(rule, i, j, n, g) for j in range(n + g)] for i in range(n)])
    assert torch.equal(dense, expected)
    assert visible_pairs(rule, n) == int(dense[:, :n].sum())
    for i in (0, 7, n - 1):  # the span form the block indices use
        lo, hi = rule.key_span(i, n)
        assert dense[i, :n].nonzero().flatten().tolist() == list(range(lo, hi + 1))


def test_window_sizes_admit_w_and_2w_minus_1_keys():
    # the package's convention (attention-gym's q - kv <= W admits one more)
    assert int(_dense(Visibility(True, 4), 20, 0)[10].sum()) == 4
    assert int(_dense(Visibility(False, 4), 20, 0)[10].sum()) == 7


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("n,n_global", [(40, 0), (37, 3), (32, 8)])
def test_flex_block_indices_match_a_dense_classification(rule, n, n_global):
    """Touched blocks are exactly those with a visible pair; 'full' only where every pair is
    visible and the block lies inside the sequence (a wrong 'full' would skip the mask)."""
    block = 8
    dense = _dense(rule, n, n_global)
    nq, nkv = -(-n // block), -(-(n + n_global) // block)
    kv_num, kv_idx, full_num, full_idx = flex_kv_blocks(rule, n, n_global, block=block)
    assert kv_idx.shape == (1, 1, nq, nkv)
    for i in range(nq):
        partial = set(kv_idx[0, 0, i, : kv_num[0, 0, i]].tolist())
        full = set(full_idx[0, 0, i, : full_num[0, 0, i]].tolist())
        assert not partial & full
        for j in range(nkv):
            tile = dense[i * block:(i + 1) * block, j * block:(j + 1) * block]
            if not tile.any():
                assert j not in partial | full, (i, j)
            elif j in full:
                assert tile.all() and tile.shape == (block, block) and (j + 1) * block <= n, (i, j)
            else:
                assert j in partial, (i, j)
    # a window smaller than a block still leaves interior blocks full when it covers them
    if rule.window is None and not rule.causal:
        assert int(full_num.sum()) > 0


def test_block_indices_at_131k_are_quadratic_in_blocks_not_tokens():
    kv_num, kv_idx, full_num, full_idx = flex_kv_blocks(Visibility(False, 128), 131072, 16)
    assert kv_idx.shape == (1, 1, 1024, 1025) and kv_idx.dtype == torch.int32
    # each query block touches its neighbours and the global tokens' block: a handful, not 1025
    assert int(kv_num.max()) + int(full_num.max()) <= 4


@pytest.mark.parametrize("rule", [r for r in RULES if r.window is not None], ids=str)
@pytest.mark.parametrize("n,n_global", [(150, 0), (401, 3)])
def test_blocked_layout_shows_each_query_exactly_its_keys_once(rule, n, n_global):
    """Rebuilt from the blocked path's runs and masks, every query row sees each key the rule
    admits exactly once (the globals too, though every run holds a copy) and nothing else."""
    layout = BlockedLayout.of(rule, n, n_global)
    seen = torch.zeros(n, n + n_global, dtype=torch.long)
    for phase in range(layout.phases):
        q_idx, kv_idx = layout.key_index(phase)
        visible = layout.mask(rule, phase, None, torch.float32) == 0
        rows, cols = q_idx.expand_as(visible), kv_idx.expand_as(visible)
        keep = visible & (rows < n)
        assert (cols[keep] >= 0).all()
        seen.index_put_((rows[keep], cols[keep]), torch.ones(int(keep.sum()), dtype=torch.long), accumulate=True)
    assert torch.equal(seen, _dense(rule, n, n_global).long())


@pytest.mark.parametrize("rule", [r for r in RULES if r.window is not None], ids=str)
@pytest.mark.parametrize("n,n_global", [(150, 0), (401, 3), (2000, 2)])
def test_blocked_pieces_broadcast_one_mask_over_the_interior_runs(rule, n, n_global):
    """The pieces the blocked path runs (edge runs with their own masks, interior runs sharing
    one broadcast row) rebuild every phase's full per-run mask exactly."""
    layout = BlockedLayout.of(rule, n, n_global)
    interior_runs = 0
    for phase in range(layout.phases):
        full = layout.mask(rule, phase, None, torch.float32)
        pieces = layout.pieces(rule, phase, None, torch.float32)
        assert [(a, z) for a, z, _ in pieces] == list(zip([0] + [z for _, z, _ in pieces[:-1]], [z for _, z, _ in pieces]))
        rebuilt = torch.cat([m.expand(z - a, -1, -1, -1) for a, z, m in pieces])
        assert torch.equal(rebuilt, full)
        lo, hi = layout.interior(phase)
        interior_runs += hi - lo
    assert interior_runs > 0 or n < 400


@pytest.mark.parametrize("n", [1, 37, 150, 160, 401])
def test_key_buffer_written_in_place_matches_pad_and_concatenate(n):
    """Without grad the key buffer is written slice by slice (RoPE applied on the way); with grad
    it is padded and concatenated: the same buffer, position for position, padding included."""
    layout = BlockedLayout.of(Visibility(causal=False, window=13), n, 3)
    k, g = torch.randn(2, 3, n, 8), torch.randn(2, 3, 3, 8)
    rotation = torch.polar(torch.ones(n, 4), torch.rand(n, 4) * 6.3)
    roped = torch.view_as_real(torch.view_as_complex(k.unflatten(-1, (4, 2))) * rotation).flatten(-2)
    with torch.no_grad():
        in_place, in_place_roped = layout.key_buffer(k, g), layout.key_buffer(k, g, rotation)
    padded = layout.key_buffer(k.clone().requires_grad_(), g).detach()
    padded_roped = layout.key_buffer(k.clone().requires_grad_(), g, rotation).detach()
    assert torch.equal(in_place, padded)
    assert torch.equal(in_place_roped, padded_roped)
    assert torch.equal(in_place_roped, layout.key_buffer(roped, g))
