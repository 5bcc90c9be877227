import pytest
import torch

from sqa_search.layer.model import MODEL_PRESETS, ModelConfig, ProxyLM, build_model
from sqa_search.layer.spec import AttentionSpec, SpecError


@pytest.mark.parametrize("name", ["mha", "sqa", "lsqa", "flexsqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_model_runs_counts_and_trains_a_step(name, causal):
    spec = AttentionSpec.variant(name, d_model=64, n_heads=8, causal=causal)
    if spec.window:
        spec = spec.replace(window=8)
    config = ModelConfig(attention=spec, n_layers=2, vocab_size=97)
    model = ProxyLM(config)
    assert config.n_params() == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 97, (2, 40))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 40, 97)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # every block carries the spec's layer (not one shared or default layer)
    layers = model.attention_layers
    assert len(layers) == config.n_layers and len({id(l) for l in layers}) == config.n_layers
    assert all(layer.spec == spec for layer in layers)


def test_decoder_is_causal_and_encoder_is_not():
    """Changing the last token changes earlier logits only in the encoder."""
    torch.manual_seed(0)
    for causal in (True, False):
        model = build_model(AttentionSpec.variant("sqa", 64, 8, causal=causal), n_layers=2, vocab_size=50)
        idx = torch.randint(0, 50, (1, 16))
        changed = idx.clone()
        changed[0, -1] = (idx[0, -1] + 1) % 50
        early = model(idx)[0][0, :-1]
        early_changed = model(changed)[0][0, :-1]
        assert torch.allclose(early, early_changed) == causal


def test_config_validation_and_presets():
    spec = AttentionSpec.variant("sqa", 128, 8)
    assert ModelConfig(spec).d_ff == 352  # 8/3 * 128 rounded up to a multiple of 32
    with pytest.raises(SpecError, match="n_layers=0"):
        ModelConfig(spec, n_layers=0)
    with pytest.raises(SpecError, match="vocab_size"):
        ModelConfig(spec, vocab_size=1)
    with pytest.raises(SpecError, match="choose one of quickstart"):
        build_model(spec, preset="huge")
    assert len(build_model(spec, preset="quickstart").blocks) == MODEL_PRESETS["quickstart"]["n_layers"]
