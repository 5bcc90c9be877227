"""Rotary position embeddings (RoPE), rotate-half (GPT-NeoX) layout: the tables, the eager formula,
and the paired form the attention layer uses (one complex multiply per rotated pair)."""

from __future__ import annotations

import torch

__all__ = ["ROPE_BASE", "rope_tables", "apply_rope", "pair_halves", "rotation_factors", "rope_paired"]

ROPE_BASE = 10000.0


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


def pair_halves(n_heads: int, head_dim: int) -> torch.Tensor:
    """Output rows of a q/k projection reordered so each head's dims i and i + head_dim/2 (the
    pair rotate-half RoPE rotates together) sit side by side: (i, i + half) -> (2i, 2i + 1)."""
    half = head_dim // 2
    per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).flatten()


def rotation_factors(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """RoPE's complex factors cos + i sin, (len(positions), head_dim / 2), for `rope_paired`."""
    cos, sin = rope_tables(positions, head_dim, torch.float64 if dtype == torch.float64 else torch.float32)
    half = head_dim // 2
    return torch.complex(cos[:, :half], sin[:, :half])


def rope_paired(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (..., N, H, head_dim) whose dims are in `pair_halves` order: one
    complex multiply per pair instead of the eager formula's neg, cat, two muls and an add.
    Exactly apply_rope's rotation: (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos)."""
    half = x.shape[-1] // 2
    exact = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no complex bf16/fp16
    rotated = torch.view_as_real(torch.view_as_complex(exact.unflatten(-1, (half, 2))) * rotation[:, None, :])
    return rotated.flatten(-2).to(x.dtype)
