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

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .masks import Visibility, visible_pairs

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


def variant_heads(key: str, h: int) -> tuple[int, int]:
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
        n_q, n_kv = variant_heads(key, n_heads)
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
                heads = variant_heads(key, self.n_heads)
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

        Exact for the visibility rule of `sqa_search.layer.masks` (the one the layer's masks use);
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
