"""sqa_search.speed.workload: what is timed or predicted (`Workload`) and the one shape of a
latency (`Latency`), checked field by field and through their dict forms."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sqa_search.errors import UserError
from sqa_search.speed.workload import (
    DEVICES,
    LATENCY_KINDS,
    MODES,
    SCOPES,
    Latency,
    Workload,
    WorkloadError,
)


# ----- Workload --------------------------------------------------------------------------------
def test_defaults():
    w = Workload(mode="prefill", seq_len=1024)
    assert (w.batch, w.scope, w.dtype, w.device, w.n_layers, w.d_ff, w.threads) == (
        1, "layer", "float32", "cpu", 1, None, None)
    assert w.dtype_bytes == 4


def test_every_allowed_value_is_accepted():
    for mode in MODES:
        for scope in SCOPES:
            assert Workload(mode=mode, seq_len=8, scope=scope).scope == scope
    for device in (*DEVICES, "cuda:0", "cuda:3"):
        assert Workload(mode="train", seq_len=8, device=device).device == device
    for dtype, size in (("float32", 4), ("float16", 2), ("bfloat16", 2), ("float64", 8)):
        assert Workload(mode="train", seq_len=8, dtype=dtype).dtype_bytes == size
    full = Workload(mode="decode", seq_len=1, batch=1, n_layers=1, d_ff=1, threads=1)
    assert (full.d_ff, full.threads) == (1, 1)


# (field, a bad value, words of what is allowed that the message must carry)
BAD_FIELDS = [
    ("mode", "infer", "one of train, prefill, decode"),
    ("mode", None, "one of train, prefill, decode"),
    ("scope", "block2", "one of layer, block, model"),
    ("dtype", "int8", "one of float32, float16, bfloat16, float64"),
    ("device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("device", 0, "auto, cpu, cuda or cuda:N"),
    ("seq_len", 0, "an integer >= 1"),
    ("seq_len", 8.0, "an integer >= 1"),
    ("seq_len", True, "an integer >= 1"),
    ("batch", 0, "an integer >= 1"),
    ("batch", "4", "an integer >= 1"),
    ("n_layers", -1, "an integer >= 1"),
    ("n_layers", False, "an integer >= 1"),
    ("d_ff", 0, "an integer >= 1, or null for 4 x d_model"),
    ("d_ff", 2.5, "an integer >= 1, or null for 4 x d_model"),
    ("d_ff", True, "an integer >= 1, or null for 4 x d_model"),
    ("threads", 0, "an integer >= 1, or null for all of torch's threads"),
    ("threads", True, "an integer >= 1, or null for all of torch's threads"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_names_the_field_the_value_and_what_is_allowed(field, value, allowed):
    kwargs = {"mode": "train", "seq_len": 64, field: value}
    with pytest.raises(WorkloadError) as info:
        Workload(**kwargs)
    assert str(info.value) == f"{field}={value!r} is not allowed: {allowed}"
    assert isinstance(info.value, UserError)  # the CLI prints it as one line and exits 2


def test_every_field_is_validated():
    """Each field of Workload has a bad value above, so a new field needs a check and a test."""
    assert {f.name for f in dataclasses.fields(Workload)} == {f for f, _, _ in BAD_FIELDS}


def test_workload_is_frozen_and_hashable():
    w = Workload(mode="train", seq_len=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.seq_len = 128
    assert len({w, Workload(mode="train", seq_len=64)}) == 1


def test_at_changes_only_the_sequence_length():
    w = Workload(mode="decode", seq_len=1024, batch=4, scope="model", dtype="bfloat16", device="cuda:1",
                 n_layers=8, d_ff=512, threads=2)
    longer = w.at(4096)
    assert longer.seq_len == 4096 and w.seq_len == 1024  # a new workload; the old one is unchanged
    assert dataclasses.replace(longer, seq_len=1024) == w
    with pytest.raises(WorkloadError, match=r"seq_len=0 is not allowed"):
        w.at(0)  # the new one is validated too


def test_to_dict_from_dict_round_trip():
    w = Workload(mode="train", seq_len=256, batch=2, scope="block", dtype="float16", device="auto",
                 n_layers=3, d_ff=1024, threads=4)
    d = w.to_dict()
    assert d == {"mode": "train", "seq_len": 256, "batch": 2, "scope": "block", "dtype": "float16",
                 "device": "auto", "n_layers": 3, "d_ff": 1024, "threads": 4}
    assert Workload.from_dict(json.loads(json.dumps(d))) == w


def test_from_dict_reads_the_old_what_spelling():
    old = {"mode": "prefill", "seq_len": 512, "what": "model", "batch": 1}
    assert Workload.from_dict(old).scope == "model"
    assert old == {"mode": "prefill", "seq_len": 512, "what": "model", "batch": 1}  # the caller's dict untouched
    # when both are there, scope wins
    assert Workload.from_dict({"mode": "prefill", "seq_len": 512, "what": "model", "scope": "block"}).scope == "block"


def test_from_dict_ignores_unknown_keys_and_still_validates():
    w = Workload.from_dict({"mode": "decode", "seq_len": 32, "median_s": 0.1, "fingerprint": "abc"})
    assert w == Workload(mode="decode", seq_len=32)
    with pytest.raises(WorkloadError, match=r"scope='everything' is not allowed"):
        Workload.from_dict({"mode": "decode", "seq_len": 32, "what": "everything"})


# ----- Latency ---------------------------------------------------------------------------------
def test_latency_kinds():
    assert LATENCY_KINDS == ("measured-raw", "measured-corrected", "predicted")
    for kind in LATENCY_KINDS:
        lat = Latency(seconds=0.01, kind=kind, where="here", seq_len=128)
        assert lat.measured == (kind != "predicted")
    with pytest.raises(WorkloadError) as info:
        Latency(seconds=0.01, kind="measured", where="here", seq_len=128)
    assert str(info.value) == ("kind='measured' is not allowed: one of measured-raw, measured-corrected, "
                               "predicted")


def test_latency_label_says_what_the_figure_is():
    assert Latency(0.01, "measured-raw", "cpu-1a2b3c", 128).label == "measured on cpu-1a2b3c, raw"
    assert (Latency(0.01, "measured-corrected", "cpu-1a2b3c", 128).label
            == "measured on cpu-1a2b3c, speed-corrected")
    assert Latency(0.01, "predicted", "h100-sxm (calibrated)", 128).label == "predicted for h100-sxm (calibrated)"


def test_latency_round_trip():
    lat = Latency(seconds=0.0123, kind="measured-corrected", where="cpu-1a2b3c", seq_len=2048, spread_s=0.0004,
                  raw_seconds=0.0131, backend="sdpa/flash", peak_memory_bytes=12_345_678,
                  flags=("unstable", "machine-busy"))
    d = lat.to_dict()
    assert d["flags"] == ["unstable", "machine-busy"]  # a list, as JSON writes it
    back = Latency.from_dict(json.loads(json.dumps(d)))
    assert back == lat and isinstance(back.flags, tuple)


def test_latency_from_dict_defaults_and_unknown_keys():
    lat = Latency.from_dict({"seconds": 0.5, "kind": "predicted", "where": "a100", "seq_len": 64, "extra": 1})
    assert lat == Latency(0.5, "predicted", "a100", 64)
    assert (lat.spread_s, lat.raw_seconds, lat.backend, lat.peak_memory_bytes, lat.flags) == (None, None, None,
                                                                                               None, ())
    assert Latency.from_dict({**lat.to_dict(), "flags": None}).flags == ()
