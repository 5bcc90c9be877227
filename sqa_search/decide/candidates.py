"""Where `recommend`'s candidates and their losses come from: a study's complete trials (read
through `TrialRecord`), or, without a study, the named variants of the SQA paper's quality table,
a PRIOR (Filipek 2025, arXiv 2510.01817) published for one model and mapped onto yours by name.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..layer.spec import AttentionSpec, SpecError
from ..search.halving import pooled_seed_sd, quality_noise
from ..search.records import TrialRecord, current_records, read_records
from ..speed.hardware import Fingerprint
from .objectives import ObjectiveFigure, objective_figures

# The SQA paper's quality table: validation loss of its dense model after one epoch of Wikipedia.
PAPER_QUALITY: dict[str, float] = {
    "mha": 1.198, "gqa": 1.218, "mqa": 1.250, "sqa": 1.227, "ssqa": 1.220, "xsqa": 1.243, "xsmqa": 1.282,
}
PAPER_CITATION = "Filipek 2025, arXiv 2510.01817, Table (quality), 8-layer d=256 dense model, 1 epoch Wikipedia"
PAPER_MODEL = {"d_model": 256, "n_heads": 16, "n_layers": 8}

# the objectives recommend's table shows in columns of its own (loss, latency, KV cache); any other
# objective of a study gets a column from `objective_figures`
TABLE_OBJECTIVES = ("val_loss", "latency_s", "kv_cache_bytes")


@dataclass
class CandidateRow:
    """One configuration to consider, with its loss and, from a study, the trial it came from."""

    spec: AttentionSpec
    loss: float | None
    loss_source: str
    record: TrialRecord | None = None  # None: from the prior
    other_objectives: list[ObjectiveFigure] = field(default_factory=list)
    pooled_sd: float | None = None  # the study's pooled seed sd (halving.pooled_seed_sd), None without one

    @property
    def trial(self) -> int | None:
        return self.record.number if self.record else None

    @property
    def loss_se(self) -> float | None:
        """The loss's noise: its standard error over seeds, at least the study's pooled seed sd /
        sqrt(seeds), which also stands in for one seed (`halving.quality_noise`); None from the prior
        or with no estimate."""
        return self._noise[0]

    @property
    def loss_noise_kind(self) -> str | None:
        """What `loss_se` is: "SE", "pooled sd/√n", "pooled sd" (one seed) or None."""
        return self._noise[1]

    @property
    def _noise(self) -> tuple[float | None, str | None]:
        if not self.record or self.loss is None:
            return None, None
        return quality_noise(self.record.quality_se, len(self.record.quality_values), self.pooled_sd)

    @property
    def loss_values(self) -> list[float]:
        """The loss of each seed (one entry with one seed; none from the prior)."""
        return list(self.record.quality_values) if self.record and self.loss is not None else []

    def latency_iqr_s(self, seq_len: int) -> float | None:
        """The interquartile range of the study's timing at `seq_len` (None: predicted, or not stored)."""
        if self.record is None:
            return None
        return next((lat.spread_s for lat in self.record.latencies if lat.seq_len == seq_len and lat.measured), None)

    @property
    def fingerprint(self) -> Fingerprint | None:
        return self.record.fingerprint if self.record else None


def study_rows(handle) -> list[CandidateRow]:
    """A study's complete trials, one per distinct spec: its current result (`current_records`)."""
    space = handle.space
    quality = space.objectives.quality
    rows = []
    current = [r for r in current_records(read_records(handle.study)) if r.spec is not None]
    pooled = pooled_seed_sd(current)
    for rec in current:
        value = rec.quality
        if value is not None and not math.isfinite(value):
            value = None
        steps = rec.train_value("steps")
        source = (f"measured: study {space.name!r} trial {rec.number} ({quality} after "
                  f"{'?' if steps is None else steps} steps)")
        rows.append(CandidateRow(rec.spec, value, source, rec,
                                 objective_figures(space, rec, leave_out=TABLE_OBJECTIVES), pooled_sd=pooled))
    return rows


def prior_rows(d_model: int, n_heads: int, notes: list) -> list[CandidateRow]:
    """The paper's named variants at d_model / n_heads, each with its published loss."""
    rows, skipped = [], []
    for name, loss in PAPER_QUALITY.items():
        try:
            spec = AttentionSpec.variant(name, d_model, n_heads)
        except SpecError:
            skipped.append(name)
            continue
        if any(r.spec == spec for r in rows):  # small H: two names can be one configuration
            continue
        rows.append(CandidateRow(spec, loss, f"PRIOR: {PAPER_CITATION}"))
    if skipped:
        notes.append(f"n_heads={n_heads} cannot form {', '.join(skipped)}: left out.")
    return rows


def study_hardware(rows: list[CandidateRow]) -> tuple[Fingerprint | None, list[str], int]:
    """The most common fingerprint of a study's timings, their fingerprint ids, and how many devices."""
    fps = [r.fingerprint for r in rows if r.fingerprint]
    if not fps:
        return None, [], 0
    main = Counter(fps).most_common(1)[0][0]
    ids = sorted({r.record.fingerprint_id for r in rows if r.record and r.record.fingerprint_id})
    devices = {fp.device_name for fp in fps}
    return main, ids, len(devices)
