"""GQA 16q/4kv: a Sparse Query Attention layer exported by sqa-search (standalone: needs only torch).

16 query heads, 4 key/value heads, head_dim 16, d_model 256 (baseline H=16),
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

Exported 2026-12-02 10:53 UTC from study 'gpu_check'
  study: gpu_check
  trial: 1
  chosen by: knee of the val_loss/latency front of study 'gpu_check' (trial 1)
  fingerprint: Intel(R) Xeon(R) Processor, torch 2.13.0+cpu, 2 threads
  latency per step (train, layer, N=512): 9.222 ms (measured on Intel(R) Xeon(R) Processor)
  val_loss: 3.2517 (proxy model trained 16 steps / 8192 tokens (data builtin, seed 0))
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

        Exact for the masks stated in the class docstring; global tokens are counted apart.
        """
        n = seq_len
        w = self.window
        if self.causal:
            if w is None or w >= n:
                return n * (n + 1) // 2
            # query i sees min(i + 1, w) keys
            return w * (w + 1) // 2 + (n - w) * w
        if w is None or w >= n:
            return n * n
        # |i - j| < w: n*(2w-1) minus the keys that fall off both ends
        return n * (2 * w - 1) - w * (w - 1)

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


# ============================== inlined from sqa_search/attention.py ==============================
"""The attention layer: every head configuration an `AttentionSpec` describes, on its fastest path.

Paths (the one that ran is in ``layer.last_backend``, so timings can name their kernel):

* ``sdpa``: full attention through ``F.scaled_dot_product_attention``. Grouped heads use the
  kernel's own ``enable_gqa`` where that keeps a fused kernel, and expand K/V where the grouped
  call would fall to the math path (or, on CPU, where expanding is measurably faster).
* ``blocked``: sliding window (and global tokens) without an N x N mask: queries in blocks of
  ``b >= W`` tokens each attend to their own and the neighbouring key blocks in one batched
  SDPA call, so cost is linear in N, forward and backward, on any device.
* ``flex``: FlexAttention with a block mask; the default for windows and global tokens on CUDA,
  where the compiled kernel runs forward and backward. On CPU it can be forced for checking:
  eager flex materialises N x N and, in torch 2.13, has no backward on CPU (forward only).
* ``sdpa-masked``: full attention plus global tokens off CUDA: an (N, N+G) boolean mask.

Head grouping and mask conventions are defined in `sqa_search.spec`.
"""


import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["SparseQueryAttention", "KVCache", "apply_rope", "rope_tables", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "blocked", "flex")
ROPE_BASE = 10000.0
# Smallest query block for the blocked path: tiny windows would otherwise mean many tiny
# matmuls whose overhead dominates; a larger block wastes a little arithmetic instead.
MIN_BLOCK = 64

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


# ----- helpers -------------------------------------------------------------------------------
def _sdp_kernel(q, k, v, **kw) -> str:
    """Name of the SDPA kernel PyTorch will pick for these inputs (private API; best effort)."""
    try:
        return _SDP_KERNELS.get(int(torch._fused_sdp_choice(q, k, v, **kw)), "unknown")
    except Exception:  # the private API moved: say so rather than guess
        return "unknown"


def _tracing() -> bool:
    return torch.compiler.is_compiling()


@dataclass
class KVCache:
    """Keys and values for decode, (B, H_kv, capacity, head_dim) each.

    A windowed spec keeps at most W tokens (a ring buffer: slot = position % W); RoPE is
    applied before caching, so the order of slots does not matter to attention.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # tokens seen so far

    @property
    def filled(self) -> int:
        return min(self.length, self.k.shape[2])


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
        if backend == "flex" and spec.window is None and spec.n_global == 0:
            raise SpecError("backend='flex' needs a window or global tokens; full attention runs on sdpa")
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
        self.register_buffer("_kv_index", torch.tensor(spec.kv_head_of_query), persistent=False)
        self.register_buffer("_q_index", torch.tensor(spec.query_head_of_kv), persistent=False)
        self.last_backend: str | None = None
        self._mask_cache: dict = {}  # blocked-path masks by shape; not state, not saved

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

    def _global_kv(self, batch: int, k_seq=None, v_seq=None, dtype=None):
        """Global tokens' keys and values, (B, H_kv, G, hd) each.

        Causal: projections of the learned tokens (they see nothing). Bidirectional: the
        tokens first attend to the whole sequence and themselves; their updated states
        (token + attention output) give the keys and values the sequence then reads.
        """
        spec = self.spec
        tokens = self.global_tokens.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if not spec.causal:
            q_g = self._heads(self.q_proj(tokens), spec.n_q_heads)
            k_all = torch.cat([k_seq, self._heads(self.k_proj(tokens), spec.n_kv_heads)], dim=2)
            v_all = torch.cat([v_seq, self._heads(self.v_proj(tokens), spec.n_kv_heads)], dim=2)
            q_g, k_all, v_all, _ = self._group(q_g, k_all, v_all, allow_native_gqa=False)
            o_g = F.scaled_dot_product_attention(q_g, k_all, v_all)
            tokens = tokens + self.o_proj(self._merge(o_g))
        return (
            self._heads(self.k_proj(tokens), spec.n_kv_heads),
            self._heads(self.v_proj(tokens), spec.n_kv_heads),
        )

    def choose_backend(self, x: torch.Tensor) -> str:
        spec, n = self.spec, x.shape[1]
        if self.backend != "auto":
            return self.backend
        windowed = spec.window is not None and spec.window < n
        if not windowed and spec.n_global == 0:
            return "sdpa"
        if x.is_cuda and _flex_available():
            return "flex"
        return "blocked" if windowed else "sdpa-masked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if x.dim() != 3 or x.shape[-1] != spec.d_model:
            raise ValueError(f"input must be (batch, N, d_model={spec.d_model}); got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), spec.n_q_heads)
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.arange(n, device=x.device), spec.head_dim, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g_kv = self._global_kv(b, k, v, q.dtype) if spec.n_global else None

        backend = self.choose_backend(x)
        if backend == "sdpa" and spec.n_global == 0:
            o, name = self._full(q, k, v)
        elif backend == "flex":
            o, name = self._flex(q, k, v, g_kv)
        elif backend == "blocked" or (backend == "sdpa" and spec.window is not None):
            o, name = self._blocked(q, k, v, g_kv)
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

    # -- full attention plus global tokens, dense mask (off CUDA only) --
    def _masked(self, q, k, v, g_kv):
        n = q.shape[2]
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
        k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        pos = torch.arange(n, device=q.device)
        seq_mask = _pair_mask(pos[:, None], pos[None, :], self.spec.causal, self.spec.window)
        mask = torch.cat([seq_mask, seq_mask.new_ones(n, g_kv[0].shape[2])], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "sdpa-masked"

    # -- sliding window without an N x N mask --
    def _blocked(self, q, k, v, g_kv):
        spec = self.spec
        w = spec.window
        q, k, v, _ = self._group(q, k, v, allow_native_gqa=False)
        bsz, h, n, hd = q.shape
        blk = max(w, MIN_BLOCK)
        nb = -(-n // blk)
        before, after = blk, (blk if not spec.causal else 0)
        span = (before + blk + after) // blk  # key blocks per query block
        pad_q = nb * blk - n

        qb = F.pad(q, (0, 0, 0, pad_q)).view(bsz, h, nb, blk, hd)
        kp = F.pad(k, (0, 0, before, pad_q + after))
        vp = F.pad(v, (0, 0, before, pad_q + after))
        # key block i covers padded positions [i*blk, i*blk + span*blk): unfold makes the view
        kb = kp.unfold(2, span * blk, blk).transpose(-1, -2)  # (B, H, nb, span*blk, hd)
        vb = vp.unfold(2, span * blk, blk).transpose(-1, -2)

        mask = self._block_mask(n, blk, span, before, q.device, q.dtype)

        # fold the blocks into the batch: (B*nb, H, blk, hd) queries, (B*nb, H, span*blk, hd) keys
        qf = qb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, blk, hd)
        kf = kb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        vf = vb.permute(0, 2, 1, 3, 4).reshape(bsz * nb, h, span * blk, hd)
        maskf = mask.unsqueeze(0).expand(bsz, -1, -1, -1).reshape(bsz * nb, 1, blk, span * blk)
        if g_kv is not None:
            gk, gv = self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1])
            g = gk.shape[2]
            kf = torch.cat([kf, gk.repeat_interleave(nb, dim=0)], dim=2)
            vf = torch.cat([vf, gv.repeat_interleave(nb, dim=0)], dim=2)
            maskf = torch.cat([maskf, maskf.new_zeros(bsz * nb, 1, blk, g)], dim=-1)  # globals: visible
        name = "blocked"
        if not _tracing():
            name = f"blocked/{_sdp_kernel(qf, kf, vf, attn_mask=maskf)}"
        of = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=maskf)
        o = of.view(bsz, nb, h, blk, hd).permute(0, 2, 1, 3, 4).reshape(bsz, h, nb * blk, hd)
        return o[:, :, :n], name

    def _block_mask(self, n, blk, span, before, device, dtype):
        """Additive mask (0 visible, -inf hidden) of the blocked path, (nb, blk, span*blk).

        Cached per shape: building it each call cost as much as the attention itself on CPU,
        and handing SDPA a float mask spares its own bool-to-float conversion.
        """
        key = (n, blk, span, before, str(device), dtype)
        cached = None if _tracing() else self._mask_cache.get(key)
        if cached is not None:
            return cached
        nb = -(-n // blk)
        q_pos = torch.arange(nb * blk, device=device).view(nb, blk, 1)
        k_pos = (torch.arange(nb, device=device).view(nb, 1, 1) * blk - before
                 + torch.arange(span * blk, device=device).view(1, 1, -1))
        visible = _pair_mask(q_pos, k_pos, self.spec.causal, self.spec.window) & (k_pos >= 0) & (k_pos < n)
        visible = visible | (q_pos >= n)  # padded query rows: anything, so no row is empty (discarded)
        mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
        if not _tracing():
            if len(self._mask_cache) >= 8:  # a few shapes at most: sweeps over N would grow it
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    # -- FlexAttention --
    def _flex(self, q, k, v, g_kv):
        from torch.nn.attention.flex_attention import flex_attention

        spec = self.spec
        n = q.shape[2]
        gqa_native = spec.grouping == "gqa" and spec.n_q_heads != spec.n_kv_heads
        q, k, v, gqa = self._group(q, k, v, allow_native_gqa=gqa_native)
        n_global = 0
        if g_kv is not None:
            gk, gv = g_kv if gqa else (self._expand_kv(g_kv[0]), self._expand_kv(g_kv[1]))
            n_global = gk.shape[2]
            k, v = torch.cat([k, gk], dim=2), torch.cat([v, gv], dim=2)
        block_mask = _flex_block_mask(n, n_global, spec.window, spec.causal, str(q.device))
        compiled = q.is_cuda
        fn = _compiled_flex() if compiled else flex_attention
        o = fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return o, "flex-compiled" if compiled else "flex-eager"

    # -- decode: one new token against the cache --
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty cache for up to `capacity` tokens (a window caps it at W)."""
        spec = self.spec
        if spec.window is not None:
            capacity = min(capacity, spec.window)
        shape = (batch, spec.n_kv_heads, capacity, spec.head_dim)
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def prefill_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """Write the keys and values of a whole prompt x (B, N, d) into the cache."""
        spec = self.spec
        n = x.shape[1]
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.arange(n, device=x.device), spec.head_dim, k.dtype)
            k = apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        keep = min(n, cap)
        slots = torch.arange(n - keep, n, device=x.device) % cap
        cache.k[:, :, slots] = k[:, :, n - keep:]
        cache.v[:, :, slots] = v[:, :, n - keep:]
        cache.length = n

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token x (B, 1, d) at position cache.length; updates the cache in place."""
        spec = self.spec
        if not spec.causal:
            raise SpecError("decode needs causal=True: a bidirectional layer has no next token")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode takes one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        b = x.shape[0]
        pos = cache.length
        q = self._heads(self.q_proj(x), spec.n_q_heads)
        k = self._heads(self.k_proj(x), spec.n_kv_heads)
        v = self._heads(self.v_proj(x), spec.n_kv_heads)
        if spec.rope:
            cos, sin = rope_tables(torch.tensor([pos], device=x.device), spec.head_dim, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cap = cache.k.shape[2]
        if spec.window is None and pos >= cap:
            raise ValueError(f"KV cache is full: capacity {cap} tokens, position {pos}")
        slot = pos % cap
        cache.k[:, :, slot] = k[:, :, 0]
        cache.v[:, :, slot] = v[:, :, 0]
        cache.length = pos + 1
        ks, vs = cache.k[:, :, : cache.filled], cache.v[:, :, : cache.filled]
        if spec.n_global:
            gk, gv = self._global_kv(b, dtype=q.dtype)
            ks, vs = torch.cat([ks, gk], dim=2), torch.cat([vs, gv], dim=2)
        if spec.grouping == "gqa" and spec.n_q_heads > spec.n_kv_heads:
            # One query token and no mask: fold each group of query heads into the query axis
            # and read the grouped cache as it is. Expanding K/V instead would copy the whole
            # cache every step and make GQA/MQA decode slower than MHA, the opposite of their point.
            group = spec.n_q_heads // spec.n_kv_heads
            o = F.scaled_dot_product_attention(q.view(b, spec.n_kv_heads, group, spec.head_dim), ks, vs)
            o, name = o.reshape(b, spec.n_q_heads, 1, spec.head_dim), "decode/sdpa-grouped"
        else:
            q, ks, vs, _ = self._group(q, ks, vs, allow_native_gqa=False)
            o, name = F.scaled_dot_product_attention(q, ks, vs), "decode/sdpa"
        if not _tracing():
            self.last_backend = name
        return self.o_proj(self._merge(o))


def _pair_mask(q_pos, k_pos, causal: bool, window: int | None):
    """True where key k_pos is visible to query q_pos (broadcasting); see AttentionSpec."""
    if causal:
        ok = k_pos <= q_pos
        if window is not None:
            ok = ok & (q_pos - k_pos < window)
        return ok
    if window is None:
        return torch.ones_like(q_pos - k_pos, dtype=torch.bool)
    return (q_pos - k_pos).abs() < window


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


@functools.lru_cache(maxsize=1)
def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(n: int, n_global: int, window: int | None, causal: bool, device: str):
    """Block mask over keys [sequence (n); global tokens (n_global)], cached per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        is_global = kv_idx >= n
        if causal:
            ok = kv_idx <= q_idx
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
        elif window is not None:
            ok = (q_idx - kv_idx).abs() < window
        else:
            ok = kv_idx >= 0
        return is_global | ok

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n + n_global, device=device)

# ============================== this export's configuration ==============================
D_MODEL = 256
N_HEADS = 16  # the baseline H the configuration was chosen against
N_Q_HEADS = 16
N_KV_HEADS = 4
HEAD_DIM = 16
WINDOW = None  # None: full attention
N_GLOBAL = 0
CAUSAL = True
ROPE = True
BIAS = False
LABEL = 'GQA 16q/4kv'

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
