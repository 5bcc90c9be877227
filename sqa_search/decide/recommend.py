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

`recommend()` runs in stages, each a plain function: the inputs (`read_inputs`), the target
hardware (`resolve_target`), the candidates (`study_pool` / `prior_pool`), where the speed comes
from (`plan_speed`), the latencies (`price_candidates`, the only stage that times or predicts),
the ranking and the prose (ranking.py).

    sqa-search recommend --hardware h100 --seq-len 32k --mode train --tolerance 1%
    sqa-search recommend --study studies/quickstart --hardware local
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..common import DTYPE_BYTES, resolve_device_name
from ..layer.spec import AttentionSpec, SpecError
from ..search.space import SpaceError
from ..speed.cost import canonical_dtype, predict
from ..speed.hardware import CostError, Fingerprint, list_profiles, load_profile
from ..speed.workload import KIND_NOTES, MODES, SCOPES, Workload, WorkloadError, latency_kind, latency_label
from .candidates import PAPER_CITATION, PAPER_MODEL, PAPER_QUALITY, CandidateRow, prior_rows, study_hardware, study_rows
from .errors import RecommendError
from .parse import parse_bytes, parse_latency_budget, parse_seq_len, parse_tolerance
from .ranking import explain, rank
from .recommendation import Candidate, Recommendation

__all__ = ["RecommendError", "Candidate", "Recommendation", "recommend", "parse_tolerance", "parse_bytes",
           "PAPER_QUALITY", "PAPER_CITATION"]


# ----- stage 1: the inputs -------------------------------------------------------------------------
@dataclass
class Ask:
    """The flags, checked: what the user asked for, before a study fills in what was left out."""

    hardware: str
    device: str | None
    seq_len: int | str | None  # parsed with the candidates: a study's target is the default
    mode: str | None
    batch: int | None
    dtype: str | None
    what: str | None
    d_model: int | None
    n_heads: int | None
    n_layers: int | None
    tolerance: float
    tolerance_vs: str
    max_kv: int | None
    max_lat: float | None
    study: object
    n_alternatives: int


def read_inputs(hardware, *, seq_len, mode, batch, tolerance, tolerance_vs, max_kv_cache_bytes, max_latency_s,
                study, d_model, n_heads, n_layers, dtype, what, device, n_alternatives) -> Ask:
    """Every flag checked, in the order the errors have always come. Raises RecommendError."""
    tol = parse_tolerance(tolerance)
    if tolerance_vs not in ("mha", "best"):
        raise RecommendError(f"--tolerance-vs {tolerance_vs!r} is not allowed: choose mha or best")
    max_kv = parse_bytes(max_kv_cache_bytes) if max_kv_cache_bytes is not None else None
    max_lat = parse_latency_budget(max_latency_s, "--max-latency") if max_latency_s is not None else None
    if mode is not None and mode not in MODES:
        raise RecommendError(f"--mode {mode!r} is not allowed: choose one of {', '.join(MODES)}")
    if what is not None and what not in SCOPES:
        raise RecommendError(f"--what {what!r} is not allowed: choose layer, block or model")
    for name, value in (("--batch", batch), ("--layers", n_layers), ("--d-model", d_model), ("--heads", n_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecommendError(f"{name} {value!r} is not allowed: an integer >= 1")
    if isinstance(n_alternatives, bool) or not isinstance(n_alternatives, int) or n_alternatives < 0:
        raise RecommendError(f"n_alternatives={n_alternatives!r} is not allowed: an integer >= 0")
    return Ask(hardware, device, seq_len, mode, batch, dtype, what, d_model, n_heads, n_layers, tol, tolerance_vs,
               max_kv, max_lat, study, n_alternatives)


# ----- stage 2: the target hardware ----------------------------------------------------------------
@dataclass
class Target:
    kind: str  # "local" | "profile"
    name: str
    display: str
    fingerprint: Fingerprint | None
    profile: object | None  # HardwareProfile for predictions (None: none matches a local GPU)


def model_token(display_name: str) -> str | None:
    """'NVIDIA H100 SXM5 80GB' -> 'H100'; 'NVIDIA GeForce RTX 4090 24GB' -> '4090'."""
    for token in re.findall(r"[A-Za-z0-9]+", display_name):
        if any(ch.isdigit() for ch in token) and not token.upper().endswith("GB"):
            return token.upper()
    return None


def same_hardware(fp: Fingerprint | dict | None, profile) -> bool:
    """Whether timings with fingerprint `fp` were taken on the hardware `profile` describes."""
    if not fp or profile is None:
        return False
    fp = Fingerprint.from_dict(fp)
    if fp.device_type != profile.device_type:
        return False
    name = str(fp.device_name or "")
    if profile.device_type == "cpu":
        on = profile.calibrated_on
        return bool(name) and on is not None and name in (on.cpu_model, on.device_name)
    token = model_token(profile.display_name)
    tokens = {t.upper() for t in re.findall(r"[A-Za-z0-9]+", name)}
    if not token or token not in tokens:
        return False
    display = profile.display_name.upper()
    if ("PCIE" in tokens) != ("PCIE" in display):
        return False
    mem = fp.gpu_memory_bytes
    if mem and profile.mem_bytes:
        return abs(mem - profile.mem_bytes) / profile.mem_bytes < 0.15
    return True


def resolve_target(hardware: str, device: str | None) -> Target:
    """'local' (the device at hand, and the profile that describes it) or a cost-model profile."""
    if str(hardware).strip().lower() == "local":
        from ..speed.hardware import fingerprint  # imports torch: only when the device at hand is asked about

        dev = resolve_device_name("auto" if device is None else device)
        try:
            fp = fingerprint(dev)
        except Exception as exc:  # a device that is not there
            raise RecommendError(f"--device {dev!r} is not usable here: {exc}") from None
        profile = None
        if fp.device_type == "cpu":
            profile = load_profile("cpu-generic")
        else:
            for name in list_profiles():
                candidate = load_profile(name)
                if same_hardware(fp, candidate):
                    profile = candidate
                    break
        return Target("local", "local", f"this machine ({fp.device_name}, {fp.device_type})", fp, profile)
    try:
        profile = load_profile(hardware)
    except CostError:
        raise RecommendError(
            f"--hardware {hardware!r} is not known: choose local or one of {', '.join(list_profiles())} "
            f"(aliases h100, a100, 4090, cpu; or a profile .yaml path)") from None
    return Target("profile", profile.name, f"{profile.display_name} (profile {profile.name})", None, profile)


# ----- stage 3: the candidates ---------------------------------------------------------------------
@dataclass
class Pool:
    """The candidates and the shape they are judged at: a study's target and model, or the flags
    and the SQA paper's model."""

    rows: list[CandidateRow]
    seq_len: int
    mode: str
    batch: int
    what: str
    dtype: str | None  # None: chosen with the speed source
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int | None
    causal: bool
    quality_source: str  # "study" | "prior"
    handle: object = None  # the StudyHandle, with a study


def study_pool(ask: Ask, notes: list, footnotes: dict) -> Pool:
    """A study's complete trials, at the study's target shape unless the flags say otherwise."""
    from ..search.engine import StudyError, open_study  # imports optuna: only when a study is asked for

    path = Path(ask.study)
    if not path.exists():
        raise RecommendError(f"--study {str(path)!r} does not exist (a study folder, e.g. studies/quickstart)")
    try:
        handle = open_study(path)
    except (StudyError, SpaceError) as exc:
        raise RecommendError(f"--study {str(path)!r}: {exc}") from None
    space, st = handle.space, handle.space.target
    rows = study_rows(handle)
    if not rows:
        raise RecommendError(f"--study {str(path)!r} has no complete trial to recommend from")
    if space.objectives.quality != "val_loss":
        raise RecommendError(f"study {space.name!r} optimises {space.objectives.quality}; recommend reads a loss "
                             f"(objectives.quality: val_loss)")
    m = space.model
    for name, given, have in (("--d-model", ask.d_model, m.d_model), ("--heads", ask.n_heads, m.n_heads),
                              ("--layers", ask.n_layers, m.n_layers)):
        if given is not None and given != have:
            notes.append(f"{name} {given} ignored: the study's model has {have}.")
    seq_len = parse_seq_len(ask.seq_len) if ask.seq_len is not None else max(st.seq_len)
    footnotes["study"] = (f"loss MEASURED: validation loss of the proxy model ({m.n_layers} "
                          f"layer{'s' if m.n_layers != 1 else ''}, d_model {m.d_model}, "
                          f"H {m.n_heads}) trained in study {space.name!r} ({handle.directory}); trial numbers in "
                          f"the table")
    return Pool(rows, seq_len, ask.mode or st.mode, ask.batch or st.batch, ask.what or st.what, ask.dtype,
                m.d_model, m.n_heads, m.n_layers, m.d_ff, m.causal, "study", handle)


def prior_pool(ask: Ask, notes: list, footnotes: dict) -> Pool:
    """The paper's named variants at --d-model / --heads (default the paper's model), loss from the prior."""
    if ask.seq_len is None:
        raise RecommendError("--seq-len is needed without --study (e.g. --seq-len 32k)")
    seq_len = parse_seq_len(ask.seq_len)
    d_model = ask.d_model or PAPER_MODEL["d_model"]
    n_heads = ask.n_heads or PAPER_MODEL["n_heads"]
    n_layers = ask.n_layers or PAPER_MODEL["n_layers"]
    if d_model % n_heads:
        raise RecommendError(f"--heads {n_heads} is not allowed with --d-model {d_model}: the heads must divide "
                             f"the model width (head_dim = d_model / heads), e.g. --heads 16")
    try:
        rows = prior_rows(d_model, n_heads, notes)
    except SpecError as exc:
        raise RecommendError(f"--d-model {d_model} / --heads {n_heads}: {exc}") from None
    if not rows:
        raise RecommendError(f"--heads {n_heads} forms none of the paper's variants ({', '.join(PAPER_QUALITY)})")
    footnotes["prior"] = (f"PRIOR, not a measurement: validation loss from {PAPER_CITATION}; published for that "
                          f"model and mapped onto d_model={d_model}, H={n_heads} by variant name. Run a study "
                          f"(sqa-search run) to measure it for your model.")
    if (d_model, n_heads) != (PAPER_MODEL["d_model"], PAPER_MODEL["n_heads"]):
        notes.append(f"The prior losses were measured at d_model=256, H=16; at d_model={d_model}, H={n_heads} "
                     f"they are a guess by analogy.")
    return Pool(rows, seq_len, ask.mode or "prefill", ask.batch or 1, ask.what or "model", ask.dtype,
                d_model, n_heads, n_layers, None, True, "prior")


# ----- stage 4: where the speed comes from ---------------------------------------------------------
@dataclass
class SpeedPlan:
    """Measured (the study's own timings, when they describe the target at this shape) or
    predicted (the cost model for the target's profile)."""

    measured: bool
    dtype: str
    profile: object | None
    study_fp: Fingerprint | None = None
    study_ids: list = field(default_factory=list)


def _study_timings_apply(pool: Pool, target: Target, notes: list) -> tuple[Fingerprint | None, list, bool]:
    """(the study's fingerprint, its ids, whether its timings describe the target at the asked
    shape); a note says which and why."""
    st = pool.handle.space.target
    study_fp, study_ids, n_devices = study_hardware(pool.rows)
    if n_devices > 1:
        notes.append(f"The study's timings come from {n_devices} different devices; the most common is used "
                     f"to decide whether they describe the target.")
    ran_on, same_hw = None, False
    if st.measured:
        ran_on = f"{(study_fp.device_name if study_fp else None) or 'an unknown device'}" + (
            f" (fingerprint {', '.join(study_ids)})" if study_ids else "")
        if target.kind == "local":
            same_hw = bool(study_fp) and (study_fp.device_type, study_fp.device_name) == (
                target.fingerprint.device_type, target.fingerprint.device_name)
        else:
            same_hw = same_hardware(study_fp, target.profile)
    dtype, seq_len = pool.dtype, pool.seq_len
    shape_ok = (pool.mode == st.mode and seq_len in st.seq_len and pool.batch == st.batch and pool.what == st.what
                and (dtype is None or dtype == st.dtype))
    if same_hw and shape_ok:
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
                     f"{st.what}; you asked {pool.mode} at N={seq_len}, batch {pool.batch}, "
                     f"{dtype or st.dtype}, the {pool.what}: its losses are used, speed is PREDICTED by the cost "
                     f"model (or re-run the study's space at this shape).")
    return study_fp, study_ids, same_hw and shape_ok


def plan_speed(pool: Pool, target: Target, notes: list, footnotes: dict) -> SpeedPlan:
    """Measured or predicted, the dtype, and the footnote that says which."""
    measured, study_fp, study_ids, dtype = False, None, [], pool.dtype
    if pool.handle is not None:
        study_fp, study_ids, measured = _study_timings_apply(pool, target, notes)
    profile = target.profile
    if measured:
        dtype = pool.handle.space.target.dtype
        fp = study_fp or Fingerprint()
        kind = latency_kind(lat for row in pool.rows for lat in row.record.latencies
                            if lat.seq_len == pool.seq_len and lat.measured) or "measured"
        footnotes["measured"] = (f"speed MEASURED in study {pool.handle.space.name!r} on "
                                 f"{fp.device_name or '?'}, torch {fp.torch_version or '?'}, "
                                 f"{'?' if fp.threads is None else fp.threads} thread(s) (fingerprint "
                                 f"{', '.join(study_ids) or '?'}); median of repeated timings, {kind}"
                                 + (f": {KIND_NOTES[kind]}" if kind in KIND_NOTES else ""))
        return SpeedPlan(True, dtype, profile, study_fp, study_ids)
    if profile is None:
        raise RecommendError(f"no cost-model profile describes {target.display}: pass --hardware PROFILE "
                             f"(see sqa-search calibrate --list), or a --study measured here at this shape")
    dtype = dtype or ("bfloat16" if profile.device_type == "cuda" else "float32")
    scope = {"layer": "one attention layer", "block": "one block",
             "model": f"the whole {pool.n_layers}-layer model (d_model {pool.d_model}, H {pool.n_heads}, "
                      f"SwiGLU FFN)"}[pool.what]
    footnotes["predicted"] = (f"speed PREDICTED by the cost model (roofline), profile {profile.name} "
                              f"({profile.display_name}), {profile.calibration_label}; {dtype}, {pool.mode}, "
                              f"{scope}, batch {pool.batch}, N={pool.seq_len}")
    if not profile.calibration:
        notes.append(f"Profile {profile.name} is not calibrated: the factors are guesses from datasheets; "
                     f"speedup ratios are more reliable than absolute seconds.")
    return SpeedPlan(False, dtype, profile, study_fp, study_ids)


# ----- stage 5: the latencies ----------------------------------------------------------------------
@dataclass
class SpeedFigure:
    """One candidate's latency and where it came from (seconds None: there is none, and why)."""

    seconds: float | None
    source: str
    measured: bool
    fingerprint_id: str | None = None
    calibration: str | None = None  # Prediction.calibration when predicted
    bound: str | None = None  # Prediction.bound when predicted
    kind: str | None = None  # the Latency kind: measured-raw, measured-corrected, predicted


def measured_speed(row: CandidateRow, seq_len: int) -> SpeedFigure:
    """The study's own timing of this trial at `seq_len`."""
    rec = row.record
    lats = [lat for lat in rec.latencies if lat.seq_len == seq_len and lat.measured and lat.seconds]
    if not lats:
        return SpeedFigure(None, f"no timing at N={seq_len} in the study", True)
    fid = rec.fingerprint_id
    device_name = (rec.fingerprint.device_name if rec.fingerprint else None) or "?"
    source = f"{latency_label(lats[0].kind, device_name)} (fingerprint {fid}, backend {lats[0].backend})"
    return SpeedFigure(lats[0].seconds, source, True, fid, kind=lats[0].kind)


def predicted_speed(spec: AttentionSpec, plan: SpeedPlan, pool: Pool) -> SpeedFigure:
    """The cost model's latency of `spec` on the target's profile at the pool's shape.
    (The one call into the cost model.)"""
    profile, dtype = plan.profile, plan.dtype
    batch, seq_len, mode, what = pool.batch, pool.seq_len, pool.mode, pool.what
    n_layers, d_ff = pool.n_layers, pool.d_ff
    try:
        workload = Workload(mode=mode, seq_len=seq_len, batch=batch, scope=what, dtype=canonical_dtype(dtype),
                            n_layers=n_layers, d_ff=d_ff)
        pred = predict(spec, profile, workload)
    except (CostError, SpecError, WorkloadError) as exc:
        return SpeedFigure(None, f"not predictable: {exc}", False)
    return SpeedFigure(pred.seconds, f"predicted by {pred.profile} ({pred.calibration}), {pred.bound}-bound, "
                                     f"path {pred.path}", False, None, pred.calibration, pred.bound, "predicted")


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[canonical_dtype(dtype)]
    except CostError:  # a dtype the cost model does not know (fp8): its KV cache is at most 2 bytes a value
        return 2


def price_candidates(pool: Pool, plan: SpeedPlan, notes: list) -> list[Candidate]:
    """Every candidate with its latency, KV cache and speedups against MHA and GQA."""
    candidates = []
    for row in pool.rows:
        s = measured_speed(row, pool.seq_len) if plan.measured else predicted_speed(row.spec, plan, pool)
        kv = pool.n_layers * row.spec.kv_cache_bytes(pool.seq_len, _dtype_bytes(plan.dtype), pool.batch)
        candidates.append(Candidate(
            spec=row.spec, label=row.spec.label, loss=row.loss, loss_source=row.loss_source, latency_s=s.seconds,
            latency_source=s.source, latency_measured=s.measured, kv_cache_bytes=kv, trial=row.trial,
            fingerprint_id=s.fingerprint_id, calibration=s.calibration, bound=s.bound,
            other_objectives=list(row.other_objectives), loss_se=row.loss_se, loss_noise_kind=row.loss_noise_kind,
            loss_values=row.loss_values,
            latency_iqr_s=row.latency_iqr_s(pool.seq_len) if plan.measured else None, latency_kind=s.kind))
    if plan.measured:
        shaky = []
        for row in pool.rows:
            flags = sorted({f for lat in row.record.latencies if lat.seq_len == pool.seq_len and lat.measured
                            for f in lat.flags})
            if flags:
                shaky.append(f"{row.spec.label} ({', '.join(flags)})")
        if shaky:
            notes.append("Timings the study flagged (a busy or unsettled machine; re-run them before trusting "
                         "close calls): " + "; ".join(shaky) + ".")
    _speedups(candidates, pool, plan, notes)
    return candidates


def _speedups(candidates: list, pool: Pool, plan: SpeedPlan, notes: list) -> None:
    """Speedups against MHA and GQA: their latency among the candidates, else predicted where we predict."""
    baselines = {}
    for name in ("mha", "gqa"):
        try:
            base_spec = AttentionSpec.variant(name, pool.d_model, pool.n_heads, causal=pool.causal)
        except SpecError:
            baselines[name] = None
            continue
        found = [c for c in candidates if c.spec == base_spec and c.latency_s]
        if found:
            baselines[name] = found[0].latency_s
        elif not plan.measured:
            baselines[name] = predicted_speed(base_spec, plan, pool).seconds
        else:
            baselines[name] = None
            notes.append(f"{name.upper()} is not among the study's complete trials: no measured speedup against it.")
    for c in candidates:
        for name in ("mha", "gqa"):
            base = baselines[name]
            value = base / c.latency_s if (base and c.latency_s) else None
            setattr(c, f"speedup_vs_{name}", value)


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
    ask = read_inputs(hardware, seq_len=seq_len, mode=mode, batch=batch, tolerance=tolerance,
                      tolerance_vs=tolerance_vs, max_kv_cache_bytes=max_kv_cache_bytes, max_latency_s=max_latency_s,
                      study=study, d_model=d_model, n_heads=n_heads, n_layers=n_layers, dtype=dtype, what=what,
                      device=device, n_alternatives=n_alternatives)
    target = resolve_target(ask.hardware, ask.device)
    notes: list[str] = []
    footnotes: dict[str, str] = {}
    pool = (study_pool if ask.study is not None else prior_pool)(ask, notes, footnotes)
    if pool.mode == "decode" and not pool.causal:
        raise RecommendError(f"--mode decode needs a causal model; study {pool.handle.space.name!r} is an encoder")
    plan = plan_speed(pool, target, notes, footnotes)
    candidates = price_candidates(pool, plan, notes)
    ranking = rank(candidates, mode=pool.mode, seq_len=pool.seq_len, tolerance=ask.tolerance,
                   tolerance_vs=ask.tolerance_vs, max_kv=ask.max_kv, max_lat=ask.max_lat,
                   n_alternatives=ask.n_alternatives, notes=notes)
    why = explain(ranking, mode=pool.mode, seq_len=pool.seq_len, n_heads=pool.n_heads, tolerance=ask.tolerance,
                  measured=plan.measured, profile_name=plan.profile.name if plan.profile else None,
                  quality_source=pool.quality_source, candidates=candidates, notes=notes)
    return Recommendation(
        choice=ranking.choice, alternatives=ranking.alternatives, candidates=candidates, hardware=target.name,
        hardware_name=target.display, seq_len=pool.seq_len, mode=pool.mode, batch=pool.batch, dtype=plan.dtype,
        what=pool.what, n_layers=pool.n_layers, tolerance=ask.tolerance, tolerance_vs=ask.tolerance_vs,
        reference_label=ranking.reference.label, reference_loss=ranking.reference.loss,
        max_kv_cache_bytes=ask.max_kv, max_latency_s=ask.max_lat, ranked_by="kv_cache" if ranking.decode else "latency",
        speed_source="measured" if plan.measured else "predicted", quality_source=pool.quality_source,
        study=pool.handle.space.name if pool.handle is not None else None, why=why, notes=notes, footnotes=footnotes)
