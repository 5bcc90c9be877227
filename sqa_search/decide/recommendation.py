"""What `recommend` returns: every candidate with its figures and where each came from, the choice,
the runners-up and why, and the text `sqa-search recommend` prints (`Recommendation.render`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._format import fmt_bytes, fmt_s, fmt_x
from ..layer.spec import AttentionSpec
from ..speed.workload import KIND_HEADINGS


def fmt_pct(x) -> str:
    return "-" if x is None else f"{x:+.2f}%"


def fmt_loss(loss, se, kind: str | None = None) -> str:
    """A loss with its noise when it has one, and what that is unless it is its own standard error."""
    if loss is None:
        return "-"
    if se is None:
        return f"{loss:.4f}"
    return f"{loss:.4f} ± {se:.2g}" + (f" ({kind})" if kind and kind != "SE" else "")


def render_table(headers, rows) -> str:
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


@dataclass
class Candidate:
    """One configuration considered, with every figure and where it came from."""

    spec: AttentionSpec
    label: str
    loss: float | None
    loss_source: str  # "PRIOR: ..." or "measured: study S trial N (val_loss)"
    latency_s: float | None
    latency_source: str  # "measured on DEVICE, speed-corrected (fingerprint F)" or "predicted by PROFILE (calibration)"
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
    # the study's objectives the table has no column of its own for (ObjectiveFigure), one column each
    other_objectives: list = field(default_factory=list)
    loss_se: float | None = None  # the loss's noise: SE over seeds, at least pooled sd / √n (None: a prior, no estimate)
    loss_noise_kind: str | None = None  # what loss_se is: "SE", "pooled sd/√n" or "pooled sd" (one seed)
    loss_values: list = field(default_factory=list)  # the loss of each seed
    latency_iqr_s: float | None = None  # interquartile range of the measured timing (None: predicted)
    tied_with: list = field(default_factory=list)  # the choice only: runners-up it cannot be told from (Tie.to_dict)
    latency_kind: str | None = None  # measured-raw | measured-corrected | predicted (a Latency kind)

    @property
    def speed_tag(self) -> str:
        """The figure's kind, as the table's figures column says it."""
        return self.latency_kind or ("measured" if self.latency_measured else "predicted")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict()
        if not self.other_objectives:  # the JSON of a study with the usual objectives stays as it was
            data.pop("other_objectives")
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

    @property
    def speed_kind(self) -> str:
        """What the latencies are: measured-raw, measured-corrected or predicted ("a + b" when the
        candidates mix them)."""
        kinds = sorted({c.speed_tag for c in self.candidates if c.latency_s is not None})
        return " + ".join(kinds) or self.speed_source

    @property
    def speed_heading(self) -> str:
        """'MEASURED (speed-corrected)', 'MEASURED (raw)' or 'PREDICTED by the cost model'."""
        if self.speed_source != "measured":
            return "PREDICTED by the cost model"
        return KIND_HEADINGS.get(self.speed_kind, f"MEASURED ({self.speed_kind})")

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["speed_kind"] = self.speed_kind
        data["choice"] = self.choice.to_dict()
        data["alternatives"] = [c.to_dict() for c in self.alternatives]
        data["candidates"] = [c.to_dict() for c in self.candidates]
        data["tied_with"] = list(self.choice.tied_with)
        return data

    @property
    def tied_with(self) -> list:
        """The eligible runners-up the choice cannot be told from within noise (`ranking.Tie` as dicts)."""
        return self.choice.tied_with

    def render(self) -> str:
        speed = self.speed_heading
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
                f"{a.label} ({fmt_x(a.speedup_vs_mha)} vs MHA, loss {fmt_pct(a.loss_change_vs_mha_pct)}, "
                f"KV {fmt_bytes(a.kv_cache_bytes)})" for a in self.alternatives))
        lines += ["", self.table(), ""]
        for tag, text in self.footnotes.items():
            lines.append(f"[{tag}] {text}")
        if self.notes:
            lines.append("")
            lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self) -> str:
        with_trial = any(c.trial is not None for c in self.candidates)
        others = list(dict.fromkeys(f.name for c in self.candidates for f in c.other_objectives))
        headers = ["", "configuration"] + (["trial"] if with_trial else []) + [
            "loss", "loss vs MHA", "speedup vs MHA", "vs GQA", "KV cache", "latency"] + others + ["figures", "status"]
        rows = []
        for c in self.candidates:
            mark = "*" if c is self.choice else ""
            loss_tag = "prior" if c.loss_source.startswith("PRIOR") else "study"
            formatted = {f.name: f.formatted for f in c.other_objectives}
            row = [mark, c.label] + ([("-" if c.trial is None else c.trial)] if with_trial else []) + [
                fmt_loss(c.loss, c.loss_se, c.loss_noise_kind), fmt_pct(c.loss_change_vs_mha_pct),
                fmt_x(c.speedup_vs_mha), fmt_x(c.speedup_vs_gqa), fmt_bytes(c.kv_cache_bytes),
                fmt_s(c.latency_s) + (f" (IQR {fmt_s(c.latency_iqr_s)})" if c.latency_iqr_s is not None else "")] + [formatted.get(name, "-") for name in others] + [
                f"loss:{loss_tag} speed:{c.speed_tag}", c.status]
            rows.append(row)
        return render_table(headers, rows)
