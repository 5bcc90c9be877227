import pytest
import torch

from sqa_search.layer.attention import SparseQueryAttention
from sqa_search.layer.spec import VARIANTS, AttentionSpec, SpecError, normalise_variant


# ----- named variants and their names ---------------------------------------------------------
@pytest.mark.parametrize(
    "name,heads",
    [("mha", (16, 16)), ("gqa", (16, 4)), ("mqa", (16, 1)), ("sqa", (8, 4)), ("ssqa", (8, 8)),
     ("xsqa", (4, 4)), ("xsmqa", (4, 1)), ("lsqa", (12, 4)), ("rsqa", (4, 8))],
)
def test_named_variants_at_h16_and_their_names_round_trip(name, heads):
    spec = AttentionSpec.variant(name, d_model=256, n_heads=16)
    assert (spec.n_q_heads, spec.n_kv_heads) == heads
    assert spec.head_dim == 16
    assert spec.variant_name == name
    assert spec.family == name


def test_windowed_variants():
    sw = AttentionSpec.variant("SW-SQA", 256, 16)
    assert (sw.n_q_heads, sw.n_kv_heads, sw.window, sw.n_global) == (8, 4, 128, 0)
    assert sw.variant_name == "swsqa" and sw.family == "swsqa"
    flex = AttentionSpec.variant("flex_sqa", 256, 16, window=512, n_global=8)
    assert (flex.window, flex.n_global) == (512, 8)
    assert flex.family == "flexsqa"
    # a window on MHA heads is SW family but no exact named variant
    assert AttentionSpec(256, 16, 16, 16, window=64).variant_name is None
    assert AttentionSpec(256, 16, 16, 16, window=64).family == "swsqa"


@pytest.mark.parametrize("h", [4, 8, 12, 16, 32])
def test_every_variant_builds_for_h_divisible_by_4(h):
    for name in VARIANTS:
        spec = AttentionSpec.variant(name, d_model=8 * h, n_heads=h)
        assert spec.family in VARIANTS


def test_families_of_unnamed_specs():
    assert AttentionSpec(256, 16, 16, 8).family == "gqa"
    assert AttentionSpec(256, 16, 6, 3).family == "sqa"
    assert AttentionSpec(256, 16, 10, 5).family == "lsqa"  # more than half the query heads
    assert AttentionSpec(256, 16, 14, 7).family == "lsqa"
    assert AttentionSpec(256, 16, 6, 6).family == "ssqa"
    assert AttentionSpec(256, 16, 2, 2).family == "xsqa"
    assert AttentionSpec(256, 16, 2, 1).family == "xsmqa"
    assert AttentionSpec(256, 16, 3, 7).family == "rsqa"
    assert AttentionSpec(256, 16, 12, 8).label == "lSQA 12q/8kv"


def test_variant_name_aliases_and_unknown():
    assert normalise_variant("xSMQA") == normalise_variant("x_smqa") == "xsmqa"
    with pytest.raises(SpecError, match="choose one of mha, gqa"):
        AttentionSpec.variant("sparse", 256, 16)


def test_dict_round_trip():
    spec = AttentionSpec.variant("flexsqa", 256, 16, causal=False)
    assert AttentionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown AttentionSpec field"):
        AttentionSpec.from_dict({**spec.to_dict(), "heads": 3})


# ----- validation walks the invalid corners ----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field,allowed",
    [
        (dict(d_model=0, n_heads=1, n_q_heads=1, n_kv_heads=1), "d_model", ">= 1"),
        (dict(d_model=64, n_heads=0, n_q_heads=1, n_kv_heads=1), "n_heads", ">= 1"),
        (dict(d_model=64, n_heads=6, n_q_heads=1, n_kv_heads=1), "n_heads", "must divide d_model=64"),
        (dict(d_model=64, n_heads=8, n_q_heads=0, n_kv_heads=1), "n_q_heads", r"\[1, 8\]"),
        (dict(d_model=64, n_heads=8, n_q_heads=9, n_kv_heads=1), "n_q_heads", r"\[1, 8\]"),
        (dict(d_model=64, n_heads=8, n_q_heads=8, n_kv_heads=0), "n_kv_heads", r"\[1, 8\]"),
        (dict(d_model=64, n_heads=8, n_q_heads=8, n_kv_heads=9), "n_kv_heads", r"\[1, 8\]"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, window=0), "window", ">= 1"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, window=-5), "window", ">= 1"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, window=2.5), "window", "integer"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, n_global=-1), "n_global", ">= 0"),
        (dict(d_model=64, n_heads=8, n_q_heads=4.0, n_kv_heads=2), "n_q_heads", "integer"),
        (dict(d_model=64, n_heads=8, n_q_heads=True, n_kv_heads=2), "n_q_heads", "integer"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, causal="yes"), "causal", "True or False"),
        (dict(d_model=60, n_heads=4, n_q_heads=4, n_kv_heads=2, head_dim=15), "head_dim", "even when rope"),
        (dict(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2, head_dim=0), "head_dim", ">= 1"),
    ],
)
def test_invalid_specs_name_field_value_and_what_is_allowed(kwargs, field, allowed):
    with pytest.raises(SpecError, match=rf"AttentionSpec\.{field}=.*{allowed}"):
        AttentionSpec(**kwargs)


def test_variants_that_h_cannot_express():
    with pytest.raises(SpecError, match="n_heads=6 does not allow it"):
        AttentionSpec.variant("gqa", 48, 6)
    with pytest.raises(SpecError, match="Flex-SQA needs a window"):
        AttentionSpec.variant("flexsqa", 64, 8, n_global=0)
    with pytest.raises(SpecError, match="SW-SQA needs a window"):
        AttentionSpec.variant("swsqa", 64, 8, window=None)


def test_every_valid_small_combination_builds_a_working_layer():
    """1 <= H_q <= H, 1 <= H_kv <= H with windows and globals: supported, never a torch shape error."""
    x = torch.randn(1, 9, 32)
    for hq in range(1, 5):
        for hkv in range(1, 5):
            for window, n_global in ((None, 0), (3, 0), (4, 2), (None, 1)):
                for causal in (True, False):
                    spec = AttentionSpec(32, 4, hq, hkv, window=window, n_global=n_global, causal=causal)
                    assert SparseQueryAttention(spec)(x).shape == x.shape


def test_odd_head_dim_without_rope_is_allowed():
    spec = AttentionSpec(60, 4, 4, 2, head_dim=15, rope=False)
    assert SparseQueryAttention(spec)(torch.randn(1, 5, 60)).shape == (1, 5, 60)


# ----- analytic counts --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_matches_the_layer(name, bias):
    spec = AttentionSpec.variant(name, d_model=128, n_heads=16, bias=bias)
    layer = SparseQueryAttention(spec)
    assert spec.n_params() == sum(p.numel() for p in layer.parameters())


def test_parameter_count_by_hand():
    # SQA d=256 H=16: hd=16, q 256*128, k 256*64, v 256*64, out 128*256
    spec = AttentionSpec.variant("sqa", 256, 16)
    assert spec.n_params() == 256 * 128 + 256 * 64 * 2 + 128 * 256 == 98304
    # rSQA 4q/8kv: out projection takes all 8 attention heads
    r = AttentionSpec.variant("rsqa", 256, 16)
    assert r.n_params() == 256 * 64 + 2 * 256 * 128 + 128 * 256


def test_flops_by_hand():
    # MHA d=8, H=2 (hd=4), N=3, bidirectional, full attention:
    # projections: q,k,v,out each 2*N*d*d = 2*3*8*8 = 384 -> 1536
    # scores + AV: 2 * (2 * heads * hd * pairs) = 2 * 2 * 2 * 4 * 9 = 288
    spec = AttentionSpec(8, 2, 2, 2, causal=False)
    assert spec.attention_flops(3) == 1536 + 288
    assert spec.attention_flops(3, backward=True) == 3 * (1536 + 288)
    # causal: pairs 1+2+3 = 6 -> core 2*2*2*4*6 = 192
    assert spec.replace(causal=True).attention_flops(3) == 1536 + 192


def test_visible_pairs_match_the_mask_conventions():
    for causal in (True, False):
        for window in (None, 1, 3, 7, 20):
            spec = AttentionSpec(8, 2, 2, 2, window=window, causal=causal)
            n = 11
            def visible(i, j):
                if causal:
                    return j <= i and (window is None or i - j < window)
                return window is None or abs(i - j) < window

            brute = sum(visible(i, j) for i in range(n) for j in range(n))
            assert spec.visible_pairs(n) == brute, (causal, window)


def test_flops_scale_with_query_heads_and_window():
    n = 32768
    mha = AttentionSpec.variant("mha", 256, 16)
    sqa, xsqa = AttentionSpec.variant("sqa", 256, 16), AttentionSpec.variant("xsqa", 256, 16)
    core = lambda s: s.attention_flops(n) - s.attention_flops(1) * n  # drop the linear part
    assert core(mha) / core(sqa) == pytest.approx(2, rel=1e-3)
    assert core(mha) / core(xsqa) == pytest.approx(4, rel=1e-3)
    sw = AttentionSpec.variant("swsqa", 256, 16, window=128)
    # linear in N: doubling N doubles the FLOPs (up to the first window's triangle)
    assert sw.attention_flops(2 * n) / sw.attention_flops(n) == pytest.approx(2, rel=1e-2)


def test_kv_cache_bytes():
    gqa = AttentionSpec.variant("gqa", 256, 16)  # 4 KV heads of 16
    assert gqa.kv_cache_bytes_per_token(2) == 2 * 4 * 16 * 2 == 256
    assert gqa.kv_cache_bytes(1000, 2) == 256_000
    sw = AttentionSpec.variant("swsqa", 256, 16, window=128)
    assert sw.kv_cache_bytes(1000, 2) == 128 * 256  # the window caps the cache
    flex = AttentionSpec.variant("flexsqa", 256, 16, window=128, n_global=4)
    assert flex.kv_cache_bytes(1000, 2) == (128 + 4) * 256


def test_coerce_takes_a_spec_or_its_dict_and_names_anything_else():
    s = AttentionSpec.variant("sqa", 64, 8)
    assert AttentionSpec.coerce(s) is s
    assert AttentionSpec.coerce(s.to_dict()) == s
    with pytest.raises(SpecError, match="spec must be an AttentionSpec or a dict of its fields, got str"):
        AttentionSpec.coerce("sqa")
