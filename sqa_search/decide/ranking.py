"""`recommend`'s last two stages: rank the candidates (the loss tolerance, the budgets, ties), then
say why in words. Decode is ranked by KV-cache size (one token's step reads the whole cache);
everything else by latency, then loss, then KV cache. A choice that leads a runner-up in nothing
beyond noise (the report's rule: loss standard errors, timing IQRs) is tied with it, and says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .._format import fmt_bytes, fmt_s, fmt_x
from ..search.pareto import IQR_PER_SD
from ..search.report import NOISE_Z
from .errors import RecommendError
from .recommendation import Candidate, fmt_loss, fmt_pct

DECODE_NOTE = ("Decode is ranked by KV-cache size: each new token reads the whole cache, so decode time "
               "and memory follow the key/value heads (H_kv), not the query heads. SQA's advantage "
               "(fewer query heads, fewer attention FLOPs) is in prefill and training; for decode it "
               "helps only through the KV heads it also cuts.")


@dataclass
class Ranking:
    """The ranked candidates and what they were judged against."""

    choice: Candidate
    alternatives: list
    eligible: list  # best first
    reference: Candidate  # the loss the tolerance is taken against
    reference_name: str  # "MHA's" or "the best candidate's (LABEL)"
    decode: bool
    budget_text: str  # ", KV cache <= ..., latency <= ..." or ""
    ties: list = field(default_factory=list)  # Tie: eligible runners-up the choice cannot be told from


def rank_key(c: Candidate, decode: bool) -> tuple:
    lat = c.latency_s if c.latency_s is not None else math.inf
    loss = c.loss if c.loss is not None else math.inf
    return (c.kv_cache_bytes, lat, loss) if decode else (lat, loss, c.kv_cache_bytes)


def loss_reference(candidates: list, tolerance_vs: str, notes: list) -> tuple[Candidate, str]:
    """The candidate whose loss the tolerance is taken against; fills in each loss change."""
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
    mha_loss = mha[0].loss if mha else None
    for c in candidates:
        if c.loss is not None:
            c.loss_change_pct = 100 * (c.loss - ref.loss) / abs(ref.loss)
            if mha_loss is not None:
                c.loss_change_vs_mha_pct = 100 * (c.loss - mha_loss) / abs(mha_loss)
    return ref, ref_name


def _judge(c: Candidate, limit: float, max_kv: int | None, max_lat: float | None) -> None:
    """Whether one candidate is eligible, and if not every reason why."""
    reasons = []
    if c.loss is None:
        reasons.append("no loss figure")
    elif c.loss > limit + 1e-12:
        reasons.append(f"over tolerance ({fmt_pct(c.loss_change_pct)})")
        c.needed_tolerance_pct = c.loss_change_pct
    if c.latency_s is None:
        reasons.append(c.latency_source)
    if max_kv is not None and c.kv_cache_bytes > max_kv:
        reasons.append(f"over KV budget ({fmt_bytes(c.kv_cache_bytes)})")
    if max_lat is not None and c.latency_s is not None and c.latency_s > max_lat:
        reasons.append(f"over latency budget ({fmt_s(c.latency_s)})")
    c.eligible = not reasons
    c.reasons = reasons
    c.status = "within tolerance" if c.eligible else ", ".join(reasons)


def rank(candidates: list, *, mode: str, seq_len: int, tolerance: float, tolerance_vs: str,
         max_kv: int | None, max_lat: float | None, n_alternatives: int, notes: list) -> Ranking:
    """Judge every candidate, pick the best eligible one and sort `candidates` for the table
    (the choice and the eligible first). Raises RecommendError when none is eligible."""
    ref, ref_name = loss_reference(candidates, tolerance_vs, notes)
    limit = ref.loss + tolerance * abs(ref.loss)
    decode = mode == "decode"
    for c in candidates:
        _judge(c, limit, max_kv, max_lat)
    eligible = sorted([c for c in candidates if c.eligible], key=lambda c: rank_key(c, decode))
    budget_text = "".join([f", KV cache <= {fmt_bytes(max_kv)}" if max_kv is not None else "",
                           f", latency <= {fmt_s(max_lat)}" if max_lat is not None else ""])
    if not eligible:
        nearest = sorted(candidates, key=lambda c: (len(c.reasons), rank_key(c, decode)))[:3]
        raise RecommendError(
            f"no configuration matches: loss within {100 * tolerance:g}% of {ref_name} {ref.loss:.4g}{budget_text} "
            f"({mode}, N={seq_len}); nearest: " + "; ".join(f"{c.label}: {c.status}" for c in nearest))
    choice, alternatives = eligible[0], eligible[1:1 + n_alternatives]
    choice.status = "RECOMMENDED"
    for a in alternatives:
        a.status = "alternative"
    candidates.sort(key=lambda c: (not c.eligible, eligible.index(c) if c.eligible else 0, rank_key(c, decode)))
    tied = [t for t in (find_tie(choice, other, decode) for other in eligible[1:]) if t is not None]
    choice.tied_with = [t.to_dict() for t in tied]
    return Ranking(choice, alternatives, eligible, ref, ref_name, decode, budget_text, tied)


# ----- ties: a runner-up the choice cannot be told from --------------------------------------------
@dataclass
class Tie:
    """An eligible runner-up the choice leads in nothing beyond noise, in the order it was ranked by
    (latency, loss, KV cache; decode: KV cache, latency, loss). Noise is the report's: a loss's
    standard error, a timing's IQR / 1.349, and a difference counts when it exceeds NOISE_Z times
    the two combined (pareto.py's rule)."""

    label: str
    trial: int | None
    within_noise: list  # the figures whose difference is within noise (or cannot be judged: one seed)
    better_beyond_noise: str | None  # a figure in which the runner-up is better beyond noise (the choice won on noise)
    latency_difference_s: float | None  # runner-up minus choice
    latency_threshold_s: float | None  # NOISE_Z x the combined timing noise
    loss_difference: float | None  # runner-up minus choice
    loss_threshold: float | None  # NOISE_Z x the combined standard error; None: a loss without one (one seed)
    seeds_needed: int | None  # seeds per candidate that would likely separate their losses (an estimate)
    seeds_note: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _threshold(sa: float | None, sb: float | None) -> float:
    """NOISE_Z x the combined noise of two figures; infinite when either has no estimate."""
    if sa is None or sb is None:
        return math.inf
    return NOISE_Z * math.hypot(sa, sb)


def _figures(c: Candidate, decode: bool) -> dict:
    """name -> (value, noise scale or None) of what a candidate is ranked by, in ranking order. A
    measured timing without an IQR (older studies) and a prediction count as exact."""
    lat_noise = (c.latency_iqr_s or 0.0) / IQR_PER_SD
    loss_noise = c.loss_se if c.loss_se is not None else (0.0 if c.loss_source.startswith("PRIOR") else None)
    figures = {"latency": (c.latency_s, lat_noise), "loss": (c.loss, loss_noise), "KV cache": (c.kv_cache_bytes, 0.0)}
    order = ("KV cache", "latency", "loss") if decode else ("latency", "loss", "KV cache")
    return {name: figures[name] for name in order}


def find_tie(choice: Candidate, other: Candidate, decode: bool) -> "Tie | None":
    """The tie between the choice and one eligible runner-up, or None when the choice leads beyond
    noise in the first figure whose difference is beyond noise (it is better, not just luckier)."""
    mine, theirs = _figures(choice, decode), _figures(other, decode)
    within, better, thresholds = [], None, {}
    for name, (a, sa) in mine.items():
        b, sb = theirs[name]
        thresholds[name] = _threshold(sa, sb)
        if abs(b - a) > thresholds[name]:
            if b > a and (not within or name != "KV cache"):  # all minimised: the choice leads beyond noise
                return None
            better = None if b > a else name  # b > a here: within noise in latency and loss, the smaller KV cache decides
            break
        if name != "KV cache" or b != a:
            within.append(name)
    needed, note = seeds_to_separate(choice, other) if "loss" in within else (None, "")
    loss_threshold = thresholds.get("loss")
    return Tie(other.label, other.trial, within, better, other.latency_s - choice.latency_s,
               thresholds.get("latency"), other.loss - choice.loss,
               None if loss_threshold is None or math.isinf(loss_threshold) else loss_threshold, needed, note)


def _per_seed_sd(c: Candidate) -> float | None:
    """The spread of one seed's loss: the loss's noise x sqrt(seeds), i.e. the larger of the seeds'
    sample standard deviation and the study's pooled seed sd (`Candidate.loss_se`)."""
    values = [v for v in c.loss_values if v is not None]
    if c.loss_se is not None and values:
        return c.loss_se * math.sqrt(len(values))
    return None


def seeds_to_separate(a: Candidate, b: Candidate) -> tuple[int | None, str]:
    """(seeds per candidate, in words) that would likely separate two losses within noise: with the
    per-seed spread s (pooled) and the observed difference d, n ≈ ceil(2 (z s / d)^2) for a
    two-sample difference of z = NOISE_Z standard errors. An estimate: it takes the observed
    difference as the true one."""
    sa, sb = _per_seed_sd(a), _per_seed_sd(b)
    if sa is None or sb is None:
        return None, ("the loss has no uncertainty estimate (one seed): set training.replicates (e.g. 4) or "
                      "study.halving to measure how much it varies with the seed")
    d = abs(b.loss - a.loss)
    if d == 0:
        return None, "their losses are equal: they cannot be separated by seeds alone"
    s = math.sqrt((sa ** 2 + sb ** 2) / 2)
    have = min(len(a.loss_values), len(b.loss_values))
    n = max(math.ceil(2 * (NOISE_Z * s / d) ** 2), have + 1)
    return n, (f"about {n} seeds per candidate (they have {len(a.loss_values)} and {len(b.loss_values)}) would "
               f"likely separate their losses: an estimate, n = 2 (z s / d)^2 with z = {NOISE_Z:g}, per-seed "
               f"spread s = {s:.2g} and difference d = {d:.2g}")


def tie_words(r: Ranking) -> str:
    """The sentences `explain` adds when the choice is tied with a runner-up."""
    words = []
    choice = r.choice
    for t in r.ties:
        other = next(c for c in r.eligible if c.label == t.label)
        parts = []
        if "latency" in t.within_noise:
            iqr = [c.latency_iqr_s for c in (choice, other) if c.latency_iqr_s is not None]
            parts.append(f"latency {fmt_s(choice.latency_s)} vs {fmt_s(other.latency_s)}, a difference within the "
                         f"timings' noise" + (f" (IQR {fmt_s(max(iqr))})" if iqr else ""))
        if "loss" in t.within_noise:
            parts.append(f"loss {fmt_loss(choice.loss, choice.loss_se, choice.loss_noise_kind)} vs "
                         f"{fmt_loss(other.loss, other.loss_se, other.loss_noise_kind)}, "
                         + ("within 2 combined noise scales" if t.loss_threshold is not None
                            else "a difference that cannot be judged"))
        trial = f" (trial {t.trial})" if t.trial is not None else ""
        text = f" Within noise it is tied with {t.label}{trial}: {'; '.join(parts) or 'identical figures'}."
        if t.better_beyond_noise == "KV cache":
            text += (f" {t.label} has the smaller KV cache ({fmt_bytes(other.kv_cache_bytes)}): the choice leads "
                     f"only within noise.")
        elif t.better_beyond_noise:
            text += f" {t.label}'s {t.better_beyond_noise} is better beyond noise: the choice leads only within noise."
        elif not r.decode and other.kv_cache_bytes > choice.kv_cache_bytes:
            text += f" The choice's smaller KV cache ({fmt_bytes(choice.kv_cache_bytes)}) decides between them."
        if t.seeds_note:
            text += f" {t.seeds_note[0].upper()}{t.seeds_note[1:]}."
        words.append(text)
    return "".join(words)


def explain(r: Ranking, *, mode: str, seq_len: int, n_heads: int, tolerance: float, measured: bool,
            profile_name: str | None, quality_source: str, candidates: list, notes: list) -> str:
    """Why the choice, in words (the "Why:" paragraph); adds the decode and query-head notes."""
    choice, decode = r.choice, r.decode
    kind = "measured" if measured else "predicted"
    src = "" if measured else f" on {profile_name}"
    vs = []
    if choice.speedup_vs_mha is not None:
        vs.append(f"{choice.speedup_vs_mha:.2f}x MHA's speed")
    if choice.speedup_vs_gqa is not None:
        vs.append(f"{choice.speedup_vs_gqa:.2f}x GQA's")
    speed_words = f"{kind}{src}: {' and '.join(vs) if vs else fmt_s(choice.latency_s)}"
    loss_words = (f"loss {fmt_loss(choice.loss, choice.loss_se, choice.loss_noise_kind)} ({fmt_pct(choice.loss_change_pct)} against {r.reference_name} "
                  f"{r.reference.loss:.4f}, {'prior' if quality_source == 'prior' else 'measured'})")
    within = f"loss within {100 * tolerance:g}% of {r.reference_name}{r.budget_text}"
    pool = f"the {len(r.eligible)} configurations with {within}" if len(r.eligible) > 1 else None
    if decode:
        lead = (f"has the smallest KV cache ({fmt_bytes(choice.kv_cache_bytes)} at N={seq_len}) of {pool}" if pool
                else f"is the only configuration with {within} (KV cache {fmt_bytes(choice.kv_cache_bytes)} at "
                     f"N={seq_len})")
        why = f"{choice.label} {lead}; decode {speed_words}; {loss_words}."
        notes.insert(0, DECODE_NOTE)
    else:
        lead = f"is the fastest of {pool}" if pool else f"is the only configuration with {within}"
        why = (f"{choice.label} {lead}, for {mode} at N={seq_len}; {speed_words}; {loss_words}; "
               f"KV cache {fmt_bytes(choice.kv_cache_bytes)}.")
    better = _looser_tolerance(r, candidates)
    if better:
        gain = (lambda c: f"KV cache {fmt_bytes(c.kv_cache_bytes)}") if decode else (
            lambda c: f"{fmt_x(c.speedup_vs_mha)} vs MHA")
        why += " A looser tolerance would admit: " + "; ".join(
            f"{c.label} at {c.needed_tolerance_pct:.2f}% ({gain(c)})" for c in better[:3]) + "."
    if not decode and choice.spec.n_q_heads == n_heads:
        notes.append(_query_heads_note(r, n_heads, kind, seq_len, bool(better)))
    if quality_source != "prior" and any(c.loss_se is None for c in r.eligible):
        notes.append("The study's losses come from one seed each: they have no uncertainty estimate, so a close "
                     "call on loss cannot be judged; set training.replicates (e.g. 4) or study.halving to measure one.")
    return why + tie_words(r)


def _looser_tolerance(r: Ranking, candidates: list) -> list:
    """Candidates left out only by the tolerance that rank ahead of the choice, the nearest first."""
    head = rank_key(r.choice, r.decode)[0]
    better = [c for c in candidates if not c.eligible and c.needed_tolerance_pct is not None
              and len(c.reasons) == 1 and rank_key(c, r.decode)[0] < head]
    return sorted(better, key=lambda c: c.needed_tolerance_pct)


def _query_heads_note(r: Ranking, n_heads: int, kind: str, seq_len: int, looser: bool) -> str:
    """Why a choice that keeps every query head is not an SQA configuration."""
    fewer = [c.label for c in r.eligible if c.spec.n_q_heads < n_heads]
    if not fewer:
        return ("The recommendation keeps all query heads: within this tolerance no configuration with "
                "fewer query heads (SQA) qualifies" + ("; see what a looser tolerance would admit above."
                                                       if looser else "."))
    return (f"Configurations with fewer query heads ({', '.join(fewer)}) are within tolerance but "
            f"{kind} slower here at N={seq_len}: SQA cuts the N^2 attention work, which dominates a "
            f"step only at long sequences.")
