"""The layer against a plain float64 reference: a loop over heads with a dense masked softmax.

Fresh random inputs on every run (no fixed seed): a bug that hides behind one draw shows up
on another. Outputs and gradients for inputs and every weight are compared.
"""


import pytest
import torch

from sqa_search.attention import SparseQueryAttention
from sqa_search.reference import reference
from sqa_search.spec import AttentionSpec, SpecError

NAMED = ["mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa", "rsqa", "swsqa", "flexsqa"]


# ----- helpers -------------------------------------------------------------------------------
def _check(spec, n, batch=2, backend="auto", dtype=torch.float64, atol=1e-9, grads=True):
    layer = SparseQueryAttention(spec, backend=backend).to(dtype)
    if spec.bias:
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 1:
                    p.normal_()
    x = torch.randn(batch, n, spec.d_model, dtype=dtype, requires_grad=grads)
    x_ref = x.detach().double().requires_grad_(True)
    with torch.set_grad_enabled(grads):
        out = layer(x)
    params = dict(layer.named_parameters())
    ref_layer = SparseQueryAttention(spec).double()
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref = reference(ref_layer, x_ref)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    if not grads:
        return layer

    grad_out = torch.randn_like(ref)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=atol, rtol=atol)
    ref_params = dict(ref_layer.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad.double(), ref_params[name].grad, atol=atol, rtol=atol, msg=name)
    return layer


# ----- every named variant, causal and bidirectional, window and global tokens ----------------
@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("causal", [True, False])
def test_named_variants_match_reference(name, causal):
    spec = AttentionSpec.variant(name, d_model=64, n_heads=8, causal=causal)
    if spec.window is not None:
        spec = spec.replace(window=7)  # 37 = 5 blocks of 7 plus 2: not a multiple of the window
    layer = _check(spec, n=37)
    assert layer.last_backend


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "heads,window,n_global",
    [
        ((8, 8), 5, 0),  # MHA with a window
        ((8, 2), 1, 0),  # W=1: a token sees only itself
        ((6, 4), 9, 0),  # uneven grouping: 4 KV heads do not divide 6 query heads
        ((2, 8), 11, 3),  # rSQA with window and global tokens
        ((3, 2), None, 2),  # full attention plus global tokens (dense-mask path)
        ((4, 1), 70, 0),  # window longer than the sequence
        ((8, 4), 64, 1),  # window = MIN_BLOCK, sequence spans several blocks
    ],
)
def test_windows_globals_and_grouping_match_reference(heads, window, n_global, causal):
    spec = AttentionSpec(64, 8, heads[0], heads[1], window=window, n_global=n_global, causal=causal)
    _check(spec, n=133 if window == 64 else 29)


def test_lsqa_where_query_heads_do_not_divide_h():
    """12 of 16 query heads, 8 KV heads: the anchor implementation crashes on this."""
    spec = AttentionSpec(d_model=64, n_heads=16, n_q_heads=12, n_kv_heads=8)
    assert spec.grouping == "uneven"
    _check(spec, n=19)
    spec3 = AttentionSpec(d_model=96, n_heads=16, n_q_heads=12, n_kv_heads=4, head_dim=6)
    _check(spec3, n=10)


def test_bias_and_no_rope():
    spec = AttentionSpec(48, 4, 2, 1, bias=True, rope=False, window=4)
    _check(spec, n=23)


@pytest.mark.parametrize("name", ["sqa", "xsmqa", "rsqa", "swsqa", "flexsqa"])
def test_float32_and_bfloat16_within_dtype_tolerance(name):
    spec = AttentionSpec.variant(name, d_model=64, n_heads=8)
    if spec.window:
        spec = spec.replace(window=16)
    _check(spec, n=50, dtype=torch.float32, atol=2e-5)
    _check(spec, n=50, dtype=torch.bfloat16, atol=8e-2)


# ----- head grouping matches SDPA's enable_gqa ------------------------------------------------
def test_grouping_is_sdpa_enable_gqa_convention():
    """When H_kv divides H_q, the layer equals SDPA(enable_gqa=True) on the same projections."""
    spec = AttentionSpec.variant("sqa", d_model=64, n_heads=8, rope=False)
    layer = SparseQueryAttention(spec).double()
    x = torch.randn(1, 21, 64, dtype=torch.float64)
    q = layer.q_proj(x).view(1, 21, spec.n_q_heads, 8).transpose(1, 2)
    k = layer.k_proj(x).view(1, 21, spec.n_kv_heads, 8).transpose(1, 2)
    v = layer.v_proj(x).view(1, 21, spec.n_kv_heads, 8).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = layer.o_proj(o.transpose(1, 2).reshape(1, 21, -1))
    torch.testing.assert_close(layer(x), expected)


# ----- the FlexAttention path, checked in eager mode on CPU ------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,window,n_global", [((4, 2), 6, 0), ((4, 2), 6, 2), ((6, 4), 5, 1), ((2, 4), None, 2)])
def test_flex_path_matches_reference(heads, window, n_global, causal):
    """Forward only: FlexAttention has no backward on CPU (torch 2.13); CUDA runs both."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    spec = AttentionSpec(64, 8, heads[0], heads[1], window=window, n_global=n_global, causal=causal)
    layer = _check(spec, n=30, backend="flex", dtype=torch.float32, atol=2e-5, grads=False)
    assert layer.last_backend == "flex-eager"


# ----- backends are chosen and recorded -------------------------------------------------------
def test_backend_is_recorded_and_window_path_has_no_square_mask():
    spec = AttentionSpec.variant("swsqa", d_model=64, n_heads=8, window=16)
    layer = SparseQueryAttention(spec)
    layer(torch.randn(1, 100, 64))
    assert layer.last_backend.startswith("blocked/")
    layer(torch.randn(1, 10, 64))  # window >= N: exactly full causal attention
    assert layer.last_backend.startswith("sdpa/")
    full = SparseQueryAttention(AttentionSpec.variant("mha", 64, 8))
    full(torch.randn(1, 10, 64))
    assert full.last_backend.startswith("sdpa/")


def test_bad_input_shape_and_backend_name():
    layer = SparseQueryAttention(AttentionSpec.variant("sqa", 64, 8))
    with pytest.raises(ValueError, match="d_model=64"):
        layer(torch.randn(1, 5, 32))
    with pytest.raises(SpecError, match="backend"):
        SparseQueryAttention(AttentionSpec.variant("sqa", 64, 8), backend="cudnn-magic")
    with pytest.raises(SpecError, match="flex"):
        SparseQueryAttention(AttentionSpec.variant("sqa", 64, 8), backend="flex")


# ----- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,window", [("mha", None), ("gqa", None), ("sqa", None), ("rsqa", None),
                                         ("lsqa", None), ("swsqa", 5), ("flexsqa", 4)])
def test_decode_matches_full_forward(name, window):
    """Feeding tokens one at a time through the cache gives the full causal forward's outputs."""
    spec = AttentionSpec.variant(name, d_model=64, n_heads=8)
    if window:
        spec = spec.replace(window=window)
    layer = SparseQueryAttention(spec).double()
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2, 13)
    assert cache.k.shape[2] == (min(13, window) if window else 13)
    layer.prefill_cache(x[:, :6], cache)
    steps = [layer.decode(x[:, t:t + 1], cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:])
    assert cache.length == 13


def test_decode_rejects_bidirectional_and_full_cache():
    layer = SparseQueryAttention(AttentionSpec.variant("sqa", 64, 8, causal=False))
    with pytest.raises(SpecError, match="causal"):
        layer.decode(torch.randn(1, 1, 64), layer.new_cache(1, 4))
    causal = SparseQueryAttention(AttentionSpec.variant("sqa", 64, 8))
    cache = causal.new_cache(1, 2)
    causal.prefill_cache(torch.randn(1, 2, 64), cache)
    with pytest.raises(ValueError, match="full"):
        causal.decode(torch.randn(1, 1, 64), cache)


# ----- GPU (skipped without CUDA) --------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sqa", "xsqa", "lsqa", "swsqa", "flexsqa"])
def test_cuda_paths_match_reference(name):
    spec = AttentionSpec.variant(name, d_model=128, n_heads=8)
    layer = SparseQueryAttention(spec).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    ref = reference(SparseQueryAttention(spec).double().requires_grad_(False), x.double().cpu())
    ref_layer_state = {k: v.double().cpu() for k, v in layer.state_dict().items()}
    ref_layer = SparseQueryAttention(spec).double()
    ref_layer.load_state_dict(ref_layer_state)
    ref = reference(ref_layer, x.double().cpu())
    torch.testing.assert_close(out.double().cpu(), ref, atol=6e-2, rtol=6e-2)
    if spec.window:
        assert layer.last_backend == "flex-compiled"
