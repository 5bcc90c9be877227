"""A plain float64 reference for the attention layer: a loop over heads with a dense masked softmax.

Written out from the documented conventions (head grouping, RoPE, window, global tokens) and
sharing no code path with the layer, so the tests and `sqa-search doctor` can hold every fast
path against it. Dense: for small N only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference"]

def _rope(x, positions):
    hd = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = positions.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = hd // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _visible(i, j, spec):
    if spec.causal:
        return j <= i and (spec.window is None or i - j < spec.window)
    return spec.window is None or abs(i - j) < spec.window


def _lin(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def _attend(q_heads, k_heads, v_heads, spec, allowed):
    """q_heads: list over attention heads of (N_q, hd); allowed: (N_q, N_k) bool."""
    outs = []
    for qh, kh, vh in zip(q_heads, k_heads, v_heads):
        scores = qh @ kh.T / math.sqrt(spec.head_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ vh)
    return torch.cat(outs, -1)


def _head_pairs(spec):
    """(query head, kv head) per attention head, written out from the documented rule."""
    if spec.n_q_heads >= spec.n_kv_heads:
        return [(h, h * spec.n_kv_heads // spec.n_q_heads) for h in range(spec.n_q_heads)]
    return [(g * spec.n_q_heads // spec.n_kv_heads, g) for g in range(spec.n_kv_heads)]


def reference(layer, x):
    """x: (B, N, d) float64 with requires_grad; the layer's weights are used in float64."""
    spec, hd = layer.spec, layer.spec.head_dim
    outs = []
    for xb in x:
        n = xb.shape[0]
        q, k, v = _lin(xb, layer.q_proj), _lin(xb, layer.k_proj), _lin(xb, layer.v_proj)
        split = lambda t: [t[:, i * hd:(i + 1) * hd] for i in range(t.shape[1] // hd)]
        qs, ks, vs = split(q), split(k), split(v)
        if spec.rope:
            pos = torch.arange(n)
            qs, ks = [_rope(t, pos) for t in qs], [_rope(t, pos) for t in ks]
        pairs = _head_pairs(spec)
        allowed = torch.tensor([[_visible(i, j, spec) for j in range(n)] for i in range(n)])
        if spec.n_global:
            g = layer.global_tokens
            if not spec.causal:  # globals read the sequence and themselves first
                gq, gk, gv = split(_lin(g, layer.q_proj)), split(_lin(g, layer.k_proj)), split(_lin(g, layer.v_proj))
                all_k = [torch.cat([ks[i], gk[i]]) for i in range(len(ks))]
                all_v = [torch.cat([vs[i], gv[i]]) for i in range(len(vs))]
                every = torch.ones(spec.n_global, n + spec.n_global, dtype=torch.bool)
                o_g = _attend([gq[a] for a, _ in pairs], [all_k[b] for _, b in pairs],
                              [all_v[b] for _, b in pairs], spec, every)
                g = g + _lin(o_g, layer.o_proj)
            gk, gv = split(_lin(g, layer.k_proj)), split(_lin(g, layer.v_proj))
            ks = [torch.cat([ks[i], gk[i]]) for i in range(len(ks))]
            vs = [torch.cat([vs[i], gv[i]]) for i in range(len(vs))]
            allowed = torch.cat([allowed, torch.ones(n, spec.n_global, dtype=torch.bool)], 1)
        o = _attend([qs[a] for a, _ in pairs], [ks[b] for _, b in pairs], [vs[b] for _, b in pairs], spec, allowed)
        outs.append(_lin(o, layer.o_proj))
    return torch.stack(outs)
