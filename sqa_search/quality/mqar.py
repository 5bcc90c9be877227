"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023): a synthetic task that
separates attention variants by how well they retrieve; fewer query heads may hurt it first.

Every batch is a pure function of ``(config, seed, step)``, so each candidate of a study sees the
same sequences in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, require_int

__all__ = ["MQARConfig", "mqar_batch", "IGNORE_INDEX"]

# torch.nn.functional.cross_entropy's default ignore_index: the target of every position that is
# not scored (in MQAR all but the queries; in the encoders' masked-token objective all but the
# masked positions).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall, laid out as in Zoology (Arora et al. 2023).

    A sequence is ``n_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` followed by a query region of
    two-token slots. ``n_queries`` distinct keys from the context are placed at slots chosen
    with Zoology's power law (near slots likelier, ``power_a``); the target at a query key's
    position is that key's value, and ``IGNORE_INDEX`` everywhere else. Keys come from
    ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)``, so a value is
    never mistaken for a key; token 0 is the filler when ``random_fill`` is off. With
    ``random_fill`` (Zoology's default) the other positions hold random tokens of the whole
    vocabulary, so the model cannot find queries by looking for non-zero tokens.
    ``n_queries=None`` queries every pair, as Zoology does.
    """

    vocab_size: int = 8192
    seq_len: int = 256
    n_pairs: int = 16
    n_queries: int | None = None
    power_a: float = 0.01
    random_fill: bool = True

    def __post_init__(self):
        if self.n_queries is None:
            object.__setattr__(self, "n_queries", self.n_pairs)
        for field in ("vocab_size", "seq_len", "n_pairs", "n_queries"):
            require_int("MQARConfig.", field, getattr(self, field), 1)
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise DataError(f"MQARConfig.power_a={self.power_a!r} is not allowed: must be a number > 0")
        p, q = self.n_pairs, self.n_queries
        if q > p:
            raise DataError(
                f"MQARConfig.n_queries={q} is not allowed: must be <= n_pairs={p}, "
                "because each query asks for a different key"
            )
        if 2 * p + 2 * q > self.seq_len:
            raise DataError(
                f"MQARConfig.seq_len={self.seq_len} is not allowed: n_pairs={p} pairs and "
                f"n_queries={q} queries need 2*n_pairs + 2*n_queries = {2 * p + 2 * q} positions"
            )
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < p:
            raise DataError(
                f"MQARConfig.vocab_size={self.vocab_size} is not allowed: n_pairs={p} distinct keys "
                f"in [1, vocab_size//2) and distinct values in [vocab_size//2, vocab_size) need "
                f"vocab_size >= {2 * p + 2}"
            )


def _has_repeats(rows: np.ndarray) -> np.ndarray:
    ordered = np.sort(rows, axis=1)
    return (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)


def _sample_distinct(rng: np.random.Generator, batch: int, population: int, k: int) -> np.ndarray:
    """k distinct integers from [0, population) per row, in random order (vectorised)."""
    if k * k <= population:
        # Collisions are rare (birthday bound k^2 / 2N <= 1/2): draw with replacement and redraw
        # the rows that collide. Rejection keeps every ordered tuple of distinct values equally
        # likely, and costs O(k) per row instead of O(population) for the scoring below.
        out = rng.integers(0, population, size=(batch, k))
        bad = _has_repeats(out)
        while bad.any():
            out[bad] = rng.integers(0, population, size=(int(bad.sum()), k))
            bad = _has_repeats(out)
        return out
    scores = rng.random((batch, population))
    idx = np.argpartition(scores, k - 1, axis=1)[:, :k]
    # argpartition's order inside the first k is not random; sort by the random scores.
    order = np.argsort(np.take_along_axis(scores, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def mqar_batch(config: MQARConfig, batch_size: int, seed: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, both int64 of shape (batch_size, seq_len); a pure function of
    ``(config, seed, step)``. Targets are ``IGNORE_INDEX`` except at query positions."""
    if not isinstance(config, MQARConfig):
        raise DataError(f"mqar_batch: config={config!r} is not allowed: must be an MQARConfig")
    require_int("mqar_batch: ", "batch_size", batch_size, 1)
    require_int("mqar_batch: ", "seed", seed, 0)
    require_int("mqar_batch: ", "step", step, 0)
    b, v, L = batch_size, config.vocab_size, config.seq_len
    p, q = config.n_pairs, config.n_queries
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))

    keys = _sample_distinct(rng, b, v // 2 - 1, p) + 1
    values = _sample_distinct(rng, b, v - v // 2, p) + v // 2
    asked = _sample_distinct(rng, b, p, q)  # which pairs are queried, in query order

    # Zoology's slot distribution: slot g (0-based) has weight (g+1)^(a-1); distinct slots
    # drawn with those weights via the Gumbel top-k trick, which is exact and vectorises.
    n_slots = (L - 2 * p) // 2
    log_w = (config.power_a - 1.0) * np.log(np.arange(1, n_slots + 1, dtype=np.float64))
    gumbel = -np.log(-np.log(rng.random((b, n_slots)).clip(1e-300, 1.0 - 1e-16)))
    slots = np.argpartition(-(log_w + gumbel), q - 1, axis=1)[:, :q]
    positions = 2 * p + 2 * slots

    if config.random_fill:
        inputs = rng.integers(0, v, size=(b, L), dtype=np.int64)
    else:
        inputs = np.zeros((b, L), dtype=np.int64)
    inputs[:, 0: 2 * p: 2] = keys
    inputs[:, 1: 2 * p: 2] = values
    np.put_along_axis(inputs, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
    targets = np.full((b, L), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(targets, positions, np.take_along_axis(values, asked, axis=1), axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)
