"""One trial record: what a trial stores in Optuna and how every reader gets it back.

The study engine and the Ray backend write a trial's results only through the ``record_*``
functions here; `show`, `recommend`, `export` and the Ray backend read them only through
`TrialRecord.from_trial`. No other module touches a trial's user attributes by string key. The
stored keys are the ones every study since the first version wrote, so old study folders read the
same (tests/test_legacy_study.py keeps one made before this module existed).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

from ..layer.spec import AttentionSpec
from ..speed.hardware import Fingerprint
from ..speed.workload import Latency
from .space import candidate_key

# the stored keys (Optuna user attributes); the names are the on-disk schema, do not rename
SPEC = "spec"
SPEC_KEY = "spec_key"
LABEL = "label"
VARIANT = "variant"
FAMILY = "family"
KV_CACHE_BYTES = "kv_cache_bytes"
N_PARAMS = "n_params"
QUALITY = "quality"  # the figure the study optimises: the mean over replicates
QUALITY_SE = "quality_se"  # its standard error (None with one replicate)
QUALITY_VALUES = "quality_values"  # one per replicate, in seed order
REPLICATE_SEEDS = "replicate_seeds"
LATENCY_S = "latency_s"
LATENCY_SOURCE = "latency_source"
TIMING = "timing"
FINGERPRINT = "fingerprint"
TRAIN = "train"
DUPLICATE_OF = "duplicate_of"
ANCHOR = "anchor"
RETRY_OF = "retry_of"
FAIL_REASON = "fail_reason"
PRUNE_REASON = "prune_reason"
PID = "pid"  # the worker process running the trial (recovery checks it is alive)
HOST = "host"
RAY = "ray"  # the Ray backend's trial id, experiment, node and worker fingerprint
PROMOTION = "promotion"  # successive halving: {"from", "rung", "new_seeds", "earlier"} (search/halving.py)
TRAINING_RUNS = "training_runs"  # seed-runs this trial trained itself (what it cost of a halving budget)

# what a duplicate copies from the trial it repeats
REUSED = (LATENCY_S, LATENCY_SOURCE, QUALITY, QUALITY_SE, QUALITY_VALUES, REPLICATE_SEEDS, TRAIN, TIMING)
# what a promotion carries from the trial it extends: its speed is not measured again
CARRIED = REUSED + (FINGERPRINT,)


def _latency_from_stored(row: dict, source: str | None, fingerprint: Fingerprint | None) -> Latency:
    """One entry of the stored ``timing`` list as a `Latency`. Measured entries hold
    median_s/iqr_s/raw_median_s; predicted ones predicted_s/bound (the shapes every version wrote)."""
    flags = tuple(row.get("flags") or ())
    if "predicted_s" in row:
        where = (source or "").removeprefix("predicted for ") or "a hardware profile"
        return Latency(seconds=float(row["predicted_s"]), kind="predicted", where=where,
                       seq_len=int(row["seq_len"]), backend=row.get("path"),
                       peak_memory_bytes=row.get("peak_mem_bytes"),
                       flags=flags + ((f"{row['bound']}-bound",) if row.get("bound") else ()))
    raw = row.get("raw_median_s")
    corrected = row.get("speed_corrected")
    if corrected is None:  # before the flag was stored: corrected when the raw figure differs
        corrected = raw is not None and raw != row["median_s"]
    where = fingerprint.label if fingerprint else (source or "").removeprefix("measured on ") or "unknown device"
    return Latency(seconds=float(row["median_s"]), kind="measured-corrected" if corrected else "measured-raw",
                   where=where, seq_len=int(row["seq_len"]), spread_s=row.get("iqr_s"),
                   raw_seconds=raw if raw is not None else row["median_s"], backend=row.get("backend"),
                   peak_memory_bytes=row.get("peak_mem_bytes"), flags=flags)


@dataclass
class TrialRecord:
    """One trial of a study as every reader sees it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: tuple | None
    params: dict
    spec: AttentionSpec | None = None
    label: str | None = None
    variant: str | None = None
    family: str | None = None
    quality: float | None = None  # the mean over replicates
    quality_se: float | None = None  # its standard error; None with one replicate (and in older studies)
    quality_values: list[float] = field(default_factory=list)  # per replicate, in seed order
    replicate_seeds: list[int] = field(default_factory=list)
    latency_s: float | None = None  # summed over the target's sequence lengths
    latency_source: str | None = None  # the words stored with it ("measured on ...", "predicted for ...")
    latencies: list[Latency] = field(default_factory=list)  # one per sequence length
    timing_rows: list[dict] = field(default_factory=list)  # the stored rows verbatim (an export's config copies them)
    fingerprint: Fingerprint | None = None
    fingerprint_id: str | None = None
    kv_cache_bytes: int | None = None
    n_params: int | None = None
    train: dict = field(default_factory=dict)  # the training summary (TrainResult.to_dict without curves)
    duplicate_of: int | None = None
    anchor: str | None = None
    retry_of: int | None = None
    fail_reason: str | None = None
    prune_reason: str | None = None
    datetime_start: object = None
    datetime_complete: object = None  # an export's provenance dates the trial by its end
    duration_s: float | None = None
    pid: int | None = None
    host: str | None = None
    ray: dict | None = None
    promotion: dict | None = None  # a halving promotion: more seeds for the trial promotion["from"]
    stored: dict = field(default_factory=dict, repr=False, compare=False)  # the attributes as stored

    def reused_attrs(self) -> dict:
        """What a later trial of the same spec copies from this one, as stored (with the spec key)."""
        return {k: self.stored[k] for k in REUSED + (SPEC_KEY,) if k in self.stored}

    @property
    def spec_key(self) -> str | None:
        return self.stored.get(SPEC_KEY)

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def evaluated(self) -> bool:
        """Complete with its own result (not a repeat of an earlier trial's)."""
        return self.complete and self.duplicate_of is None and self.spec is not None

    @property
    def rung(self) -> int:
        """The halving rung this trial's result belongs to: 0 for a first evaluation."""
        return int(self.promotion["rung"]) if self.promotion else 0

    @property
    def training_runs(self) -> int:
        """How many seed-runs this trial trained itself: 0 for a duplicate (it trained nothing);
        in studies stored before the count, one per replicate its training summary lists."""
        if self.duplicate_of is not None:
            return 0
        if TRAINING_RUNS in self.stored:
            return int(self.stored[TRAINING_RUNS])
        if not self.train or self.promotion:
            return 0
        return len(self.train.get("per_seed") or []) or 1

    @property
    def latency_iqr_s(self) -> float | None:
        """The interquartile range of the summed latency: the root of the sum of squares of each
        sequence length's IQR (the lengths are timed independently). None when the latency is
        predicted or no length has an IQR (an old record, or one timing repeat)."""
        spreads = [lat.spread_s for lat in self.latencies if lat.measured and lat.spread_s is not None]
        return math.sqrt(sum(s * s for s in spreads)) if spreads else None

    @property
    def reason(self) -> str | None:
        return self.fail_reason or self.prune_reason

    @property
    def backend(self) -> str | None:
        return self.latencies[0].backend if self.latencies else None

    @property
    def latency_measured(self) -> bool:
        return bool(self.latencies) and all(lat.measured for lat in self.latencies)

    @property
    def peak_memory_bytes(self) -> int | None:
        """The largest peak memory over the target's sequence lengths (None unless every one has it)."""
        peaks = [lat.peak_memory_bytes for lat in self.latencies]
        return max(peaks) if peaks and None not in peaks else None

    def train_value(self, name: str):
        """One figure of the training summary (val_loss, mqar_accuracy, wall_s, tokens_per_s, ...)."""
        return self.train.get(name)

    @classmethod
    def from_trial(cls, trial) -> "TrialRecord":
        """An Optuna FrozenTrial (or a live Trial's stored state) as a record."""
        attrs = trial.user_attrs
        state = getattr(trial, "state", None)
        spec = AttentionSpec.from_dict(attrs[SPEC]) if attrs.get(SPEC) else None
        fp = Fingerprint.from_dict(attrs[FINGERPRINT]) if attrs.get(FINGERPRINT) else None
        timing = attrs.get(TIMING) or []
        source = attrs.get(LATENCY_SOURCE)
        fp_id = next((row.get("fingerprint_id") for row in timing if row.get("fingerprint_id")), None)
        duration = getattr(trial, "duration", None)
        values = getattr(trial, "values", None)
        quality_values, seeds = _replicates_stored(attrs)
        return cls(
            number=trial.number, state=state.name if state is not None else "RUNNING", values=tuple(values) if values else None,
            params=dict(trial.params), spec=spec, label=attrs.get(LABEL), variant=attrs.get(VARIANT),
            family=attrs.get(FAMILY), quality=attrs.get(QUALITY), quality_se=attrs.get(QUALITY_SE),
            quality_values=quality_values, replicate_seeds=seeds, latency_s=attrs.get(LATENCY_S),
            latency_source=source, latencies=[_latency_from_stored(row, source, fp) for row in timing],
            timing_rows=[dict(row) for row in timing],
            fingerprint=fp, fingerprint_id=fp_id, kv_cache_bytes=attrs.get(KV_CACHE_BYTES),
            n_params=attrs.get(N_PARAMS), train=dict(attrs.get(TRAIN) or {}), duplicate_of=attrs.get(DUPLICATE_OF),
            anchor=attrs.get(ANCHOR), retry_of=attrs.get(RETRY_OF), fail_reason=attrs.get(FAIL_REASON),
            prune_reason=attrs.get(PRUNE_REASON), datetime_start=getattr(trial, "datetime_start", None),
            datetime_complete=getattr(trial, "datetime_complete", None),
            duration_s=duration.total_seconds() if duration else None, pid=attrs.get(PID), host=attrs.get(HOST),
            ray=attrs.get(RAY) if isinstance(attrs.get(RAY), dict) else None,
            promotion=attrs.get(PROMOTION) if isinstance(attrs.get(PROMOTION), dict) else None, stored=dict(attrs),
        )


def _replicates_stored(attrs: dict) -> tuple[list[float], list[int]]:
    """(quality per replicate, their seeds). A trial stored before replicates trained one seed:
    its quality alone, and the seed its training summary names (if any)."""
    if QUALITY_VALUES in attrs:
        return [float(v) for v in attrs[QUALITY_VALUES]], [int(s) for s in attrs.get(REPLICATE_SEEDS) or []]
    quality = attrs.get(QUALITY)
    if quality is None:
        return [], []
    train = attrs.get(TRAIN) if isinstance(attrs.get(TRAIN), dict) else {}
    return [quality], ([int(train["seed"])] if train.get("seed") is not None else [])


def read_records(study) -> list[TrialRecord]:
    """Every trial of an Optuna study, in trial order."""
    return [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False)]


def current_records(records: list[TrialRecord]) -> list[TrialRecord]:
    """Each configuration's current result, in trial order: of its complete trials (a first
    evaluation, its duplicates, the promotions that added seeds to it), the one with the most
    replicate seeds, the earliest of those. A promotion supersedes the trial it extends."""
    best: dict[str, TrialRecord] = {}
    for r in records:
        if not r.complete or (r.spec is None and r.spec_key is None):  # a Ray reuse carries the key alone
            continue
        key = r.spec_key or candidate_key(r.spec)
        held = best.get(key)
        if held is None or len(r.quality_values) > len(held.quality_values):
            best[key] = r
    return sorted(best.values(), key=lambda r: r.number)


def from_trial(trial) -> TrialRecord:
    """A FrozenTrial, or a live optuna.Trial (read as RUNNING), as a record."""
    return TrialRecord.from_trial(trial)


# ----- writing: every user attribute of a trial is set here --------------------------------------
def spec_attrs(spec: AttentionSpec, space) -> dict:
    """What a trial stores about its spec (also for a trial whose worker never reported)."""
    return {SPEC: spec.to_dict(), LABEL: spec.label, FAMILY: spec.family, VARIANT: spec.variant_name,
            KV_CACHE_BYTES: space.kv_cache_bytes(spec), N_PARAMS: spec.n_params(), SPEC_KEY: candidate_key(spec)}


def _set(trial, attrs: dict) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def record_spec(trial, spec: AttentionSpec, space) -> None:
    _set(trial, spec_attrs(spec, space))


def _stored_timing(row, fingerprint: Fingerprint | None) -> dict:
    """A timing row as stored: a dict every version wrote, or a `Latency` in that shape."""
    if isinstance(row, dict):
        return row
    if row.kind == "predicted":
        bound = next((f.removesuffix("-bound") for f in row.flags if f.endswith("-bound")), None)
        stored = {"seq_len": row.seq_len, "predicted_s": row.seconds, "bound": bound}
        if row.peak_memory_bytes is not None:
            stored["peak_mem_bytes"] = row.peak_memory_bytes
        return stored
    return {"seq_len": row.seq_len, "median_s": row.seconds, "iqr_s": row.spread_s, "raw_median_s": row.raw_seconds,
            "speed_corrected": row.kind == "measured-corrected", "backend": row.backend, "flags": list(row.flags),
            "fingerprint_id": fingerprint.id if fingerprint else None, "peak_mem_bytes": row.peak_memory_bytes}


def record_latency(trial, timing: list, total: float, source: str, fingerprint=None) -> None:
    """The target's latency: one row per sequence length (stored dicts or `Latency`s), their sum,
    the words saying where it comes from, and the machine it was measured on."""
    if fingerprint is not None:
        fp = fingerprint if isinstance(fingerprint, Fingerprint) else None
        trial.set_user_attr(FINGERPRINT, fingerprint.to_dict() if fp else fingerprint)
    else:
        fp = None
    _set(trial, {LATENCY_S: total, LATENCY_SOURCE: source, TIMING: [_stored_timing(r, fp) for r in timing]})


def record_training(trial, summary: dict, quality: float | None = None) -> None:
    """The training summary; the quality figure too once it is known to be a result."""
    trial.set_user_attr(TRAIN, summary)
    if quality is not None:
        record_quality(trial, quality)


def record_quality(trial, value: float) -> None:
    trial.set_user_attr(QUALITY, value)


def record_replicates(trial, values: list[float], seeds: list[int], mean: float, se: float | None) -> None:
    """The quality of a candidate trained once per seed: the mean (the figure the study optimises),
    its standard error (None for one replicate), and each replicate's value with its seed."""
    if len(values) != len(seeds) or not values:
        raise ValueError(f"record_replicates: {len(values)} value(s) for {len(seeds)} seed(s)")
    _set(trial, {QUALITY: float(mean), QUALITY_SE: None if se is None else float(se),
                 QUALITY_VALUES: [float(v) for v in values], REPLICATE_SEEDS: [int(s) for s in seeds]})


def record_failure(trial, reason: str) -> None:
    trial.set_user_attr(FAIL_REASON, reason)


def record_prune(trial, reason: str) -> None:
    trial.set_user_attr(PRUNE_REASON, reason)


def record_duplicate(trial, earlier: TrialRecord) -> None:
    """`trial` repeats `earlier`'s spec: its result is earlier's."""
    trial.set_user_attr(DUPLICATE_OF, earlier.number)
    _set(trial, {k: v for k, v in earlier.reused_attrs().items() if k != SPEC_KEY})


def anchor_attrs(label: str) -> dict:
    """The attributes of a queued named variant."""
    return {ANCHOR: label}


def rerun_attrs(record: TrialRecord) -> dict:
    """The attributes of a queued re-run of an interrupted trial."""
    attrs = {RETRY_OF: record.number}
    if record.anchor is not None:
        attrs[ANCHOR] = record.anchor
    if record.promotion is not None:  # a re-run promotion adds the same seeds to the same trial
        attrs[PROMOTION] = record.promotion
    return attrs


def promotion_attrs(earlier: TrialRecord, rung: int, new_seeds: list[int]) -> dict:
    """The attributes of a queued promotion: train ``new_seeds`` more for ``earlier``'s
    configuration. It carries what it keeps of ``earlier`` (speed, seeds, values), so a Ray
    worker that never sees the study's storage has all it needs."""
    carried = {k: earlier.stored[k] for k in CARRIED if k in earlier.stored}
    attrs = {PROMOTION: {"from": earlier.number, "rung": int(rung), "new_seeds": [int(s) for s in new_seeds],
                         "earlier": carried}}
    if earlier.anchor is not None:  # a named variant stays one through its promotions
        attrs[ANCHOR] = earlier.anchor
    return attrs


def carried_replicates(promotion: dict) -> tuple[list[float], list[int], dict]:
    """What a promotion carries of its earlier trial: the quality per seed, the seeds, and the
    training summary."""
    attrs = promotion["earlier"]
    values, seeds = _replicates_stored(attrs)
    return values, seeds, dict(attrs.get(TRAIN) or {})


def record_promotion_start(trial, promotion: dict) -> None:
    """A promotion's trial begins as the trial it extends: the same speed figures and fingerprint."""
    _set(trial, {k: v for k, v in promotion["earlier"].items() if k in (LATENCY_S, LATENCY_SOURCE, TIMING, FINGERPRINT)})


def record_training_runs(trial, n: int) -> None:
    trial.set_user_attr(TRAINING_RUNS, int(n))


def store_owner(storage, trial_id: int) -> None:
    """The worker running a trial (this process), which recovery checks is still alive."""
    storage.set_trial_user_attr(trial_id, PID, os.getpid())
    storage.set_trial_user_attr(trial_id, HOST, socket.gethostname())


def store_failure(storage, trial_id: int, reason: str) -> None:
    """record_failure for a trial this process does not run (found interrupted)."""
    storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
