"""The objectives a study optimised, as `recommend` and `export` show them: for one trial, a list of
(name, value, formatted), so a new objective (peak memory, next) appears in their tables, READMEs
and configs without an edit here.

The objectives are declared once, on the search space (`SearchSpace.declared_objectives()`); this
module only decides how each unit is printed.
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


_FORMAT_BY_UNIT = {"s": fmt_s, "bytes": fmt_bytes}  # anything else: a plain figure to 4 decimals


def _plain(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def objectives_in_use(space) -> list[ObjectiveView]:
    """Every objective the study's space declares, in the order of its Optuna values, with the
    formatting its unit calls for."""
    return [ObjectiveView(o.name, o.direction, o.value, _FORMAT_BY_UNIT.get(o.unit, _plain))
            for o in space.declared_objectives()]


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
