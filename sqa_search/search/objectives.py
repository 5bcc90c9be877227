"""The objectives a study can optimise, declared once: name, direction, the trials table's column,
unit and how the value is read from a trial's record. The space switches them on
(`SearchSpace.declared_objectives`); the backends, the report, show, recommend and export only
loop over what it declares, so a new objective is a declaration here, a switch in space.py and its
value in the trial record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Objective", "quality_objective", "LATENCY", "KV_CACHE", "MEMORY"]


@dataclass(frozen=True)
class Objective:
    """One objective of a study: its name (the metric the samplers and Ray see), its direction,
    the column it has in the trials table and how its value is read from a trial's record.

    To add an objective: declare it here (and switch it on in `SearchSpace.declared_objectives`)
    and write its value into the trial record (records.py); the backends, report, show, recommend
    and export go through `SearchSpace.objectives_in_use()` / `declared_objectives()`.
    """

    name: str
    direction: str  # minimize | maximize
    column: str  # the trials table's column (and TrialRecord's attribute, unless `read` is given)
    unit: str = ""  # for axis labels and table headers
    fmt: str = ".4g"
    read: Callable | None = None  # TrialRecord -> value; default: the record's attribute `column`

    def value(self, record) -> float | None:
        """This objective's value in a `records.TrialRecord` (None when the trial has none)."""
        value = self.read(record) if self.read is not None else getattr(record, self.column, None)
        return None if value is None else float(value)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name


def quality_objective(metric: str) -> Objective:
    """The quality objective: the training metric the space names (val_loss or mqar_accuracy)."""
    return Objective(metric, "maximize" if metric == "mqar_accuracy" else "minimize", "quality")


LATENCY = Objective("latency_s", "minimize", "latency_s", unit="s")
KV_CACHE = Objective("kv_cache_bytes", "minimize", "kv_cache_bytes", unit="bytes", fmt=".0f")
MEMORY = Objective("peak_memory_bytes", "minimize", "peak_memory_bytes", unit="bytes", fmt=".0f")
