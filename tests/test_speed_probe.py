"""The machine-speed probe: the stored reference and how repeats are corrected."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from sqa_search.speed import probe as speed_probe
from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.probe import SpeedProbe, corrected_times, machine_reference, stored_reference
from sqa_search.speed.job import build_job
from sqa_search.speed.measure import measure


@pytest.fixture(scope="module")
def probe():
    return SpeedProbe()


def test_probe_times_a_real_kernel(probe):
    times = [probe() for _ in range(3)]
    assert all(0 < t < 5 for t in times)


def test_decode_gets_the_dispatch_probe_with_its_own_reference(tmp_path, monkeypatch):
    from sqa_search.speed.probe import probe_kind

    monkeypatch.setattr(speed_probe, "_MEMO", {})
    assert probe_kind("decode") == "dispatch" and probe_kind("prefill") == probe_kind("train") == "compute"
    dispatch = SpeedProbe("dispatch")
    assert 0 < dispatch() < 5
    ref = machine_reference(dispatch, fingerprint_id="d", cache_dir=tmp_path, seconds=0.05)
    assert ref.kind == "dispatch" and ref.path.endswith(f"machine-reference-dispatch-t{ref.threads}.json")
    assert stored_reference(fingerprint_id="d", cache_dir=tmp_path, threads=ref.threads, kind="compute") is None
    with pytest.raises(ValueError, match="kind='gpu'"):
        SpeedProbe("gpu")


def test_reference_is_measured_once_then_read_back(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    ref = machine_reference(probe, fingerprint_id="abc", cache_dir=tmp_path, seconds=0.05)
    assert ref.probe_s > 0 and ref.n_probes >= 5 and ref.threads == torch.get_num_threads()
    assert ref.path == str(tmp_path / "abc" / f"machine-reference-compute-t{ref.threads}.json")
    stored = json.loads((tmp_path / "abc" / f"machine-reference-compute-t{ref.threads}.json").read_text())
    assert stored["probe_s"] == ref.probe_s

    monkeypatch.setattr(speed_probe, "_MEMO", {})  # a later process: reads the file, measures nothing
    again = machine_reference(probe, fingerprint_id="abc", cache_dir=tmp_path, seconds=0.05)
    assert again.probe_s == ref.probe_s and again.measured_at == ref.measured_at
    assert stored_reference(fingerprint_id="abc", cache_dir=tmp_path, threads=ref.threads) == again

    fresh = machine_reference(probe, fingerprint_id="abc", cache_dir=tmp_path, seconds=0.05, remeasure=True)
    assert fresh.measured_at > ref.measured_at
    assert stored_reference(fingerprint_id="abc", cache_dir=tmp_path, threads=ref.threads).measured_at == fresh.measured_at


def test_one_process_shares_its_reference_between_cache_dirs(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    a = machine_reference(probe, fingerprint_id="m", cache_dir=tmp_path / "a", seconds=0.05)
    b = machine_reference(probe, fingerprint_id="m", cache_dir=tmp_path / "b", seconds=0.05)
    assert b.probe_s == a.probe_s and b.measured_at == a.measured_at
    assert (tmp_path / "b" / "m" / f"machine-reference-compute-t{a.threads}.json").is_file()


def test_a_stale_or_damaged_reference_is_measured_again(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    path = tmp_path / "x" / f"machine-reference-compute-t{torch.get_num_threads()}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"probe_s": 1.0, "threads": 1, "fingerprint_id": "x", "kind": "compute", "measured_at": 0.0,
                                "n_probes": 9, "probe_version": speed_probe.PROBE_VERSION - 1}))
    assert stored_reference(fingerprint_id="x", cache_dir=tmp_path, threads=torch.get_num_threads()) is None
    ref = machine_reference(probe, fingerprint_id="x", cache_dir=tmp_path, seconds=0.05)
    assert ref.probe_s < 1.0 and ref.probe_version == speed_probe.PROBE_VERSION
    path.write_text("{damaged")
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    assert machine_reference(probe, fingerprint_id="x", cache_dir=tmp_path, seconds=0.05).measured_at > 0


def test_unwritable_cache_dir_still_gives_a_reference(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ref = machine_reference(probe, fingerprint_id="y", cache_dir=blocker, seconds=0.05)
    assert ref.probe_s > 0 and ref.path is None


def test_corrected_times_scale_each_repeat_by_its_speed():
    assert corrected_times([1.0, 2.0, 4.0], [1.0, 0.5, 0.25]) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="3 times but 2 speeds"):
        corrected_times([1.0, 2.0, 3.0], [1.0, 1.0])


class ScriptedProbe:
    """The machine's speed as a script (probe seconds in order), so the arithmetic can be checked."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.values.pop(0) if self.values else 1.0


def test_each_repeat_gets_the_mean_speed_of_the_probes_around_it(monkeypatch):
    import sqa_search.speed.measure as measuring

    monkeypatch.setattr(measuring, "PROBE_INTERVAL_S", 0.0)  # probe after every repeat
    spec = AttentionSpec.variant("sqa", 64, 8)
    job = build_job(spec, what="layer", mode="prefill", batch=1, seq_len=64, n_layers=1, d_ff=None,
                     backend="auto", device=torch.device("cpu"), dtype=torch.float32, seed=0)
    # probes: before the first repeat, then after each: 1.0, 2.0, 2.0, 4.0 s
    probe = ScriptedProbe([1.0, 2.0, 2.0, 4.0])
    out = measure(job, torch.device("cpu"), budget_s=0.0, max_repeats=3, min_repeats=3, warmup_max=4,
                  flush_l2=False, probe=probe, reference=1.0)
    assert probe.calls == 4
    assert out["speeds"] == pytest.approx([1 / 1.5, 1 / 2.0, 1 / 3.0])
    assert out["median_s"] == pytest.approx(statistics.median(corrected_times(out["times_s"], out["speeds"])))
    assert out["raw_median_s"] == pytest.approx(statistics.median(out["times_s"]))
    assert out["machine_speed"] == pytest.approx(0.5)
    assert "machine-busy" in out["flags"]  # corrected by 2x: above the 1.5x line


def test_repeats_between_two_probes_share_their_speed(monkeypatch):
    import sqa_search.speed.measure as measuring

    monkeypatch.setattr(measuring, "PROBE_INTERVAL_S", 60.0)  # no probe between repeats
    spec = AttentionSpec.variant("sqa", 64, 8)
    job = build_job(spec, what="layer", mode="prefill", batch=1, seq_len=64, n_layers=1, d_ff=None,
                     backend="auto", device=torch.device("cpu"), dtype=torch.float32, seed=0)
    probe = ScriptedProbe([1.0, 3.0])  # one probe before, one after
    out = measure(job, torch.device("cpu"), budget_s=0.0, max_repeats=4, min_repeats=4, warmup_max=4,
                  flush_l2=False, probe=probe, reference=2.0)
    assert probe.calls == 2
    assert out["speeds"] == pytest.approx([1.0] * 4)
    assert "machine-busy" not in out["flags"]


def test_a_reference_belongs_to_its_clock(tmp_path, monkeypatch):
    """The wall clock and this thread's CPU time have a reference each, in files of their own, and a
    reference taken with one clock is never read for the other (issue 14: calibration's thread-clock
    reference once landed in the file wall-clock timings read)."""
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    wall = machine_reference(SpeedProbe(), fingerprint_id="c", cache_dir=tmp_path, seconds=0.05)
    thread = machine_reference(SpeedProbe(clock="thread"), fingerprint_id="c", cache_dir=tmp_path, seconds=0.05)
    assert (wall.clock, thread.clock) == ("wall", "thread")
    assert wall.path.endswith(f"machine-reference-compute-t{wall.threads}.json")  # the name it always had
    assert thread.path.endswith(f"machine-reference-compute-t{thread.threads}-thread.json")
    assert thread.measured_at != wall.measured_at  # measured again, not borrowed from the other clock
    for ref in (wall, thread):
        assert json.loads(open(ref.path).read())["clock"] == ref.clock
        assert stored_reference(fingerprint_id="c", cache_dir=tmp_path, threads=ref.threads, clock=ref.clock) == ref

    # a thread-clock figure in the wall clock's file (what the bug wrote) is not read as wall-clock
    wall_path = tmp_path / "c" / f"machine-reference-compute-t{wall.threads}.json"
    wall_path.write_text(json.dumps({**json.loads(open(thread.path).read()), "probe_s": 1e-9}))
    assert stored_reference(fingerprint_id="c", cache_dir=tmp_path, threads=wall.threads) is None
    # nor is a file from before the clock was stored: which clock it holds is unknown
    legacy = {k: v for k, v in json.loads(open(thread.path).read()).items() if k != "clock"}
    wall_path.write_text(json.dumps({**legacy, "probe_s": 1e-9}))
    assert stored_reference(fingerprint_id="c", cache_dir=tmp_path, threads=wall.threads) is None
    monkeypatch.setattr(speed_probe, "_MEMO", {})
    again = machine_reference(SpeedProbe(), fingerprint_id="c", cache_dir=tmp_path, seconds=0.05)
    assert again.clock == "wall" and again.probe_s > 1e-6 and again.measured_at > wall.measured_at
    with pytest.raises(ValueError, match="clock='cpu'"):
        SpeedProbe(clock="cpu")
