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
``(data_seed, step)``, and the model is initialised from ``seed``: by default paired across
candidates (`sqa_search.quality.paired_init`: embeddings, norms and MLP the same tensors, a
candidate's attention heads a slice of one full-size draw), or, with ``paired_init=False``, after
``torch.manual_seed(seed)``. By default
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

from ..common import is_oom
from ..layer.model import ModelConfig, ProxyLM
from ..layer.spec import AttentionSpec
from .config import DEFAULT_BUDGET_TOKENS, DEFAULT_MQAR, DTYPES, TASKS, TrainConfig, TrainError
from .corpus import TextSource
from .mqar import IGNORE_INDEX, mqar_batch
from .paired_init import paired_initialise
from .plan import TaskPlan, plan_task, resolve_data
from .result import TrainResult, json_safe
from .tokens import TokenData, lm_batch, val_batches

# TrainConfig, TrainResult, resolve_data and json_safe live in config.py, result.py and plan.py;
# they are re-exported here so that `train_spec` and everything it takes and returns is one import.
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

MASK_FRACTION = 0.15
# Held-out MQAR sequences come from this seed, which training never uses for its own batches
# unless a user picks it as a training seed; then the overlap is still only by chance.
MQAR_EVAL_SEED = 2**31 - 1


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
# Running
# ---------------------------------------------------------------------------------------------


class _CallbackRaised(BaseException):
    """Carries an exception out of the caller's callback past our own error handling."""

    def __init__(self, original: BaseException):
        super().__init__(original)
        self.original = original


class _Diverged(Exception):
    """A NaN/inf or exploding training loss; the trial ends with status "diverged"."""


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


def _optimizer(model: ProxyLM, cfg: TrainConfig) -> torch.optim.Optimizer:
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


def _lm_eval_batches(plan: TaskPlan, cfg: TrainConfig, data: TokenData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    causal = plan.model_config.causal
    for i, (x, y) in enumerate(val_batches(data.val, plan.batch_size, plan.seq_len, max_batches=cfg.eval_batches)):
        if causal:
            yield x, y
        else:
            # the same masked positions for every candidate and every seed
            yield mask_tokens(x, plan.model_config.vocab_size - 1, seed=0, step=10**6 + i)


def _mqar_eval_batches(plan: TaskPlan, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


@dataclass
class _TaskRun:
    """One task being trained: its plan, model, optimiser and data, and where its loop stands."""

    plan: TaskPlan
    cfg: TrainConfig
    data: TokenData | None
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    model: ProxyLM
    opt: torch.optim.Optimizer
    step_offset: int  # steps of the tasks run before this one: reported steps never repeat
    step: int = 0
    train_s: float = 0.0
    last_eval_step: int = -1
    losses: list[float] = field(default_factory=list)

    @property
    def is_lm(self) -> bool:
        return self.plan.task == "lm"

    @property
    def tokens_per_step(self) -> int:
        return self.plan.batch_size * self.plan.seq_len

    def budget_fraction(self) -> float | None:
        """How much of the budget is spent, in [0, 1): of the steps, or of the seconds for a
        wall-clock budget; None once it is all spent."""
        total, budget_s = self.plan.total_steps, self.cfg.budget_seconds
        if total is not None:
            return self.step / total if self.step < total else None
        return self.train_s / budget_s if self.train_s < budget_s else None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step``: the same for every candidate (a pure function of the data seed)."""
        plan, seed = self.plan, self.cfg.batch_seed
        if self.is_lm:
            x, y = lm_batch(self.data.train, plan.batch_size, plan.seq_len, step=step, seed=seed)
            if not plan.model_config.causal:
                x, y = mask_tokens(x, plan.model_config.vocab_size - 1, seed, step)
        else:
            x, y = mqar_batch(self.cfg.mqar, plan.batch_size, seed=seed, step=step)
        return x.to(self.device), y.to(self.device)

    def evaluate(self) -> dict:
        if self.is_lm:
            batches = _lm_eval_batches(self.plan, self.cfg, self.data)
        else:
            batches = _mqar_eval_batches(self.plan, self.cfg)
        return _evaluate(self.model, batches, self.device, self.autocast)


def _start_task(plan: TaskPlan, cfg: TrainConfig, data: TokenData | None, step_offset: int) -> _TaskRun:
    """The model, initialised from the run's seed, and its optimiser."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=dtype))
        if dtype != torch.float32 else contextlib.nullcontext
    )
    torch.manual_seed(cfg.seed)
    model = ProxyLM(plan.model_config).to(device)
    if cfg.paired_init:  # the same seed, the same weights wherever shapes allow (common random numbers)
        paired_initialise(model, cfg.seed)
    return _TaskRun(plan, cfg, data, device, autocast, model, _optimizer(model, cfg), step_offset)


def _train_task(
    spec: AttentionSpec,
    plan: TaskPlan,
    cfg: TrainConfig,
    data: TokenData | None,
    result: TrainResult,
    callback,
    progress,
    step_offset: int,
) -> None:
    """Train and evaluate one task, writing into ``result``. Raises _Diverged, _CallbackRaised
    or whatever training raised; the caller turns those into a status."""
    run = _start_task(plan, cfg, data, step_offset)
    if run.is_lm:
        result.n_params = sum(p.numel() for p in run.model.parameters())
    bar = _progress_bar(progress, plan, spec)
    run.model.train()
    try:
        _train_steps(run, result, callback, bar)
    finally:
        if bar is not None:
            bar.close()
        _record(result, run)  # a failed task still counts its steps and time
    _finish_task(run, result, callback)


def _train_steps(run: _TaskRun, result: TrainResult, callback, bar) -> None:
    """Step until the budget is spent, evaluating every ``eval_every`` steps on the way; a
    callback that asks to stop ends the loop with ``result.status = "stopped"``."""
    plan = run.plan
    curve = result.loss_curve if run.is_lm else result.mqar_loss_curve
    while True:
        fraction = run.budget_fraction()
        if fraction is None:
            return
        lr = lr_at(fraction, plan.lr, plan.warmup, run.cfg.min_lr_ratio)
        loss_value = _one_step(run, lr)
        run.losses.append(loss_value)
        curve.append((run.step_offset + run.step, loss_value))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{run.step * run.tokens_per_step / run.train_s:,.0f}",
                            refresh=False)
        done = run.budget_fraction() is None  # the final evaluation follows; no intermediate one
        if plan.eval_every and run.step % plan.eval_every == 0 and not done:
            metrics = _report(run, run.evaluate(), lr)
            run.last_eval_step = run.step
            result.evals.append(metrics)
            if _call(callback, run.step_offset + run.step, metrics):
                result.status = "stopped"
                result.reason = f"the callback asked to stop after {plan.task} step {run.step}"
                return


def _one_step(run: _TaskRun, lr: float) -> float:
    """One optimiser step at learning rate ``lr``; returns its training loss. A NaN/inf or
    exploding loss raises _Diverged before the step is applied."""
    plan = run.plan
    for group in run.opt.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    x, y = run.batch(run.step)
    with run.autocast():
        _, loss = run.model(x, y)
    loss_value = loss.item()
    if not math.isfinite(loss_value) or loss_value > plan.diverge_loss:
        raise _Diverged(
            f"{plan.task} training loss became {loss_value:.4g} at step {run.step} "
            f"(limit {plan.diverge_loss:.3g}; lr {lr:.3g})"
        )
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    run.train_s += time.perf_counter() - t0
    run.step += 1
    return loss_value


def _finish_task(run: _TaskRun, result: TrainResult, callback) -> None:
    """The task's final metrics into ``result``: a last evaluation, or, when the callback
    stopped the task, the evaluation it stopped at."""
    plan = run.plan
    if result.status == "stopped":
        _store_final(result, plan, result.evals[-1])
        return
    final = run.evaluate()
    metrics = _report(run, final, lr_at(1.0, plan.lr, plan.warmup, run.cfg.min_lr_ratio), final_eval=True)
    result.evals.append(metrics)
    _store_final(result, plan, metrics)
    if run.last_eval_step != run.step:
        _call(callback, run.step_offset + run.step, metrics)  # the final report cannot stop anything
    backends = {layer.last_backend for layer in run.model.attention_layers}
    result.backend = ",".join(sorted(b for b in backends if b))


def _call(callback, step: int, metrics: dict) -> bool:
    if callback is None:
        return False
    try:
        return bool(callback(step, dict(metrics)))
    except BaseException as exc:  # noqa: BLE001 - re-raised untouched by train_spec
        raise _CallbackRaised(exc) from None


def _recent_loss(losses: list[float]) -> float | None:
    """The mean training loss of the last tenth of the steps (at most 20): less noisy than the last."""
    recent = losses[-max(1, min(20, len(losses) // 10)):] if losses else []
    return sum(recent) / len(recent) if recent else None


def _report(run: _TaskRun, ev: dict, lr: float, final_eval: bool = False) -> dict:
    """The metrics of one evaluation, as the callback and ``TrainResult.evals`` get them."""
    plan, step, tokens = run.plan, run.step, run.step * run.tokens_per_step
    metrics = {
        "task": plan.task,
        "step": run.step_offset + step,
        "task_step": step,
        "tokens": tokens,
        "train_loss": _recent_loss(run.losses),
        "lr": lr,
        "train_s": run.train_s,
        "tokens_per_s": tokens / run.train_s if run.train_s > 0 else 0.0,
        "final": final_eval,
    }
    if plan.task == "lm":
        metrics.update(val_loss=ev["loss"], val_ppl=math.exp(min(ev["loss"], 700.0)), val_acc=ev["acc"])
    else:
        metrics.update(mqar_loss=ev["loss"], mqar_accuracy=ev["acc"])
    return metrics


def _record(result: TrainResult, run: _TaskRun) -> None:
    """Add one task's counts to the result: steps, tokens and time are totals over tasks."""
    mean = _recent_loss(run.losses)
    if run.is_lm:
        result.train_loss = mean
    else:
        result.mqar_steps, result.mqar_train_loss = run.step, mean
    result.steps += run.step
    result.tokens += run.step * run.tokens_per_step
    result.train_s += run.train_s
    result.tokens_per_s = result.tokens / result.train_s if result.train_s > 0 else 0.0


def _store_final(result: TrainResult, plan: TaskPlan, metrics: dict) -> None:
    if plan.task == "lm":
        result.val_loss, result.val_ppl, result.val_acc = metrics["val_loss"], metrics["val_ppl"], metrics["val_acc"]
    else:
        result.mqar_loss, result.mqar_accuracy = metrics["mqar_loss"], metrics["mqar_accuracy"]


def _progress_bar(progress, plan: TaskPlan, spec: AttentionSpec):
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
    plans = [plan_task(spec, task, cfg, model, tokens) for task in cfg.tasks]

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
                if is_oom(exc):
                    result.status, result.reason = "oom", f"{plan.task}: out of memory ({_first_line(exc)})"
                else:
                    result.status = "error"
                    result.reason = (f"{plan.task}: {type(exc).__name__}: {_first_line(exc)}\n"
                                     f"{traceback.format_exc(limit=-3)}")
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
