"""SQA 8q/4kv: a Sparse Query Attention layer exported by sqa-search (standalone: needs only torch).

8 query heads, 4 key/value heads, head_dim 16, d_model 256 (baseline H=16),
causal, full attention, RoPE.

Conventions (those of sqa_search): query head h reads KV head h * H_kv // H_q (SDPA's enable_gqa
layout when H_kv divides H_q); rSQA (H_q < H_kv) shares query heads instead. Causal window:
key j is visible to query i iff i - W < j <= i; bidirectional: |i - j| < W. Global tokens have
no position; causal ones see nothing of the sequence, bidirectional ones read it first.
The code below is sqa_search's own (spec.py, masks.py, attention.py, inlined by the exporter),
so parameter names match sqa_search.SparseQueryAttention and a state_dict loads into either.
torch.export traces every path at a fixed shape; a dynamic sequence length works for full
attention (the windowed path specialises on its number of blocks).

Usage:
    from sqa_layer import load
    layer = load("weights.pt")            # or SparseQueryAttention() for fresh weights
    y = layer(torch.randn(2, 1024, 256))

Exported 2026-12-02 12:08 UTC from study 'gpu_check'
  study: gpu_check
  trial: 3
  chosen by: knee of the val_loss/latency front of study 'gpu_check' (trial 3)
  fingerprint: Intel(R) Xeon(R) Processor, torch 2.13.0+cpu, 2 threads
  latency per step (train, layer, N=512): 4.261 ms (measured on Intel(R) Xeon(R) Processor)
  val_loss: 3.1828 (proxy model trained 16 steps / 8192 tokens (data builtin, seed 0))
  KV cache (model, largest N, batch 1): 512.0 KiB (analytic)
Weights (weights.pt): freshly initialised with torch.manual_seed(0) (PyTorch's nn.Linear default init; NOT trained: studies do not save model weights).
"""

from __future__ import annotations

# ============================== inlined from sqa_search/spec.py ==============================
"""One spec for an attention head configuration, the named variants, and analytic counts.

`AttentionSpec` is the one type that travels the whole way: the search proposes specs, the
layer, the model, the timer, the cost model and the exporter all take one. It is validated
when it is made, so a bad combination fails with a message that names the field, the value
and what is allowed, before any tensor exists.

Head grouping (how query heads share key/value heads) is defined here, once, because the
layer, the reference in the tests and the exporter must agree on it:

* ``n_q_heads >= n_kv_heads``: query head ``h`` reads KV head ``h * n_kv_heads // n_q_heads``.
  When ``n_kv_heads`` divides ``n_q_heads`` this is ``h // (n_q_heads / n_kv_heads)``, the
  convention of ``F.scaled_dot_product_attention(enable_gqa=True)``, so a trained layer maps
  one-to-one onto PyTorch's fused kernels. When it does not divide (12 query, 8 KV heads) the
  groups are contiguous and differ in size by at most one.
* ``n_q_heads < n_kv_heads`` (rSQA): the mirror image. Attention runs with ``n_kv_heads``
  heads; KV head ``g`` is read by query head ``g * n_q_heads // n_kv_heads`` (query heads are
  shared), and the output projection takes all ``n_kv_heads`` head outputs. Every parameter
  is used and the attention cost is governed by ``n_kv_heads``.
"""


import dataclasses
import math
from dataclasses import dataclass


__all__ = [
    "AttentionSpec",
    "SpecError",
    "VARIANTS",
    "variant_display_name",
]


class SpecError(ValueError):
    """An attention configuration that sqa-search does not support."""


def _fail(field: str, value, allowed: str) -> SpecError:
    return SpecError(f"AttentionSpec.{field}={value!r} is not allowed: {allowed}")


def _require_int(field: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, "must be an integer")
    if value < low or (high is not None and value > high):
        allowed = f"must be >= {low}" if high is None else f"must be in [{low}, {high}]"
        raise _fail(field, value, allowed)


# Named variants as (H_q, H_kv) functions of the baseline H, as in the SQA paper's table.
# Each takes H and returns (n_q_heads, n_kv_heads) or raises when H does not allow it.
def _frac(h: int, num: int, den: int, name: str, what: str) -> int:
    if (h * num) % den:
        raise SpecError(
            f"variant {name!r} needs {what} = {num}*n_heads/{den} to be a whole number; "
            f"n_heads={h} does not allow it (use n_heads divisible by {den // math.gcd(num, den)})"
        )
    return h * num // den


VARIANTS: dict[str, str] = {
    "mha": "MHA",
    "gqa": "GQA",
    "mqa": "MQA",
    "sqa": "SQA",
    "ssqa": "sSQA",
    "xsqa": "xSQA",
    "xsmqa": "xSMQA",
    "lsqa": "lSQA",
    "rsqa": "rSQA",
    "swsqa": "SW-SQA",
    "flexsqa": "Flex-SQA",
}

# Default window and global tokens for the windowed variants; override with keywords.
DEFAULT_WINDOW = 128
DEFAULT_GLOBAL_TOKENS = 4


def _variant_heads(key: str, h: int) -> tuple[int, int]:
    q, kv = {
        "mha": lambda: (h, h),
        "gqa": lambda: (h, _frac(h, 1, 4, "gqa", "n_kv_heads")),
        "mqa": lambda: (h, 1),
        "sqa": lambda: (_frac(h, 1, 2, "sqa", "n_q_heads"), _frac(h, 1, 4, "sqa", "n_kv_heads")),
        "ssqa": lambda: (_frac(h, 1, 2, "ssqa", "n_q_heads"), _frac(h, 1, 2, "ssqa", "n_kv_heads")),
        "xsqa": lambda: (_frac(h, 1, 4, "xsqa", "n_q_heads"), _frac(h, 1, 4, "xsqa", "n_kv_heads")),
        "xsmqa": lambda: (_frac(h, 1, 4, "xsmqa", "n_q_heads"), 1),
        "lsqa": lambda: (_frac(h, 3, 4, "lsqa", "n_q_heads"), _frac(h, 1, 4, "lsqa", "n_kv_heads")),
        "rsqa": lambda: (_frac(h, 1, 4, "rsqa", "n_q_heads"), _frac(h, 1, 2, "rsqa", "n_kv_heads")),
        "swsqa": lambda: (_frac(h, 1, 2, "swsqa", "n_q_heads"), _frac(h, 1, 4, "swsqa", "n_kv_heads")),
        "flexsqa": lambda: (_frac(h, 1, 2, "flexsqa", "n_q_heads"), _frac(h, 1, 4, "flexsqa", "n_kv_heads")),
    }[key]()
    return q, kv


def normalise_variant(name: str) -> str:
    """'SW-SQA', 'sw_sqa', 'swsqa' -> 'swsqa'; raises for unknown names, listing the known ones."""
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in VARIANTS:
        raise SpecError(f"variant={name!r} is not known: choose one of {', '.join(VARIANTS)}")
    return key


def variant_display_name(name: str) -> str:
    return VARIANTS[normalise_variant(name)]


@dataclass(frozen=True)
class AttentionSpec:
    """An attention layer's head configuration.

    window: None for full attention, else the sliding-window size W in tokens. Causal: key j
    is visible to query i iff ``i - W < j <= i`` (W keys, the query's own included).
    Bidirectional: iff ``|i - j| < W`` (2W - 1 keys).
    n_global: learned global tokens (Flex-SQA). Every position attends to them. Causal: they
    see nothing of the sequence (attention sinks), so no future leaks into the past.
    Bidirectional: they first read the whole sequence, then the sequence reads them
    (Longformer style). They have no position (no RoPE).
    """

    d_model: int
    n_heads: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int | None = None
    window: int | None = None
    n_global: int = 0
    causal: bool = True
    rope: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        _require_int("d_model", self.d_model, 1)
        _require_int("n_heads", self.n_heads, 1)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise _fail(
                    "n_heads",
                    self.n_heads,
                    f"must divide d_model={self.d_model} when head_dim is not given "
                    f"(or pass head_dim explicitly)",
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _require_int("head_dim", self.head_dim, 1)
        _require_int("n_q_heads", self.n_q_heads, 1, self.n_heads)
        _require_int("n_kv_heads", self.n_kv_heads, 1, self.n_heads)
        if self.window is not None:
            _require_int("window", self.window, 1)
        _require_int("n_global", self.n_global, 0)
        for flag in ("causal", "rope", "bias"):
            if not isinstance(getattr(self, flag), bool):
                raise _fail(flag, getattr(self, flag), "must be True or False")
        if self.rope and self.head_dim % 2:
            raise _fail("head_dim", self.head_dim, "must be even when rope=True (RoPE rotates pairs)")

    # ----- construction ---------------------------------------------------------------
    @classmethod
    def variant(cls, name: str, d_model: int, n_heads: int, **overrides) -> "AttentionSpec":
        """A named variant of the SQA paper's table for any H, e.g. ``variant("sqa", 256, 16)``.

        ``overrides`` set the other fields (window, n_global, causal, rope, bias, head_dim).
        SW-SQA and Flex-SQA default to SQA heads with a 128-token window (Flex-SQA adds 4
        global tokens); pass n_q_heads / n_kv_heads to put a window on other heads.
        """
        key = normalise_variant(name)
        _require_int("n_heads", n_heads, 1)
        n_q, n_kv = _variant_heads(key, n_heads)
        fields = {"n_q_heads": n_q, "n_kv_heads": n_kv}
        if key == "swsqa":
            fields["window"] = DEFAULT_WINDOW
        if key == "flexsqa":
            fields["window"] = DEFAULT_WINDOW
            fields["n_global"] = DEFAULT_GLOBAL_TOKENS
        fields.update(overrides)
        spec = cls(d_model=d_model, n_heads=n_heads, **fields)
        if key == "swsqa" and spec.window is None:
            raise _fail("window", None, "SW-SQA needs a window (an integer >= 1)")
        if key == "flexsqa" and (spec.window is None or spec.n_global < 1):
            raise SpecError(
                f"Flex-SQA needs a window and at least one global token; got "
                f"window={spec.window!r}, n_global={spec.n_global!r}"
            )
        return spec

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown AttentionSpec field(s) {unknown}: allowed are {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, value) -> "AttentionSpec":
        """An AttentionSpec, or the dict of its fields (a JSON record's ``spec``), as a spec."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise SpecError(f"spec must be an AttentionSpec or a dict of its fields, got {type(value).__name__}")

    # ----- naming ------------------------------------------------------------------------
    @property
    def variant_name(self) -> str | None:
        """The named variant this spec is exactly (e.g. 'sqa'), or None.

        With small H several names can coincide (H=4: GQA is MQA); the table order decides.
        """
        if self.n_global:
            return "flexsqa" if self.window is not None else None
        for key in ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa", "rsqa"):
            try:
                heads = _variant_heads(key, self.n_heads)
            except SpecError:
                continue
            if heads == (self.n_q_heads, self.n_kv_heads):
                if self.window is None:
                    return key
                return "swsqa" if key == "sqa" else None
        return None

    @property
    def family(self) -> str:
        """The family every spec belongs to, one of the keys of VARIANTS.

        Windowed or global-token specs are SW-SQA / Flex-SQA whatever their heads; the rest
        by head counts: all query heads -> MHA/GQA/MQA by KV heads; fewer query than KV
        heads -> rSQA; otherwise the nearest SQA family.
        """
        if self.n_global:
            return "flexsqa"
        if self.window is not None:
            return "swsqa"
        exact = self.variant_name
        if exact:
            return exact
        h, q, kv = self.n_heads, self.n_q_heads, self.n_kv_heads
        if q < kv:
            return "rsqa"
        if q == h:
            return "mha" if kv == h else ("mqa" if kv == 1 else "gqa")
        if q > h / 2:
            return "lsqa"
        if q == kv:
            return "ssqa" if q * 4 > h else "xsqa"
        if kv == 1 and q * 4 <= h:
            return "xsmqa"
        return "sqa"

    @property
    def label(self) -> str:
        """Short human label, e.g. 'SQA 8q/4kv' or 'SW-SQA 8q/4kv W=128 G=4'."""
        name = self.variant_name or self.family
        text = f"{VARIANTS[name]} {self.n_q_heads}q/{self.n_kv_heads}kv"
        if self.window is not None:
            text += f" W={self.window}"
        if self.n_global:
            text += f" G={self.n_global}"
        return text

    # ----- head grouping -----------------------------------------------------------------
    @property
    def n_attn_heads(self) -> int:
        """Heads the attention itself runs with: max(H_q, H_kv) (see module docstring)."""
        return max(self.n_q_heads, self.n_kv_heads)

    @property
    def kv_head_of_query(self) -> list[int]:
        """For H_q >= H_kv: the KV head each query head reads."""
        return [h * self.n_kv_heads // self.n_q_heads for h in range(self.n_q_heads)]

    @property
    def query_head_of_kv(self) -> list[int]:
        """For H_q < H_kv (rSQA): the query head each KV head is read by."""
        return [g * self.n_q_heads // self.n_kv_heads for g in range(self.n_kv_heads)]

    @property
    def grouping(self) -> str:
        """'gqa' when SDPA's enable_gqa convention applies directly, 'uneven' when H_kv does
        not divide H_q, 'reverse' for rSQA."""
        if self.n_q_heads < self.n_kv_heads:
            return "reverse"
        return "gqa" if self.n_q_heads % self.n_kv_heads == 0 else "uneven"

    # ----- analytic counts ---------------------------------------------------------------
    def n_params(self) -> int:
        """Parameters of the layer: q, k, v, output projections (+ biases) and global tokens."""
        d, hd = self.d_model, self.head_dim
        q_out, kv_out, att_out = self.n_q_heads * hd, self.n_kv_heads * hd, self.n_attn_heads * hd
        weights = d * q_out + 2 * d * kv_out + att_out * d
        biases = (q_out + 2 * kv_out + d) if self.bias else 0
        return weights + biases + self.n_global * d

    def visible_pairs(self, seq_len: int) -> int:
        """Number of (query, key) pairs among the sequence's own tokens that attention scores.

        Exact for the visibility rule of `sqa_search.masks` (the one the layer's masks use);
        global tokens are counted apart.
        """
        return visible_pairs(Visibility(self.causal, self.window), seq_len)

    def attention_flops(self, seq_len: int, backward: bool = False, batch: int = 1) -> int:
        """Matmul FLOPs of the layer at sequence length N (2 FLOPs per multiply-add).

        Projections (q, k, v, out) + scores (QK^T) + weighted values (AV) over the visible
        pairs, with global tokens. Forward+backward counts backward as twice the forward
        matmuls (gradients for inputs and weights); a fused kernel's recomputation of the
        scores is not counted. Softmax and RoPE are elementwise and left out.
        """
        _require_int("seq_len", seq_len, 1)
        n, d, hd, g = seq_len, self.d_model, self.head_dim, self.n_global
        heads = self.n_attn_heads
        proj = 2 * n * d * (self.n_q_heads + 2 * self.n_kv_heads) * hd + 2 * n * heads * hd * d
        pairs = self.visible_pairs(n) + n * g  # every position also reads the global tokens
        if g:
            proj += 2 * g * d * 2 * self.n_kv_heads * hd  # global tokens' k and v
            if not self.causal:
                # globals first read the whole sequence: their q, the N*G pairs, their out proj
                proj += 2 * g * d * self.n_q_heads * hd + 2 * g * heads * hd * d
                pairs += g * n
        core = 2 * 2 * heads * hd * pairs
        forward = proj + core
        return batch * (3 * forward if backward else forward)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one cached token costs in one layer (keys and values)."""
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def kv_cache_bytes(self, seq_len: int, dtype_bytes: int = 2, batch: int = 1) -> int:
        """KV-cache bytes for one layer after seq_len tokens; a window caps the cache at W."""
        cached = seq_len if self.window is None else min(seq_len, self.window)
        return batch * (cached + self.n_global) * self.kv_cache_bytes_per_token(dtype_bytes)


# ============================== inlined from sqa_search/masks.py ==============================
"""The visibility rule, defined once: which keys a query may read (causal, window, global tokens).

Every path that needs the rule takes it from here: the blocked path's layout and additive
masks (`BlockedLayout`), the FlexAttention ``mask_mod`` and its block indices, and the analytic
counts of `AttentionSpec` (FLOPs over visible pairs). Only the float64 reference in `sqa_search.reference` writes the
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


# ============================== inlined from sqa_search/attention.py ==============================
"""The attention layer: every head configuration an `AttentionSpec` describes, on its fastest path.

Paths (the one that ran is in ``layer.last_backend``, so timings can name their kernel):

* ``sdpa``: full attention through ``F.scaled_dot_product_attention``. Grouped heads use the
  kernel's own ``enable_gqa`` where that keeps a fused kernel, and expand K/V where the grouped
  call would fall to the math path (or, on CPU, where expanding is measurably faster).
* ``blocked``: sliding window (and global tokens) without an N x N mask: queries in blocks of
  ~W/4 tokens (~W/2 with grad) each read the few key blocks their window needs plus the global
  tokens, as one contiguous run of a key buffer (`sqa_search.masks.BlockedLayout`), a few
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

Head grouping is defined in `sqa_search.spec`; the visibility rule (causal, window, global
tokens) in `sqa_search.masks`, which every path here uses.
"""


import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention


__all__ = ["SparseQueryAttention", "KVCache", "FlexFallbackError", "apply_rope", "rope_tables", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "blocked", "flex", "flex-eager")
# Inductor's CPU and CUDA flex kernels are not implemented below this head size (torch 2.13).
FLEX_MIN_HEAD_DIM = 16
ROPE_BASE = 10000.0

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


def _pair_halves(n_heads: int, head_dim: int) -> torch.Tensor:
    """Output rows of a q/k projection reordered so each head's dims i and i + head_dim/2 (the
    pair rotate-half RoPE rotates together) sit side by side: (i, i + half) -> (2i, 2i + 1)."""
    half = head_dim // 2
    per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).flatten()


def _rotation(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """RoPE's complex factors cos + i sin, (len(positions), head_dim / 2), for `_rope_paired`."""
    cos, sin = rope_tables(positions, head_dim, torch.float64 if dtype == torch.float64 else torch.float32)
    half = head_dim // 2
    return torch.complex(cos[:, :half], sin[:, :half])


def _rope_paired(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (..., N, H, head_dim) whose dims are in `_pair_halves` order: one
    complex multiply per pair instead of the eager formula's neg, cat, two muls and an add.
    Exactly apply_rope's rotation: (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos)."""
    half = x.shape[-1] // 2
    exact = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no complex bf16/fp16
    rotated = torch.view_as_real(torch.view_as_complex(exact.unflatten(-1, (half, 2))) * rotation[:, None, :])
    return rotated.flatten(-2).to(x.dtype)


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
        # With RoPE, q and k are projected with their output rows reordered (_pair_halves) so that
        # RoPE is one complex multiply. Scores are sums over head dims, so the order of dims,
        # the same for q and k, changes nothing; v and the output projection keep theirs.
        q_order = _pair_halves(spec.n_q_heads, hd) if spec.rope else torch.zeros(0, dtype=torch.long)
        k_order = _pair_halves(spec.n_kv_heads, hd) if spec.rope else torch.zeros(0, dtype=torch.long)
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
            t = _rope_paired(t, rotation)
        return t.transpose(1, 2)

    # rotation: `_rotation` of the tokens' positions (None: no RoPE)
    def _q(self, x, rotation=None):
        return self._project_qk(x, self.q_proj, self._q_order, self.spec.n_q_heads, rotation)

    def _k(self, x, rotation=None):
        return self._project_qk(x, self.k_proj, self._k_order, self.spec.n_kv_heads, rotation)

    def _rotation(self, positions, dtype):
        return None if not self.spec.rope else _rotation(positions, self.spec.head_dim, dtype)

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

# ============================== this export's configuration ==============================
D_MODEL = 256
N_HEADS = 16  # the baseline H the configuration was chosen against
N_Q_HEADS = 8
N_KV_HEADS = 4
HEAD_DIM = 16
WINDOW = None  # None: full attention
N_GLOBAL = 0
CAUSAL = True
ROPE = True
BIAS = False
LABEL = 'SQA 8q/4kv'

SPEC = AttentionSpec(d_model=D_MODEL, n_heads=N_HEADS, n_q_heads=N_Q_HEADS, n_kv_heads=N_KV_HEADS,
                     head_dim=HEAD_DIM, window=WINDOW, n_global=N_GLOBAL, causal=CAUSAL, rope=ROPE, bias=BIAS)
CONFIG = SPEC.to_dict()
_LibraryLayer = SparseQueryAttention


class SparseQueryAttention(_LibraryLayer):
    """The library's layer (above, unchanged) built with this export's configuration.

    backend: "auto" (fused SDPA for full attention; FlexAttention on CUDA for windows and global
    tokens; the blocked window path elsewhere) or a backend the library allows forcing. The path
    that ran is in ``last_backend``. Parameter names are the library's: a state_dict loads into either.
    """

    def __init__(self, backend="auto", device=None, dtype=None, *, spec=None):
        super().__init__(SPEC if spec is None else spec, backend=backend)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)


def load(weights=None, backend="auto", device=None, dtype=None):
    """The layer, with weights from a state_dict file (e.g. the export's weights.pt) if given."""
    layer = SparseQueryAttention(backend=backend, device=device, dtype=dtype)
    if weights is not None:
        state = torch.load(weights, map_location=device or "cpu", weights_only=True)
        layer.load_state_dict(state)
    return layer


__all__ = ["SparseQueryAttention", "KVCache", "AttentionSpec", "SPEC", "CONFIG", "LABEL", "load"]
