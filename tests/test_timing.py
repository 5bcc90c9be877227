"""Timing trials: real timings of small shapes; the tests assert behaviour, never speed."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.hardware import HARDWARE_FIELDS, Fingerprint, fingerprint
from sqa_search.speed.isolated import time_spec_subprocess
from sqa_search.speed.measure import CPU_MEM_KIND, CUDA_MEM_KIND
from sqa_search.speed.timing import TimingError, TimingResult, time_spec, time_specs
from sqa_search.speed.timing_cache import default_cache_dir
from sqa_search.speed.workload import Workload, WorkloadError

D, H = 64, 8
# one thread: on a shared 2-core machine two OpenMP threads wait on each other for whole
# scheduler slices; the tests need runs that finish, not figures
FAST = dict(budget_s=0.02, max_repeats=5)


def W(seq_len=64, mode="prefill", threads=1, **kw):
    """A workload on the CPU with one thread unless told otherwise."""
    return Workload(mode=mode, seq_len=seq_len, threads=threads, **kw)


def spec(name="sqa", **kw):
    return AttentionSpec.variant(name, D, H, **kw)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "timings"


def cached_timings(cache):
    """Timing records in a cache dir (the machine-speed reference stored beside them is not one)."""
    return [p for p in cache.rglob("*.json") if not p.name.startswith("machine-reference")]


def test_record_has_every_field_and_round_trips_json(cache):
    s = spec("sqa")
    r = time_spec(s, W(128, mode="prefill"), cache_dir=cache, **FAST)
    assert r.status == "ok" and r.error is None
    assert r.spec == s and r.label == s.label and r.variant == "sqa"
    assert (r.mode, r.what, r.batch, r.seq_len, r.dtype, r.device) == ("prefill", "layer", 1, 128, "float32", "cpu")
    assert r.median_s > 0 and r.iqr_s >= 0
    assert 3 <= r.n_repeats <= 5 and len(r.times_s) == r.n_repeats
    # on CPU each raw repeat is scaled by the machine's speed at that moment (speed_probe.py)
    assert r.speed_corrected and r.reference_probe_s > 0
    assert len(r.speeds) == r.n_repeats and all(v > 0 for v in r.speeds)
    assert min(r.times_s) <= r.raw_median_s <= max(r.times_s)
    assert r.median_s == pytest.approx(statistics.median(t * v for t, v in zip(r.times_s, r.speeds)))
    assert r.machine_speed == pytest.approx(statistics.median(r.speeds))
    assert r.n_warmup >= 2 and r.first_call_s > 0
    assert r.backend.startswith("sdpa/")  # the kernel that ran is named
    # a fused kernel on one backend: none of the flags that say the wrong thing was timed
    assert not {"math-fallback", "eager-flex", "backend-changed", "compile-in-timing"} & set(r.flags)
    assert r.mem_kind == CPU_MEM_KIND and r.peak_mem_bytes > 0
    assert r.threads == 1 and r.fingerprint.threads == 1
    # SQA at d=64, H=8: 2 KV heads of 8 dims; K and V for 128 tokens in fp32
    assert r.kv_cache_bytes == 2 * 2 * 8 * 128 * 4
    assert r.predicted is False and r.from_cache is False
    assert isinstance(r.fingerprint, Fingerprint)
    for name in HARDWARE_FIELDS + ("dtype", "threads"):
        assert name in r.fingerprint.to_dict()
    assert r.fingerprint.device_type == "cpu" and r.fingerprint.torch_version == torch.__version__
    assert r.fingerprint_id == r.fingerprint.id
    # the shared shapes: the workload it ran and the latency it gives
    assert r.workload == W(128)
    lat = r.latency
    assert lat.kind == "measured-corrected" and lat.seconds == r.median_s and lat.spread_s == r.iqr_s
    assert lat.raw_seconds == r.raw_median_s and lat.peak_memory_bytes == r.peak_mem_bytes
    assert lat.where == r.fingerprint.label and lat.seq_len == 128

    data = json.loads(json.dumps(r.to_dict()))  # JSON-safe
    assert data["key"] == r.key
    assert data["spec"] == s.to_dict() and data["fingerprint"]["device_type"] == "cpu"  # the stored form
    back = TimingResult.from_dict(data)
    assert back == r and back.key == r.key
    assert back.spec == s


def test_threads_are_restored():
    before = torch.get_num_threads()
    time_spec(spec("xsqa"), W(64), use_cache=False, **FAST)
    assert torch.get_num_threads() == before


def test_fingerprint_id_ignores_dtype_and_threads_but_not_hardware():
    a = fingerprint("cpu", "float32", 1)
    b = fingerprint("cpu", "bfloat16", 2)
    assert a.dtype == "float32" and b.dtype == "bfloat16"
    assert a.id == b.id
    assert dataclasses.replace(a, cpu_model="another CPU").id != a.id
    assert dataclasses.replace(a, torch_version="0.0").id != a.id
    assert not any("host" in k for k in a.to_dict())  # no hostnames


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_each_mode_on_the_layer(mode):
    r = time_spec(spec("gqa"), W(128, mode=mode), use_cache=False, **FAST)
    assert r.status == "ok", r.error
    assert r.median_s > 0
    if mode == "decode":
        assert r.backend.startswith("decode/sdpa")
        assert r.kv_cache_tokens == 128
    else:
        assert r.backend.startswith("sdpa/")
        assert r.kv_cache_tokens is None


@pytest.mark.parametrize("what", ["block", "model"])
@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_block_and_model(what, mode):
    r = time_spec(spec("sqa"), W(64, mode=mode, scope=what, n_layers=2), use_cache=False, **FAST)
    assert r.status == "ok", r.error
    assert r.what == what
    assert r.n_layers == (2 if what == "model" else 1)
    assert r.kv_cache_bytes == (2 * 2 * 8 * 64 * 4) * r.n_layers  # K, V x 2 heads x 8 dims x 64 tokens x fp32
    if mode == "decode":
        assert r.kv_cache_tokens == 64


def test_decode_cache_holds_n_tokens_or_the_window():
    full = time_spec(spec("sqa"), W(160, mode="decode"), use_cache=False, **FAST)
    windowed = time_spec(spec("swsqa", window=32), W(160, mode="decode"), use_cache=False, **FAST)
    short = time_spec(spec("swsqa", window=32), W(20, mode="decode"), use_cache=False, **FAST)
    assert (full.kv_cache_tokens, windowed.kv_cache_tokens, short.kv_cache_tokens) == (160, 32, 20)
    # the record says how big the cache is: GQA/MQA shrink it, SQA's fewer query heads do not
    mha, mqa, sqa = (time_spec(spec(v), W(64, mode="decode"), use_cache=False, **FAST) for v in ("mha", "mqa", "sqa"))
    assert mqa.kv_cache_bytes < sqa.kv_cache_bytes < mha.kv_cache_bytes
    assert mqa.kv_cache_bytes * H == mha.kv_cache_bytes


def test_decode_of_a_bidirectional_spec_is_an_error_record(cache):
    r = time_spec(spec("sqa", causal=False), W(64, mode="decode"), cache_dir=cache, **FAST)
    assert r.status == "error"
    assert "causal" in r.error and "decode" in r.error
    assert r.median_s is None
    assert cached_timings(cache) == []  # errors are not cached


def test_cache_returns_the_stored_record_and_force_retimes(cache):
    s = spec("xsqa")
    first = time_spec(s, W(96), cache_dir=cache, **FAST)
    assert not first.from_cache
    path = cache / first.fingerprint_id / f"{first.key}.json"
    assert path.is_file()
    assert not list(path.parent.glob(".tmp-*"))  # atomic write left no temporary behind

    again = time_spec(s, W(96), cache_dir=cache, **FAST)
    assert again.from_cache
    assert again.times_s == first.times_s and again.timestamp == first.timestamp

    other = time_spec(s, W(96, mode="train"), cache_dir=cache, **FAST)  # another key
    assert not other.from_cache and other.key != first.key

    forced = time_spec(s, W(96), cache_dir=cache, force=True, **FAST)
    assert not forced.from_cache and forced.timestamp > first.timestamp
    assert forced.key == first.key
    assert time_spec(s, W(96), cache_dir=cache, **FAST).timestamp == forced.timestamp

    # a damaged file is timed again, not trusted
    path.write_text("{not json")
    assert not time_spec(s, W(96), cache_dir=cache, **FAST).from_cache


def test_no_cache_writes_no_timing_only_the_machine_reference(cache):
    r = time_spec(spec("mqa"), W(64), cache_dir=cache, use_cache=False, **FAST)
    assert r.status == "ok"
    assert cached_timings(cache) == []
    assert [p.name for p in cache.rglob("*.json")] == ["machine-reference-compute-t1.json"]  # the shared yardstick
    time_spec(spec("mqa"), W(64, mode="decode"), cache_dir=cache, use_cache=False, **FAST)
    assert sorted(p.name for p in cache.rglob("*.json")) == [
        "machine-reference-compute-t1.json", "machine-reference-dispatch-t1.json"]  # decode has its own probe


def test_uncorrected_timing_keeps_raw_figures_under_another_key(cache):
    s = spec("sqa")
    raw = time_spec(s, W(96), cache_dir=cache, speed_correction=False, **FAST)
    assert not raw.speed_corrected and raw.speeds == [] and raw.machine_speed is None
    assert raw.median_s == raw.raw_median_s == statistics.median(raw.times_s)
    corrected = time_spec(s, W(96), cache_dir=cache, **FAST)
    assert corrected.speed_corrected and not corrected.from_cache and corrected.key != raw.key
    with pytest.raises(TimingError, match="speed_correction='yes'"):
        time_spec(s, W(96), speed_correction="yes")


def test_cached_corrected_timing_is_retimed_when_the_reference_changes(cache):
    s = spec("xsqa")
    first = time_spec(s, W(96), cache_dir=cache, **FAST)
    assert time_spec(s, W(96), cache_dir=cache, **FAST).from_cache
    ref_path = cache / first.fingerprint_id / "machine-reference-compute-t1.json"
    data = json.loads(ref_path.read_text())
    data["probe_s"] *= 1.5  # as if re-measured: the stored figure is on another scale now
    ref_path.write_text(json.dumps(data))
    again = time_spec(s, W(96), cache_dir=cache, **FAST)
    assert not again.from_cache and again.reference_probe_s == pytest.approx(data["probe_s"])


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SQA_SEARCH_CACHE", raising=False)
    assert default_cache_dir().parts[-3:] == (".cache", "sqa_search", "timings")
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "timings"
    assert default_cache_dir(tmp_path / "mine") == tmp_path / "mine"  # the argument wins


def test_out_of_memory_is_a_record_and_the_caller_goes_on():
    # a real allocation failure: 16 PiB of input cannot be mapped on any machine
    r = time_spec(spec("sqa"), W(64, batch=2**40), use_cache=False, **FAST)
    assert r.status == "oom"
    assert "allocate" in r.error
    assert r.median_s is None and r.times_s == []
    ok = time_spec(spec("sqa"), W(64), use_cache=False, **FAST)
    assert ok.status == "ok"


def test_failure_inside_the_timed_call_is_an_error_record(cache):
    # compiled FlexAttention has no backward on CPU: a genuine failure of the timed train step
    # (head_dim 16: compiled flex refuses smaller heads before any timing)
    wide = AttentionSpec.variant("swsqa", 2 * D, H, window=32)
    r = time_spec(wide, W(128, mode="train"), backend="flex", cache_dir=cache, **FAST)
    assert r.status == "error"
    assert "NotImplementedError" in r.error and "backward" in r.error
    assert cached_timings(cache) == []


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_eager_flex_is_flagged():
    r = time_spec(spec("swsqa", window=32), W(128), backend="flex-eager", use_cache=False, **FAST)
    assert r.status == "ok"
    assert r.backend == "flex-eager" and "eager-flex" in r.flags


def test_windowed_spec_runs_the_blocked_path_and_a_math_fallback_is_flagged():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    r = time_spec(spec("swsqa", window=32), W(256), use_cache=False, **FAST)
    assert r.backend == "blocked/flash" and "math-fallback" not in r.flags
    with sdpa_kernel(SDPBackend.MATH):  # the same spec forced onto the N x N math kernel
        slow = time_spec(spec("swsqa", window=32), W(256), use_cache=False, **FAST)
    assert slow.backend == "blocked/math" and "math-fallback" in slow.flags


def test_sdpa_kernel_choice_is_asked_outside_the_timed_repeats(monkeypatch):
    """The layer's backend detection (torch._fused_sdp_choice) runs in the warm-up only: the
    number of questions does not grow with the timed repeats, and the named kernel is right."""
    from sqa_search.layer.attention import SparseQueryAttention

    asked = []
    real = torch._fused_sdp_choice

    def counting(*args, **kwargs):
        asked.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sdp_choice", counting)
    layer = SparseQueryAttention(spec("sqa"))
    with torch.inference_mode():
        layer(torch.randn(1, 64, D))
    per_call = len(asked)
    assert per_call >= 1
    asked.clear()
    r = time_spec(spec("sqa"), W(64, threads=1), use_cache=False, budget_s=0.0, min_repeats=20, max_repeats=20)
    assert r.n_repeats == 20 and r.backend == layer.last_backend
    assert len(asked) == per_call * r.n_warmup
    assert torch._fused_sdp_choice is counting  # put back afterwards


def test_bad_arguments_raise_before_timing():
    # the workload's own fields are checked where a Workload is made
    with pytest.raises(WorkloadError, match="mode='sideways'"):
        time_spec(spec(), W(64, mode="sideways"))
    with pytest.raises(WorkloadError, match="scope="):
        time_spec(spec(), W(64, scope="galaxy"))
    with pytest.raises(WorkloadError, match="seq_len=0"):
        time_spec(spec(), W(0))
    with pytest.raises(WorkloadError, match="dtype="):
        time_spec(spec(), W(64, dtype="float8"))
    with pytest.raises(TimingError, match="dtype="):  # a Workload dtype the harness cannot time
        time_spec(spec(), W(64, dtype="float64"))
    with pytest.raises(TimingError, match="workload="):
        time_spec(spec(), 64)
    with pytest.raises(TimingError, match="backend="):
        time_spec(spec(), W(64), backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(TimingError, match="CUDA is not available"):
            time_spec(spec(), W(64, device="cuda"))


def test_time_specs_grid_order_and_records(cache):
    specs = [spec("mha"), spec("xsqa")]
    out = time_specs(specs, [W(n, mode=m) for m in ("prefill", "decode") for n in (32, 64)], progress=True,
                     cache_dir=cache, **FAST)
    assert [(r.mode, r.seq_len, r.variant) for r in out] == [
        (m, n, v) for m in ("prefill", "decode") for n in (32, 64) for v in ("mha", "xsqa")
    ]
    assert all(r.status == "ok" for r in out)


@pytest.mark.slow
def test_fresh_process_gives_the_same_record_form(cache):
    s = spec("ssqa")
    r = time_spec_subprocess(s, W(64, mode="train"), cache_dir=cache, timeout_s=300, **FAST)
    assert isinstance(r, TimingResult)
    assert r.status == "ok", r.error
    assert r.median_s > 0 and r.backend.startswith("sdpa/") and not r.from_cache
    assert set(r.to_dict()) == set(time_spec(s, W(64), use_cache=False, **FAST).to_dict())
    # the child wrote the cache under the same key this process computes
    local = time_spec(s, W(64, mode="train"), cache_dir=cache, **FAST)
    assert local.from_cache and local.times_s == r.times_s and local.key == r.key
    # and a cached point starts no process
    assert time_spec_subprocess(s, W(64, mode="train"), cache_dir=cache, **FAST).from_cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_uses_events_and_the_allocator():
    r = time_spec(spec("sqa"), W(512, dtype="bfloat16", device="cuda", threads=None), use_cache=False, budget_s=0.2)
    assert r.status == "ok", r.error
    assert r.device.startswith("cuda") and r.mem_kind == CUDA_MEM_KIND and r.peak_mem_bytes > 0
    assert r.fingerprint.compute_capability and r.fingerprint.device_name
    assert r.backend.startswith("sdpa/")
    d = time_spec(spec("swsqa", window=64), W(512, mode="decode", dtype="bfloat16", device="cuda", threads=None), use_cache=False, budget_s=0.2)
    assert d.status == "ok" and d.kv_cache_tokens == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_leaves_out_what_was_allocated_before():
    kw = dict(use_cache=False, budget_s=0.05)
    w = W(1024, dtype="bfloat16", device="cuda", threads=None)
    alone = time_spec(spec("sqa"), w, **kw)
    ballast = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # 512 MiB held by "an earlier trial"
    with_ballast = time_spec(spec("sqa"), w, **kw)
    del ballast
    assert alone.ok and with_ballast.ok
    assert with_ballast.peak_mem_bytes < alone.peak_mem_bytes + 64 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_events_time_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    kw = dict(use_cache=False, budget_s=0.2)
    w = dict(seq_len=8192, mode="train", dtype="bfloat16", threads=None)
    on_0 = time_spec(AttentionSpec.variant("mha", 256, 16), W(device="cuda:0", **w), **kw)
    on_1 = time_spec(AttentionSpec.variant("mha", 256, 16), W(device="cuda:1", **w), **kw)
    assert on_0.ok and on_1.ok and on_1.device == "cuda:1"
    # an idle stream would time ~microseconds; the same work on a twin device takes about as long
    assert 0.5 < on_1.median_s / on_0.median_s < 2.0


def test_passes_pool_each_points_repeats_and_cache_the_pooled_record(cache):
    kw = dict(budget_s=0.02, max_repeats=6, min_repeats=4, cache_dir=cache)
    out = time_specs([spec("mha"), spec("xsqa")], W(64), passes=2, progress=False, **kw)
    for r in out:
        assert r.ok and r.passes == 2 and not r.from_cache
        assert r.n_repeats == len(r.times_s) == len(r.speeds) >= 4  # 2 per pass at least
        assert r.n_warmup >= 4  # each pass warmed up its own layer
        assert r.median_s == pytest.approx(statistics.median(t * v for t, v in zip(r.times_s, r.speeds)))
    again = time_specs([spec("mha"), spec("xsqa")], W(64), passes=2, progress=False, **kw)
    assert all(r.from_cache for r in again)
    assert [r.times_s for r in again] == [r.times_s for r in out]
    with pytest.raises(TimingError, match="passes=0"):
        time_specs([spec("mha")], W(64), passes=0, **kw)


def test_a_failed_pass_fails_the_point():
    from sqa_search.speed.timing import merge_passes

    ok = time_spec(spec("sqa"), W(64), use_cache=False, **FAST)
    failed = time_spec(spec("sqa", causal=False), W(64, mode="decode"), use_cache=False, **FAST)
    assert merge_passes([ok, failed]) is failed
    single = merge_passes([ok])
    assert single.median_s == ok.median_s and single.times_s == ok.times_s and single.passes == 1


def test_unstable_means_more_than_a_stray_outlier():
    from sqa_search.speed.measure import _unstable

    assert _unstable([1.0, 1.0, 10.0], 1.0)  # one in three
    assert not _unstable([1.0] * 99 + [10.0], 1.0)  # one interrupt in a hundred repeats
    assert _unstable([1.0] * 97 + [10.0] * 3, 1.0)
    assert not _unstable([1.0, 2.0, 4.9], 1.0)


def test_flex_that_would_run_eagerly_is_an_error_record_not_a_timing(cache):
    """Eager flex under the compiled label would time N x N scores as if they were the kernel:
    the layer refuses (FlexFallbackError), the timing becomes an error record (a study's trial
    then fails with this reason) and nothing is cached."""
    wide = AttentionSpec.variant("swsqa", 2 * D, H, window=32)  # head_dim 16: compiled flex allowed
    try:
        with torch._dynamo.config.patch(disable=True):
            r = time_spec(wide, W(128, mode="prefill"), backend="flex", cache_dir=cache, **FAST)
    finally:
        torch._dynamo.reset()  # as in test_attention: disabled dynamo leaves eager flex's wrapper skipped
    assert r.status == "error" and r.median_s is None
    assert "FlexFallbackError" in r.error and "eager" in r.error
    assert cached_timings(cache) == []


def test_a_cache_file_written_before_the_redesign_reads_back_under_its_key(tmp_path):
    """tests/fixtures/timing-record-v2.json was written by the previous version (spec and
    fingerprint as dicts): it loads, its key is the one it was stored under, and the cache finds it."""
    from pathlib import Path

    from sqa_search.speed import timing_cache

    data = json.loads((Path(__file__).parent / "fixtures" / "timing-record-v2.json").read_text())
    r = TimingResult.from_dict(data)
    assert r.key == data["key"] and r.fingerprint_id == r.fingerprint.id == data["fingerprint_id"]
    assert r.spec == AttentionSpec.from_dict(data["spec"]) and r.workload.mode == "decode"
    assert r.to_dict()["spec"] == data["spec"]
    path = tmp_path / r.fingerprint_id / f"{r.key}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**data, "speed_corrected": False}))  # no probe reference to check against
    assert timing_cache.load(path, TimingResult.from_dict({**data, "speed_corrected": False}).key).from_cache


def test_the_thread_clock_is_for_one_cpu_thread_and_keyed_apart(cache):
    with pytest.raises(TimingError, match="clock='thread'"):
        time_spec(spec(), W(64, threads=2), clock="thread")
    with pytest.raises(TimingError, match="clock='sundial'"):
        time_spec(spec(), W(64), clock="sundial")
    wall = time_spec(spec("mqa"), W(64), cache_dir=cache, **FAST)
    thread = time_spec(spec("mqa"), W(64), cache_dir=cache, clock="thread", **FAST)
    assert thread.ok and thread.clock == "thread" and thread.key != wall.key and not thread.from_cache


def test_thread_clock_calibration_then_wall_clock_timing_use_a_reference_each(tmp_path, monkeypatch):
    """Calibration times on this thread's CPU clock, bench and studies on the wall clock: each timing
    divides by the reference taken with its own clock, whichever ran first (issue 14)."""
    from sqa_search.speed import probe
    from sqa_search.speed.calibrate import calibrate_from_measurements
    from sqa_search.speed.probe import stored_reference

    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path))  # nothing measured yet: calibration goes first
    monkeypatch.setattr(probe, "_MEMO", {})
    configs = [{"variant": v, "d_model": D, "n_heads": H, "seq_len": 64, "batch": 1} for v in ("mha", "sqa")]
    _, report, records = calibrate_from_measurements("cpu-generic", configs=configs, modes=("prefill",), repeats=1,
                                                     passes=1, clock="thread")
    assert {r.clock for r in records} == {"thread"} and report.clocks == ["thread"]
    fp_id = records[0].fingerprint_id
    thread_ref = stored_reference(fingerprint_id=fp_id, cache_dir=default_cache_dir(), threads=1, clock="thread")
    assert thread_ref is not None and {r.reference_probe_s for r in records} == {thread_ref.probe_s}
    assert stored_reference(fingerprint_id=fp_id, cache_dir=default_cache_dir(), threads=1) is None  # no wall one yet

    r = time_spec(spec("sqa"), W(64), use_cache=False, **FAST)  # the wall clock, the harness's default
    wall_ref = stored_reference(fingerprint_id=r.fingerprint_id, cache_dir=default_cache_dir(), threads=1)
    assert r.clock == "wall" and wall_ref is not None and wall_ref.clock == "wall"
    assert r.reference_probe_s == wall_ref.probe_s and wall_ref.measured_at > thread_ref.measured_at
    # calibration keeps both figures of every point, and says which it fitted
    assert report.latency_kind == "measured-corrected"
    assert all(p["measured_raw_s"] > 0 and p["measured_corrected_s"] == p["measured_s"] and p["clock"] == "thread"
               for p in report.points)


def test_calibration_saves_the_raw_and_corrected_figures_beside_the_profile(tmp_path, monkeypatch):
    from sqa_search.speed.calibrate import calibrate_from_measurements
    from sqa_search.speed.hardware import load_profile, user_profile_dir

    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path))
    configs = [{"variant": "sqa", "d_model": D, "n_heads": H, "seq_len": 64, "batch": 1}]
    calibrated, _, records = calibrate_from_measurements("cpu-generic", configs=configs, modes=("prefill",),
                                                         repeats=1, passes=1, save=True)
    saved = load_profile("cpu-generic")
    assert saved.calibration["latency_kind"] == "measured-corrected" and saved.calibration["clock"] == "thread"
    stored = json.loads((user_profile_dir() / saved.calibration["timings_file"]).read_text())
    (point,) = stored["report"]["points"]
    assert point["measured_kind"] == "measured-corrected" and point["measured_raw_s"] == records[0].raw_median_s
    assert point["measured_corrected_s"] == records[0].median_s
    (record,) = stored["records"]
    assert record["times_s"] == records[0].times_s and record["speeds"] == records[0].speeds
    assert record["clock"] == "thread" and record["reference_probe_s"] == records[0].reference_probe_s
