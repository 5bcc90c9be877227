"""The user's words for a tolerance, a latency, a size, a sequence length, a pick rule and a spec,
read into numbers and an `AttentionSpec`. One module for both commands, so `recommend --tolerance 1%`
and `export --pick "fastest-within 1%"` read "1%" the same way.

The export-side parsers raise `ExportError` and the recommend-side ones `RecommendError`, so each
command's message names its own flag.
"""

from __future__ import annotations

import json
import math
import re

from ..layer.spec import VARIANTS, AttentionSpec, SpecError, normalise_variant
from .errors import ExportError, RecommendError

PICK_HELP = "knee | 'fastest-within X%' | 'best-under-latency SECONDS' (units s, ms, us allowed)"


# ----- shared: a fraction and a duration ------------------------------------------------------------
def parse_fraction(text, what: str = "tolerance") -> float:
    """'1%' -> 0.01; '0.01' -> 0.01 (a bare number is a fraction and must be < 1). Raises ExportError."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1].strip()) / 100.0
        else:
            value = float(raw)
            if value >= 1:
                raise ExportError(f"{what} {raw!r} is ambiguous: a bare number is a fraction of the loss "
                                  f"(0.01 = 1%) and must be < 1; write {raw}% for percent")
    except ValueError as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{what} {raw!r} cannot be parsed: give a percentage like 1% "
                          f"or a fraction like 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise ExportError(f"{what} {raw!r} is not allowed: must be a finite loss increase >= 0")
    return value


_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def _scaled(text, pattern: str, units: dict, default_unit: str) -> float:
    """A number followed by an optional unit, scaled by the unit; NaN when it does not parse."""
    m = re.fullmatch(pattern, str(text).strip().lower())
    try:
        return float(m.group(1)) * units[m.group(2) or default_unit] if m else float("nan")
    except ValueError:
        return float("nan")


def parse_seconds(text, what: str = "latency") -> float:
    """'0.01', '10ms', '250 us' -> seconds. Raises ExportError."""
    value = _scaled(text, r"([0-9.eE+-]+)\s*(s|sec|ms|us|µs)?", _UNITS, "s")
    if not math.isfinite(value) or value <= 0:
        raise ExportError(f"{what} {text!r} cannot be parsed: give seconds > 0, e.g. 0.01, 10ms or 250us")
    return value


# ----- export: which configuration ------------------------------------------------------------------
def parse_pick(text: str) -> tuple[str, float | None]:
    """'knee' -> ('knee', None); 'fastest-within 1%' -> ('fastest-within', 0.01);
    'best-under-latency 5ms' -> ('best-under-latency', 0.005). Raises ExportError."""
    raw = str(text).strip()
    parts = raw.replace("=", " ").split(None, 1)
    if not parts:
        raise ExportError(f"--pick {text!r} is not a rule: choose {PICK_HELP}")
    rule = parts[0].lower().replace("_", "-")
    arg = parts[1].strip() if len(parts) > 1 else ""
    if rule == "knee":
        if arg:
            raise ExportError(f"--pick {text!r}: 'knee' takes no argument")
        return "knee", None
    if rule == "fastest-within":
        return rule, parse_fraction(arg, "--pick fastest-within")
    if rule == "best-under-latency":
        return rule, parse_seconds(arg, "--pick best-under-latency")
    raise ExportError(f"--pick {text!r} is not a rule: choose {PICK_HELP}")


def _heads_spec(raw: str, d: int, h: int, overrides: dict) -> AttentionSpec:
    """'q/kv[/W[/G]]' (W may be 'none') at d_model d, baseline heads h."""
    parts = [p.strip() for p in raw.split("/")]
    if not 2 <= len(parts) <= 4:
        raise ExportError(f"--spec {raw!r} is not 'q/kv[/W[/G]]'")
    try:
        q, kv = int(parts[0]), int(parts[1])
        window = None
        if len(parts) > 2 and parts[2].lower() not in ("none", "full", "-", ""):
            window = int(parts[2])
        n_global = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise ExportError(f"--spec {raw!r}: the parts of 'q/kv[/W[/G]]' must be integers "
                          f"(W may be 'none')") from None
    fields = {"window": window, "n_global": n_global, **overrides}
    return AttentionSpec(d_model=d, n_heads=h, n_q_heads=q, n_kv_heads=kv, **fields)


def parse_spec(text: str, *, d_model: int | None = None, n_heads: int | None = None, **overrides) -> AttentionSpec:
    """A spec given directly: a variant name ('sqa', 'SW-SQA'), 'q/kv[/W[/G]]' (W may be 'none'),
    or a JSON object of AttentionSpec fields. d_model / n_heads default to the SQA paper's 256 / 16
    for names and head counts. overrides: window, n_global, causal, rope, bias. Raises ExportError."""
    raw = str(text).strip()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ExportError(f"--spec {raw!r} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ExportError(f"--spec {raw!r}: a JSON spec must be an object of AttentionSpec fields")
            return AttentionSpec.from_dict({**data, **overrides})
        d = 256 if d_model is None else d_model
        h = 16 if n_heads is None else n_heads
        if "/" in raw:
            return _heads_spec(raw, d, h, overrides)
        try:
            normalise_variant(raw)
        except SpecError:
            raise ExportError(f"--spec {raw!r} is not known: give a variant name ({', '.join(VARIANTS)}), "
                              f"'q/kv[/W[/G]]' or a JSON object of AttentionSpec fields") from None
        return AttentionSpec.variant(raw, d, h, **overrides)
    except SpecError as exc:
        raise ExportError(f"--spec {raw!r}: {exc}") from None


# ----- recommend: tolerance, budgets, length --------------------------------------------------------
def parse_tolerance(text) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01 (a relative loss increase). Raises RecommendError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or not 0 <= text < 1:
            raise RecommendError(f"tolerance={text!r} is not allowed: a fraction in [0, 1), e.g. 0.01 (= 1%)")
        return float(text)
    try:
        return parse_fraction(text, "--tolerance")
    except ExportError as exc:
        raise RecommendError(str(exc)) from None


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text, what: str = "--max-kv-cache") -> int:
    """'1073741824', '1GiB', '512 MB' -> bytes. Raises RecommendError."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        value = _scaled(text, r"([0-9.eE+]+)\s*([kmgt]i?b|b)?", _BYTE_UNITS, "")
    if not math.isfinite(value) or value <= 0:
        raise RecommendError(f"{what} {text!r} cannot be parsed: give bytes > 0, e.g. 1073741824, 1GiB or 512MB")
    return int(value)


def parse_latency_budget(text, what: str = "--max-latency") -> float:
    """A latency budget in seconds (a number, or '50ms'). Raises RecommendError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise RecommendError(f"{what} {text!r} is not allowed: seconds > 0")
        return float(text)
    try:
        return parse_seconds(text, what)
    except ExportError as exc:
        raise RecommendError(str(exc)) from None


def parse_seq_len(text) -> int:
    """'32k' -> 32768, '4096' -> 4096. Raises RecommendError."""
    raw = str(text).strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = int(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = 0
    if value < 1:
        raise RecommendError(f"--seq-len {text!r} is not a sequence length: a positive integer, k = 1024 (32k = 32768)")
    return value
