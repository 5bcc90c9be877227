"""How long and how to train one quality trial: `TrainConfig`, checked before any work starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .mqar import MQARConfig

__all__ = ["TrainConfig", "TrainError", "TASKS", "DTYPES", "DEFAULT_BUDGET_TOKENS", "DEFAULT_MQAR"]

TASKS = ("lm", "mqar", "lm+mqar")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The default budget: one quickstart trial (d_model=128, H=8, 4 layers, task "lm": 187 steps
# of 8 x 128 tokens) in about 30 s on a quiet 2-core CPU, evaluation included. Measured on a
# shared machine with one thread: 40 s, ~5,400 tokens/s for MHA. With it, xSMQA's val loss sits
# apart from MHA's by more than twice the seed spread; see benchmarks/quality_discrimination.py.
DEFAULT_BUDGET_TOKENS = 192_000

# MQAR small enough that the quickstart model can get off the 1/n_pairs plateau within ~200
# steps of 64 sequences on a CPU (often, not always): 2 pairs from 3 keys and 4 values in 16
# tokens, zero filler (with random filler the queries must first be found, which takes far
# longer). With 4+ pairs no variant left the plateau in 1,000 steps here; Zoology's settings
# (8192-token vocabulary, 16+ pairs) need GPU budgets.
DEFAULT_MQAR = MQARConfig(vocab_size=8, seq_len=16, n_pairs=2, random_fill=False)


class TrainError(UserError):
    """A training setting that cannot be used; raised before any training starts."""

    @classmethod
    def for_field(cls, field_name: str, value, allowed: str) -> "TrainError":
        """The error for one TrainConfig field, naming the field, the value and what is allowed."""
        return cls(f"TrainConfig.{field_name}={value!r} is not allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train one trial.

    Budget: exactly one of ``budget_tokens`` (training tokens per task), ``budget_steps`` or
    ``budget_seconds`` (wall clock per task, training only). None of them means
    ``budget_tokens=DEFAULT_BUDGET_TOKENS``. Token and step budgets give every candidate the same
    data and are repeatable; a wall-clock budget gives faster candidates more steps (the
    question it answers is "best model in T seconds on this machine") and is not repeatable.
    The learning-rate schedule (linear warm-up, cosine decay to ``min_lr_ratio * lr``) runs
    over the budget: over steps, or over elapsed time for a wall-clock budget.

    ``eval_every``: steps between intermediate evaluations reported to the callback; None picks
    4 evenly spaced ones (every 50 steps for a wall-clock budget), 0 turns them off. The final
    evaluation always runs.
    ``threads``: torch intra-op threads for the run (restored afterwards); None leaves them.
    Fix it for repeatable losses: a different thread count changes the order of float sums.
    ``deterministic``: on CUDA, ``torch.use_deterministic_algorithms`` for the run (CUDA also
    needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment); CPU kernels used here are
    deterministic for a fixed thread count already.
    ``diverge_loss``: a training loss above this (or NaN/inf) ends the trial as diverged; None
    means 3 x ln(vocab), three times the loss of a uniform guess.
    ``paired_init``: initialise from ``seed`` so that candidates share their weights where shapes
    allow (`sqa_search.quality.paired_init`: a candidate's heads are a slice of one full-size
    draw). Off by default: measured at the quickstart's budget (benchmarks/2026-12-02-cpu-paired-seeds,
    4 seeds) it did not shrink the seed-to-seed spread of the difference between two variants (the
    shared data order already correlates them), and a study resumed across the switch would mix two
    initialisations. False: the plain ``torch.manual_seed(seed)`` initialisation.
    """

    budget_tokens: int | None = None
    budget_steps: int | None = None
    budget_seconds: float | None = None
    task: str = "lm"
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.2
    warmup_steps: int | None = None  # overrides warmup_fraction when given
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    seed: int = 0
    data_seed: int | None = 0  # None: follow seed
    eval_batches: int = 8
    eval_every: int | None = None
    mqar: MQARConfig = DEFAULT_MQAR
    mqar_batch_size: int | None = 64  # None: batch_size
    mqar_lr: float | None = None  # None: lr
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    deterministic: bool = True
    diverge_loss: float | None = None
    paired_init: bool = False

    def __post_init__(self) -> None:
        self._check_budget()
        self._check_numbers()
        self._check_run_settings()

    def _check_budget(self) -> None:
        """Exactly one budget (none given means the default token budget), and a usable one."""
        budgets = {
            "budget_tokens": self.budget_tokens,
            "budget_steps": self.budget_steps,
            "budget_seconds": self.budget_seconds,
        }
        given = {k: v for k, v in budgets.items() if v is not None}
        if len(given) > 1:
            raise TrainError(
                f"TrainConfig budget is ambiguous: {given} are all set; give exactly one of "
                "budget_tokens, budget_steps, budget_seconds"
            )
        if not given:
            object.__setattr__(self, "budget_tokens", DEFAULT_BUDGET_TOKENS)
        for name in ("budget_tokens", "budget_steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise TrainError.for_field(name, value, "must be an integer >= 1 (a budget of zero trains nothing)")
        if self.budget_seconds is not None and (
            not _is_num(self.budget_seconds) or not math.isfinite(self.budget_seconds) or self.budget_seconds <= 0
        ):
            raise TrainError.for_field("budget_seconds", self.budget_seconds, "must be a finite number of seconds > 0")

    def _check_numbers(self) -> None:
        """The task, sizes, seeds and optimiser settings."""
        if self.task not in TASKS:
            raise TrainError.for_field("task", self.task, f"choose one of {', '.join(TASKS)}")
        for name, low in (("batch_size", 1), ("seq_len", 2), ("eval_batches", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise TrainError.for_field(name, value, f"must be an integer >= {low}")
        for name in ("warmup_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise TrainError.for_field(name, value, "must be an integer >= 0 or None")
        if self.mqar_batch_size is not None and (not _is_int(self.mqar_batch_size) or self.mqar_batch_size < 1):
            raise TrainError.for_field("mqar_batch_size", self.mqar_batch_size, "must be an integer >= 1 or None")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise TrainError.for_field("threads", self.threads, "must be an integer >= 1 or None")
        if not _is_int(self.seed) or self.seed < 0:
            raise TrainError.for_field("seed", self.seed, "must be an integer >= 0")
        if self.data_seed is not None and (not _is_int(self.data_seed) or self.data_seed < 0):
            raise TrainError.for_field("data_seed", self.data_seed, "must be an integer >= 0, or None to follow seed")
        for name in ("lr", "mqar_lr"):
            value = getattr(self, name)
            if value is None and name == "mqar_lr":
                continue
            if not _is_num(value) or not math.isfinite(value) or value <= 0:
                raise TrainError.for_field(name, value, "must be a finite number > 0")
        for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("warmup_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_num(value) or not lo <= value <= hi:
                raise TrainError.for_field(name, value, f"must be a number in [{lo}, {hi}]")
        if not _is_num(self.weight_decay) or not self.weight_decay >= 0:
            raise TrainError.for_field("weight_decay", self.weight_decay, "must be a number >= 0")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or not self.grad_clip > 0):
            raise TrainError.for_field("grad_clip", self.grad_clip,
                                       "must be a number > 0, or None for no clipping")
        if self.diverge_loss is not None and (not _is_num(self.diverge_loss) or not self.diverge_loss > 0):
            raise TrainError.for_field("diverge_loss", self.diverge_loss,
                                       "must be a number > 0, or None for 3 x ln(vocab)")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in betas):
            raise TrainError.for_field("betas", self.betas, "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", betas)

    def _check_run_settings(self) -> None:
        """The MQAR task's settings, the dtype and the device."""
        if not isinstance(self.mqar, MQARConfig):
            raise TrainError.for_field("mqar", self.mqar, "must be an sqa_search.quality.mqar.MQARConfig")
        if self.dtype not in DTYPES:
            raise TrainError.for_field("dtype", self.dtype,
                                       f"choose one of {', '.join(DTYPES)} (float16 needs loss scaling; use bfloat16)")
        for name in ("deterministic", "paired_init"):
            if not isinstance(getattr(self, name), bool):
                raise TrainError.for_field(name, getattr(self, name), "must be True or False")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise TrainError.for_field("device", self.device,
                                       f"must name a torch device such as 'cpu' or 'cuda:0' ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError.for_field("device", self.device, "CUDA is not available on this machine; use 'cpu'")
        if device.type not in ("cpu", "cuda", "mps"):
            raise TrainError.for_field("device", self.device, "must be a cpu, cuda or mps device")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def batch_seed(self) -> int:
        """The seed of the data order (and of the encoder's masks)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task.split("+"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown TrainConfig field(s) {unknown}: allowed are {sorted(known)}")
        if isinstance(data.get("mqar"), dict):
            data["mqar"] = MQARConfig(**data["mqar"])
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)
