"""The quality side of a trial: train the proxy model with one attention spec, briefly, and measure it.

Two tasks, each its own short training run from the same seed:

* ``lm``: language modelling on real text (`sqa_search.quality.tokens`). A causal spec trains next-token
  prediction; a bidirectional spec (an encoder) trains a masked-token objective: 15% of the
  positions are replaced by a reserved ``[MASK]`` id (one past the tokenizer's vocabulary, so it
  never collides with a real token) and only those positions are predicted. No 80/10/10 split:
  the objective is a yardstick for comparing heads, not a pretraining recipe.
  Reported: ``val_loss``, ``val_ppl``, ``val_acc`` (next-token, or masked-token, accuracy) on a
  fixed, held-out slice of the corpus.
* ``mqar``: multi-query associative recall on synthetic data (`sqa_search.quality.mqar.mqar_batch`),
  trained with the same model shape and the same budget. Reported: ``mqar_accuracy``, the
  accuracy over the queried positions only, on fixed held-out sequences.
* ``lm+mqar``: both, one after the other; each task gets the whole budget (so twice the time).
  The default is ``lm``: at the default CPU budget whether a model gets off MQAR's
  1/n_pairs plateau is mostly the luck of the seed (MHA scored 1.00, 0.58 and 0.50 over three
  seeds, xSMQA 1.00, 1.00, 0.56), so MQAR is worth its time on bigger budgets.

Every candidate sees the same data in the same order: batch ``k`` is
``lm_batch(..., step=k, seed=data_seed)`` (or ``mqar_batch``), a pure function of
``(data_seed, step)``, and the model is initialised after ``torch.manual_seed(seed)``. By default
``data_seed`` is fixed (0), so replicate seeds vary the initialisation only and every trial of a
study reads one common data stream (common random numbers: a difference between two candidates
is not confounded with a difference in data order); ``data_seed=None`` makes the seed drive
both. With a token or step budget and a fixed thread count a run is repeatable on CPU to the
last bit.

A trial never takes its caller down for its own failures: a NaN/inf or exploding loss ends it
with ``status="diverged"``, running out of memory with ``"oom"``, anything else raised while
training with ``"error"``; the reason is in ``TrainResult.reason``. Bad settings are different:
they raise `TrainError` (or `DataError`/`SpecError`) before any work starts. Exceptions raised
by the caller's ``callback`` (``optuna.TrialPruned``, ...) pass through untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .corpus import TextSource
from .errors import DataError
from .mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from .tokens import TokenData, lm_batch, load_tokens, val_batches
from ..layer.model import MODEL_PRESETS, ModelConfig, ProxyLM
from ..layer.spec import AttentionSpec
from ..errors import UserError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainError",
    "TASKS",
    "DEFAULT_BUDGET_TOKENS",
    "DEFAULT_MQAR",
    "train_spec",
    "masked_accuracy",
    "mask_tokens",
    "lr_at",
    "resolve_data",
    "json_safe",
]

TASKS = ("lm", "mqar", "lm+mqar")
STATUSES = ("ok", "stopped", "diverged", "oom", "error")
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

MASK_FRACTION = 0.15
# Held-out MQAR sequences come from this seed, which training never uses for its own batches
# unless a user picks it as a training seed; then the overlap is still only by chance.
MQAR_EVAL_SEED = 2**31 - 1


class TrainError(UserError):
    """A training setting that cannot be used; raised before any training starts."""


def _fail(field_name: str, value, allowed: str) -> TrainError:
    return TrainError(f"TrainConfig.{field_name}={value!r} is not allowed: {allowed}")


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

    def __post_init__(self) -> None:
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
                raise _fail(name, value, "must be an integer >= 1 (a budget of zero trains nothing)")
        if self.budget_seconds is not None and (
            not _is_num(self.budget_seconds) or not math.isfinite(self.budget_seconds) or self.budget_seconds <= 0
        ):
            raise _fail("budget_seconds", self.budget_seconds, "must be a finite number of seconds > 0")
        if self.task not in TASKS:
            raise _fail("task", self.task, f"choose one of {', '.join(TASKS)}")
        for name, low in (("batch_size", 1), ("seq_len", 2), ("eval_batches", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise _fail(name, value, f"must be an integer >= {low}")
        for name in ("warmup_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise _fail(name, value, "must be an integer >= 0 or None")
        if self.mqar_batch_size is not None and (not _is_int(self.mqar_batch_size) or self.mqar_batch_size < 1):
            raise _fail("mqar_batch_size", self.mqar_batch_size, "must be an integer >= 1 or None")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise _fail("threads", self.threads, "must be an integer >= 1 or None")
        if not _is_int(self.seed) or self.seed < 0:
            raise _fail("seed", self.seed, "must be an integer >= 0")
        if self.data_seed is not None and (not _is_int(self.data_seed) or self.data_seed < 0):
            raise _fail("data_seed", self.data_seed, "must be an integer >= 0, or None to follow seed")
        for name in ("lr", "mqar_lr"):
            value = getattr(self, name)
            if value is None and name == "mqar_lr":
                continue
            if not _is_num(value) or not math.isfinite(value) or value <= 0:
                raise _fail(name, value, "must be a finite number > 0")
        for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("warmup_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_num(value) or not lo <= value <= hi:
                raise _fail(name, value, f"must be a number in [{lo}, {hi}]")
        if not _is_num(self.weight_decay) or not self.weight_decay >= 0:
            raise _fail("weight_decay", self.weight_decay, "must be a number >= 0")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or not self.grad_clip > 0):
            raise _fail("grad_clip", self.grad_clip, "must be a number > 0, or None for no clipping")
        if self.diverge_loss is not None and (not _is_num(self.diverge_loss) or not self.diverge_loss > 0):
            raise _fail("diverge_loss", self.diverge_loss, "must be a number > 0, or None for 3 x ln(vocab)")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in betas):
            raise _fail("betas", self.betas, "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", betas)
        if not isinstance(self.mqar, MQARConfig):
            raise _fail("mqar", self.mqar, "must be an sqa_search.quality.data.MQARConfig")
        if self.dtype not in DTYPES:
            raise _fail("dtype", self.dtype, f"choose one of {', '.join(DTYPES)} (float16 needs loss scaling; use bfloat16)")
        if not isinstance(self.deterministic, bool):
            raise _fail("deterministic", self.deterministic, "must be True or False")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise _fail("device", self.device, f"must name a torch device such as 'cpu' or 'cuda:0' ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise _fail("device", self.device, "CUDA is not available on this machine; use 'cpu'")
        if device.type not in ("cpu", "cuda", "mps"):
            raise _fail("device", self.device, "must be a cpu, cuda or mps device")

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


# ---------------------------------------------------------------------------------------------
# Pieces (pure functions, tested on their own)
# ---------------------------------------------------------------------------------------------


def lr_at(progress: float, lr: float, warmup: float, min_lr_ratio: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the budget: linear warm-up over the first
    ``warmup`` of it (starting above zero so step 0 learns), then cosine to ``min_lr_ratio * lr``."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return lr * max(progress / warmup, 0.01)
    rest = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * rest)))


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over the positions whose target is not IGNORE_INDEX.

    For MQAR this is exactly the queried positions: every other target is IGNORE_INDEX.
    """
    keep = targets != IGNORE_INDEX
    pred = logits.argmax(dim=-1)
    return int((pred[keep] == targets[keep]).sum()), int(keep.sum())


def mask_tokens(x: torch.Tensor, mask_id: int, seed: int, step: int, fraction: float = MASK_FRACTION):
    """The masked-token objective for encoders: (inputs, targets).

    A fixed ``fraction`` of positions (per batch, chosen by ``(seed, step)``) becomes
    ``mask_id`` in the inputs and keeps its token as the target; everything else is
    IGNORE_INDEX. At least one position per batch is masked.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    chosen = torch.rand(x.shape, generator=gen) < fraction
    if not bool(chosen.any()):
        chosen.view(-1)[0] = True
    inputs = torch.where(chosen, torch.full_like(x, mask_id), x)
    targets = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# Setup: everything that can fail on bad input fails here, before training
# ---------------------------------------------------------------------------------------------


def _model_config(spec: AttentionSpec, model, vocab_size: int) -> ModelConfig:
    """The model for a task: ``model`` is a ModelConfig (its attention and vocab are replaced),
    a preset name from MODEL_PRESETS (its n_layers is used; d_model and heads come from the
    spec), a dict of ModelConfig overrides, or None (the quickstart preset's depth)."""
    if isinstance(model, ModelConfig):
        return dataclasses.replace(model, attention=spec, vocab_size=vocab_size)
    if model is None:
        model = "quickstart"
    if isinstance(model, str):
        if model not in MODEL_PRESETS:
            raise TrainError(f"model preset {model!r} is not known: choose one of {', '.join(MODEL_PRESETS)}")
        # The spec decides the width and heads; the preset gives the depth.
        return ModelConfig(attention=spec, n_layers=MODEL_PRESETS[model]["n_layers"], vocab_size=vocab_size)
    if isinstance(model, dict):
        overrides = dict(model)
        for key in ("attention", "vocab_size"):
            if key in overrides:
                raise TrainError(f"model override {key!r} is not allowed: the spec and the task's data decide it")
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"attention", "vocab_size"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TrainError(f"unknown model override(s) {unknown}: allowed are {sorted(known)}")
        return ModelConfig(attention=spec, vocab_size=vocab_size, **overrides)
    raise TrainError(
        f"model={model!r} is not allowed: give a ModelConfig, a preset name ({', '.join(MODEL_PRESETS)}), "
        "a dict of ModelConfig fields, or None"
    )


def resolve_data(data) -> TokenData:
    """``data``: a TokenData, a source load_tokens understands (path, 'builtin', 'hf:NAME',
    TextSource), or None for the builtin corpus. Raises DataError for an unusable source."""
    if isinstance(data, TokenData):
        return data
    if data is None or isinstance(data, (str, os.PathLike, TextSource)):
        return load_tokens(data)
    raise TrainError(f"data={data!r} is not allowed: give a TokenData, a data source (path, 'builtin', 'hf:NAME') or None")


@dataclass
class _Plan:
    """One task's resolved settings."""

    task: str
    model_config: ModelConfig
    batch_size: int
    seq_len: int
    lr: float
    total_steps: int | None  # None for a wall-clock budget
    warmup: float  # as a fraction of the budget
    eval_every: int | None
    diverge_loss: float


def _plan(spec: AttentionSpec, task: str, cfg: TrainConfig, model, data: TokenData | None) -> _Plan:
    if task == "lm":
        vocab = data.vocab_size + (0 if spec.causal else 1)  # one extra id for [MASK]
        batch, seq_len, lr = cfg.batch_size, cfg.seq_len, cfg.lr
        need = seq_len + 1
        for part in ("train", "val"):
            n = len(getattr(data, part))
            if n < need:
                raise DataError(
                    f"TrainConfig.seq_len={seq_len} is not allowed for data {data.source!r}: its {part} split "
                    f"has {n} tokens and one sequence needs {need}"
                )
    else:
        vocab = cfg.mqar.vocab_size
        batch, seq_len = cfg.mqar_batch_size or cfg.batch_size, cfg.mqar.seq_len
        lr = cfg.mqar_lr or cfg.lr
    model_config = _model_config(spec, model, vocab)
    tokens_per_step = batch * seq_len
    if cfg.budget_steps is not None:
        total = cfg.budget_steps
    elif cfg.budget_tokens is not None:
        total = cfg.budget_tokens // tokens_per_step
        if total < 1:
            raise _fail(
                "budget_tokens", cfg.budget_tokens,
                f"must cover at least one {task} step of batch_size x seq_len = {tokens_per_step} tokens",
            )
    else:
        total = None
    if cfg.warmup_steps is not None:
        if total is None:
            raise _fail("warmup_steps", cfg.warmup_steps, "needs a token or step budget; use warmup_fraction with budget_seconds")
        warmup = min(cfg.warmup_steps / total, 1.0)
    else:
        warmup = cfg.warmup_fraction
    if cfg.eval_every is None:
        eval_every = max(1, total // 4) if total else 50
    else:
        eval_every = cfg.eval_every or None
    diverge = cfg.diverge_loss if cfg.diverge_loss is not None else 3 * math.log(vocab)
    return _Plan(task, model_config, batch, seq_len, lr, total, warmup, eval_every, diverge)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


class _CallbackRaised(BaseException):
    """Carries an exception out of the caller's callback past our own error handling."""

    def __init__(self, original: BaseException):
        super().__init__(original)
        self.original = original


class _Diverged(Exception):
    pass


@contextlib.contextmanager
def _run_environment(cfg: TrainConfig):
    """Threads, determinism and the global RNG for one run; all restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = [torch.device(cfg.device)] if torch.device(cfg.device).type == "cuda" else []
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # On CPU our kernels are already deterministic for a fixed thread count, and the
        # switch costs seconds the first time (it imports torch._inductor); so CUDA only.
        if cfg.deterministic and devices:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(old_threads)
        if cfg.deterministic and devices:
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


def _optimizer(model: ProxyLM, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: norms, biases, the (tied) embedding and global tokens are left alone.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith("embed."):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _lm_eval_batches(plan: _Plan, cfg: TrainConfig, data: TokenData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    causal = plan.model_config.causal
    for i, (x, y) in enumerate(val_batches(data.val, plan.batch_size, plan.seq_len, max_batches=cfg.eval_batches)):
        if causal:
            yield x, y
        else:
            # the same masked positions for every candidate and every seed
            yield mask_tokens(x, plan.model_config.vocab_size - 1, seed=0, step=10**6 + i)


def _mqar_eval_batches(plan: _Plan, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(cfg.eval_batches):
        yield mqar_batch(cfg.mqar, plan.batch_size, seed=MQAR_EVAL_SEED, step=i)


@torch.no_grad()
def _evaluate(model: ProxyLM, batches, device, autocast) -> dict:
    was_training = model.training
    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits, _ = model(x)
        keep = y != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            continue
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        loss_sum += float(loss)
        c, k = masked_accuracy(logits, y)
        correct, counted = correct + c, counted + k
    model.train(was_training)
    loss = loss_sum / max(counted, 1)
    return {"loss": loss, "acc": correct / max(counted, 1), "count": counted}


def _train_task(
    spec: AttentionSpec,
    plan: _Plan,
    cfg: TrainConfig,
    data: TokenData | None,
    result: TrainResult,
    callback,
    progress,
    step_offset: int,
) -> None:
    """Train and evaluate one task, writing into ``result``. Raises _Diverged, _CallbackRaised
    or whatever training raised; the caller turns those into a status."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=dtype))
        if dtype != torch.float32 else contextlib.nullcontext
    )
    torch.manual_seed(cfg.seed)
    model = ProxyLM(plan.model_config).to(device)
    if plan.task == "lm":
        result.n_params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, cfg, device)
    causal = plan.model_config.causal
    mask_id = plan.model_config.vocab_size - 1
    is_lm = plan.task == "lm"

    def batch(step: int):
        if is_lm:
            x, y = lm_batch(data.train, plan.batch_size, plan.seq_len, step=step, seed=cfg.batch_seed)
            if not causal:
                x, y = mask_tokens(x, mask_id, cfg.batch_seed, step)
        else:
            x, y = mqar_batch(cfg.mqar, plan.batch_size, seed=cfg.batch_seed, step=step)
        return x.to(device), y.to(device)

    def evaluate() -> dict:
        batches = _lm_eval_batches(plan, cfg, data) if is_lm else _mqar_eval_batches(plan, cfg)
        return _evaluate(model, batches, device, autocast)

    curve = result.loss_curve if is_lm else result.mqar_loss_curve
    tokens_per_step = plan.batch_size * plan.seq_len
    budget_s = cfg.budget_seconds
    bar = _progress_bar(progress, plan, spec)
    train_s = 0.0
    step = 0
    last_eval_step = -1
    losses: list[float] = []
    model.train()
    try:
        while True:
            if plan.total_steps is not None:
                if step >= plan.total_steps:
                    break
                frac = step / plan.total_steps
            else:
                if train_s >= budget_s:
                    break
                frac = train_s / budget_s
            lr = lr_at(frac, plan.lr, plan.warmup, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            x, y = batch(step)
            with autocast():
                _, loss = model(x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value) or loss_value > plan.diverge_loss:
                raise _Diverged(
                    f"{plan.task} training loss became {loss_value:.4g} at step {step} "
                    f"(limit {plan.diverge_loss:.3g}; lr {lr:.3g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            train_s += time.perf_counter() - t0
            step += 1
            losses.append(loss_value)
            curve.append((step_offset + step, loss_value))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{step * tokens_per_step / train_s:,.0f}", refresh=False)
            done = (plan.total_steps is not None and step >= plan.total_steps) or (
                budget_s is not None and train_s >= budget_s
            )
            if plan.eval_every and step % plan.eval_every == 0 and not done:
                metrics = _report(plan, evaluate(), step, step_offset, losses, lr, train_s, tokens_per_step)
                last_eval_step = step
                result.evals.append(metrics)
                if _call(callback, step_offset + step, metrics):
                    result.status = "stopped"
                    result.reason = f"the callback asked to stop after {plan.task} step {step}"
                    break
    finally:
        if bar is not None:
            bar.close()
        _record(result, plan, step, train_s, tokens_per_step, losses)

    if result.status == "stopped":
        last = result.evals[-1]
        _store_final(result, plan, last)
        return
    final = evaluate()
    metrics = _report(plan, final, step, step_offset, losses, lr_at(1.0, plan.lr, plan.warmup, cfg.min_lr_ratio),
                      train_s, tokens_per_step, final_eval=True)
    result.evals.append(metrics)
    _store_final(result, plan, metrics)
    if last_eval_step != step:
        _call(callback, step_offset + step, metrics)  # the final report cannot stop anything
    backends = {layer.last_backend for layer in model.attention_layers}
    result.backend = ",".join(sorted(b for b in backends if b))


def _call(callback, step: int, metrics: dict) -> bool:
    if callback is None:
        return False
    try:
        return bool(callback(step, dict(metrics)))
    except BaseException as exc:  # noqa: BLE001 - re-raised untouched by train_spec
        raise _CallbackRaised(exc) from None


def _report(plan, ev, step, offset, losses, lr, train_s, tokens_per_step, final_eval=False) -> dict:
    recent = losses[-max(1, min(20, len(losses) // 10)):] if losses else []
    metrics = {
        "task": plan.task,
        "step": offset + step,
        "task_step": step,
        "tokens": step * tokens_per_step,
        "train_loss": sum(recent) / len(recent) if recent else None,
        "lr": lr,
        "train_s": train_s,
        "tokens_per_s": step * tokens_per_step / train_s if train_s > 0 else 0.0,
        "final": final_eval,
    }
    if plan.task == "lm":
        metrics.update(val_loss=ev["loss"], val_ppl=math.exp(min(ev["loss"], 700.0)), val_acc=ev["acc"])
    else:
        metrics.update(mqar_loss=ev["loss"], mqar_accuracy=ev["acc"])
    return metrics


def _record(result: TrainResult, plan: _Plan, step, train_s, tokens_per_step, losses) -> None:
    """Add one task's counts to the result: steps, tokens and time are totals over tasks."""
    recent = losses[-max(1, min(20, len(losses) // 10)):] if losses else []
    mean = sum(recent) / len(recent) if recent else None
    if plan.task == "lm":
        result.train_loss = mean
    else:
        result.mqar_steps, result.mqar_train_loss = step, mean
    result.steps += step
    result.tokens += step * tokens_per_step
    result.train_s += train_s
    result.tokens_per_s = result.tokens / result.train_s if result.train_s > 0 else 0.0


def _store_final(result: TrainResult, plan: _Plan, metrics: dict) -> None:
    if plan.task == "lm":
        result.val_loss, result.val_ppl, result.val_acc = metrics["val_loss"], metrics["val_ppl"], metrics["val_acc"]
    else:
        result.mqar_loss, result.mqar_accuracy = metrics["mqar_loss"], metrics["mqar_accuracy"]


def _progress_bar(progress, plan: _Plan, spec: AttentionSpec):
    """A tqdm bar that appears only after a few seconds (short runs stay quiet); progress=False
    turns it off, True shows it at once."""
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar must not fail a trial
        return None
    return tqdm(
        total=plan.total_steps,
        desc=f"{spec.label} {plan.task}",
        unit="step",
        delay=0 if progress else 3.0,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def train_spec(
    spec: AttentionSpec,
    model: ModelConfig | str | dict | None = None,
    train_config: TrainConfig | None = None,
    data: TokenData | str | os.PathLike | TextSource | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train the proxy model with ``spec`` under ``train_config`` and return what it measured.

    ``model``: a ModelConfig (its attention and vocab_size are replaced by the spec and the
    task's data), a preset name (``"quickstart"``, the default), or a dict of ModelConfig fields.
    ``data``: tokens for the LM task (TokenData, a source for `load_tokens`, or None for the
    builtin corpus); not loaded when the task is ``"mqar"``.
    ``callback(step, metrics)``: called at every intermediate evaluation and once at the end;
    returning True stops the trial (``status="stopped"``, metrics of the last evaluation kept).
    Anything it raises (``optuna.TrialPruned``...) propagates unchanged. Steps are numbered
    across tasks (the MQAR phase of ``lm+mqar`` continues after the LM steps), so they never
    repeat; ``metrics["task"]`` says which task reported.
    ``progress``: None shows a bar only for runs longer than ~3 s, False never, True always.

    Raises TrainError, DataError or SpecError for bad settings, before any training.
    """
    wall_start = time.perf_counter()
    if not isinstance(spec, AttentionSpec):
        raise TrainError(f"spec={spec!r} is not allowed: must be an AttentionSpec")
    cfg = train_config if train_config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TrainError(f"train_config={cfg!r} is not allowed: must be a TrainConfig or None")
    if callback is not None and not callable(callback):
        raise TrainError(f"callback={callback!r} is not allowed: must be callable(step, metrics) or None")
    tokens = resolve_data(data) if "lm" in cfg.tasks else None
    plans = [_plan(spec, task, cfg, model, tokens) for task in cfg.tasks]

    result = TrainResult(
        spec=spec,
        task=cfg.task,
        seed=cfg.seed,
        train_config=cfg.to_dict(),
        model_config={k: v for k, v in dataclasses.asdict(plans[0].model_config).items() if k != "attention"},
        data_source=tokens.source if tokens is not None else None,
    )
    with _run_environment(cfg):
        offset = 0
        for plan in plans:
            try:
                _train_task(spec, plan, cfg, tokens, result, callback, progress, offset)
            except _CallbackRaised as exc:
                raise exc.original from None
            except _Diverged as exc:
                result.status, result.reason = "diverged", str(exc)
            except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not a crash
                if _is_oom(exc):
                    result.status, result.reason = "oom", f"{plan.task}: out of memory ({_first_line(exc)})"
                else:
                    result.status = "error"
                    result.reason = f"{plan.task}: {type(exc).__name__}: {_first_line(exc)}\n{traceback.format_exc(limit=-3)}"
            finally:
                if torch.device(cfg.device).type == "cuda":
                    torch.cuda.empty_cache()
            if result.status != "ok":
                break
            offset = result.steps
    result.wall_s = time.perf_counter() - wall_start
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
