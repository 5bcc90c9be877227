"""Quality with its uncertainty: paired initialisation, replicate seeds, their mean and standard
error, and how a study stores them (real models, real training, a real SQLite study)."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sqa_search.layer.model import ModelConfig, ProxyLM
from sqa_search.layer.spec import AttentionSpec
from sqa_search.quality.config import TrainConfig, TrainError
from sqa_search.quality.paired_init import INIT_STD, paired_initialise, parameter_seed
from sqa_search.quality.replicates import Replicates, mean_and_se, replicate_seeds, train_replicates
from sqa_search.search import records
from sqa_search.search.engine import run_study
from sqa_search.search.space import SpaceError, replicates_of, space_from_dict, train_config_from
from study_helpers import space_file

D, H = 64, 8
SHARED = ("embed.weight", "norm.weight", "blocks.0.attn_norm.weight", "blocks.1.ff_norm.weight",
          "blocks.0.ff.gate.weight", "blocks.0.ff.up.weight", "blocks.1.ff.down.weight")


def _model(variant: str, seed: int, paired: bool = True, **spec_kw) -> ProxyLM:
    torch.manual_seed(1000 + seed)  # what the unpaired init would draw from: paired must not depend on it
    model = ProxyLM(ModelConfig(AttentionSpec.variant(variant, D, H, **spec_kw), n_layers=2))
    return paired_initialise(model, seed) if paired else model


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# ----- paired initialisation -----------------------------------------------------------------------
def test_same_seed_shares_everything_shapes_allow_and_slices_the_heads():
    mha, sqa = _params(_model("mha", 3)), _params(_model("sqa", 3))
    spec = AttentionSpec.variant("sqa", D, H)
    hd = spec.head_dim
    assert (spec.n_q_heads, spec.n_kv_heads) == (4, 2)
    for name in SHARED:
        assert torch.equal(mha[name], sqa[name]), name
    for layer in range(2):
        p = f"blocks.{layer}.attn."
        assert torch.equal(sqa[p + "q_proj.weight"], mha[p + "q_proj.weight"][: 4 * hd])
        assert torch.equal(sqa[p + "k_proj.weight"], mha[p + "k_proj.weight"][: 2 * hd])
        assert torch.equal(sqa[p + "v_proj.weight"], mha[p + "v_proj.weight"][: 2 * hd])
        assert torch.equal(sqa[p + "o_proj.weight"], mha[p + "o_proj.weight"][:, : 4 * hd])
    # every parameter of one shape is the same tensor, whatever the global RNG said
    xsmqa = _params(_model("xsmqa", 3))
    for name, value in xsmqa.items():
        if value.shape == mha[name].shape:
            assert torch.equal(value, mha[name]), name


def test_different_seeds_differ_and_the_same_seed_repeats():
    a, b, again = _params(_model("mha", 0)), _params(_model("mha", 1)), _params(_model("mha", 0))
    for name in a:
        assert torch.equal(a[name], again[name]), name
        if "norm" not in name:  # norms start at one for every seed
            assert not torch.equal(a[name], b[name]), name
    assert parameter_seed(0, "embed.weight") != parameter_seed(1, "embed.weight")
    assert parameter_seed(0, "embed.weight") != parameter_seed(0, "blocks.0.ff.up.weight")


def test_unpaired_models_do_not_share_their_weights():
    mha, sqa = _params(_model("mha", 3, paired=False)), _params(_model("sqa", 3, paired=False))
    assert not torch.equal(mha["blocks.0.ff.up.weight"], sqa["blocks.0.ff.up.weight"])


def test_paired_init_keeps_the_models_distributions():
    params = _params(_model("mha", 5, bias=True, window=16, n_global=2))
    depth_std = INIT_STD / (2 * 2) ** 0.5
    for name, value in params.items():
        if "norm" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        elif name.endswith(".bias"):
            assert torch.equal(value, torch.zeros_like(value)), name
        elif name.endswith("o_proj.weight") or name.endswith("ff.down.weight"):
            assert value.std().item() == pytest.approx(depth_std, rel=0.1), name
        elif value.numel() > 1000:
            assert value.mean().abs().item() < 3e-3 and value.std().item() == pytest.approx(INIT_STD, rel=0.1), name
    assert params["blocks.0.attn.global_tokens"].shape == (2, D)


def test_a_training_run_starts_from_the_paired_weights():
    """train_spec's first step is taken from paired_initialise's weights (its loss is the loss of
    those weights on the first batch), and paired_init=False is the old torch.manual_seed init."""
    from sqa_search.quality.mqar import mqar_batch
    from sqa_search.quality.train import train_spec

    spec = AttentionSpec.variant("sqa", 32, 4)
    config = TrainConfig(budget_steps=1, batch_size=2, seq_len=16, eval_batches=1, threads=1, task="mqar",
                         mqar_batch_size=8, seed=2, paired_init=True)
    paired = train_spec(spec, {"n_layers": 1}, config, progress=False).mqar_loss_curve[0][1]
    model = paired_initialise(ProxyLM(ModelConfig(spec, n_layers=1, vocab_size=config.mqar.vocab_size)), 2)
    x, y = mqar_batch(config.mqar, 8, seed=config.batch_seed, step=0)
    with torch.no_grad():
        assert model(x, y)[1].item() == pytest.approx(paired, abs=1e-5)
    unpaired = train_spec(spec, {"n_layers": 1}, config.replace(paired_init=False), progress=False)
    assert unpaired.mqar_loss_curve[0][1] != pytest.approx(paired, abs=1e-5)
    with pytest.raises(TrainError, match="paired_init"):
        TrainConfig(paired_init="yes")


# ----- replicates ---------------------------------------------------------------------------------
def test_mean_and_standard_error():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3) / 2)
    assert mean_and_se([2.0]) == (2.0, None)
    with pytest.raises(ValueError):
        mean_and_se([])
    rep = Replicates(spec=AttentionSpec.variant("mha", D, H), metric="val_loss", seeds=[0, 1, 2], values=[3.0, 3.2, 3.1])
    assert rep.mean == pytest.approx(3.1) and rep.se == pytest.approx(0.1 / math.sqrt(3))
    assert rep.sd == pytest.approx(0.1)
    assert replicate_seeds(4, 3) == [4, 5, 6]
    with pytest.raises(TrainError, match="replicates=0"):
        replicate_seeds(0, 0)


MQAR_TINY = dict(budget_steps=3, batch_size=2, seq_len=16, eval_batches=1, threads=1, task="mqar",
                 mqar_batch_size=4)


def test_train_replicates_trains_each_seed_and_averages():
    spec = AttentionSpec.variant("sqa", 32, 4)
    rep = train_replicates(spec, {"n_layers": 1}, TrainConfig(**MQAR_TINY), [0, 1], metric="mqar_loss")
    assert rep.ok and rep.seeds == [0, 1] and [r.seed for r in rep.results] == [0, 1]
    assert rep.values == [r.mqar_loss for r in rep.results] and rep.values[0] != rep.values[1]
    assert rep.mean == pytest.approx(sum(rep.values) / 2) and rep.se == pytest.approx(abs(rep.values[0] - rep.values[1]) / 2)
    summary = rep.summary()
    assert summary["replicates"] == 2 and summary["seeds"] == [0, 1]
    assert summary["mqar_loss"] == pytest.approx(rep.mean)
    assert summary["wall_s"] == pytest.approx(sum(r.wall_s for r in rep.results))
    assert [s["mqar_loss"] for s in summary["per_seed"]] == rep.values
    with pytest.raises(TrainError, match="repeated seed"):
        train_replicates(spec, {"n_layers": 1}, TrainConfig(**MQAR_TINY), [1, 1], metric="mqar_loss")


def test_a_failed_replicate_fails_the_candidate_with_its_reason():
    spec = AttentionSpec.variant("sqa", 32, 4)
    config = TrainConfig(**MQAR_TINY, diverge_loss=1e-6)  # every loss "explodes"
    rep = train_replicates(spec, {"n_layers": 1}, config, [7, 8], metric="mqar_loss")
    assert not rep.ok and rep.status == "diverged" and rep.reason.startswith("seed 7: ")
    assert len(rep.results) == 1 and rep.values == [] and rep.mean is None  # seed 8 never trained


# ----- records ------------------------------------------------------------------------------------
SPACE = {"name": "rep", "model": {"d_model": 64, "n_heads": 8, "n_layers": 2},
         "target": {"seq_len": [128], "mode": "prefill", "device": "cpu"},
         "search": {"n_q_heads": [2, 8], "n_kv_heads": [1, 8]}, "training": {"task": "lm"}}


def test_replicates_round_trip_through_a_sqlite_study(tmp_path):
    study = optuna.create_study(study_name="rep", storage=f"sqlite:///{tmp_path / 'study.db'}")
    space = space_from_dict(SPACE)
    trial = study.ask()
    records.record_spec(trial, space.suggest(trial), space)
    records.record_training(trial, {"val_loss": 3.1, "seed": 0})
    records.record_replicates(trial, [3.0, 3.2], [0, 1], 3.1, 0.1)
    study.tell(trial, 3.1)
    old = study.ask()  # as a study written before replicates stored it
    records.record_training(old, {"val_loss": 2.5, "seed": 4})
    records.record_quality(old, 2.5)
    study.tell(old, 2.5)
    repeat = study.ask()

    new, legacy = records.read_records(study)[:2]
    records.record_duplicate(repeat, new)
    study.tell(repeat, 3.1)
    assert new.quality == 3.1 and new.quality_se == 0.1
    assert new.quality_values == [3.0, 3.2] and new.replicate_seeds == [0, 1]
    assert legacy.quality == 2.5 and legacy.quality_se is None
    assert legacy.quality_values == [2.5] and legacy.replicate_seeds == [4]
    dup = records.read_records(study)[2]
    assert dup.duplicate_of == 0 and dup.quality_se == 0.1 and dup.quality_values == [3.0, 3.2]
    with pytest.raises(ValueError):
        records.record_replicates(study.ask(), [1.0], [0, 1], 1.0, None)


def test_the_training_replicates_key():
    assert replicates_of({}) == 1
    space = space_from_dict({**SPACE, "training": {"task": "lm", "replicates": 3, "seed": 5}})
    assert replicates_of(space.training) == 3
    assert train_config_from(space.training).seed == 5  # not a TrainConfig field: left out
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(SpaceError, match="training.replicates"):
            space_from_dict({**SPACE, "training": {"task": "lm", "replicates": bad}})


TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05},
    "search": {"n_q_heads": [2, 4], "n_kv_heads": [1, 4], "variants": ["mha", "sqa"]},
    "study": {"sampler": "random", "seed": 0, "trials": 2},
    "training": {"task": "lm", "budget_steps": 3, "batch_size": 2, "seq_len": 32, "eval_batches": 1,
                 "replicates": 2, "seed": 3},
}


def test_a_study_with_two_replicates_stores_both_values_and_their_se(tmp_path):
    handle = run_study(space_file(tmp_path, TINY, "reps"), studies_dir=tmp_path / "studies", progress=False)
    done = handle.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    for record in (records.from_trial(t) for t in done):
        assert record.replicate_seeds == [3, 4] and len(record.quality_values) == 2
        mean, se = mean_and_se(record.quality_values)
        assert record.quality == pytest.approx(mean) and record.values[0] == pytest.approx(mean)
        assert record.quality_se == pytest.approx(se) and se > 0
        assert record.train_value("replicates") == 2 and record.train_value("val_loss") == pytest.approx(mean)
        assert [row["seed"] for row in record.train_value("per_seed")] == [3, 4]
