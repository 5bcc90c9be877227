"""Setup of a quality trial: everything that can fail on bad input fails here, before training.

`plan_task` resolves one task's settings (model, batch, learning rate, step budget, warm-up,
evaluation interval, divergence limit) from a `TrainConfig`, checking that the data holds a
sequence and that the budget covers a step; `resolve_data` turns the caller's data argument into
tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..layer.model import MODEL_PRESETS, ModelConfig
from ..layer.spec import AttentionSpec
from .config import TrainConfig, TrainError
from .corpus import TextSource
from .errors import DataError
from .tokens import TokenData, load_tokens

__all__ = ["TaskPlan", "plan_task", "model_config_for", "resolve_data"]


def model_config_for(spec: AttentionSpec, model, vocab_size: int) -> ModelConfig:
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
class TaskPlan:
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


def plan_task(spec: AttentionSpec, task: str, cfg: TrainConfig, model, data: TokenData | None) -> TaskPlan:
    """One task's settings, checked: the data holds a sequence, the budget covers a step."""
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
    model_config = model_config_for(spec, model, vocab)
    tokens_per_step = batch * seq_len
    if cfg.budget_steps is not None:
        total = cfg.budget_steps
    elif cfg.budget_tokens is not None:
        total = cfg.budget_tokens // tokens_per_step
        if total < 1:
            raise TrainError.for_field(
                "budget_tokens", cfg.budget_tokens,
                f"must cover at least one {task} step of batch_size x seq_len = {tokens_per_step} tokens",
            )
    else:
        total = None
    if cfg.warmup_steps is not None:
        if total is None:
            raise TrainError.for_field("warmup_steps", cfg.warmup_steps,
                                       "needs a token or step budget; use warmup_fraction with budget_seconds")
        warmup = min(cfg.warmup_steps / total, 1.0)
    else:
        warmup = cfg.warmup_fraction
    if cfg.eval_every is None:
        eval_every = max(1, total // 4) if total else 50
    else:
        eval_every = cfg.eval_every or None
    diverge = cfg.diverge_loss if cfg.diverge_loss is not None else 3 * math.log(vocab)
    return TaskPlan(task, model_config, batch, seq_len, lr, total, warmup, eval_every, diverge)
