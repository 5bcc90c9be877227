"""`recommend`'s last two stages: rank the candidates (the loss tolerance, the budgets, ties), then
say why in words. Decode is ranked by KV-cache size (one token's step reads the whole cache);
everything else by latency, then loss, then KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._format import fmt_bytes, fmt_s, fmt_x
from .errors import RecommendError
from .recommendation import Candidate, fmt_pct

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
    return Ranking(choice, alternatives, eligible, ref, ref_name, decode, budget_text)


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
    loss_words = (f"loss {choice.loss:.4f} ({fmt_pct(choice.loss_change_pct)} against {r.reference_name} "
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
    return why


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
