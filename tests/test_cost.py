"""Tests for sqa_search.speed.cost: counts, profiles, roofline predictions, calibration on real timings."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

from sqa_search import AttentionSpec, SparseQueryAttention
from sqa_search.speed import calibrate as calibration
from sqa_search.speed import cost, hardware, phases
from sqa_search.speed.calibrate import calibrate
from sqa_search.speed.cost import CostError, predict, step_cost
from sqa_search.speed.hardware import HardwareProfile, list_profiles, load_profile, save_profile
from sqa_search.speed.record import TimingResult
from sqa_search.speed.workload import Workload, WorkloadError

REQUIRED_PROFILES = ("a100-40gb", "a100-80gb", "h100-sxm", "h200", "l40s", "l4", "rtx4090", "cpu-generic")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep every test away from the real ~/.cache calibration directory."""
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "cache"))


def wl(*, seq_len, mode, batch=1, dtype="float32", what="layer", n_layers=1, d_ff=None):
    """The workload of a prediction, from the keywords the tests spell out."""
    return Workload(mode=mode, seq_len=seq_len, batch=batch, scope=what, dtype=dtype, n_layers=n_layers, d_ff=d_ff)


def total(phases, attr, kinds=None):
    return sum(getattr(p, attr) for p in phases if kinds is None or p.kind in kinds)


def by_name(phases):
    return {p.name: p for p in phases}


# ----- hand-computed counts ------------------------------------------------------------------------
def test_prefill_counts_by_hand():
    # d=16, H=4 (head_dim 4), 2 query heads, 1 KV head, causal, N=4, batch 1, float32, no RoPE
    spec = AttentionSpec(d_model=16, n_heads=4, n_q_heads=2, n_kv_heads=1, rope=False)
    ph = by_name(step_cost(spec, batch=1, seq_len=4, mode="prefill", dtype="float32"))
    assert set(ph) == {"q_proj", "k_proj", "v_proj", "scores", "softmax", "av", "o_proj"}
    # q_proj: 4 tokens x 16 -> 8: 2*4*16*8 FLOPs; bytes 4 * (x 4*16 + W 16*8 + y 4*8)
    assert ph["q_proj"].flops == 1024 and ph["q_proj"].bytes == 4 * (64 + 128 + 32)
    assert ph["k_proj"].flops == 512 and ph["k_proj"].bytes == 4 * (64 + 64 + 16)
    assert ph["v_proj"].flops == 512
    # causal N=4: 10 visible pairs, 2 heads, head_dim 4: 2*2*4*10 FLOPs each for QK^T and AV
    assert ph["scores"].flops == 160 and ph["av"].flops == 160
    assert ph["scores"].bytes == 4 * 4 * (2 * 4 + 1 * 4)  # read q (2 heads x 4 tokens), k (1 head)
    assert ph["softmax"].flops == 5 * 2 * 10 and ph["softmax"].bytes == 0  # on chip in a fused kernel
    assert ph["o_proj"].flops == 1024 and ph["o_proj"].bytes == 4 * (32 + 128 + 64)
    assert ph["scores"].kind == "attention" and ph["q_proj"].kind == "matmul" and ph["softmax"].kind == "elementwise"
    matmul = total(ph.values(), "flops", ("matmul", "attention"))
    assert matmul == 3392 == spec.attention_flops(4)


def test_decode_counts_by_hand():
    # one token per sequence, batch 2, a 6-token cache (7 with the new token) capped by a
    # window of 4, float32
    spec = AttentionSpec(d_model=16, n_heads=4, n_q_heads=2, n_kv_heads=1, window=4, rope=False)
    ph = by_name(step_cost(spec, batch=2, seq_len=6, mode="decode", dtype="float32"))
    weights = 4 * (16 * 8 + 16 * 4 + 16 * 4 + 8 * 16)
    assert sum(ph[n].bytes for n in ("q_proj", "k_proj", "v_proj", "o_proj")) == weights + 4 * 2 * (
        16 + 8 + 16 + 4 + 16 + 4 + 8 + 16)
    # 4 keys (the window), 2 heads, head_dim 4, batch 2
    assert ph["scores"].flops == 2 * 2 * 2 * 4 * 4
    q_and_o = 2 * 4 * 2 * 2 * 4  # q read and output written: batch 2, 2 heads, head_dim 4
    assert ph["scores"].bytes + ph["av"].bytes - q_and_o == spec.kv_cache_bytes(6, dtype_bytes=4, batch=2) == 256


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa", "rsqa",
                                     "swsqa", "flexsqa"])
def test_prefill_flops_match_spec(variant):
    spec = AttentionSpec.variant(variant, 256, 16)
    for n in (100, 1000):
        phases = step_cost(spec, batch=3, seq_len=n, mode="prefill", dtype="bfloat16")
        assert total(phases, "flops", ("matmul", "attention")) == spec.attention_flops(n, batch=3)


def test_train_counts_backward():
    from torch.utils.flop_counter import FlopCounterMode

    spec = AttentionSpec.variant("sqa", 128, 8)  # 4 query heads, 2 KV heads, head_dim 16
    fwd = step_cost(spec, batch=2, seq_len=256, mode="prefill", dtype="bfloat16")
    train = step_cost(spec, batch=2, seq_len=256, mode="train", dtype="bfloat16")
    # projections: torch's own count of the matmuls the real layer runs, forward and forward+backward
    layer = SparseQueryAttention(spec)
    x = torch.randn(2, 256, 128, requires_grad=True)
    counted = {}
    for mode in ("prefill", "train"):
        with FlopCounterMode(display=False) as counter:
            y = layer(x)
            if mode == "train":
                y.backward(torch.randn_like(y))
        counted[mode] = counter.get_total_flops()  # CPU SDPA is not counted by torch: matmuls only
    assert total(fwd, "flops", ("matmul",)) == counted["prefill"]
    assert total(train, "flops", ("matmul",)) == counted["train"]
    # attention core by hand: 4 heads x 2 sequences x 256*257/2 causal pairs x 16 dims x 2 FLOPs,
    # for scores and for A.V; FlashAttention's backward runs five such products (S recomputed,
    # dV, dP, dQ, dK), so training costs the forward's two plus five
    one_product = 4 * 2 * (256 * 257 // 2) * 16 * 2
    assert total(fwd, "flops", ("attention",)) == 2 * one_product
    assert total(train, "flops", ("attention",)) == pytest.approx((2 + 5) * one_product)


def test_window_and_global_tokens():
    full = AttentionSpec.variant("sqa", 256, 16)
    win = AttentionSpec.variant("swsqa", 256, 16, window=128)
    n = 8192
    f_full = total(step_cost(full, batch=1, seq_len=n, mode="prefill"), "flops", ("attention",))
    f_win = total(step_cost(win, batch=1, seq_len=n, mode="prefill"), "flops", ("attention",))
    assert f_win == pytest.approx(f_full * win.visible_pairs(n) / full.visible_pairs(n))
    # decode: a window caps the cache, so past W the step stops growing with N
    kv = [total(step_cost(win, batch=1, seq_len=m, mode="decode"), "bytes") for m in (512, 4096)]
    assert kv[0] == kv[1]
    kv_full = [total(step_cost(full, batch=1, seq_len=m, mode="decode"), "bytes") for m in (512, 4096)]
    assert kv_full[1] > kv_full[0]
    # global tokens add N*G pairs and their K/V projections
    flex = AttentionSpec.variant("flexsqa", 256, 16, window=128)
    f_flex = total(step_cost(flex, batch=1, seq_len=n, mode="prefill"), "flops", ("attention",))
    assert f_flex - f_win == 2 * 2 * flex.n_attn_heads * flex.head_dim * n * flex.n_global


def test_implementation_counts_mirror_the_layer():
    spec = AttentionSpec.variant("gqa", 256, 16, window=128)
    ideal = total(step_cost(spec, batch=1, seq_len=4096, mode="prefill"), "flops", ("attention",))
    cuda = step_cost(spec, batch=1, seq_len=4096, mode="prefill", device_type="cuda", attention_tile=128)
    cpu = step_cost(spec, batch=1, seq_len=4096, mode="prefill", device_type="cpu", attention_tile=64)
    # flex computes whole 128x128 tiles
    assert ideal < total(cuda, "flops", ("attention",)) <= 2.1 * ideal
    # the blocked path's rows (prefill: W/4-token blocks) score the blocks around their window:
    # 160 keys for 128 visible (blocks of W would score 256), plus the padding to whole phases
    assert ideal < total(cpu, "flops", ("attention",)) < 1.6 * ideal
    # the CPU path copies K/V out to every query head; CUDA keeps bf16 grouped
    assert "expand_kv" in by_name(cpu) and "expand_kv" not in by_name(cuda)



# ----- the model's counts against the real layer's work --------------------------------------------
class _WholeStep:
    """FlopCounterMode's module tracker without its module hooks, which fail without grad
    (on the expanded global tokens): every FLOP is counted under "Global"."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _counted_flops(layer, x, cache=None, grad=False):
    """torch's own FLOP count of one forward (with or without grad) or decode step (with a
    cache). SDPA is forced onto its math path, whose matmuls FlopCounterMode sees (it does not
    count CPU flash kernels); the math path multiplies exactly the keys the fused kernel would,
    mask or not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _WholeStep()
    with torch.set_grad_enabled(grad), sdpa_kernel(SDPBackend.MATH), counter:
        layer(x) if cache is None else layer.decode(x, cache)
    return counter.get_total_flops()


@pytest.mark.parametrize("spec, n, batch", [
    (AttentionSpec.variant("swsqa", 128, 8), 1000, 1),  # causal window, 4 query / 2 KV heads, n not a whole block
    (AttentionSpec.variant("flexsqa", 128, 8), 700, 2),  # window + 4 global tokens, batch 2
    (AttentionSpec(d_model=96, n_heads=6, n_q_heads=6, n_kv_heads=4, window=100, n_global=3, causal=False), 555, 1),
    (AttentionSpec(d_model=64, n_heads=4, n_q_heads=1, n_kv_heads=2, window=33), 400, 1),  # rSQA, odd window
])
def test_blocked_path_flops_are_the_layers(spec, n, batch):
    from sqa_search.layer.masks import BlockedLayout, Visibility

    layer = SparseQueryAttention(spec)
    x = torch.randn(batch, n, spec.d_model)
    rule, g = Visibility(spec.causal, spec.window), spec.n_global
    ideal = step_cost(spec, batch=batch, seq_len=n, mode="prefill", dtype="float32")
    # prefill runs the forward-only layout, train's forward the layout with grad: each mode's
    # forward FLOPs are the layer's, and its scored pairs the rows of the masks the layer builds
    # (padding included); the ones the rule admits (finite) are the algorithm's visible pairs
    for mode, grad in (("prefill", False), ("train", True)):
        counted = _counted_flops(layer, x, grad=grad)
        assert layer.last_backend == "blocked/math"
        phases = [ph for ph in step_cost(spec, batch=batch, seq_len=n, mode=mode, dtype="float32", device_type="cpu")
                  if not ph.name.endswith(".bwd")]
        assert total(phases, "flops", ("matmul", "attention")) == counted, mode
        plan = BlockedLayout.of(rule, n, g, grad=grad)
        pieces = layer._slot_mask(plan, "cpu", torch.float32, whole=grad)
        scored = sum((stop - start) * m.shape[2] * m.shape[3] for phase in pieces for start, stop, m in phase)
        assert by_name(phases)["scores"].flops == 2 * batch * spec.n_attn_heads * spec.head_dim * scored, mode
        visible = 0
        for ph in range(plan.phases):
            q_idx, _ = plan.key_index(ph)
            visible += int((plan.mask(rule, ph, "cpu", torch.float32).isfinite() & (q_idx < n)).sum())
        assert by_name(ideal)["scores"].flops == 2 * batch * spec.n_attn_heads * spec.head_dim * visible, mode


@pytest.mark.parametrize("spec", [
    AttentionSpec.variant("sqa", 128, 8),
    AttentionSpec(d_model=96, n_heads=12, n_q_heads=9, n_kv_heads=6),  # uneven groups: padded query rows
    AttentionSpec.variant("rsqa", 64, 4),
    AttentionSpec.variant("flexsqa", 128, 8),  # globals in the cache's first slots
])
def test_decode_flops_are_the_layers(spec):
    layer = SparseQueryAttention(spec)
    n = 300
    cache = layer.new_cache(2, n + 1)
    with torch.no_grad():
        layer.prefill_cache(torch.randn(2, n, spec.d_model), cache)
    counted = _counted_flops(layer, torch.randn(2, 1, spec.d_model), cache)
    phases = step_cost(spec, batch=2, seq_len=n, mode="decode", dtype="float32", device_type="cpu")
    assert total(phases, "flops", ("matmul", "attention")) == counted


def _dispatched_ops(fn, grad: bool = False) -> int:
    """Non-view aten ops one call dispatches (forward ops only, with grad too: autograd sits
    above the dispatch mode): on CPU each is one kernel and one overhead term."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view:  # a view too
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    with torch.set_grad_enabled(grad), Count():
        fn()
    return Count.ops


@pytest.mark.parametrize("spec", [
    AttentionSpec.variant("mha", 64, 4),
    AttentionSpec.variant("gqa", 128, 8),
    AttentionSpec(d_model=96, n_heads=12, n_q_heads=9, n_kv_heads=6),
    AttentionSpec.variant("rsqa", 64, 4),
    AttentionSpec.variant("swsqa", 128, 8),
    AttentionSpec.variant("flexsqa", 128, 8),
    # bidirectional: the global tokens' pass reads the blocked layout's buffers
    AttentionSpec(d_model=96, n_heads=6, n_q_heads=6, n_kv_heads=4, window=100, n_global=3, causal=False),
    AttentionSpec(d_model=64, n_heads=4, n_q_heads=1, n_kv_heads=2, window=33, n_global=2, causal=False),  # rSQA
    AttentionSpec.variant("sqa", 64, 4, rope=False),
])
def test_launches_are_the_ops_the_layer_runs(spec):
    # the overhead term is launches x seconds per op: on CPU that is most of a small step's
    # time, so the model's launches must be the layer's ops (RoPE, reorders, copies, cache writes)
    layer = SparseQueryAttention(spec)
    n, batch = 512, 2
    x = torch.randn(batch, n, spec.d_model)
    cache = layer.new_cache(batch, n + 1)
    token = torch.randn(batch, 1, spec.d_model)
    with torch.no_grad():
        layer(x)  # the blocked path builds its masks once per shape, RoPE its factors once per length
        layer.prefill_cache(x, cache)
    layer(x)  # and, with grad, the other layout's masks
    # train: the forward with grad (the blocked path's other layout); its backward is approximate
    ran = {"prefill": _dispatched_ops(lambda: layer(x)), "train": _dispatched_ops(lambda: layer(x), grad=True)}
    if spec.causal:  # a bidirectional layer has no decode
        ran["decode"] = _dispatched_ops(lambda: layer.decode(token, cache))
    for mode, ops in ran.items():
        cache.length = n
        phases = step_cost(spec, batch=batch, seq_len=n, mode=mode, dtype="float32", device_type="cpu")
        assert total([ph for ph in phases if not ph.name.endswith(".bwd")], "launches") == ops, mode


def test_flex_tiles_are_the_block_masks():
    from sqa_search.layer.masks import FLEX_BLOCK, Visibility, flex_kv_blocks

    for spec, n in [(AttentionSpec.variant("swsqa", 128, 8), 1000), (AttentionSpec.variant("flexsqa", 128, 8), 1024),
                    (AttentionSpec(d_model=64, n_heads=4, n_q_heads=4, n_kv_heads=4, window=300, n_global=130,
                                   causal=False), 777),
                    (AttentionSpec(d_model=64, n_heads=4, n_q_heads=2, n_kv_heads=1, n_global=5), 300)]:
        kv_num, _, full_num, _ = flex_kv_blocks(Visibility(spec.causal, spec.window), n, spec.n_global)
        blocks = (kv_num + full_num).flatten().tolist()
        rows = [min(FLEX_BLOCK, n - i * FLEX_BLOCK) for i in range(len(blocks))]
        assert phases.flex_pairs(spec, n, FLEX_BLOCK) == sum(r * k * FLEX_BLOCK for r, k in zip(rows, blocks))


def test_auto_path_is_the_layers_choice():
    import types

    from sqa_search.layer import attention

    assert phases.FLEX_MIN_HEAD_DIM == attention.FLEX_MIN_HEAD_DIM
    specs = [AttentionSpec.variant(v, d, h, **kw) for v, kw in (("sqa", {}), ("swsqa", {}), ("flexsqa", {}),
                                                               ("sqa", {"n_global": 2}))
             for d, h in ((64, 8), (128, 8))]  # head_dim 8 (no compiled flex) and 16
    for spec in specs:
        layer = SparseQueryAttention(spec)
        for n in (100, 1000):
            for device in ("cpu", "cuda"):
                # choose_backend reads only the length and the device of its input
                x = types.SimpleNamespace(shape=(1, n, spec.d_model), is_cuda=device == "cuda")
                assert phases.attention_path(spec, n, device) == layer.choose_backend(x), (spec.label, n, device)

def test_block_and_model_scope():
    spec = AttentionSpec.variant("sqa", 256, 16)
    layer = step_cost(spec, batch=1, seq_len=512, mode="prefill")
    block = step_cost(spec, batch=1, seq_len=512, mode="prefill", what="block", d_ff=1024)
    model = step_cost(spec, batch=1, seq_len=512, mode="prefill", what="model", n_layers=8, d_ff=1024,
                      vocab_size=1000)
    ffn = total(block, "flops", ("matmul",)) - total(layer, "flops", ("matmul",))
    assert ffn == 3 * 2 * 512 * 256 * 1024
    names = by_name(model)
    assert names["lm_head"].flops == 2 * 512 * 256 * 1000
    assert total(model, "flops", ("matmul", "attention")) == pytest.approx(
        8 * total(block, "flops", ("matmul", "attention")) + names["lm_head"].flops)
    # default d_ff is the proxy model's
    from sqa_search.layer.model import ModelConfig

    assert cost.default_d_ff(256) == ModelConfig(attention=spec).d_ff


# ----- profiles ---------------------------------------------------------------------------------------
def test_shipped_profiles_have_datasheet_figures():
    names = list_profiles()
    for name in REQUIRED_PROFILES:
        assert name in names
        prof = load_profile(name)
        assert prof.name == name and prof.display_name
        assert set(prof.peak_flops) == {"fp32", "tf32", "bf16", "fp16"}
        assert prof.mem_bandwidth > 0 and prof.mem_bytes > 0 and prof.l2_bytes > 0
        assert prof.calibration is None
        for key in ("peak_flops", "mem_bandwidth", "mem_bytes", "l2_bytes"):
            assert prof.sources.get(key), f"{name}: no source for {key}"
        if name != "cpu-generic":
            assert prof.device_type == "cuda"
            assert "NVIDIA" in prof.sources["peak_flops"]
            # dense figures: bf16 Tensor Core beats fp32, and tf32 sits between
            assert prof.peak_flops["fp32"] <= prof.peak_flops["tf32"] < prof.peak_flops["bf16"]
    # widely known dense figures
    assert load_profile("a100-40gb").peak_flops["bf16"] == 312e12
    assert load_profile("a100-40gb").mem_bandwidth == 1555e9
    assert load_profile("a100-80gb").mem_bandwidth == 2039e9
    assert load_profile("h100-sxm").peak_flops["bf16"] == 989.5e12
    assert load_profile("h200").mem_bandwidth == 4.8e12
    assert load_profile("l40s").peak_flops["bf16"] == 362.05e12
    assert load_profile("l4").peak_flops["bf16"] == 121e12
    assert load_profile("rtx4090").peak_flops["bf16"] == 165.2e12
    cpu = load_profile("cpu-generic")
    assert cpu.device_type == "cpu" and "placeholder" in cpu.sources["peak_flops"]
    assert "placeholder" in cpu.display_name.lower() or "calibrate" in cpu.display_name.lower()


def test_unknown_profile_lists_known_names():
    with pytest.raises(CostError) as err:
        load_profile("tpu-v9")
    assert isinstance(err.value, ValueError)
    for name in REQUIRED_PROFILES:
        assert name in str(err.value)
    assert load_profile("H100").name == "h100-sxm"  # aliases and case


def test_bad_inputs_name_field_value_and_choices():
    spec = AttentionSpec.variant("sqa", 64, 4)
    with pytest.raises(WorkloadError, match=r"mode='infer'.*train, prefill, decode"):
        predict(spec, "h100-sxm", wl(batch=1, seq_len=64, mode="infer", dtype="bfloat16"))
    with pytest.raises(WorkloadError, match=r"dtype='int8'.*bfloat16"):
        predict(spec, "h100-sxm", wl(batch=1, seq_len=64, mode="prefill", dtype="int8"))
    with pytest.raises(CostError, match=r"what='everything'.*layer, block, model"):
        step_cost(spec, batch=1, seq_len=64, mode="prefill", what="everything")
    with pytest.raises(CostError, match=r"batch=0"):
        step_cost(spec, batch=0, seq_len=64, mode="prefill")
    with pytest.raises(CostError, match="causal"):
        step_cost(spec.replace(causal=False), batch=1, seq_len=64, mode="decode")
    with pytest.raises(CostError, match=r"dtype='float64'"):  # a Workload dtype no profile has a peak for
        predict(spec, "h100-sxm", wl(batch=1, seq_len=64, mode="prefill", dtype="float64"))
    with pytest.raises(CostError, match="workload="):
        predict(spec, "h100-sxm", 64)
    assert predict(spec, "h100-sxm", wl(batch=1, seq_len=64, mode="prefill", dtype="bfloat16")).dtype == "bfloat16"


def test_bad_profile_file(tmp_path):
    data = load_profile("l4").to_dict()
    data["peak_flops"].pop("tf32")
    path = tmp_path / "broken.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(CostError, match="peak_flops"):
        load_profile(str(path))
    with pytest.raises(CostError, match="no profile file"):
        load_profile(str(tmp_path / "missing.yaml"))


def test_save_load_and_precedence(tmp_path):
    shipped = load_profile("l4")
    mine = dataclasses.replace(shipped, efficiency={**shipped.efficiency, "matmul": 0.9}, calibration={
        "fingerprint": "test box", "date": "2025-01-01", "n_points": 3, "heldout_mape": 0.1})
    path = save_profile(mine)  # default: the user calibration directory
    assert path == hardware.user_profile_dir() / "l4.yaml" and path.is_file()
    assert str(tmp_path) in str(path)
    loaded = load_profile("l4")
    assert loaded.efficiency["matmul"] == 0.9 and loaded.calibration["fingerprint"] == "test box"
    assert load_profile("l4", calibrated=False).efficiency["matmul"] == shipped.efficiency["matmul"]
    assert load_profile(str(path)).efficiency["matmul"] == 0.9
    p = predict(AttentionSpec.variant("sqa", 64, 4), "l4", wl(batch=1, seq_len=64, mode="prefill", dtype="bfloat16"))
    assert p.calibration == "calibrated on test box 2025-01-01, 3 points, held-out MAPE 10.0%"
    # a custom name saved there becomes a known profile
    save_profile(dataclasses.replace(mine, name="my-l4"))
    assert "my-l4" in list_profiles()


# ----- predictions -------------------------------------------------------------------------------------
def test_prediction_is_labelled():
    spec = AttentionSpec.variant("sqa", 256, 16)
    p = predict(spec, "a100-80gb", wl(batch=1, seq_len=4096, mode="prefill", dtype="bfloat16"))
    assert p.source == "predicted" and p.profile == "a100-80gb"
    assert p.calibration == "uncalibrated datasheet figures"
    lat = p.latency  # the shape every latency source gives
    assert lat.kind == "predicted" and not lat.measured and lat.seconds == p.seconds and lat.seq_len == 4096
    assert lat.label == "predicted for a100-80gb (uncalibrated datasheet figures)"
    assert p.seconds > 0 and p.flops > 0 and p.bytes > 0 and p.bound in ("compute", "memory", "overhead")
    d = p.to_dict()
    json.dumps(d)
    assert d["source"] == "predicted" and d["seconds"] == p.seconds and d["phases"]
    assert math.isclose(sum(ph["seconds"] for ph in d["phases"]), p.seconds, rel_tol=1e-9)


@pytest.mark.parametrize("profile", ["a100-80gb", "h100-sxm", "l4"])
@pytest.mark.parametrize("what", ["layer", "model"])
def test_prefill_scales_with_query_heads(profile, what):
    n = 32768
    kw = dict(batch=1, seq_len=n, mode="prefill", dtype="bfloat16", what=what, n_layers=8)
    preds = {v: predict(AttentionSpec.variant(v, 256, 16), profile, wl(**kw)) for v in ("mha", "gqa", "sqa", "xsqa")}
    assert preds["xsqa"].flops < preds["sqa"].flops < preds["mha"].flops
    assert preds["xsqa"].seconds < preds["sqa"].seconds < preds["mha"].seconds
    # GQA cuts KV heads, not the N^2 work: no prefill speed-up worth the name
    assert preds["gqa"].seconds > 0.9 * preds["mha"].seconds
    assert preds["mha"].bound == "compute"


def test_prefill_ratios_near_the_paper():
    # SQA paper, A100, 8-layer d=256 H=16 dense model, forward, N=32k (seconds): xSQA 0.135,
    # SQA 0.199, GQA 0.364, MHA 0.373. Absolute times depend on their kernels; ratios should agree.
    kw = dict(batch=1, seq_len=32768, mode="prefill", dtype="bfloat16", what="model", n_layers=8)
    t = {v: predict(AttentionSpec.variant(v, 256, 16), "a100-80gb", wl(**kw)).seconds
         for v in ("mha", "gqa", "sqa", "xsqa")}
    assert t["sqa"] / t["mha"] == pytest.approx(0.199 / 0.373, rel=0.25)
    assert t["xsqa"] / t["mha"] == pytest.approx(0.135 / 0.373, rel=0.35)
    assert t["gqa"] / t["mha"] == pytest.approx(0.364 / 0.373, rel=0.05)


@pytest.mark.parametrize("profile", ["a100-80gb", "h100-sxm", "rtx4090"])
def test_decode_is_memory_bound_and_governed_by_kv_heads(profile):
    kw = dict(batch=16, seq_len=32768, mode="decode", dtype="bfloat16")
    p = {v: predict(AttentionSpec.variant(v, 1024, 16), profile, wl(**kw)) for v in ("mha", "gqa", "mqa", "sqa", "xsqa")}
    assert p["mqa"].seconds < p["gqa"].seconds < p["mha"].seconds
    assert p["mha"].bound == "memory" and p["gqa"].bound == "memory"
    # SQA has GQA's KV heads: fewer query heads buy (almost) nothing at decode
    assert p["sqa"].seconds >= 0.95 * p["gqa"].seconds
    # decode bytes are dominated by the KV cache, which scales with H_kv
    assert p["mha"].bytes / p["gqa"].bytes == pytest.approx(4, rel=0.1)


def test_sliding_window_wins_at_long_context():
    kw = dict(batch=1, mode="prefill", dtype="bfloat16")
    sqa, sw = AttentionSpec.variant("sqa", 256, 16), AttentionSpec.variant("swsqa", 256, 16)
    long = [predict(s, "h100-sxm", wl(seq_len=131072, **kw)).seconds for s in (sqa, sw)]
    assert long[1] < 0.2 * long[0]


# ----- calibration -----------------------------------------------------------------------------------
def _synthetic_records(truth: HardwareProfile, noise=0.03, seed=0):
    import random

    rng = random.Random(seed)
    records = []
    for variant in ("mha", "gqa", "sqa", "xsqa", "swsqa", "rsqa"):
        for n in (256, 1024, 4096):
            spec = AttentionSpec.variant(variant, 128, 8)
            for mode in ("prefill", "train", "decode"):
                t = predict(spec, truth, wl(batch=2, seq_len=n, mode=mode, dtype="float32")).seconds
                records.append({"spec": spec.to_dict(), "mode": mode, "what": "layer", "batch": 2, "seq_len": n,
                                "dtype": "float32", "median_s": t * math.exp(rng.gauss(0, noise)), "status": "ok",
                                "fingerprint": {"cpu_model": "synthetic"}, "predicted": False})
    return records


def test_calibrate_recovers_known_factors():
    start = load_profile("cpu-generic")
    truth = dataclasses.replace(start, efficiency={"matmul": 0.2, "attention": 0.05, "elementwise": 0.1,
                                                   "memory": 0.3}, overhead_s=3e-5)
    records = _synthetic_records(truth)
    records.append({**records[0], "status": "error"})  # ignored
    records.append({**records[0], "predicted": True})  # a prediction is not a measurement
    records.append({**records[0], "device": "cuda:0"})  # another kind of device than the profile's
    calibrated, report = calibrate(start, records)
    assert report.n_points == len(records) - 3 and report.n_skipped == 3
    assert any("cuda:0" in reason for reason in report.skipped)
    assert report.fit_mape_before > 0.5
    assert report.fit_mape_after < 0.05
    assert report.heldout_mape < 0.06
    assert "leave-one-configuration-out" in report.heldout_method
    for key in ("attention", "memory"):
        assert calibrated.efficiency[key] == pytest.approx(truth.efficiency[key], rel=0.25)
    assert calibrated.overhead_s == pytest.approx(3e-5, rel=0.25)
    assert calibrated.calibration["n_points"] == report.n_points
    assert calibrated.calibration["modes"] == ["decode", "prefill", "train"]
    assert "synthetic" in calibrated.calibration_label and "held-out MAPE" in calibrated.calibration_label
    assert "held-out" in report.summary()
    assert len(report.to_frame()) == report.n_points


def test_calibrate_accepts_timing_result_objects():
    objs = [TimingResult.from_dict({"label": "", "variant": "", "device": "cpu", **r})
            for r in _synthetic_records(load_profile("cpu-generic"))[:12]]
    assert all(isinstance(o.spec, AttentionSpec) for o in objs)
    calibrated, report = calibrate("cpu-generic", objs)
    assert report.n_points == 12 and math.isfinite(report.heldout_mape)


def test_calibrate_needs_usable_records():
    with pytest.raises(CostError, match="at least one usable"):
        calibrate("cpu-generic", [{"spec": {}, "status": "timeout"}])


# Real timings on this machine: a tiny local timer around the layer.
def _time_layer(spec, n, repeats=3, passes=3):
    layer = SparseQueryAttention(spec)
    x = torch.randn(1, n, spec.d_model)
    with torch.no_grad():
        layer(x)  # warm-up

        def once():
            t0 = time.perf_counter()
            layer(x)
            return time.perf_counter() - t0

        # fastest of several, in separate passes: other processes only ever add time
        return [min(once() for _ in range(repeats)) for _ in range(passes)]


@pytest.fixture(scope="module")
def cpu_timings():
    configs = [(v, d, h, n) for v, d, h in (("mha", 64, 4), ("gqa", 128, 8), ("sqa", 128, 8), ("xsqa", 128, 8),
                                             ("swsqa", 128, 8), ("rsqa", 64, 4))
               for n in (256, 1024)]
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine two threads stall on each other
    try:
        runs = {}
        for _ in range(2):  # interleave: a busy spell hits every configuration a little
            for v, d, h, n in configs:
                spec = AttentionSpec.variant(v, d, h, **({"window": 128} if v == "swsqa" else {}))
                runs.setdefault((spec, n), []).extend(_time_layer(spec, n))
    finally:
        torch.set_num_threads(old)
    return [{"spec": spec.to_dict(), "mode": "prefill", "what": "layer", "batch": 1, "seq_len": n,
             "dtype": "float32", "device": "cpu", "median_s": min(ts), "status": "ok",
             "fingerprint": {"cpu_model": "test machine", "threads": 1}, "predicted": False}
            for (spec, n), ts in runs.items()]


def test_calibrate_on_real_cpu_timings(cpu_timings):
    # from the shipped profile as it is: the fit must earn its improvement
    start = load_profile("cpu-generic")
    calibrated, report = calibrate(start, cpu_timings)
    assert report.n_points == len(cpu_timings) == 12
    # each point predicted by a fit that did not see it, against the measurement
    assert math.isfinite(report.heldout_mape) and report.heldout_mape < 0.5
    # and a configuration at a length no point has (N=512), timed here now
    spec = AttentionSpec.variant("sqa", 128, 8)
    p = predict(spec, calibrated, wl(batch=1, seq_len=512, mode="prefill", dtype="float32"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = min(_time_layer(spec, 512))
    finally:
        torch.set_num_threads(old)
    print(f"calibrated: held-out {report.heldout_mape:.3f}, shipped {report.fit_mape_before:.3f}; "
          f"N=512 predicted {p.seconds:.3g}s measured {measured:.3g}s")
    assert 0.5 < p.seconds / measured < 2.0
    assert p.calibration.startswith("calibrated on test machine") and p.source == "predicted"
    # the calibrated profile survives a save/load round trip
    again = load_profile(str(save_profile(calibrated, hardware.user_profile_dir())))
    assert again.efficiency == pytest.approx(calibrated.efficiency)
    assert again.calibration["heldout_mape"] == pytest.approx(report.heldout_mape)
    print(report.summary())


def test_real_timings_order_like_predictions(cpu_timings):
    # at N=1024 on this CPU, the query-head cut shows in measured time as predicted
    t = {AttentionSpec.from_dict(r["spec"]).variant_name: r["median_s"] for r in cpu_timings
         if r["seq_len"] == 1024 and r["spec"]["d_model"] == 128}
    assert t["xsqa"] < t["gqa"]
    kw = dict(batch=1, seq_len=1024, mode="prefill", dtype="float32")
    pred = {v: predict(AttentionSpec.variant(v, 128, 8), "cpu-generic", wl(**kw)).seconds for v in ("xsqa", "sqa", "gqa")}
    assert pred["xsqa"] < pred["sqa"] < pred["gqa"]


def test_calibrate_speed_correction_is_for_cpu_only():
    with pytest.raises(CostError, match="speed_correction"):
        calibration.calibrate_from_measurements("cpu-generic", device="cuda", clock="wall", speed_correction=True)


def test_calibrate_from_measurements_smoke(monkeypatch):
    configs = [{"variant": v, "d_model": 64, "n_heads": 4, "seq_len": 256, "batch": 1} for v in ("mha", "sqa", "xsqa")]
    calibrated, report, records = calibration.calibrate_from_measurements(
        "cpu-generic", configs=configs, modes=("prefill", "decode"), repeats=1, passes=1, save=True)
    # timed by the one timing harness: its records, on the thread clock (one thread, CPU)
    assert len(records) == 6 and all(isinstance(r, TimingResult) and r.ok and r.median_s > 0 for r in records)
    assert all(r.clock == "thread" and r.passes == 1 and r.n_repeats >= 1 for r in records)
    # on the scale bench measures: corrected to the machine's stored reference speed
    assert all(r.speed_corrected and r.reference_probe_s > 0 for r in records)
    assert {r.mode for r in records} == {"prefill", "decode"}
    assert load_profile("cpu-generic").calibration is not None  # saved where load_profile looks first
    assert report.modes == ["decode", "prefill"]
