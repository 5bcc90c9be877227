"""The objectives a study optimised, as `recommend` and `export` show them: for one trial, a list of
(name, value, formatted), so a new objective (peak memory, next) appears in their tables, READMEs
and configs without an edit here.

`objectives_in_use` is a local ADAPTER: issue 13 declares the objectives once on the search space
(`SearchSpace.objectives_in_use()`, each with a name, a direction, how to read it from a
`TrialRecord` and how to format it). Until that is on main, this mirrors `space.objective_names` /
`space.directions`; at the merge its body becomes ``return space.objectives_in_use()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._format import fmt_bytes, fmt_s
from ..search.records import TrialRecord


@dataclass(frozen=True)
class ObjectiveView:
    """One objective of a study: its name as the study declares it, which way is better, and how to
    read and print one trial's value."""

    name: str  # val_loss, mqar_accuracy, latency_s, kv_cache_bytes, ...
    direction: str  # minimize | maximize
    read: Callable[[TrialRecord], float | None]
    format: Callable[[float | None], str]


@dataclass(frozen=True)
class ObjectiveFigure:
    """One trial's value of one objective."""

    name: str
    value: float | None
    formatted: str


def _fmt_quality(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def objectives_in_use(space) -> list[ObjectiveView]:
    """The study's objectives, in the order of its Optuna values. ADAPTER (see the module docstring)."""
    known = {"latency_s": (lambda r: r.latency_s, fmt_s),
             "kv_cache_bytes": (lambda r: r.kv_cache_bytes, fmt_bytes)}
    views = []
    for name, direction in zip(space.objective_names, space.directions):
        read, fmt = known.get(name, (lambda r: r.quality, _fmt_quality))  # the first is the quality metric
        views.append(ObjectiveView(name, direction, read, fmt))
    return views


def objective_figures(space, record: TrialRecord, *, leave_out=()) -> list[ObjectiveFigure]:
    """Every objective of the study read from one trial, except the names in `leave_out` (those a
    table or README already shows in its own words)."""
    figures = []
    for objective in objectives_in_use(space):
        if objective.name in leave_out:
            continue
        value = objective.read(record)
        figures.append(ObjectiveFigure(objective.name, value, objective.format(value)))
    return figures
