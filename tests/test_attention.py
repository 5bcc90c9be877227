"""The layer against a plain float64 reference: a loop over heads with a dense masked softmax.

Fresh random inputs on every run (no fixed seed): a bug that hides behind one draw shows up
on another. Outputs and gradients for inputs and every weight are compared.
"""


import pytest
import torch

from sqa_search.layer import attention
from sqa_search.layer.attention import FlexFallbackError, SparseQueryAttention
from sqa_search.layer.reference import reference
from sqa_search.layer.spec import AttentionSpec, SpecError

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
        spec = spec.replace(window=7)  # W < N = 37 < one block (max(W, 64)): the single-block case
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
        ((8, 4), 64, 1),  # window = MIN_BLOCK_GRAD, sequence spans several blocks
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


@pytest.mark.parametrize("grads", [True, False], ids=["train", "no-grad"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,window,n_global", [((8, 8), 5, 0), ((6, 4), 13, 3), ((2, 8), 63, 2)])
def test_blocked_path_over_several_blocks_matches_reference(heads, window, n_global, causal, grads):
    """W < 64: blocks are 64 tokens with grad, 32 without (masks.MIN_BLOCK_GRAD, MIN_BLOCK); N = 400
    spans several, the last one partial, so every phase reads several runs of key blocks. Without
    grad the path differs (finer blocks, interior runs under one broadcast mask, keys written
    into their buffer in place, the global tokens' pass reading that buffer): checked on its own,
    batch 2."""
    spec = AttentionSpec(64, 8, heads[0], heads[1], window=window, n_global=n_global, causal=causal)
    layer = _check(spec, n=400, batch=1 if grads else 2, grads=grads)
    assert layer.last_backend.startswith("blocked/")


def _float32_against_reference(spec, n, backend):
    """Max |layer - reference| in float32 at the spec's window, and at windows one off."""
    layer = SparseQueryAttention(spec, backend=backend)
    x = torch.randn(1, n, spec.d_model)
    with torch.no_grad():
        out = layer(x).double()
    diffs = {}
    for w in (spec.window - 1, spec.window, spec.window + 1):
        ref_layer = SparseQueryAttention(spec.replace(window=w)).double()
        ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        diffs[w - spec.window] = (out - reference(ref_layer, x.double())).abs().max().item()
    return layer, diffs


FLOAT32_ATOL = 1e-4  # float32 attention over a few hundred keys: ~1e-6 measured


def test_float32_tolerance_catches_a_window_off_by_one():
    spec = AttentionSpec(64, 8, 6, 4, window=40, n_global=2, causal=False)
    layer, diffs = _float32_against_reference(spec, 150, "blocked")
    assert diffs[0] < FLOAT32_ATOL
    assert diffs[-1] > 10 * FLOAT32_ATOL and diffs[1] > 10 * FLOAT32_ATOL, diffs


# ----- forced backends: correct or refused -----------------------------------------------------
def test_forced_sdpa_on_a_window_runs_the_dense_mask():
    spec = AttentionSpec(64, 8, 4, 2, window=9, n_global=1, causal=False)
    layer = _check(spec, n=40, backend="sdpa")
    assert layer.last_backend.startswith("sdpa-masked")


@pytest.mark.parametrize("backend,spec,field", [
    ("blocked", AttentionSpec(64, 8, 4, 2), "window=None"),
    ("flex", AttentionSpec(64, 8, 4, 2), "window=None"),
    ("flex", AttentionSpec(64, 8, 4, 2, window=16), "head_dim=8"),
    ("cudnn-magic", AttentionSpec(64, 8, 4, 2), "choose one of"),
])
def test_forced_backend_that_cannot_run_is_refused(backend, spec, field):
    with pytest.raises(SpecError, match=field):
        SparseQueryAttention(spec, backend=backend)


def test_mask_first_built_under_inference_mode_serves_training():
    """A prefill timing (inference mode) then a training step of the same shape."""
    layer = SparseQueryAttention(AttentionSpec(64, 8, 4, 2, window=16, n_global=2))
    x = torch.randn(1, 100, 64)
    with torch.inference_mode():
        layer(x)
    layer(x.requires_grad_()).sum().backward()
    with torch.inference_mode():
        block_mask = attention._flex_block_mask(layer.rule, 300, 2, "cpu")
    assert not any(t.is_inference() for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))


# ----- the compiled FlexAttention path (CPU: forward only in torch 2.13) ------------------------
@pytest.mark.slow
@pytest.mark.parametrize("causal,heads,window,n_global", [
    (True, (6, 4), 50, 3),  # window inside a 128-token block, uneven grouping, globals
    (False, (4, 2), 200, 0),  # window wider than a block, grouped heads
    (False, (4, 4), 100, 5),  # partial and full blocks, globals
])
def test_compiled_flex_matches_reference_over_several_blocks(causal, heads, window, n_global):
    """N = 300: three query blocks, so the BlockMask's partial and full blocks and the mask_mod
    all take part; the tolerance sees a window off by one."""
    spec = AttentionSpec(64, 8, heads[0], heads[1], head_dim=16, window=window, n_global=n_global, causal=causal)
    layer, diffs = _float32_against_reference(spec, 300, "flex")
    assert layer.last_backend == "flex-compiled"
    assert diffs[0] < FLOAT32_ATOL and min(diffs[-1], diffs[1]) > 10 * FLOAT32_ATOL, diffs


@pytest.mark.slow
def test_compiled_flex_sweep_stays_compiled_past_the_recompile_limit():
    """Recompile limit 1, three shapes in one process: each signature has its own compiled code
    object, so none recompiles and none falls back to eager (20 specs: flex_many_specs.py)."""
    spec = AttentionSpec(64, 4, 4, 2, window=40, n_global=1, causal=False)
    layer = SparseQueryAttention(spec, backend="flex")
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        for n in (130, 200, 260):
            layer(torch.randn(1, n, 64))
            assert layer.last_backend == "flex-compiled"


def test_flex_that_runs_eagerly_under_a_compiled_label_is_refused():
    """torch.compile disabled: the compiled callable runs the frame eagerly; the layer notices
    from the call's own result and refuses instead of saying 'flex-compiled'."""
    layer = SparseQueryAttention(AttentionSpec(64, 4, 4, 4, window=20), backend="flex")
    try:
        with torch._dynamo.config.patch(disable=True), torch.no_grad():
            with pytest.raises(FlexFallbackError, match="eagerly"):
                layer(torch.randn(1, 40, 64))
    finally:
        # flex_attention's own eager wrapper, entered while dynamo was disabled, is left marked
        # "skip" in this process (later eager flex calls then fail): start dynamo afresh
        torch._dynamo.reset()
    assert layer.last_backend is None


def test_compiled_flex_refuses_backward_on_cpu():
    layer = SparseQueryAttention(AttentionSpec(64, 4, 4, 4, window=20), backend="flex")
    with pytest.raises(NotImplementedError, match="backward"):
        layer(torch.randn(1, 40, 64, requires_grad=True))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_eager_flex_is_labelled_eager():
    spec = AttentionSpec(64, 8, 6, 4, window=6, n_global=2, causal=False)
    layer = _check(spec, n=30, backend="flex-eager", dtype=torch.float32, atol=FLOAT32_ATOL, grads=False)
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


# ----- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,window,n_global", [
    ((8, 8), None, 0), ((8, 2), None, 0), ((4, 2), None, 0), ((2, 4), None, 0),  # MHA, GQA, SQA, rSQA
    ((6, 4), None, 0), ((6, 4), 5, 3), ((4, 2), 4, 4),  # uneven grouping; windows with globals
])
def test_decode_matches_reference(heads, window, n_global):
    """Prompt through the cache, then one token at a time: each step equals the float64
    reference of the whole causal sequence at that position."""
    spec = AttentionSpec(64, 8, heads[0], heads[1], window=window, n_global=n_global)
    layer = SparseQueryAttention(spec).double()
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    ref = reference(layer, x)
    cache = layer.new_cache(2, 13)
    assert cache.capacity == (min(13, window) if window else 13)
    layer.prefill_cache(x[:, :6], cache)
    steps = [layer.decode(x[:, t:t + 1], cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, 6:], atol=1e-10, rtol=1e-10)
    assert cache.length == 13


@pytest.mark.parametrize("heads,n_global", [((6, 4), 0), ((8, 2), 0), ((4, 2), 3)])
def test_decode_step_copies_nothing_the_size_of_the_cache(heads, n_global):
    """No op of a step outputs a tensor the size of the cached keys (views aside): uneven
    grouping gathers queries, not the cache; globals live in the cache, not re-projected."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and isinstance(out, torch.Tensor) and not func.__name__.startswith("copy_"):
                self.biggest = max(self.biggest, out.numel())
            return out

    spec = AttentionSpec(64, 8, heads[0], heads[1], n_global=n_global, window=300 if n_global else None)
    layer = SparseQueryAttention(spec)
    cache = layer.new_cache(1, 300)
    layer.prefill_cache(torch.randn(1, 280, 64), cache)
    with torch.no_grad(), Sizes() as sizes:
        layer.decode(torch.randn(1, 1, 64), cache)
    assert sizes.biggest < cache.k[:, :, :cache.n_global + cache.filled].numel() // 8, sizes.biggest


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
    """bf16 forward and backward on CUDA against the float64 reference; windows take compiled flex."""
    spec = AttentionSpec.variant(name, d_model=128, n_heads=8)  # head_dim 16: compiled flex allowed
    layer = SparseQueryAttention(spec).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    ref_layer = SparseQueryAttention(spec).double()
    ref_layer.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x_ref = x.detach().double().cpu().requires_grad_(True)
    ref = reference(ref_layer, x_ref)
    torch.testing.assert_close(out.double().cpu(), ref, atol=3e-2, rtol=3e-2)
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.to("cuda", torch.bfloat16))
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad.double().cpu(), x_ref.grad, atol=5e-2, rtol=5e-2)
    if spec.window:
        assert layer.last_backend == "flex-compiled"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_small_head_dim_windows_take_the_blocked_path():
    spec = AttentionSpec(64, 8, 4, 2, window=32, n_global=2)  # head_dim 8: no compiled flex
    layer = SparseQueryAttention(spec).cuda()
    layer(torch.randn(1, 200, 64, device="cuda"))
    assert layer.last_backend.startswith("blocked/")
