"""The Ray Tune backend on a real local Ray instance (2 CPUs), no mocks: a study the Optuna backend
started and Ray extends (one table, one form), a trial whose worker dies retried and then
recorded, and a killed driver resumed without losing or recomputing a finished trial."""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from sqa_search.search.ray_backend import RAY_ATTR, ray_result, run_ray_study, trial_resources
from sqa_search.search.report import pareto_table, write_report
from sqa_search.search.space import space_from_dict
from sqa_search.search.engine import StudyError, finished_count, open_study, run_study
from study_helpers import merged, space_file

TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa", "xsqa"]},
    "constraints": {"kv_divides_q": True},  # some proposals are pruned as invalid combinations
    # a wall-clock budget: every trial runs long enough to be killed in the middle
    "study": {"sampler": "random", "seed": 0, "trials": 6},
    "training": {"task": "lm", "budget_seconds": 1.0, "batch_size": 2, "seq_len": 32, "eval_batches": 1},
}
ANCHORS = {"MHA 4q/4kv", "SQA 2q/1kv", "xSQA 1q/1kv"}


def _space_file(tmp_path, name="tiny", **changes):
    return space_file(tmp_path, TINY, name, **changes)


def _space(**changes):
    return space_from_dict(merged(TINY, **changes), name="tiny")


# ----- quick: arguments are checked before Ray starts ---------------------------------------------
def test_timing_trials_get_whole_gpus_training_trials_may_share():
    gpu_timed = _space(target={"device": "cuda"})
    assert trial_resources(gpu_timed, 4, None).gpus == 1
    assert trial_resources(gpu_timed, 4, 2).gpus == 2
    with pytest.raises(StudyError, match=r"gpus_per_trial=0.5 .*whole GPUs"):
        trial_resources(gpu_timed, 1, 0.5)
    with pytest.raises(StudyError, match=r"gpus_per_trial=0 .*needs gpus_per_trial >= 1"):
        trial_resources(gpu_timed, 1, 0)
    with pytest.raises(StudyError, match="cuda:1"):
        trial_resources(_space(target={"device": "cuda:1"}), 1, 1)
    # device auto times on whatever GPU the trial is given: a fraction would share it
    with pytest.raises(StudyError, match="whole GPUs"):
        trial_resources(_space(), 1, 0.25)
    assert trial_resources(_space(), 1, None, cluster_gpus=0).gpus == 0
    assert trial_resources(_space(), 1, None, cluster_gpus=8).gpus == 1
    # latency predicted by a cost model, training on a GPU: trials may share one
    predicted = _space(target={"hardware": "a100-80gb"}, training={"device": "cuda"})
    assert trial_resources(predicted, 2, 0.25).gpus == 0.25
    assert trial_resources(predicted, 2, None).gpus == 1
    with pytest.raises(StudyError, match="training.device=cuda"):
        trial_resources(predicted, 2, 0)
    with pytest.raises(StudyError, match="cpus_per_trial=0"):
        trial_resources(_space(target={"device": "cpu"}), 0, 0)


def test_every_objective_is_reported_or_the_trial_raises():
    space = _space()
    record = {"state": "COMPLETE", "values": [3.2, 0.01], "params": {}, "user_attrs": {},
              "system_attrs": {"constraints:latency": -0.5}}
    result = ray_result(space, record)
    assert result["val_loss"] == 3.2 and result["latency_s"] == 0.01 and result["sqa_state"] == "COMPLETE"
    assert json.loads(result["sqa_constraints"]) == {"latency": -0.5}
    assert json.loads(result["sqa_record"]) == record
    with pytest.raises(RuntimeError, match="1 objective value"):
        ray_result(space, {**record, "values": [3.2]})
    with pytest.raises(RuntimeError, match=r"no finite value for objective\(s\) \['latency_s'\]"):
        ray_result(space, {**record, "values": [3.2, float("nan")]})
    with pytest.raises(RuntimeError, match="state RUNNING"):
        ray_result(space, {**record, "state": "RUNNING"})
    failed = ray_result(space, {**record, "state": "FAIL", "values": None})
    assert failed["sqa_state"] == "FAIL" and all(failed[n] != failed[n] for n in ("val_loss", "latency_s"))  # NaN


def test_bad_arguments_fail_before_ray_starts(tmp_path):
    path = _space_file(tmp_path)
    studies = tmp_path / "studies"
    for kwargs, message in (({"trials": 0}, "trials=0"), ({"max_retries": -1}, "max_retries=-1"),
                            ({"max_concurrent": 0}, "max_concurrent=0"),
                            ({"address": "ray://head:10001"}, "Ray Client"),
                            ({"gpus_per_trial": 0.5}, "whole GPUs")):
        with pytest.raises(StudyError, match=message):
            run_ray_study(path, studies_dir=studies, progress=False, **kwargs)
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StudyError, match="nothing answers there"):
        run_ray_study(path, studies_dir=studies, progress=False, address=f"127.0.0.1:{port}")
    assert not ray.is_initialized()


# ----- slow: real Ray --------------------------------------------------------------------------------
def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _is_descendant(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = _ppid(pid)
            if pid == ancestor:
                return True
    except OSError:
        pass
    return False


def _trial_workers() -> dict:
    """pid -> Ray trial id of the trial processes this test process started (Tune runs each trial
    in its working directory .../trial_<id>)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cmd.startswith("ray::ImplicitFunc") and Path(cwd).name.startswith("trial_") and _is_descendant(pid, os.getpid()):
            out[pid] = Path(cwd).name[len("trial_"):]
    return out


class KillOneTrialTwice(threading.Thread):
    """Kills the worker process of the first trial it sees running for half a second, then the process
    of that trial's retry: a worker that dies (out of memory, node lost) twice in a row."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.trial = None
        self.kills = []

    def run(self):
        seen = {}
        while not self.stop.is_set() and len(self.kills) < 2:
            now = time.time()
            for pid, trial in _trial_workers().items():
                if self.trial is not None and trial != self.trial:
                    continue
                if now - seen.setdefault((pid, trial), now) >= 0.5 and (pid, trial) not in self.kills:
                    os.kill(pid, signal.SIGKILL)
                    self.trial = trial
                    self.kills.append((pid, trial))
            time.sleep(0.1)


def _form(trial) -> tuple:
    """What a trial looks like to `show`, `recommend` and `export`: its state, whether it reuses
    an earlier result, and its user attribute names (without the backend-specific ones)."""
    keys = set(trial.user_attrs) - {"anchor", RAY_ATTR}
    return trial.state, "duplicate_of" in keys, frozenset(keys)


@pytest.mark.slow
def test_ray_extends_an_optuna_study_in_the_same_form_and_records_a_dead_worker(tmp_path):
    """The Optuna backend starts a study (the named variants first), Ray Tune extends it in the same
    storage; one trial's worker is killed, retried, killed again and recorded as failed."""
    path = _space_file(tmp_path)
    studies = tmp_path / "studies"
    by_optuna = {t.number for t in run_study(path, trials=4, studies_dir=studies, progress=False).study.trials}
    killer = KillOneTrialTwice()
    killer.start()
    try:
        handle = run_ray_study(path, trials=9, studies_dir=studies, num_cpus=2, max_concurrent=2, max_retries=1,
                               progress=False)
    finally:
        killer.stop.set()
    assert not ray.is_initialized(), "the local Ray instance is shut down"
    study = handle.study
    assert finished_count(study) == len(study.trials) == 9
    optuna_trials = [t for t in study.trials if t.number in by_optuna]
    ray_trials = [t for t in study.trials if t.number not in by_optuna]
    assert len(ray_trials) == 5 and all(RAY_ATTR in t.user_attrs for t in ray_trials)
    assert not any(RAY_ATTR in t.user_attrs for t in optuna_trials)
    # the named variants ran once, first, on the Optuna backend: Ray did not run them again
    assert sorted(t.user_attrs.get("anchor") for t in optuna_trials[:3]) == sorted(ANCHORS)
    assert not any("anchor" in t.user_attrs for t in ray_trials)
    for t in ray_trials:
        if t.user_attrs.get("label") in ANCHORS and t.state == TrialState.COMPLETE:
            assert study.trials[t.user_attrs["duplicate_of"]].user_attrs["label"] == t.user_attrs["label"]

    # the trial whose worker died twice was retried once, then recorded as failed with the reason
    assert len(killer.kills) == 2 and killer.kills[0][1] == killer.kills[1][1]
    errored = [t for t in ray_trials if t.user_attrs[RAY_ATTR]["trial_id"] == killer.trial]
    assert len(errored) == 1 and errored[0].state == TrialState.FAIL
    assert errored[0].user_attrs["fail_reason"].startswith("ray trial failed 2 time(s) (max_retries=1): ")
    assert "died" in errored[0].user_attrs["fail_reason"].lower()
    assert errored[0].user_attrs[RAY_ATTR]["failures"] == 2
    assert errored[0].user_attrs["label"]  # the spec is known even though its worker never reported

    # every other Ray trial carries its worker's identity and hardware fingerprint
    ran = [t for t in ray_trials if t.number != errored[0].number]
    ids = [t.user_attrs[RAY_ATTR]["trial_id"] for t in ray_trials]
    assert len(ids) == len(set(ids))
    for t in ran:
        info = t.user_attrs[RAY_ATTR]
        assert info["experiment"] == "run-001" and info["node_ip"] and info["node_id"] and info["failures"] == 0
        assert info["fingerprint"]["device_type"] == "cpu" and len(info["fingerprint_id"]) == 12
        if t.state != TrialState.COMPLETE:
            assert t.state == TrialState.PRUNED and t.constraints == {"valid_combination": 1.0}
            assert t.user_attrs["prune_reason"].startswith("invalid combination")
            continue
        assert t.values == [t.user_attrs["quality"], t.user_attrs["latency_s"]]
        if "duplicate_of" in t.user_attrs:  # reused, as the Optuna backend reuses repeats
            assert t.values == study.trials[t.user_attrs["duplicate_of"]].values
            continue
        assert t.user_attrs["fingerprint"]["cpu_model"] == info["fingerprint"]["cpu_model"]
        assert {r["fingerprint_id"] for r in t.user_attrs["timing"]} == {info["fingerprint_id"]}
        assert t.duration.total_seconds() >= 1.0  # start and end on the worker's clock
    assert any(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in ran)

    # one table: the trials of both backends have the same form, apart from `ray`
    forms = {}
    for t in optuna_trials + ran:
        forms.setdefault(_form(t)[:2], set()).add(_form(t)[2])
    assert all(len(keys) == 1 for keys in forms.values()), forms
    for a in ran:
        b = next((b for b in optuna_trials if b.state == a.state), None)
        if b is not None:
            assert a.distributions == b.distributions and set(a.params) == set(b.params)
            assert set(a.system_attrs) <= set(b.system_attrs)  # no sampler bookkeeping of Ray's searcher

    # show / report work on it, and it stays a plain Optuna study
    write_report(handle)  # what `sqa-search run` does after the study
    frame, front, hv = pareto_table(open_study(handle.directory))
    assert len(frame) == 9 and not front.empty and hv > 0
    assert front.speedup_vs_mha.notna().all()
    for name in ("results.csv", "results.parquet", "pareto.png", "report.md"):
        assert (handle.directory / name).is_file(), name
    assert "ray trial failed" in (handle.directory / "report.md").read_text()
    from sqa_search.cli.show import run as show

    assert show(argparse.Namespace(study=str(handle.directory), out=str(tmp_path / "shown"), all=True)) == 0
    assert optuna.load_study(study_name="tiny", storage=handle.storage_url).trials

    # the same command again: the study is complete, Ray is not even started, nothing changes
    before = [(t.number, t.datetime_complete) for t in study.trials]
    again = run_ray_study(path, trials=9, studies_dir=studies, num_cpus=2, progress=False)
    assert [(t.number, t.datetime_complete) for t in again.study.trials] == before
    assert not ray.is_initialized()


def _session_processes(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[4]) == sid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _stored_count(db: Path) -> int:
    """Finished trials in the study database, read-only: opening it with Optuna while the driver
    creates it would race on creating the schema."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_ray_explores_only_unevaluated_valid_configurations_and_stops_when_exhausted(tmp_path):
    """sampler: explore through OptunaSearch: every Ray trial is a new valid configuration (the
    space has 6, kv must divide q), and asking for 8 ends cleanly at 6, no error."""
    path = _space_file(tmp_path, name="explore", study={"sampler": "explore", "trials": 8})
    handle = run_ray_study(path, studies_dir=tmp_path / "studies", num_cpus=2, max_concurrent=2, progress=False)
    assert not ray.is_initialized()
    study = handle.study
    assert finished_count(study) == len(study.trials) == 6
    assert all(t.state == TrialState.COMPLETE and RAY_ATTR in t.user_attrs for t in study.trials)
    keys = [t.user_attrs["spec_key"] for t in study.trials]
    assert len(set(keys)) == 6
    assert not any("duplicate_of" in t.user_attrs for t in study.trials)


@pytest.mark.slow
def test_killed_ray_study_resumes_without_losing_or_recomputing_finished_trials(tmp_path):
    path = _space_file(tmp_path, name="killme", study={"trials": 5})
    studies = tmp_path / "studies"
    code = (f"from sqa_search.search.ray_backend import run_ray_study; run_ray_study({str(path)!r}, "
            f"studies_dir={str(studies)!r}, num_cpus=2, max_concurrent=2, progress=False)")
    # Tune snapshots its experiment state at the start and then only every 600 s: the kill lands
    # long after the last snapshot, the hardest case for losing or recomputing nothing
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="600")
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    db = studies / "killme" / "study.db"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and _stored_count(db) < 2 and proc.poll() is None:
            time.sleep(0.2)
    finally:  # the driver and the Ray processes it started (its session), by pid
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _session_processes(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    before = {t.number: t for t in optuna.load_study(study_name="killme", storage=f"sqlite:///{db.resolve()}").trials}
    assert 2 <= len(before) < 5, f"killed after two trials were stored, before the end:\n{log.read_text()[-3000:]}"
    experiments = json.loads((studies / "killme" / "ray" / "experiments.json").read_text())["experiments"]
    assert experiments[-1]["finished"] is False

    handle = run_ray_study(path, studies_dir=studies, num_cpus=2, max_concurrent=2, progress=False)
    study = handle.study
    assert finished_count(study) == len(study.trials) == 5  # nothing lost, nothing run twice
    after = {t.number: t for t in study.trials}
    for number, t in before.items():  # finished trials are kept exactly as they were
        same = after[number]
        assert (same.state, same.values, same.params, same.datetime_complete) == \
               (t.state, t.values, t.params, t.datetime_complete)
        assert same.user_attrs == t.user_attrs
    ids = [t.user_attrs[RAY_ATTR]["trial_id"] for t in study.trials]
    assert len(ids) == len(set(ids)), "no Ray trial was written twice"
    assert sorted(t.user_attrs["anchor"] for t in study.trials if "anchor" in t.user_attrs) == sorted(ANCHORS)
    experiments = json.loads((studies / "killme" / "ray" / "experiments.json").read_text())["experiments"]
    assert experiments[0]["name"] == "run-001" and experiments[0]["restored"] == 1
    assert all(e["finished"] for e in experiments)
    # Tune re-ran the trials its stale snapshot had as running; the stored ones were re-reported
    # from the study, not recomputed
    results = list((studies / "killme" / "ray" / "run-001").glob("trial_*/result.json"))
    assert any('"sqa_record": "recorded"' in p.read_text() for p in results)
    assert not ray.is_initialized()


def test_a_failure_is_summarised_in_one_line():
    from sqa_search.search.ray_backend import _error_summary

    died = ("Failure # 1 (occurred at 2026-01-01_00-00-00)\nThe actor died unexpectedly before finishing this task.\n"
            "\tclass_name: ImplicitFunc\nThe actor is dead because its worker process has died. Worker exit type: "
            "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file.\n")
    raised = ("Failure # 2 (occurred at 2026-01-01_00-00-09)\nray::ImplicitFunc.train() (pid=1, ip=10.0.0.1)\n"
              "  File \"x.py\", line 3, in f\n    raise MemoryError()\ntorch.OutOfMemoryError: CUDA out of memory\n")
    assert _error_summary(died) == ("The actor died unexpectedly before finishing this task. "
                                    "(Worker unexpectedly exits with a connection error code 2.)")
    assert _error_summary(died + raised) == "torch.OutOfMemoryError: CUDA out of memory"
    assert _error_summary(None) == "no error text was kept"
