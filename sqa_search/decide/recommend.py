"""`sqa-search recommend`: which head configuration to use on a given hardware, sequence length
and workload, within a quality tolerance, and why.

Where the figures come from, and how each is labelled:

* **Loss**: a study's trials (``--study``: the proxy model's validation loss, measured), or,
  without a study, the SQA paper's quality table (Filipek 2025, arXiv 2510.01817), labelled a
  PRIOR: it was published for one model (8 layers, d=256, H=16, one epoch of Wikipedia) and
  is mapped onto yours by variant name, not measured on it.
* **Speed**: the study's timings when the study ran on the target hardware at the asked shape
  (``measured``, with the fingerprint it ran on); otherwise the cost model for the target
  (``predicted``, with the profile and its calibration: `sqa_search.speed.cost.Prediction`). A study
  that ran on other hardware, or timed another mode or length, gives the loss only, and the
  output says so.
* **KV cache**: analytic (`AttentionSpec.kv_cache_bytes`, all layers).

Ranking: the fastest configuration whose loss is within the tolerance (of MHA's loss, or of the
best trial's with ``--tolerance-vs best``) and inside the budgets. Decode is different and the
output says so: one token's step reads the whole KV cache, so decode is ranked by KV-cache size
(key/value heads); SQA's advantage (fewer query heads, fewer FLOPs) is in prefill and training.

    sqa-search recommend --hardware h100 --seq-len 32k --mode train --tolerance 1%
    sqa-search recommend --study studies/quickstart --hardware local
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..layer.spec import AttentionSpec, SpecError
from .._format import fmt_bytes as _fmt_bytes, fmt_s as _fmt_s, fmt_x as _fmt_x
from ..errors import UserError

__all__ = [
    "RecommendError",
    "Candidate",
    "Recommendation",
    "recommend",
    "parse_tolerance",
    "parse_bytes",
    "PAPER_QUALITY",
    "PAPER_CITATION",
    "add_arguments",
    "run",
]

# The SQA paper's quality table: validation loss of its dense model after one epoch of Wikipedia.
PAPER_QUALITY: dict[str, float] = {
    "mha": 1.198, "gqa": 1.218, "mqa": 1.250, "sqa": 1.227, "ssqa": 1.220, "xsqa": 1.243, "xsmqa": 1.282,
}
PAPER_CITATION = "Filipek 2025, arXiv 2510.01817, Table (quality), 8-layer d=256 dense model, 1 epoch Wikipedia"
PAPER_MODEL = {"d_model": 256, "n_heads": 16, "n_layers": 8}
MODES = ("train", "prefill", "decode")


class RecommendError(UserError):
    """A recommendation that cannot be made as asked; the message says which input and why."""


# ----- parsing -------------------------------------------------------------------------------------
def parse_tolerance(text) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01 (a relative loss increase). Raises RecommendError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or not 0 <= text < 1:
            raise RecommendError(f"tolerance={text!r} is not allowed: a fraction in [0, 1), e.g. 0.01 (= 1%)")
        return float(text)
    from .export import ExportError, parse_fraction

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
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgt]i?b|b)?\s*", str(text).lower())
        try:
            value = float(m.group(1)) * _BYTE_UNITS[m.group(2) or ""] if m else float("nan")
        except ValueError:
            value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise RecommendError(f"{what} {text!r} cannot be parsed: give bytes > 0, e.g. 1073741824, 1GiB or 512MB")
    return int(value)


def _parse_seconds(text, what: str) -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise RecommendError(f"{what} {text!r} is not allowed: seconds > 0")
        return float(text)
    from .export import ExportError, parse_seconds

    try:
        return parse_seconds(text, what)
    except ExportError as exc:
        raise RecommendError(str(exc)) from None


def _parse_seq_len(text) -> int:
    raw = str(text).strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = int(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = 0
    if value < 1:
        raise RecommendError(f"--seq-len {text!r} is not a sequence length: a positive integer, k = 1024 (32k = 32768)")
    return value


# ----- formatting ----------------------------------------------------------------------------------


def _fmt_pct(x) -> str:
    return "-" if x is None else f"{x:+.2f}%"


def _render(headers, rows) -> str:
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ----- results -------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One configuration considered, with every figure and where it came from."""

    spec: AttentionSpec
    label: str
    loss: float | None
    loss_source: str  # "PRIOR: ..." or "measured: study S trial N (val_loss)"
    latency_s: float | None
    latency_source: str  # "measured on DEVICE (fingerprint F)" or "predicted by PROFILE (calibration)"
    latency_measured: bool
    kv_cache_bytes: int
    trial: int | None = None
    fingerprint_id: str | None = None
    calibration: str | None = None  # Prediction.calibration when predicted
    bound: str | None = None  # Prediction.bound when predicted
    loss_change_pct: float | None = None  # against the tolerance reference
    loss_change_vs_mha_pct: float | None = None
    speedup_vs_mha: float | None = None
    speedup_vs_gqa: float | None = None
    eligible: bool = False
    status: str = ""  # recommended | alternative | within tolerance | why it was left out
    needed_tolerance_pct: float | None = None  # the tolerance that would admit it
    reasons: list = field(default_factory=list)  # why it was left out (empty when eligible)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict()
        return data


@dataclass
class Recommendation:
    """What `recommend` chose, the runners-up, every candidate considered and why."""

    choice: Candidate
    alternatives: list
    candidates: list
    hardware: str  # "local" or a profile name
    hardware_name: str
    seq_len: int
    mode: str
    batch: int
    dtype: str
    what: str
    n_layers: int
    tolerance: float
    tolerance_vs: str
    reference_label: str
    reference_loss: float
    max_kv_cache_bytes: int | None
    max_latency_s: float | None
    ranked_by: str  # "latency" | "kv_cache"
    speed_source: str  # "measured" | "predicted"
    quality_source: str  # "study" | "prior"
    study: str | None
    why: str
    notes: list = field(default_factory=list)
    footnotes: dict = field(default_factory=dict)

    @property
    def spec(self) -> AttentionSpec:
        return self.choice.spec

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["choice"] = self.choice.to_dict()
        data["alternatives"] = [c.to_dict() for c in self.alternatives]
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return data

    def render(self) -> str:
        speed = ("MEASURED" if self.speed_source == "measured" else "PREDICTED by the cost model")
        loss = ("MEASURED in study " + repr(self.study) if self.quality_source == "study"
                else "a PRIOR (the SQA paper's table), not a measurement")
        c = self.choice
        lines = [
            f"Recommendation for {self.mode} at N={self.seq_len}, batch {self.batch}, {self.dtype}, on "
            f"{self.hardware_name}",
            f"  speed: {speed}; loss: {loss}",
            "",
            f"  -> {c.label}   (n_q_heads={c.spec.n_q_heads}, n_kv_heads={c.spec.n_kv_heads}, "
            f"window={c.spec.window}, n_global={c.spec.n_global}, d_model={c.spec.d_model}, n_heads={c.spec.n_heads})",
            "",
            "Why: " + self.why,
        ]
        if self.alternatives:
            lines.append("Runners-up: " + "; ".join(
                f"{a.label} ({_fmt_x(a.speedup_vs_mha)} vs MHA, loss {_fmt_pct(a.loss_change_vs_mha_pct)}, "
                f"KV {_fmt_bytes(a.kv_cache_bytes)})" for a in self.alternatives))
        lines += ["", self.table(), ""]
        for tag, text in self.footnotes.items():
            lines.append(f"[{tag}] {text}")
        if self.notes:
            lines.append("")
            lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self) -> str:
        with_trial = any(c.trial is not None for c in self.candidates)
        headers = ["", "configuration"] + (["trial"] if with_trial else []) + [
            "loss", "loss vs MHA", "speedup vs MHA", "vs GQA", "KV cache", "latency", "figures", "status"]
        rows = []
        for c in self.candidates:
            mark = "*" if c is self.choice else ""
            loss_tag = "prior" if c.loss_source.startswith("PRIOR") else "study"
            speed_tag = "measured" if c.latency_measured else "predicted"
            row = [mark, c.label] + ([("-" if c.trial is None else c.trial)] if with_trial else []) + [
                "-" if c.loss is None else f"{c.loss:.4f}", _fmt_pct(c.loss_change_vs_mha_pct),
                _fmt_x(c.speedup_vs_mha), _fmt_x(c.speedup_vs_gqa), _fmt_bytes(c.kv_cache_bytes),
                _fmt_s(c.latency_s), f"loss:{loss_tag} speed:{speed_tag}", c.status]
            rows.append(row)
        return _render(headers, rows)


# ----- hardware ------------------------------------------------------------------------------------
@dataclass
class _Target:
    kind: str  # "local" | "profile"
    name: str
    display: str
    fingerprint: dict | None
    profile: object | None  # HardwareProfile for predictions (None: none matches a local GPU)


def _model_token(display_name: str) -> str | None:
    """'NVIDIA H100 SXM5 80GB' -> 'H100'; 'NVIDIA GeForce RTX 4090 24GB' -> '4090'."""
    for token in re.findall(r"[A-Za-z0-9]+", display_name):
        if any(ch.isdigit() for ch in token) and not token.upper().endswith("GB"):
            return token.upper()
    return None


def _same_hardware(fp: dict | None, profile) -> bool:
    """Whether timings with fingerprint `fp` were taken on the hardware `profile` describes."""
    if not fp or profile is None or fp.get("device_type") != profile.device_type:
        return False
    name = str(fp.get("device_name") or "")
    if profile.device_type == "cpu":
        on = profile.calibrated_on
        return bool(name) and on is not None and name in (on.cpu_model, on.device_name)
    token = _model_token(profile.display_name)
    tokens = {t.upper() for t in re.findall(r"[A-Za-z0-9]+", name)}
    if not token or token not in tokens:
        return False
    display = profile.display_name.upper()
    if ("PCIE" in tokens) != ("PCIE" in display):
        return False
    mem = fp.get("gpu_memory_bytes")
    if mem and profile.mem_bytes:
        return abs(mem - profile.mem_bytes) / profile.mem_bytes < 0.15
    return True


def _resolve_target(hardware: str, device: str | None) -> _Target:
    from ..speed.hardware import CostError, list_profiles, load_profile

    if str(hardware).strip().lower() == "local":
        import torch

        from ..speed.hardware import fingerprint

        dev = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            fp = fingerprint(dev).to_dict()  # the stored form, as a study's trials hold it
        except Exception as exc:  # a device that is not there
            raise RecommendError(f"--device {dev!r} is not usable here: {exc}") from None
        profile = None
        if fp["device_type"] == "cpu":
            profile = load_profile("cpu-generic")
        else:
            for name in list_profiles():
                candidate = load_profile(name)
                if _same_hardware(fp, candidate):
                    profile = candidate
                    break
        return _Target("local", "local", f"this machine ({fp['device_name']}, {fp['device_type']})", fp, profile)
    try:
        profile = load_profile(hardware)
    except CostError:
        raise RecommendError(
            f"--hardware {hardware!r} is not known: choose local or one of {', '.join(list_profiles())} "
            f"(aliases h100, a100, 4090, cpu; or a profile .yaml path)") from None
    return _Target("profile", profile.name, f"{profile.display_name} (profile {profile.name})", None, profile)


# ----- candidates ----------------------------------------------------------------------------------
@dataclass
class _Row:
    spec: AttentionSpec
    loss: float | None
    loss_source: str
    trial: int | None = None
    timing: list = field(default_factory=list)
    fingerprint: dict | None = None


def _study_rows(handle) -> list[_Row]:
    from optuna.trial import TrialState

    quality = handle.space.objectives.quality
    rows, seen = [], set()
    for t in handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        if "spec" not in attrs:
            continue
        key = attrs.get("spec_key") or json.dumps(attrs["spec"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        value = attrs.get("quality")
        if value is not None and not math.isfinite(value):
            value = None
        train = attrs.get("train") or {}
        rows.append(_Row(AttentionSpec.from_dict(attrs["spec"]), value,
                         f"measured: study {handle.space.name!r} trial {t.number} ({quality} after "
                         f"{train.get('steps', '?')} steps)",
                         t.number, list(attrs.get("timing") or []), attrs.get("fingerprint")))
    return rows


def _prior_rows(d_model: int, n_heads: int, notes: list) -> list[_Row]:
    rows, skipped = [], []
    for name, loss in PAPER_QUALITY.items():
        try:
            spec = AttentionSpec.variant(name, d_model, n_heads)
        except SpecError:
            skipped.append(name)
            continue
        if any(r.spec == spec for r in rows):  # small H: two names can be one configuration
            continue
        rows.append(_Row(spec, loss, f"PRIOR: {PAPER_CITATION}"))
    if skipped:
        notes.append(f"n_heads={n_heads} cannot form {', '.join(skipped)}: left out.")
    return rows


def _study_hardware(rows: list[_Row]) -> tuple[dict | None, list[str], int]:
    """The most common fingerprint of a study's timings, their fingerprint ids, and how many devices."""
    fps = [r.fingerprint for r in rows if r.fingerprint]
    if not fps:
        return None, [], 0
    counted = Counter(json.dumps(fp, sort_keys=True, default=str) for fp in fps)
    main = json.loads(counted.most_common(1)[0][0])
    ids = sorted({rec.get("fingerprint_id") for r in rows for rec in r.timing if rec.get("fingerprint_id")})
    devices = {fp.get("device_name") for fp in fps}
    return main, ids, len(devices)


def _dtype_bytes(dtype: str) -> int:
    return 4 if str(dtype).replace("torch.", "") in ("float32", "fp32", "float", "tf32") else 2


# ----- the recommendation --------------------------------------------------------------------------
def recommend(
    hardware: str = "local",
    *,
    seq_len: int | str | None = None,
    mode: str | None = None,
    batch: int | None = None,
    tolerance: float | str = 0.01,
    tolerance_vs: str = "mha",
    max_kv_cache_bytes: int | str | None = None,
    max_latency_s: float | str | None = None,
    study=None,
    d_model: int | None = None,
    n_heads: int | None = None,
    n_layers: int | None = None,
    dtype: str | None = None,
    what: str | None = None,
    device: str | None = None,
    n_alternatives: int = 3,
) -> Recommendation:
    """Recommend a head configuration; see the module docstring. Raises RecommendError.

    Without a study: the named variants of the SQA paper's quality table at d_model/n_heads
    (default the paper's 256/16, 8 layers), speed predicted for `hardware`, loss from the prior.
    With a study: its complete trials; shape defaults (seq_len, mode, batch, dtype, what) come
    from the study's target. hardware: "local" or a cost-model profile (name, alias or path).
    """
    from ..speed.cost import CostError, canonical_dtype, predict
    from ..speed.workload import Workload, WorkloadError

    notes: list[str] = []
    footnotes: dict[str, str] = {}
    tol = parse_tolerance(tolerance)
    if tolerance_vs not in ("mha", "best"):
        raise RecommendError(f"--tolerance-vs {tolerance_vs!r} is not allowed: choose mha or best")
    max_kv = parse_bytes(max_kv_cache_bytes) if max_kv_cache_bytes is not None else None
    max_lat = _parse_seconds(max_latency_s, "--max-latency") if max_latency_s is not None else None
    if mode is not None and mode not in MODES:
        raise RecommendError(f"--mode {mode!r} is not allowed: choose one of {', '.join(MODES)}")
    if what is not None and what not in ("layer", "block", "model"):
        raise RecommendError(f"--what {what!r} is not allowed: choose layer, block or model")
    for name, value in (("--batch", batch), ("--layers", n_layers), ("--d-model", d_model), ("--heads", n_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecommendError(f"{name} {value!r} is not allowed: an integer >= 1")
    if isinstance(n_alternatives, bool) or not isinstance(n_alternatives, int) or n_alternatives < 0:
        raise RecommendError(f"n_alternatives={n_alternatives!r} is not allowed: an integer >= 0")
    target = _resolve_target(hardware, device)

    # ----- where the candidates and their losses come from
    handle = None
    if study is not None:
        from ..search.space import SpaceError
        from ..search.engine import StudyError, open_study

        path = Path(study)
        if not path.exists():
            raise RecommendError(f"--study {str(path)!r} does not exist (a study folder, e.g. studies/quickstart)")
        try:
            handle = open_study(path)
        except (StudyError, SpaceError) as exc:
            raise RecommendError(f"--study {str(path)!r}: {exc}") from None
        space, st = handle.space, handle.space.target
        rows = _study_rows(handle)
        if not rows:
            raise RecommendError(f"--study {str(path)!r} has no complete trial to recommend from")
        if space.objectives.quality != "val_loss":
            raise RecommendError(f"study {space.name!r} optimises {space.objectives.quality}; recommend reads a loss "
                                 f"(objectives.quality: val_loss)")
        m = space.model
        for name, given, have in (("--d-model", d_model, m.d_model), ("--heads", n_heads, m.n_heads),
                                  ("--layers", n_layers, m.n_layers)):
            if given is not None and given != have:
                notes.append(f"{name} {given} ignored: the study's model has {have}.")
        d_model, n_heads, n_layers, d_ff, causal = m.d_model, m.n_heads, m.n_layers, m.d_ff, m.causal
        seq_len = _parse_seq_len(seq_len) if seq_len is not None else max(st.seq_len)
        mode = mode or st.mode
        batch = batch or st.batch
        what = what or st.what
        quality_source = "study"
        footnotes["study"] = (f"loss MEASURED: validation loss of the proxy model ({n_layers} "
                              f"layer{'s' if n_layers != 1 else ''}, d_model {d_model}, "
                              f"H {n_heads}) trained in study {space.name!r} ({handle.directory}); trial numbers in "
                              f"the table")
    else:
        if seq_len is None:
            raise RecommendError("--seq-len is needed without --study (e.g. --seq-len 32k)")
        seq_len = _parse_seq_len(seq_len)
        d_model = d_model or PAPER_MODEL["d_model"]
        n_heads = n_heads or PAPER_MODEL["n_heads"]
        n_layers = n_layers or PAPER_MODEL["n_layers"]
        d_ff, causal = None, True
        mode = mode or "prefill"
        batch = batch or 1
        what = what or "model"
        if d_model % n_heads:
            raise RecommendError(f"--heads {n_heads} is not allowed with --d-model {d_model}: the heads must divide "
                                 f"the model width (head_dim = d_model / heads), e.g. --heads 16")
        try:
            rows = _prior_rows(d_model, n_heads, notes)
        except SpecError as exc:
            raise RecommendError(f"--d-model {d_model} / --heads {n_heads}: {exc}") from None
        if not rows:
            raise RecommendError(f"--heads {n_heads} forms none of the paper's variants ({', '.join(PAPER_QUALITY)})")
        quality_source = "prior"
        footnotes["prior"] = (f"PRIOR, not a measurement: validation loss from {PAPER_CITATION}; published for that "
                              f"model and mapped onto d_model={d_model}, H={n_heads} by variant name. Run a study "
                              f"(sqa-search run) to measure it for your model.")
        if (d_model, n_heads) != (PAPER_MODEL["d_model"], PAPER_MODEL["n_heads"]):
            notes.append(f"The prior losses were measured at d_model=256, H=16; at d_model={d_model}, H={n_heads} "
                         f"they are a guess by analogy.")
    if mode == "decode" and not causal:
        raise RecommendError(f"--mode decode needs a causal model; study {handle.space.name!r} is an encoder")

    # ----- where the speed comes from
    use_measured = False
    study_fp, study_ids = None, []
    if handle is not None:
        st = handle.space.target
        study_fp, study_ids, n_devices = _study_hardware(rows)
        if n_devices > 1:
            notes.append(f"The study's timings come from {n_devices} different devices; the most common is used "
                         f"to decide whether they describe the target.")
        if not st.measured:
            ran_on = None
            same_hw = False
        else:
            ran_on = f"{(study_fp or {}).get('device_name', 'an unknown device')}" + (
                f" (fingerprint {', '.join(study_ids)})" if study_ids else "")
            if target.kind == "local":
                same_hw = bool(study_fp) and (study_fp.get("device_type"), study_fp.get("device_name")) == (
                    target.fingerprint.get("device_type"), target.fingerprint.get("device_name"))
            else:
                same_hw = _same_hardware(study_fp, target.profile)
        shape_ok = (mode == st.mode and seq_len in st.seq_len and batch == st.batch and what == st.what
                    and (dtype is None or dtype == st.dtype))
        use_measured = same_hw and shape_ok
        if use_measured:
            dtype = st.dtype
            notes.append(f"Speed: the study's own measurements on {ran_on}, {st.mode} at N={seq_len}, batch "
                         f"{st.batch}, {st.dtype}, timing the {st.what}; the target ({target.display}) is the "
                         f"hardware the study ran on.")
        elif ran_on is None:
            notes.append(f"The study's latencies are themselves predictions (profile {st.hardware}); its losses "
                         f"are used and speed is PREDICTED by the cost model for the target {target.display} at "
                         f"the asked shape.")
        elif not same_hw:
            notes.append(f"The study ran on {ran_on}, not on the target {target.display}: its losses are used, "
                         f"its timings are not; speed is PREDICTED by the cost model for the target.")
        else:
            notes.append(f"The study timed {st.mode} at N={list(st.seq_len)}, batch {st.batch}, {st.dtype}, the "
                         f"{st.what}; you asked {mode} at N={seq_len}, batch {batch}, "
                         f"{dtype or st.dtype}, the {what}: its losses are used, speed is PREDICTED by the cost "
                         f"model (or re-run the study's space at this shape).")
    profile = target.profile
    if not use_measured:
        if profile is None:
            raise RecommendError(f"no cost-model profile describes {target.display}: pass --hardware PROFILE "
                                 f"(see python -m sqa_search.speed.cost list), or a --study measured here at this shape")
        dtype = dtype or ("bfloat16" if profile.device_type == "cuda" else "float32")
        scope = {"layer": "one attention layer", "block": "one block",
                 "model": f"the whole {n_layers}-layer model (d_model {d_model}, H {n_heads}, SwiGLU FFN)"}[what]
        footnotes["predicted"] = (f"speed PREDICTED by the cost model (roofline), profile {profile.name} "
                                  f"({profile.display_name}), {profile.calibration_label}; {dtype}, {mode}, "
                                  f"{scope}, batch {batch}, N={seq_len}")
        if not profile.calibration:
            notes.append(f"Profile {profile.name} is not calibrated: the factors are guesses from datasheets; "
                         f"speedup ratios are more reliable than absolute seconds.")
    else:
        footnotes["measured"] = (f"speed MEASURED in study {handle.space.name!r} on "
                                 f"{(study_fp or {}).get('device_name', '?')}, torch "
                                 f"{(study_fp or {}).get('torch_version', '?')}, "
                                 f"{(study_fp or {}).get('threads', '?')} thread(s) (fingerprint "
                                 f"{', '.join(study_ids) or '?'}); median of repeated timings")

    # ----- figures per candidate
    def kv_bytes(spec):
        return n_layers * spec.kv_cache_bytes(seq_len, _dtype_bytes(dtype), batch)

    def speed(spec, row: _Row | None):
        """(seconds, source, measured, fingerprint_id, calibration, bound) or seconds None."""
        if use_measured:
            recs = [r for r in (row.timing if row else []) if r.get("seq_len") == seq_len and r.get("median_s")]
            if not recs:
                return None, f"no timing at N={seq_len} in the study", True, None, None, None
            fid = recs[0].get("fingerprint_id")
            device_name = (row.fingerprint or {}).get("device_name", "?")
            source = f"measured on {device_name} (fingerprint {fid}, backend {recs[0].get('backend')})"
            return recs[0]["median_s"], source, True, fid, None, None
        try:
            workload = Workload(mode=mode, seq_len=seq_len, batch=batch, scope=what, dtype=canonical_dtype(dtype),
                                n_layers=n_layers, d_ff=d_ff)
            pred = predict(spec, profile, workload)
        except (CostError, SpecError, WorkloadError) as exc:
            return None, f"not predictable: {exc}", False, None, None, None
        return (pred.seconds, f"predicted by {pred.profile} ({pred.calibration}), {pred.bound}-bound, path {pred.path}",
                False, None, pred.calibration, pred.bound)

    candidates: list[Candidate] = []
    for row in rows:
        secs, source, measured, fid, cal, bound = speed(row.spec, row)
        candidates.append(Candidate(
            spec=row.spec, label=row.spec.label, loss=row.loss, loss_source=row.loss_source, latency_s=secs,
            latency_source=source, latency_measured=measured, kv_cache_bytes=kv_bytes(row.spec), trial=row.trial,
            fingerprint_id=fid, calibration=cal, bound=bound))

    if use_measured:
        shaky = []
        for row in rows:
            flags = sorted({f for r in row.timing if r.get("seq_len") == seq_len for f in (r.get("flags") or [])})
            if flags:
                shaky.append(f"{row.spec.label} ({', '.join(flags)})")
        if shaky:
            notes.append("Timings the study flagged (a busy or unsettled machine; re-run them before trusting "
                         "close calls): " + "; ".join(shaky) + ".")

    # baselines for the speedup columns: the candidates themselves, else predicted where we predict
    baselines = {}
    for name in ("mha", "gqa"):
        try:
            base_spec = AttentionSpec.variant(name, d_model, n_heads, causal=causal)
        except SpecError:
            baselines[name] = None
            continue
        found = [c for c in candidates if c.spec == base_spec and c.latency_s]
        if found:
            baselines[name] = found[0].latency_s
        elif not use_measured:
            baselines[name] = speed(base_spec, None)[0]
        else:
            baselines[name] = None
            notes.append(f"{name.upper()} is not among the study's complete trials: no measured speedup against it.")
    for c in candidates:
        for name in ("mha", "gqa"):
            base = baselines[name]
            value = base / c.latency_s if (base and c.latency_s) else None
            setattr(c, f"speedup_vs_{name}", value)

    # ----- the loss reference
    with_loss = [c for c in candidates if c.loss is not None]
    if not with_loss:
        raise RecommendError("no candidate has a loss figure to apply the tolerance to")
    mha = [c for c in with_loss if c.spec.variant_name == "mha" and c.spec.n_global == 0]
    if tolerance_vs == "mha" and mha:
        ref, ref_name = mha[0], "MHA's"
    else:
        ref = min(with_loss, key=lambda c: c.loss)
        ref_name = f"the best candidate's ({ref.label})"
        if tolerance_vs == "mha":
            notes.append("MHA is not among the candidates with a loss: the tolerance is taken against the best one.")
    limit = ref.loss + tol * abs(ref.loss)
    mha_loss = mha[0].loss if mha else None
    for c in candidates:
        if c.loss is not None:
            c.loss_change_pct = 100 * (c.loss - ref.loss) / abs(ref.loss)
            if mha_loss is not None:
                c.loss_change_vs_mha_pct = 100 * (c.loss - mha_loss) / abs(mha_loss)

    # ----- eligibility and ranking
    decode = mode == "decode"
    ranked_by = "kv_cache" if decode else "latency"
    for c in candidates:
        reasons = []
        if c.loss is None:
            reasons.append("no loss figure")
        elif c.loss > limit + 1e-12:
            reasons.append(f"over tolerance ({_fmt_pct(c.loss_change_pct)})")
            c.needed_tolerance_pct = c.loss_change_pct
        if c.latency_s is None:
            reasons.append(c.latency_source)
        if max_kv is not None and c.kv_cache_bytes > max_kv:
            reasons.append(f"over KV budget ({_fmt_bytes(c.kv_cache_bytes)})")
        if max_lat is not None and c.latency_s is not None and c.latency_s > max_lat:
            reasons.append(f"over latency budget ({_fmt_s(c.latency_s)})")
        c.eligible = not reasons
        c.reasons = reasons
        c.status = "within tolerance" if c.eligible else ", ".join(reasons)

    def rank_key(c):
        lat = c.latency_s if c.latency_s is not None else math.inf
        loss = c.loss if c.loss is not None else math.inf
        return (c.kv_cache_bytes, lat, loss) if decode else (lat, loss, c.kv_cache_bytes)

    eligible = sorted([c for c in candidates if c.eligible], key=rank_key)
    budget_text = "".join([f", KV cache <= {_fmt_bytes(max_kv)}" if max_kv is not None else "",
                           f", latency <= {_fmt_s(max_lat)}" if max_lat is not None else ""])
    if not eligible:
        nearest = sorted(candidates, key=lambda c: (len(c.reasons), rank_key(c)))[:3]
        raise RecommendError(
            f"no configuration matches: loss within {100 * tol:g}% of {ref_name} {ref.loss:.4g}{budget_text} "
            f"({mode}, N={seq_len}); nearest: " + "; ".join(f"{c.label}: {c.status}" for c in nearest))
    choice, alternatives = eligible[0], eligible[1:1 + n_alternatives]
    choice.status = "RECOMMENDED"
    for a in alternatives:
        a.status = "alternative"
    candidates.sort(key=lambda c: (not c.eligible, eligible.index(c) if c.eligible else 0, rank_key(c)))

    # ----- why, in words
    kind = "measured" if use_measured else "predicted"
    src = "" if use_measured else f" on {profile.name}"
    vs = []
    if choice.speedup_vs_mha is not None:
        vs.append(f"{choice.speedup_vs_mha:.2f}x MHA's speed")
    if choice.speedup_vs_gqa is not None:
        vs.append(f"{choice.speedup_vs_gqa:.2f}x GQA's")
    speed_words = f"{kind}{src}: {' and '.join(vs) if vs else _fmt_s(choice.latency_s)}"
    loss_words = (f"loss {choice.loss:.4f} ({_fmt_pct(choice.loss_change_pct)} against {ref_name} {ref.loss:.4f}, "
                  f"{'prior' if quality_source == 'prior' else 'measured'})")
    within = f"loss within {100 * tol:g}% of {ref_name}{budget_text}"
    pool = f"the {len(eligible)} configurations with {within}" if len(eligible) > 1 else None
    if decode:
        lead = (f"has the smallest KV cache ({_fmt_bytes(choice.kv_cache_bytes)} at N={seq_len}) of {pool}" if pool
                else f"is the only configuration with {within} (KV cache {_fmt_bytes(choice.kv_cache_bytes)} at "
                     f"N={seq_len})")
        why = f"{choice.label} {lead}; decode {speed_words}; {loss_words}."
        notes.insert(0, "Decode is ranked by KV-cache size: each new token reads the whole cache, so decode time "
                        "and memory follow the key/value heads (H_kv), not the query heads. SQA's advantage "
                        "(fewer query heads, fewer attention FLOPs) is in prefill and training; for decode it "
                        "helps only through the KV heads it also cuts.")
    else:
        lead = f"is the fastest of {pool}" if pool else f"is the only configuration with {within}"
        why = (f"{choice.label} {lead}, for {mode} at N={seq_len}; {speed_words}; {loss_words}; "
               f"KV cache {_fmt_bytes(choice.kv_cache_bytes)}.")
    # what a looser tolerance would buy: faster (smaller cache, for decode) but over the tolerance only
    better = [c for c in candidates if not c.eligible and c.needed_tolerance_pct is not None
              and len(c.reasons) == 1
              and rank_key(c)[0] < rank_key(choice)[0]]
    if better:
        better.sort(key=lambda c: c.needed_tolerance_pct)
        gain = (lambda c: f"KV cache {_fmt_bytes(c.kv_cache_bytes)}") if decode else (
            lambda c: f"{_fmt_x(c.speedup_vs_mha)} vs MHA")
        why += " A looser tolerance would admit: " + "; ".join(
            f"{c.label} at {c.needed_tolerance_pct:.2f}% ({gain(c)})" for c in better[:3]) + "."
    if not decode and choice.spec.n_q_heads == n_heads:
        fewer = [c.label for c in eligible if c.spec.n_q_heads < n_heads]
        if not fewer:
            notes.append("The recommendation keeps all query heads: within this tolerance no configuration with "
                         "fewer query heads (SQA) qualifies" + ("; see what a looser tolerance would admit above."
                                                                 if better else "."))
        else:
            notes.append(f"Configurations with fewer query heads ({', '.join(fewer)}) are within tolerance but "
                         f"{kind} slower here at N={seq_len}: SQA cuts the N^2 attention work, which dominates a "
                         f"step only at long sequences.")

    return Recommendation(
        choice=choice, alternatives=alternatives, candidates=candidates, hardware=target.name,
        hardware_name=target.display, seq_len=seq_len, mode=mode, batch=batch, dtype=dtype, what=what,
        n_layers=n_layers, tolerance=tol, tolerance_vs=tolerance_vs, reference_label=ref.label,
        reference_loss=ref.loss, max_kv_cache_bytes=max_kv, max_latency_s=max_lat, ranked_by=ranked_by,
        speed_source="measured" if use_measured else "predicted", quality_source=quality_source,
        study=handle.space.name if handle is not None else None, why=why, notes=notes, footnotes=footnotes)


# ----- `sqa-search recommend` ----------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hardware", default="local",
                        help="a cost-model profile (h100-sxm, a100-80gb, ...; aliases h100, a100; or a .yaml) or "
                             "'local' for the device at hand (default local)")
    parser.add_argument("--seq-len", default=None, help="sequence length N; k = 1024 (32k). Default: the study's")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="train (forward+backward), prefill (forward) or decode (one token against a cache "
                             "of N). Default: the study's, else prefill")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the study's, else 1)")
    parser.add_argument("--tolerance", default="1%",
                        help="loss increase allowed, relative: 1%% or 0.01 (default 1%%)")
    parser.add_argument("--tolerance-vs", choices=("mha", "best"), default="mha",
                        help="the loss the tolerance is taken against: MHA's (default) or the best candidate's")
    parser.add_argument("--max-kv-cache", default=None, metavar="BYTES",
                        help="KV-cache budget of the whole model at N (e.g. 1073741824, 1GiB, 512MB)")
    parser.add_argument("--max-latency", default=None, metavar="SECONDS",
                        help="latency budget per step (e.g. 0.05, 50ms)")
    parser.add_argument("--study", default=None, help="a study folder to draw losses (and timings) from")
    parser.add_argument("--d-model", type=int, default=None, help="without a study: model width (default 256)")
    parser.add_argument("--heads", type=int, default=None, help="without a study: baseline heads H (default 16)")
    parser.add_argument("--layers", type=int, default=None, help="without a study: layers (default 8)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: the study's when measured; bfloat16 on GPU "
                             "profiles, float32 on CPU)")
    parser.add_argument("--what", choices=("layer", "block", "model"), default=None,
                        help="what the speed figures cover (default: the study's, else the whole model)")
    parser.add_argument("--device", default=None, help="with --hardware local: cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--alternatives", type=int, default=3, help="runners-up to list (default 3)")
    parser.add_argument("--json", action="store_true", help="print the structured result as JSON")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also export the recommended configuration into DIR (see sqa-search export)")


def run(args) -> int:
    from .export import export_recommendation

    result = recommend(
        args.hardware, seq_len=args.seq_len, mode=args.mode, batch=args.batch, tolerance=args.tolerance,
        tolerance_vs=args.tolerance_vs, max_kv_cache_bytes=args.max_kv_cache, max_latency_s=args.max_latency,
        study=args.study, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, dtype=args.dtype,
        what=args.what, device=args.device, n_alternatives=args.alternatives)
    exported = export_recommendation(result, args.export) if args.export else None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.render())
    if exported is not None:
        import sys

        print(("" if args.json else "\n") + exported.summary(), file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv=None) -> int:
    """`python -m sqa_search.decide.recommend`: the same as `sqa-search recommend`, errors included."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["recommend", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
