"""Which of a study's trials to export: by number (``--trial N``) or by a rule over its complete
trials (``--pick knee``, ``"fastest-within 1%"``, ``"best-under-latency 5ms"``). Trials are read
through `TrialRecord` only.
"""

from __future__ import annotations

import math

from ..search.pareto import knee_point
from ..search.records import TrialRecord, current_records, read_records
from .errors import ExportError
from .parse import parse_pick


def trial_summary(records: list[TrialRecord]) -> str:
    """'it has trials 0-N; complete: ...': what a study holds, for an error message."""
    if not records:
        return "it has no trials"
    complete = [r.number for r in records if r.complete]
    return (f"it has trials 0-{records[-1].number}; complete: "
            f"{', '.join(map(str, complete)) if complete else 'none'}")


def complete_records(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials with finite quality and latency, one per distinct spec: its current result
    (`current_records`: the most seeds, a halving promotion over the trial it extends)."""
    return [r for r in current_records(records)
            if r.spec is not None and r.quality is not None and r.latency_s is not None
            and math.isfinite(r.quality) and math.isfinite(r.latency_s)]


def _by_number(handle, records: list[TrialRecord], number: int) -> tuple[TrialRecord, str]:
    name = handle.space.name
    found = [r for r in records if r.number == number]
    if not found:
        raise ExportError(f"--trial {number} is not in study {name!r} ({handle.directory}): "
                          f"{trial_summary(records)}")
    rec = found[0]
    if not rec.complete or rec.spec is None:
        raise ExportError(f"--trial {number} of study {name!r} is {rec.state} ({rec.reason or 'no result'}): only "
                          f"complete trials can be exported; {trial_summary(records)}")
    return rec, f"trial {number} of study {name!r}, chosen by number"


def _fastest_within(handle, rows: list[TrialRecord], pick: str, fraction: float, better) -> tuple[TrialRecord, str]:
    name, quality = handle.space.name, handle.space.objectives.quality
    minimize = handle.space.directions[0] == "minimize"
    ref = [r for r in rows if r.variant == "mha"]
    if ref:
        ref_r, ref_name = ref[0], f"MHA (trial {ref[0].number})"
    else:
        ref_r = rows[0]
        for r in rows[1:]:
            if better(r.quality, ref_r.quality):
                ref_r = r
        ref_name = f"the best trial {ref_r.number} ({ref_r.label}; MHA is not in the study)"
    ref_q = ref_r.quality
    limit = ref_q + fraction * abs(ref_q) if minimize else ref_q - fraction * abs(ref_q)
    ok = [r for r in rows if (r.quality <= limit if minimize else r.quality >= limit)]
    if not ok:  # cannot happen with a reference in rows, kept for safety
        raise ExportError(f"--pick {pick!r}: no trial of study {name!r} has {quality} within {100 * fraction:g}% of "
                          f"{ref_name} ({ref_q:.4g})")
    best = min(ok, key=lambda r: (r.latency_s, r.number))
    return best, (f"fastest trial of study {name!r} with {quality} within {100 * fraction:g}% of {ref_name}, "
                  f"{ref_q:.4g} -> limit {limit:.4g} (trial {best.number})")


def _best_under_latency(handle, rows: list[TrialRecord], pick: str, budget: float, better) -> tuple[TrialRecord, str]:
    name, quality = handle.space.name, handle.space.objectives.quality
    ok = [r for r in rows if r.latency_s <= budget]
    if not ok:
        fastest = min(rows, key=lambda r: r.latency_s)
        raise ExportError(f"--pick {pick!r} matches nothing: no complete trial of study {name!r} has latency <= "
                          f"{budget:.4g} s; the fastest is trial {fastest.number} ({fastest.label}) "
                          f"at {fastest.latency_s:.4g} s")
    best = ok[0]
    for r in ok[1:]:
        if better(r.quality, best.quality):
            best = r
    return best, (f"best {quality} of study {name!r} with latency <= {budget:.4g} s "
                  f"({best.latency_s:.4g} s, trial {best.number})")


def select_record(handle, *, trial: int | None = None, pick: str | None = None) -> tuple[TrialRecord, str]:
    """The trial to export and why: (TrialRecord, reason). Exactly one of trial / pick.

    Raises ExportError for a trial not in the study, an incomplete trial, an unknown rule,
    or a rule that matches nothing (the message says what the study has).
    """
    if (trial is None) == (pick is None):
        raise ExportError("choose the configuration with exactly one of --trial N or --pick RULE")
    records = read_records(handle.study)
    if trial is not None:
        return _by_number(handle, records, trial)
    rule, arg = parse_pick(pick)
    rows = complete_records(records)
    if not rows:
        raise ExportError(f"--pick {pick!r}: study {handle.space.name!r} has no complete trial with a quality "
                          f"and a latency")
    direction = handle.space.directions[0]
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    if rule == "knee":
        r = rows[knee_point([[r.quality, r.latency_s] for r in rows], [direction, "minimize"])]
        return r, (f"knee of the {handle.space.objectives.quality}/latency front of study {handle.space.name!r} "
                   f"(trial {r.number})")
    if rule == "fastest-within":
        return _fastest_within(handle, rows, pick, arg, better)
    return _best_under_latency(handle, rows, pick, arg, better)


def select_trial(handle, *, trial: int | None = None, pick: str | None = None):
    """As `select_record`, with the Optuna FrozenTrial: (FrozenTrial, reason)."""
    rec, reason = select_record(handle, trial=trial, pick=pick)
    return next(t for t in handle.study.get_trials(deepcopy=False) if t.number == rec.number), reason
