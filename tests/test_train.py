"""The quality trial: tiny models and budgets of a few steps, so the file runs in seconds."""

import json
import math
import sys

import pytest
import torch
from torch import nn

import sqa_search.quality.plan as plan_mod
import sqa_search.quality.train as train_mod
from sqa_search.quality.errors import DataError
from sqa_search.quality.mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from sqa_search.quality.tokens import load_tokens
from sqa_search.layer.spec import AttentionSpec
from sqa_search.quality.train import (
    TrainConfig,
    TrainError,
    TrainResult,
    lr_at,
    mask_tokens,
    masked_accuracy,
    train_spec,
)

TINY_MODEL = {"n_layers": 2}
TINY_MQAR = MQARConfig(vocab_size=16, seq_len=16, n_pairs=4)


def tiny_spec(name="mha", **kw):
    return AttentionSpec.variant(name, 32, 4, **kw)


def tiny_config(**kw):
    base = dict(budget_steps=4, batch_size=4, seq_len=32, eval_batches=2, threads=1, task="lm", mqar=TINY_MQAR,
                mqar_batch_size=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session", autouse=True)
def _warm_torch():
    """The first optimizer a process builds imports torch._dynamo (seconds); pay it once here
    so that no single test looks slow for it."""
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])


@pytest.fixture(scope="session")
def tokens(tmp_path_factory):
    """A small corpus of real prose from the stdlib, tokenised into a private cache."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    text = "\n\n".join(topics[k] for k in sorted(topics)[:12])
    path = folder / "corpus.txt"
    path.write_text(text)
    return load_tokens(str(path), cache_dir=folder / "cache")


# ----- configuration: bad settings fail before any work ----------------------------------------
@pytest.mark.parametrize("field,value", [
    ("budget_tokens", 0), ("budget_tokens", -5), ("budget_steps", 0), ("budget_seconds", 0.0),
    ("budget_seconds", float("nan")), ("budget_steps", 2.5),
])
def test_bad_budget_names_field_and_value(field, value):
    with pytest.raises(TrainError) as err:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}={value!r}" in str(err.value)


def test_two_budgets_are_ambiguous():
    with pytest.raises(TrainError, match="exactly one of budget_tokens, budget_steps, budget_seconds"):
        TrainConfig(budget_tokens=1000, budget_steps=10)


def test_no_budget_means_the_default():
    assert TrainConfig().budget_tokens == train_mod.DEFAULT_BUDGET_TOKENS


@pytest.mark.parametrize("field,value,allowed", [
    ("task", "translation", "lm, mqar, lm+mqar"),
    ("lr", -1.0, "> 0"),
    ("batch_size", 0, ">= 1"),
    ("dtype", "float16", "bfloat16"),
    ("min_lr_ratio", 2.0, "[0.0, 1.0]"),
    ("threads", 0, ">= 1"),
    ("mqar", {"n_pairs": 4}, "MQARConfig"),
])
def test_bad_fields_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(TrainError) as err:
        TrainConfig(**{field: value})
    text = str(err.value)
    assert f"TrainConfig.{field}={value!r}" in text and allowed in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(TrainError, match="CUDA is not available"):
        TrainConfig(device="cuda")


def test_config_round_trips_through_dict():
    cfg = tiny_config(task="lm+mqar", betas=[0.9, 0.99])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(TrainError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"budget": 3})


@pytest.fixture
def no_training(monkeypatch):
    """Make building a model fail loudly: a test using this proves no training started."""

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "ProxyLM", boom)


def test_budget_below_one_step_fails_before_training(tokens, no_training):
    cfg = tiny_config(budget_steps=None, budget_tokens=10)  # one step is 4 x 32 = 128 tokens
    with pytest.raises(TrainError, match=r"budget_tokens=10 .*at least one lm step of .* 128 tokens"):
        train_spec(tiny_spec(), TINY_MODEL, cfg, data=tokens, progress=False)


def test_empty_data_file_fails_before_training(tmp_path, no_training):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(), data=str(empty), progress=False)


def test_missing_data_file_fails_before_training(tmp_path, no_training):
    with pytest.raises(DataError, match="no such file"):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(), data=str(tmp_path / "nope.txt"), progress=False)


def test_hf_dataset_without_datasets_fails_before_training(no_training, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import raises
    with pytest.raises(DataError, match="`datasets` package is not installed"):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(), data="hf:wikitext", progress=False)


def test_sequence_longer_than_the_data(tmp_path, no_training):
    path = tmp_path / "short.txt"
    path.write_text("a short text. " * 10)
    data = load_tokens(str(path), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="seq_len=512"):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(seq_len=512), data=data, progress=False)


def test_bad_model_override(tokens, no_training):
    with pytest.raises(TrainError, match="unknown model override"):
        train_spec(tiny_spec(), {"depth": 3}, tiny_config(), data=tokens, progress=False)
    with pytest.raises(TrainError, match="preset 'huge' is not known"):
        train_spec(tiny_spec(), "huge", tiny_config(), data=tokens, progress=False)


def test_mqar_task_needs_no_text(monkeypatch):
    def no_text(*a, **k):
        raise AssertionError("text was loaded for an MQAR-only trial")

    monkeypatch.setattr(plan_mod, "load_tokens", no_text)  # where train_spec resolves its data
    r = train_spec(tiny_spec(), TINY_MODEL, tiny_config(task="mqar"), progress=False)
    assert r.ok and r.val_loss is None and 0.0 <= r.mqar_accuracy <= 1.0


# ----- pieces ---------------------------------------------------------------------------------
def test_lr_schedule():
    assert lr_at(0.0, 1.0, 0.1, 0.1) == pytest.approx(0.01)  # warm-up starts above zero
    assert lr_at(0.05, 1.0, 0.1, 0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, 0.1, 0.1) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(1.0, 1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_at(0.5, 1.0, 0.0, 0.0) == pytest.approx(0.5)


def test_masked_accuracy_counts_only_targeted_positions():
    # 1 sequence, 5 positions, vocab 4. Targets at positions 1 and 3 only.
    targets = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 2, 3, 0, 3]])  # right at 1, wrong at 3, the rest do not count
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    assert masked_accuracy(logits, targets) == (1, 2)


class _Oracle(nn.Module):
    """Predicts each sequence's MQAR answers at `right` positions and a wrong token elsewhere."""

    def __init__(self, vocab, where):
        super().__init__()
        self.vocab, self.where = vocab, where

    def forward(self, idx, targets=None):
        inputs, answers = self.where(idx)
        pred = torch.where(answers != IGNORE_INDEX, answers, torch.zeros_like(inputs))
        return torch.nn.functional.one_hot(pred, self.vocab).float() * 10, None


def test_mqar_accuracy_is_over_query_positions_only():
    cfg = MQARConfig(vocab_size=16, seq_len=16, n_pairs=3, n_queries=2, random_fill=False)
    x, y = mqar_batch(cfg, batch_size=3, seed=0, step=0)
    assert int((y != IGNORE_INDEX).sum()) == 3 * 2
    batches = [(x, y)]
    lookup = {x.numpy().tobytes(): y}

    # right at every query position, wrong (token 0) everywhere else
    right = _Oracle(16, lambda idx: (idx, lookup[idx.numpy().tobytes()]))
    assert train_mod._evaluate(right, batches, "cpu", train_mod.contextlib.nullcontext)["acc"] == 1.0
    assert train_mod._evaluate(right, batches, "cpu", train_mod.contextlib.nullcontext)["count"] == 6

    # right everywhere except at the queries: still zero
    def all_but_queries(idx):
        ans = lookup[idx.numpy().tobytes()]
        shifted = torch.where(ans != IGNORE_INDEX, (ans + 1) % 16, idx)
        return idx, shifted

    wrong = _Oracle(16, all_but_queries)
    assert train_mod._evaluate(wrong, batches, "cpu", train_mod.contextlib.nullcontext)["acc"] == 0.0


def test_mask_tokens():
    x = torch.randint(0, 10, (8, 64))
    inputs, targets = mask_tokens(x, mask_id=10, seed=3, step=7)
    masked = inputs == 10
    assert 0.05 < masked.float().mean() < 0.3
    assert torch.equal(targets[masked], x[masked])
    assert (targets[~masked] == IGNORE_INDEX).all()
    assert torch.equal(inputs[~masked], x[~masked])
    again, _ = mask_tokens(x, mask_id=10, seed=3, step=7)
    assert torch.equal(again, inputs)
    one, _ = mask_tokens(torch.zeros(1, 1, dtype=torch.long), mask_id=10, seed=0, step=0, fraction=0.0)
    assert one.item() == 10  # never an empty objective


# ----- training -------------------------------------------------------------------------------
def test_trial_reports_everything(tokens):
    r = train_spec(tiny_spec(), TINY_MODEL, tiny_config(task="lm+mqar"), data=tokens, progress=False)
    assert r.status == "ok" and r.reason is None
    assert r.steps == 8 and r.mqar_steps == 4 and r.tokens == 4 * 4 * 32 + 4 * 4 * 16
    assert r.tokens_per_s > 0 and r.wall_s >= r.train_s > 0
    assert math.isfinite(r.val_loss) and r.val_ppl == pytest.approx(math.exp(r.val_loss))
    assert 0.0 <= r.val_acc <= 1.0 and 0.0 <= r.mqar_accuracy <= 1.0
    assert [s for s, _ in r.loss_curve] == [1, 2, 3, 4]
    assert [s for s, _ in r.mqar_loss_curve] == [5, 6, 7, 8]
    assert r.backend.startswith("sdpa") and r.n_params > 0
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["spec"] == tiny_spec().to_dict() and d["label"] == tiny_spec().label


def test_loss_goes_down(tokens):
    cfg = tiny_config(budget_steps=30, lr=1e-2, eval_every=0)
    r = train_spec(tiny_spec(), TINY_MODEL, cfg, data=tokens, progress=False)
    assert r.loss_curve[-1][1] < r.loss_curve[0][1] - 1.0
    assert r.val_loss < math.log(256)


def test_same_seed_same_loss(tokens):
    runs = [
        train_spec(tiny_spec("sqa"), TINY_MODEL, tiny_config(task="lm+mqar"), data=tokens, progress=False)
        for _ in range(2)
    ]
    a, b = runs
    for (s1, l1), (s2, l2) in zip(a.loss_curve + a.mqar_loss_curve, b.loss_curve + b.mqar_loss_curve):
        assert s1 == s2 and abs(l1 - l2) <= 1e-6
    assert abs(a.val_loss - b.val_loss) <= 1e-6 and a.mqar_accuracy == b.mqar_accuracy
    other = train_spec(tiny_spec("sqa"), TINY_MODEL, tiny_config(seed=1), data=tokens, progress=False)
    assert other.loss_curve != a.loss_curve


def test_data_seed_fixes_the_data_order(monkeypatch, tokens):
    seen = []
    real = train_mod.lm_batch

    def spy(tokens, batch_size, seq_len, step, seed):
        seen.append(seed)
        return real(tokens, batch_size, seq_len, step=step, seed=seed)

    monkeypatch.setattr(train_mod, "lm_batch", spy)
    for seed, data_seed in ((3, 0), (4, 0), (5, None)):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(seed=seed, data_seed=data_seed, budget_steps=1),
                   data=tokens, progress=False)
    assert seen == [0, 0, 5]


def test_caller_state_is_restored(tokens):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_spec(tiny_spec(), TINY_MODEL, tiny_config(threads=1), data=tokens, progress=False)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_encoder_trains_masked_tokens(tokens):
    spec = tiny_spec(causal=False)
    r = train_spec(spec, TINY_MODEL, tiny_config(task="lm+mqar"), data=tokens, progress=False)
    assert r.ok and math.isfinite(r.val_loss) and 0.0 <= r.mqar_accuracy <= 1.0
    assert r.model_config["vocab_size"] == tokens.vocab_size + 1  # the [MASK] id


def test_windowed_and_global_specs_train(tokens):
    for spec in (tiny_spec("swsqa", window=8), tiny_spec("flexsqa", window=8, n_global=2)):
        r = train_spec(spec, TINY_MODEL, tiny_config(budget_steps=2), data=tokens, progress=False)
        assert r.ok, r.reason


def test_divergence_is_a_result_not_a_crash(tokens):
    cfg = tiny_config(lr=1e6, budget_steps=20, grad_clip=None, warmup_fraction=0.0, task="lm+mqar")
    r = train_spec(tiny_spec(), TINY_MODEL, cfg, data=tokens, progress=False)
    assert r.status == "diverged"
    assert "lm training loss became" in r.reason and "at step" in r.reason
    assert r.steps < 20 and r.mqar_accuracy is None  # stopped at once, MQAR not started
    json.dumps(r.to_dict(), allow_nan=False)


def test_nan_loss_is_divergence(tokens, monkeypatch):
    real_forward = train_mod.ProxyLM.forward

    def nan_after_two(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        self._calls = getattr(self, "_calls", 0) + 1
        if loss is not None and self._calls > 2:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(train_mod.ProxyLM, "forward", nan_after_two)
    r = train_spec(tiny_spec(), TINY_MODEL, tiny_config(eval_every=0), data=tokens, progress=False)
    assert r.status == "diverged" and "nan" in r.reason and r.steps == 2


@pytest.mark.parametrize("exc,status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "oom"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "oom"),
    (RuntimeError("something else broke"), "error"),
])
def test_failures_become_a_status(tokens, monkeypatch, exc, status):
    def fail(self, idx, targets=None):
        raise exc

    monkeypatch.setattr(train_mod.ProxyLM, "forward", fail)
    r = train_spec(tiny_spec(), TINY_MODEL, tiny_config(), data=tokens, progress=False)
    assert r.status == status and r.val_loss is None
    assert str(exc).splitlines()[0][:20] in r.reason


def test_callback_gets_intermediate_metrics(tokens):
    seen = []
    cfg = tiny_config(task="lm+mqar", budget_steps=6, eval_every=2)
    r = train_spec(tiny_spec(), TINY_MODEL, cfg, data=tokens, callback=lambda s, m: seen.append((s, m)), progress=False)
    assert r.ok
    assert [s for s, _ in seen] == [2, 4, 6, 8, 10, 12]  # steps never repeat across tasks
    lm = [m for _, m in seen if m["task"] == "lm"]
    mq = [m for _, m in seen if m["task"] == "mqar"]
    assert all({"val_loss", "val_ppl", "val_acc", "train_loss", "tokens_per_s", "lr"} <= m.keys() for m in lm)
    assert all("mqar_accuracy" in m for m in mq)
    assert [m["final"] for m in lm] == [False, False, True]
    assert lm[-1]["val_loss"] == r.val_loss and mq[-1]["mqar_accuracy"] == r.mqar_accuracy


def test_callback_can_stop_early(tokens):
    cfg = tiny_config(task="lm+mqar", budget_steps=20, eval_every=2)
    r = train_spec(tiny_spec(), TINY_MODEL, cfg, data=tokens, callback=lambda s, m: s >= 4, progress=False)
    assert r.status == "stopped" and "step 4" in r.reason
    assert r.steps == 4 and r.mqar_accuracy is None and r.val_loss is not None


class _MyPruned(Exception):
    pass


def test_callback_exceptions_pass_through(tokens):
    raised = _MyPruned("prune me")

    def cb(step, metrics):
        raise raised

    with pytest.raises(_MyPruned) as err:
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(eval_every=2), data=tokens, callback=cb, progress=False)
    assert err.value is raised
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_optuna_pruning_passes_through(tokens):
    optuna = pytest.importorskip("optuna")

    def cb(step, metrics):
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        train_spec(tiny_spec(), TINY_MODEL, tiny_config(eval_every=2), data=tokens, callback=cb, progress=False)


def test_wall_clock_budget(tokens):
    r = train_spec(tiny_spec(), TINY_MODEL, tiny_config(budget_steps=None, budget_seconds=0.5, eval_every=0),
                   data=tokens, progress=False)
    assert r.ok and r.steps >= 1 and r.train_s >= 0.5


def test_model_config_is_accepted(tokens):
    from sqa_search.layer.model import ModelConfig

    other = AttentionSpec.variant("mha", 32, 4)
    mc = ModelConfig(attention=other, n_layers=1, vocab_size=7)
    r = train_spec(tiny_spec("xsmqa"), mc, tiny_config(budget_steps=1), data=tokens, progress=False)
    assert r.ok and r.model_config["n_layers"] == 1 and r.model_config["vocab_size"] == tokens.vocab_size


def test_result_is_json_safe_with_nans():
    r = TrainResult(spec=tiny_spec(), task="lm", val_loss=float("nan"), loss_curve=[(1, float("inf"))])
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["val_loss"] is None and d["loss_curve"] == [[1, None]]
