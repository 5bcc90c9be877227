"""What one quality trial measured: `TrainResult`, and `json_safe` for writing it out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..layer.spec import AttentionSpec

__all__ = ["TrainResult", "STATUSES", "json_safe"]

# how a trial ended; see TrainResult
STATUSES = ("ok", "stopped", "diverged", "oom", "error")


@dataclass
class TrainResult:
    """What one trial measured. ``to_dict()`` is JSON-safe (non-finite numbers become None).

    ``status``: "ok"; "stopped" (the callback returned True); "diverged"; "oom"; "error".
    ``train_loss`` is the mean of the last tenth of the steps (at most 20), less noisy than the
    last step alone. Val metrics are None for a task that was not run or a trial that failed.
    ``steps``, ``tokens`` and ``train_s`` are totals over the tasks run (``mqar_steps`` is the
    MQAR part); ``tokens_per_s`` is training tokens over training time (evaluation excluded);
    ``wall_s`` is the whole call, data loading and evaluation included.
    """

    spec: AttentionSpec
    task: str
    status: str = "ok"
    reason: str | None = None
    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0
    tokens_per_s: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_acc: float | None = None
    mqar_accuracy: float | None = None
    mqar_loss: float | None = None
    mqar_train_loss: float | None = None
    mqar_steps: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    mqar_loss_curve: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    n_params: int | None = None
    backend: str | None = None
    seed: int = 0
    train_config: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    data_source: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["spec"] = self.spec.to_dict()
        d["label"] = self.spec.label
        d["loss_curve"] = [[s, v] for s, v in self.loss_curve]
        d["mqar_loss_curve"] = [[s, v] for s, v in self.mqar_loss_curve]
        return json_safe(d)


def json_safe(obj):
    """``obj`` as plain JSON values; non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    if hasattr(obj, "item"):  # numpy scalars
        return json_safe(obj.item())
    if dataclasses.is_dataclass(obj):
        return json_safe(dataclasses.asdict(obj))
    return str(obj)
