"""The one latency source: measured here or predicted for a profile, in one shape."""

from __future__ import annotations

import pytest

from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.hardware import CostError
from sqa_search.speed.record import TimingResult
from sqa_search.speed.source import latency_source
from sqa_search.speed.workload import Workload


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "cache"))


SPECS = [AttentionSpec.variant("mha", 64, 8), AttentionSpec.variant("xsqa", 64, 8)]


def test_a_profile_predicts_and_says_so():
    source = latency_source("h100")  # aliases resolve
    assert not source.measured and source.hardware == "h100-sxm"
    assert source.describe().startswith("predicted for h100-sxm (uncalibrated")
    w = Workload(mode="prefill", seq_len=4096, dtype="bfloat16")
    lat = source.latency(SPECS[0], w)
    assert lat.kind == "predicted" and lat.seconds > 0 and lat.seq_len == 4096 and lat.backend.startswith("model:")
    records = source.records(SPECS, [w, w.at(8192)])
    assert [(r.seq_len, r.variant) for r in records] == [(4096, "mha"), (4096, "xsqa"), (8192, "mha"), (8192, "xsqa")]
    assert all(isinstance(r, TimingResult) and r.predicted and r.ok for r in records)
    assert records[1].median_s < records[0].median_s  # fewer query heads, less predicted prefill time
    assert records[0].latency == lat


def test_a_bad_shape_is_an_error_record_not_an_exception():
    source = latency_source("cpu-generic")
    bidirectional = AttentionSpec.variant("sqa", 64, 8, causal=False)
    (rec,) = source.records([bidirectional], [Workload(mode="decode", seq_len=64)])
    assert rec.status == "error" and "causal" in rec.error


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(CostError, match="h100-sxm"):
        latency_source("abacus")


def test_local_measures_with_the_timing_harness():
    source = latency_source("local", budget_s=0.02, max_repeats=4, use_cache=False)
    assert source.measured and source.describe().startswith("measured on this machine")
    assert "speed-corrected on a CPU" in source.describe()
    assert latency_source("local", speed_correction=False).describe().endswith(", raw)")
    w = Workload(mode="prefill", seq_len=64, threads=1)
    lat = source.latency(SPECS[1], w)
    assert lat.measured and lat.kind == "measured-corrected" and lat.seconds > 0
    assert lat.raw_seconds > 0 and lat.spread_s >= 0 and lat.peak_memory_bytes > 0
    (rec,) = source.records([SPECS[0]], [w], progress=False)
    assert rec.ok and not rec.predicted and rec.fingerprint is not None and rec.workload == w
