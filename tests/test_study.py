"""Studies end to end on real storages (SQLite, journal file), real timings and real training,
with budgets small enough for a test."""

import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sqa_search.search.report import pareto_table, write_report
from sqa_search.search.engine import StudyError, finished_count, is_interrupted, open_study, run_study
from sqa_search.search.recovery import pid_alive
from study_helpers import space_file

TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa", "xsqa"]},
    "study": {"sampler": "random", "seed": 0, "trials": 6},
    "training": {"task": "lm", "budget_steps": 3, "batch_size": 2, "seq_len": 32, "eval_batches": 1},
}


def _space_file(tmp_path, name="tiny", **changes):
    return space_file(tmp_path, TINY, name, **changes)


def _complete_keys(study):
    """spec_key of every trial that was evaluated (not reused from a duplicate)."""
    return [t.user_attrs["spec_key"] for t in study.get_trials(states=(TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs]


@pytest.mark.slow
def test_study_runs_records_failures_reuses_duplicates_and_writes_report(tmp_path):
    path = _space_file(tmp_path, constraints={"kv_divides_q": True})
    handle = run_study(path, studies_dir=tmp_path / "studies", progress=False)
    study = handle.study
    assert finished_count(study) == 6
    # the named variants inside the space ran first, in order
    first = [t.user_attrs.get("label") for t in study.trials[:3]]
    assert first == ["MHA 4q/4kv", "SQA 2q/1kv", "xSQA 1q/1kv"]
    # invalid combinations (kv does not divide q) are PRUNED with their reason and infeasible,
    # which is what keeps TPE from proposing them again
    assert not study.get_trials(states=(TrialState.FAIL,))
    for t in study.get_trials(states=(TrialState.PRUNED,)):
        assert t.user_attrs["prune_reason"].startswith("invalid combination")
        assert t.constraints == {"valid_combination": 1.0}
    # a spec is evaluated once; repeats reuse its values
    keys = _complete_keys(study)
    assert len(keys) == len(set(keys))
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        if "duplicate_of" in t.user_attrs:
            assert t.values == study.trials[t.user_attrs["duplicate_of"]].values
    frame, front, hv = pareto_table(handle)
    assert not front.empty and hv > 0
    assert front.speedup_vs_mha.notna().all()
    write_report(handle)
    for name in ("results.csv", "results.parquet", "pareto.png", "pareto.html", "report.md"):
        assert (handle.directory / name).is_file(), name
    # the same command again: nothing more to do, nothing recomputed
    before = [(t.number, t.datetime_complete) for t in study.trials]
    again = run_study(path, studies_dir=tmp_path / "studies", progress=False)
    assert [(t.number, t.datetime_complete) for t in again.study.trials] == before
    # more trials extend it
    more = run_study(path, trials=8, studies_dir=tmp_path / "studies", progress=False)
    assert finished_count(more.study) == 8
    # and it stays a plain Optuna study
    assert optuna.load_study(study_name="tiny", storage=handle.storage_url).trials


def test_bad_arguments_fail_before_work(tmp_path):
    path = _space_file(tmp_path)
    with pytest.raises(StudyError, match="trials=0"):
        run_study(path, trials=0, studies_dir=tmp_path / "s", progress=False)
    with pytest.raises(StudyError, match="workers=0"):
        run_study(path, workers=0, studies_dir=tmp_path / "s", progress=False)
    with pytest.raises(StudyError, match="no study at"):
        open_study(tmp_path / "nowhere")


@pytest.mark.slow
def test_changed_space_is_not_mixed_into_an_existing_study(tmp_path):
    path = _space_file(tmp_path, study={"trials": 1})
    run_study(path, studies_dir=tmp_path / "studies", progress=False)
    changed = _space_file(tmp_path, target={"seq_len": 128}, study={"trials": 1})
    with pytest.raises(StudyError, match="different search space"):
        run_study(changed, studies_dir=tmp_path / "studies", progress=False)


def _finished(storage_url, name):
    if not Path(storage_url[len("sqlite:///"):]).exists():
        return 0
    try:
        return finished_count(optuna.load_study(study_name=name, storage=storage_url))
    except Exception:  # the study or its tables are still being created by the subprocess
        return 0


def _running(storage_url, name, number=None):
    """Whether trial `number` (any, if None) is inside its objective and began under 3 s ago: with
    trials of several seconds a signal sent now lands mid-trial, and a poll that itself takes
    a second on a loaded machine still sees it."""
    if not storage_url.startswith("sqlite:///") or not Path(storage_url[len("sqlite:///"):]).exists():
        return False
    try:
        study = optuna.load_study(study_name=name, storage=storage_url)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # still being created by the subprocess
        return False
    now = datetime.now()  # Optuna's clock: local, naive
    return any("spec_key" in t.user_attrs and (now - t.datetime_start).total_seconds() < 3.0
               and number in (None, t.number) for t in running)


@pytest.mark.slow
def test_killed_run_loses_nothing_and_reruns_the_interrupted_configuration_first(tmp_path):
    # issue 11.7: `--trials 3` killed during the second anchor, then the same command again, once
    # evaluated the third anchor and a random proposal, and never the interrupted anchor
    path = _space_file(tmp_path, name="killme", study={"trials": 3},
                       training={"budget_steps": 400})  # seconds a trial: long enough to be killed mid-trial
    studies = tmp_path / "studies"
    cmd = [sys.executable, "-m", "sqa_search.cli", "run", str(path), "--studies-dir", str(studies), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{(studies / 'killme' / 'study.db').resolve()}"
    deadline = time.time() + 240
    # kill in the second trial (an anchor), with the third anchor still waiting behind it
    while time.time() < deadline and proc.poll() is None and not _running(storage, "killme", number=1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="killme", storage=storage)
    done_before = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))}
    killed = study.get_trials(states=(TrialState.RUNNING,))
    assert done_before and len(killed) == 1, "the kill should have interrupted a trial"
    assert study.get_trials(states=(TrialState.WAITING,)), "an anchor should still be waiting behind it"

    handle = run_study(path, studies_dir=studies, progress=False)
    study = handle.study
    assert finished_count(study) == 3
    after = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == when for n, when in done_before.items())  # none lost, none recomputed
    interrupted = [t for t in study.get_trials(states=(TrialState.FAIL,)) if is_interrupted(t)]
    assert [t.number for t in interrupted] == [killed[0].number]
    assert interrupted[0].user_attrs["fail_reason"].startswith("interrupted (worker process")
    resumed = sorted((t for t in study.trials if t.number not in done_before and t.number != killed[0].number),
                     key=lambda t: t.datetime_start)
    rerun = resumed[0]  # the first trial the resumed run started
    assert rerun.user_attrs["retry_of"] == killed[0].number and rerun.params == killed[0].params
    assert rerun.state == TrialState.COMPLETE
    # every anchor evaluated exactly once; the interrupted trial took none of the budget of 3
    anchors = [t.user_attrs["anchor"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(anchors) == ["MHA 4q/4kv", "SQA 2q/1kv", "xSQA 1q/1kv"]
    assert not study.get_trials(states=(TrialState.RUNNING,)) and not study.get_trials(states=(TrialState.WAITING,))


@pytest.mark.slow
def test_two_workers_share_a_journal_without_losing_or_duplicating(tmp_path):
    path = _space_file(tmp_path, name="pair", study={"trials": 6, "sampler": "random"})
    handle = run_study(path, workers=2, studies_dir=tmp_path / "studies", progress=False)
    assert handle.storage_url.startswith("journal:")
    study = open_study(handle.directory).study
    assert 6 <= finished_count(study) <= 7  # each worker checks the count before a trial
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert not study.get_trials(states=(TrialState.RUNNING,))
    pids = {t.user_attrs["pid"] for t in study.trials if "pid" in t.user_attrs}
    assert len(pids) == 2, "both workers ran trials"
    # a spec both workers started at the same moment may run twice; with 6 trials over 9 specs
    # the enqueued anchors (claimed atomically) must never be duplicated
    anchors = [t for t in study.trials if "anchor" in t.user_attrs]
    assert len({t.user_attrs["anchor"] for t in anchors}) == len(anchors) == 3


@pytest.mark.slow
def test_constrained_mode_minimises_loss_under_a_latency_budget_and_prunes(tmp_path):
    # a budget no timing can meet prunes every candidate before training, with its reason
    path = _space_file(tmp_path, name="tight", constraints={"max_latency_s": 1e-9},
                       study={"mode": "constrained", "trials": 3})
    handle = run_study(path, studies_dir=tmp_path / "studies", progress=False)
    study = handle.study
    assert len(study.directions) == 1
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 3
    assert all("over" in t.user_attrs["prune_reason"] or "max_latency_s" in t.user_attrs["prune_reason"]
               for t in pruned)
    assert all("train" not in t.user_attrs for t in pruned)  # no training was spent on them
    # a generous budget: trials complete with one objective, the loss, and report their curves
    loose = _space_file(tmp_path, name="loose", constraints={"max_latency_s": 10.0},
                        study={"mode": "constrained", "trials": 3},
                        training={"budget_steps": 8, "eval_every": 2})
    handle = run_study(loose, studies_dir=tmp_path / "studies", progress=False)
    done = handle.study.get_trials(states=(TrialState.COMPLETE,))
    assert done and all(len(t.values) == 1 for t in done)
    assert all(t.intermediate_values for t in done)  # reported to the pruner
    frame, front, hv = pareto_table(handle)
    assert not front.empty


def test_a_killed_worker_not_yet_reaped_counts_as_dead():
    # a zombie answers kill(pid, 0); taking it for alive left its trial RUNNING until the parent
    # reaped it, and the study meanwhile spent the budget on other trials
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while pid_alive(child.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child.pid)
        assert child.poll() is not None  # reaped only now: it was a zombie while judged dead
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_ctrl_c_mid_trial_costs_no_configuration(tmp_path):
    path = _space_file(tmp_path, name="ctrlc", study={"trials": 3}, training={"budget_steps": 400})
    studies = tmp_path / "studies"
    cmd = [sys.executable, "-m", "sqa_search.cli", "run", str(path), "--studies-dir", str(studies), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{(studies / 'ctrlc' / 'study.db').resolve()}"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _running(storage, "ctrlc", number=1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt inside the objective
    assert proc.wait(timeout=60) != 0
    stopped = [t for t in open_study(studies / "ctrlc").study.trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in stopped] == ["interrupted (KeyboardInterrupt)"]

    study = run_study(path, studies_dir=studies, progress=False).study
    rerun = min((t for t in study.trials if t.number > stopped[0].number and t.datetime_start),
                key=lambda t: t.datetime_start)
    assert rerun.user_attrs["retry_of"] == stopped[0].number and rerun.state == TrialState.COMPLETE
    assert finished_count(study) == 3 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_a_trial_that_crashes_is_a_failure_with_its_reason_not_an_interruption(tmp_path, monkeypatch):
    """A bug inside a trial stops the run with its traceback, but the FAIL it leaves carries the
    error as its reason: a resume must not take it for an interruption and re-run it first forever."""
    from sqa_search.search import engine as study_module

    def crash(self, trial):
        raise RuntimeError("boom in the objective")

    path = _space_file(tmp_path, name="crash", study={"trials": 2})
    monkeypatch.setattr(study_module.TrialObjective, "_evaluate", crash)
    with pytest.raises(RuntimeError, match="boom"):
        run_study(path, studies_dir=tmp_path / "studies", progress=False)
    study = open_study(tmp_path / "studies" / "crash").study
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    assert failed[0].user_attrs["fail_reason"] == "error: RuntimeError: boom in the objective"
    assert not is_interrupted(failed[0])
    assert study_module.recover_interrupted(study, requeue_failed=True) == 0


@pytest.mark.slow
def test_explore_spends_no_trial_on_repeats_or_forbidden_configurations_and_stops_when_exhausted(tmp_path, capsys):
    """sampler: explore on a space of 6 valid candidates (kv must divide q) asked for 8 trials:
    every trial evaluates a new valid configuration, and the study ends cleanly at 6."""
    path = _space_file(tmp_path, name="explore", constraints={"kv_divides_q": True},
                       study={"sampler": "explore", "trials": 8})
    handle = run_study(path, studies_dir=tmp_path / "studies", progress=True)
    study = handle.study
    assert "the space is exhausted" in capsys.readouterr().out
    assert finished_count(study) == 6
    assert not study.get_trials(states=(TrialState.PRUNED, TrialState.FAIL))
    keys = _complete_keys(study)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert all("duplicate_of" not in t.user_attrs for t in study.trials)
    write_report(handle)
    assert "6 distinct configurations evaluated" in (handle.directory / "report.md").read_text()
    # the same command again does nothing more (and does not fail)
    again = run_study(path, studies_dir=tmp_path / "studies", progress=False)
    assert len(again.study.trials) == 6
