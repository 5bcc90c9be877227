from pathlib import Path

import pytest
import yaml

from sqa_search.search.space import SpaceError, load_space, space_from_dict

PRESETS = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").glob("*.yaml"))

BASE = {
    "model": {"d_model": 64, "n_heads": 8, "n_layers": 2},
    "search": {"n_q_heads": [2, 4, 8], "n_kv_heads": [1, 2, 4, 8]},
}


def _with(**sections):
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def test_presets_load_and_hold_their_named_variants():
    names = {p.stem for p in PRESETS}
    assert {"quickstart", "paper_dense", "lsqa", "flex_sqa", "decode_vs_prefill"} <= names
    for path in PRESETS:
        space = load_space(path)
        assert space.candidates(), path
        assert space.named_variants(), path
    paper = load_space(PRESETS[[p.stem for p in PRESETS].index("paper_dense")])
    labels = {s.variant_name for s in paper.named_variants()}
    assert labels == {"mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa"}
    lsqa = load_space(PRESETS[[p.stem for p in PRESETS].index("lsqa")])
    assert {10, 12, 14} <= set(lsqa.search.n_q_heads)  # counts that do not divide H=16


def test_ratios_and_constraints():
    space = space_from_dict(_with(search={"n_q_heads": {"ratios": [1, 0.5]}, "n_kv_heads": {"ratios": [0.25, 0.125]}},
                                  constraints={"kv_divides_q": True}))
    assert space.search.n_q_heads == (4, 8) and space.search.n_kv_heads == (1, 2)
    assert all(s.n_q_heads % s.n_kv_heads == 0 for s in space.candidates())
    no_reverse = space_from_dict(_with(constraints={"allow_reverse": False}))
    assert all(s.n_q_heads >= s.n_kv_heads for s in no_reverse.candidates())
    capped = space_from_dict(_with(constraints={"max_kv_cache_bytes": 2 * 1024 * 4 * 2 * 16}))
    assert all(capped.kv_cache_bytes(s) <= 2 * 1024 * 4 * 2 * 16 for s in capped.candidates())


def test_objectives_and_directions():
    space = space_from_dict(_with(objectives={"quality": "mqar_accuracy", "kv_cache": True}))
    assert space.objective_names == ["mqar_accuracy", "latency_s", "kv_cache_bytes"]
    assert space.directions == ["maximize", "minimize", "minimize"]
    assert [o.name for o in space.objectives_in_use()] == space.objective_names  # pareto: all of them
    assert [o.column for o in space.declared_objectives()] == ["quality", "latency_s", "kv_cache_bytes"]
    constrained = space_from_dict(_with(objectives={"kv_cache": True}, constraints={"max_latency_s": 1.0},
                                        study={"mode": "constrained"}))
    assert [(o.name, o.direction) for o in constrained.objectives_in_use()] == [("val_loss", "minimize")]
    # the front is quality against latency even when only quality is optimised
    assert [o.name for o in constrained.front_objectives()] == ["val_loss", "latency_s"]


def test_search_parameters_are_declared_once():
    import optuna

    from sqa_search.search.space import SEARCH_PARAMS, params_of

    space = space_from_dict(_with(search={"n_q_heads": [2, 8], "n_kv_heads": [1, 2], "window": [None, 64],
                                          "n_global": [0, 2]}))
    assert tuple(space.distributions()) == SEARCH_PARAMS
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    spec = space.suggest(trial)
    assert set(trial.params) == set(SEARCH_PARAMS)
    assert params_of(spec) == {**trial.params, "n_global": spec.n_global}
    assert all(trial.params[k] in space.distributions()[k].choices for k in SEARCH_PARAMS)


def test_workload_of_the_target():
    space = space_from_dict(_with(target={"device": "cpu", "seq_len": [128, 256], "mode": "train", "what": "block",
                                          "batch": 2}))
    w = space.workload(256)
    assert (w.mode, w.seq_len, w.batch, w.scope, w.dtype, w.device) == ("train", 256, 2, "block", "float32", "cpu")
    assert (w.n_layers, w.d_ff) == (space.model.n_layers, space.model.d_ff)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(modle={"d_model": 1}), r"unknown key\(s\) \['modle'\] in the top level"),
        (dict(model={"d_model": 64, "n_heads": 8, "layers": 3}), r"unknown key\(s\) \['layers'\] in model"),
        (dict(model={"d_model": 64, "n_heads": 6}), r"model\.n_heads=6 .*must divide model\.d_model=64"),
        (dict(target={"mode": "inference"}), r"target\.mode='inference' .*train, prefill, decode"),
        (dict(target={"dtype": "fp8"}), r"target\.dtype='fp8'"),
        (dict(target={"hardware": "tpu-v9"}), r"target\.hardware='tpu-v9' .*h100"),
        (dict(target={"seq_len": [1024, 0]}), r"target\.seq_len=0"),
        (dict(search={"n_q_heads": [2, 9], "n_kv_heads": [1]}), r"search\.n_q_heads=9 .*\[1, n_heads=8\]"),
        (dict(search={"n_q_heads": {"ratios": [0.3]}, "n_kv_heads": [1]}), r"search\.n_q_heads\.ratios=0\.3"),
        (dict(search={"n_q_heads": [2], "n_kv_heads": [1], "window": [0]}), r"search\.window=0"),
        (dict(search={"n_q_heads": [2], "n_kv_heads": [1], "variants": ["mla"]}), r"variant='mla' is not known"),
        (dict(objectives={"quality": "bleu"}), r"objectives\.quality='bleu' .*val_loss, mqar_accuracy"),
        (dict(study={"sampler": "cmaes"}), r"study\.sampler='cmaes' .*nsga2, tpe, gp, random"),
        (dict(study={"mode": "constrained"}), r"study\.mode='constrained' .*max_latency_s"),
        (dict(study={"trials": 0}), r"study\.trials=0"),
        (dict(training={"budget_steps": 0}), r"training: .*budget_steps=0"),
        (dict(training={"epochs": 3}), r"unknown key\(s\) \['epochs'\] in training"),
        (dict(target={"mode": "decode"}, model={"d_model": 64, "n_heads": 8, "causal": False}), r"decode needs"),
        (dict(constraints={"max_params": 1}), r"empty once constraints"),
    ],
)
def test_bad_spaces_name_the_key_value_and_what_is_allowed(change, message):
    with pytest.raises(SpaceError, match=message):
        space_from_dict(_with(**change), source="bad.yaml")


def test_missing_required_key():
    with pytest.raises(SpaceError, match=r"model\.d_model=None .*required"):
        space_from_dict({"model": {"n_heads": 8}, "search": BASE["search"]})


def test_file_errors(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {d_model: 64, n_heads: [\n")
    with pytest.raises(SpaceError, match="broken.yaml: not valid YAML"):
        load_space(broken)
    good = tmp_path / "mine.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_space(good).name == "mine"  # the file's stem when no name is given


def test_fingerprint_ignores_study_size_but_not_the_target():
    a = space_from_dict(_with(study={"trials": 5}))
    b = space_from_dict(_with(study={"trials": 50}))
    c = space_from_dict(_with(target={"seq_len": 4096}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("target, expected", [
    ({"device": "cpu"}, "float32"),
    ({"device": "cuda"}, "bfloat16"),  # fp32 on a GPU would time SDPA without its flash kernel
    ({"device": "cuda:1"}, "bfloat16"),
    ({"hardware": "h100"}, "bfloat16"),  # a GPU profile predicts its 16-bit kernels
    ({"hardware": "cpu-generic"}, "float32"),
    ({"device": "cuda", "dtype": "float32"}, "float32"),  # an explicit dtype is kept
])
def test_target_dtype_defaults_to_the_devices_fast_dtype(target, expected):
    assert space_from_dict(_with(target=target)).target.dtype == expected
