"""What is timed or predicted, and the one shape a latency has whether it was measured or predicted.

`Workload` is the one description of a timing's situation (mode, scope, batch, sequence length,
dtype, device, model depth). The study's target, `bench`, `recommend`, the timing harness and the
cost model all take one instead of eight loose arguments. `Latency` is what every latency source
returns: the timing harness (measured, raw or speed-corrected) and the cost model (predicted), so a
table, a plot or a recommendation says what a figure is from one field, `kind`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..common import DTYPE_BYTES
from ..errors import UserError

MODES = ("train", "prefill", "decode")  # forward+backward, forward without grad, one token against a KV cache
SCOPES = ("layer", "block", "model")  # what is timed: the attention layer, a transformer block, the proxy model
DEVICES = ("auto", "cpu", "cuda")  # "cuda:1" is allowed too
DEFAULT_MODEL_LAYERS = 8  # the SQA paper's dense model, when the scope is "model" and no depth is given

# how a latency figure came to be; every table, plot, report and export says it
LATENCY_KINDS = ("measured-raw", "measured-corrected", "predicted")
# the words after "measured on X" / "predicted for Y"; measured-corrected figures are seconds at the
# machine's reference speed (sqa_search.speed.probe), raw ones what the clock said
_KIND_SUFFIX = {"measured-raw": ", raw", "measured-corrected": ", speed-corrected", "predicted": ""}
# a heading's words for each kind (recommend's "speed:" line, bench's headline)
KIND_HEADINGS = {"measured-raw": "MEASURED (raw)", "measured-corrected": "MEASURED (speed-corrected)",
                 "predicted": "PREDICTED"}

# what each kind means, for a report's or export's reader
KIND_NOTES = {"measured-raw": "the clock's median of the timed repeats, not corrected for the machine's speed",
              "measured-corrected": "seconds at this machine's reference speed: each timed repeat scaled by the "
                                    "machine's speed at that moment (sqa_search.speed.probe); the raw medians are "
                                    "kept beside them",
              "predicted": "the cost model's estimate (roofline) for a hardware profile, not a measurement"}


def latency_label(kind: str, where: str) -> str:
    """What a figure is, in words: 'measured on X, raw', 'measured on X, speed-corrected',
    'predicted for Y'. The one place these words are made (`Latency.label`, a study's stored
    ``latency_source``)."""
    if kind not in LATENCY_KINDS:
        raise _fail("kind", kind, f"one of {', '.join(LATENCY_KINDS)}")
    verb = "predicted for" if kind == "predicted" else "measured on"
    return f"{verb} {where}{_KIND_SUFFIX[kind]}"


def latency_kind(latencies) -> str | None:
    """The kind a set of figures shares; "a + b" when they differ (a table that mixes them says
    so), None when there are none."""
    kinds = sorted({lat.kind for lat in latencies})
    return " + ".join(kinds) if kinds else None


class WorkloadError(UserError):
    """A workload field with a value that cannot be timed or predicted."""


def _fail(name: str, value, allowed: str) -> WorkloadError:
    return WorkloadError(f"{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class Workload:
    """One situation a head configuration is timed or predicted in."""

    mode: str
    seq_len: int
    batch: int = 1
    scope: str = "layer"
    dtype: str = "float32"
    device: str = "cpu"
    n_layers: int = 1
    d_ff: int | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise _fail("mode", self.mode, f"one of {', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise _fail("scope", self.scope, f"one of {', '.join(SCOPES)}")
        if self.dtype not in DTYPE_BYTES:
            raise _fail("dtype", self.dtype, f"one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(self.device, str) or not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise _fail("device", self.device, "auto, cpu, cuda or cuda:N")
        for name, low in (("seq_len", 1), ("batch", 1), ("n_layers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _fail(name, value, f"an integer >= {low}")
        if self.d_ff is not None and (isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise _fail("d_ff", self.d_ff, "an integer >= 1, or null for 4 x d_model")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise _fail("threads", self.threads, "an integer >= 1, or null for all of torch's threads")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def at(self, seq_len: int) -> "Workload":
        """The same workload at another sequence length."""
        return replace(self, seq_len=seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        """Also reads the older spelling ``what`` for ``scope``."""
        data = dict(data)
        if "what" in data and "scope" not in data:
            data["scope"] = data.pop("what")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Latency:
    """One latency figure at one sequence length, measured or predicted, with what it is."""

    seconds: float
    kind: str  # one of LATENCY_KINDS
    where: str  # the machine it was measured on, or the profile (and its calibration) it was predicted for
    seq_len: int
    spread_s: float | None = None  # interquartile range of the repeats (measured); None when predicted
    raw_seconds: float | None = None  # measured: the uncorrected median (== seconds when not corrected)
    backend: str | None = None  # the kernel that ran (measured) or was modelled (predicted)
    peak_memory_bytes: int | None = None  # measured peak, or the cost model's estimate
    flags: tuple = field(default_factory=tuple)  # e.g. "unstable", "machine-busy", "memory-bound"

    def __post_init__(self):
        if self.kind not in LATENCY_KINDS:
            raise _fail("kind", self.kind, f"one of {', '.join(LATENCY_KINDS)}")

    @property
    def measured(self) -> bool:
        return self.kind != "predicted"

    @property
    def label(self) -> str:
        """What the figure is, in words: 'measured on X, raw', 'measured on X, speed-corrected',
        'predicted for Y'."""
        return latency_label(self.kind, self.where)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Latency":
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        data["flags"] = tuple(data.get("flags") or ())
        return cls(**data)
