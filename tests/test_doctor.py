"""`sqa-search doctor`: it passes on this machine, and a wrong path makes it fail with exit 1."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from sqa_search.speed import doctor
from sqa_search.cli import main
from sqa_search.speed.doctor import DoctorError, run_doctor
from sqa_search.layer.reference import reference


def _path_rows(rows):
    return [r for r in rows if r.mode != "timing"]


@pytest.mark.slow
def test_doctor_passes_here_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    code = main(["doctor", "--device", "cpu", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["rows"]
    paths = [r for r in rows if r["mode"] != "timing"]
    assert paths and all(r["status"] == "PASS" for r in paths), [r for r in paths if r["status"] != "PASS"]
    # every path of the layer was taken, and the table names the kernel that ran
    ran = {r["backend"].split("/")[0] for r in paths}
    assert {"sdpa", "blocked", "sdpa-masked", "decode"} <= ran and any(b.startswith("flex") for b in ran)
    assert all(r["error"] <= r["tolerance"] for r in paths)
    timing = [r for r in rows if r["mode"] == "timing"]
    assert len(timing) == 1 and timing[0]["error"] >= 0
    # exit 1 exactly when a row failed (on a very busy machine that can be the timing spread)
    assert code == (1 if any(r["status"] == "FAIL" for r in rows) else 0)
    assert "sdpa/flash" in printed and report["summary"] in printed and "tol" in printed


def _off_by_one_window(layer, x):
    """The reference with a window one token wider than the layer's: what a mask bug looks like."""
    spec = layer.spec
    if spec.window is None:
        return reference(layer, x)
    wide = types.SimpleNamespace(**{name: getattr(layer, name) for name in
                                    ("q_proj", "k_proj", "v_proj", "o_proj", "global_tokens")},
                                 spec=dataclasses.replace(spec, window=spec.window + 1))
    return reference(wide, x)


def test_a_window_off_by_one_is_a_failure_with_exit_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(doctor, "_reference", _off_by_one_window)
    monkeypatch.setattr(doctor, "_spread_check", lambda *a, **k: doctor.Check("timing", "-", "float32", "timing"))
    rows = run_doctor("cpu", "float32", quick=True)
    windowed = [r for r in _path_rows(rows) if "W=" in r.spec]
    full = [r for r in _path_rows(rows) if "W=" not in r.spec]
    assert windowed and all(r.status == "FAIL" and "tolerance" in r.note for r in windowed)
    assert full and all(r.status == "PASS" for r in full)
    assert main(["doctor", "--device", "cpu", "--quick", "--dtype", "float32"]) == 1
    assert "doctor FAILED" in capsys.readouterr().out


def test_the_wrong_kernel_is_a_failure(monkeypatch):
    """A path that ran on another backend than the one asked for fails even if its numbers agree."""
    cases = doctor._cases("cpu")
    monkeypatch.setattr(doctor, "_cases", lambda device_type: [
        dataclasses.replace(c, expect="flex") if c.name == "sdpa rSQA" else c for c in cases])
    monkeypatch.setattr(doctor, "_spread_check", lambda *a, **k: doctor.Check("timing", "-", "float32", "timing"))
    rows = run_doctor("cpu", "float32", quick=True)
    bad = [r for r in rows if r.check == "sdpa rSQA"]
    assert bad and all(r.status == "FAIL" and "expected flex" in r.note for r in bad)


def test_bad_flags_fail_before_any_check():
    with pytest.raises(DoctorError, match="--dtype='float8' is not allowed"):
        run_doctor("cpu", "float8")
    with pytest.raises(DoctorError, match="--device"):
        run_doctor("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_doctor_passes_on_cuda(tmp_path):
    rows = run_doctor("cuda", quick=False)
    failed = [r for r in rows if r.status == "FAIL"]
    assert not failed, failed
    events = [r for r in rows if r.check.startswith("timing: CUDA events")]
    assert len(events) == 1 and events[0].status == "PASS"
