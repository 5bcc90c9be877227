"""The README's dashboard line works: `optuna-dashboard sqlite:///studies/NAME/study.db` serves a
study made the way sqa-search makes one (Optuna 5, two objectives, user attributes, a pruned
infeasible trial), lists it, reads its trials and Pareto front, and its page in a real browser
(headless Chromium) shows the study."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest

from sqa_search.search.pareto import non_dominated_mask
from sqa_search.layer.spec import AttentionSpec
from study_helpers import fake_study

D, H = 64, 8
ROWS = [(AttentionSpec.variant(v, D, H), loss, latency) for v, loss, latency in
        [("mha", 2.000, 0.010), ("gqa", 2.010, 0.009), ("mqa", 2.030, 0.0085), ("sqa", 2.015, 0.006),
         ("xsqa", 2.060, 0.004)]]
NAME = "dashboard-check"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_S = 60  # the dashboard starts in a few seconds; a busy 2-core machine may take longer


def _dashboard_command() -> str:
    # the console script beside this interpreter, as `pip install optuna-dashboard` puts it there
    here = Path(sys.executable).with_name("optuna-dashboard")
    found = str(here) if here.exists() else shutil.which("optuna-dashboard")
    if found is None:
        pytest.skip("optuna-dashboard is not installed (pip install optuna-dashboard; it is in the test extra)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _add_rejected_trial(storage: str) -> None:
    """A proposal the space's rules exclude, recorded as study.py's _reject records it."""
    study = optuna.load_study(study_name=NAME, storage=storage)
    trial = study.ask()
    trial.set_user_attr("prune_reason", "invalid combination: 1 query head with 4 KV heads")
    trial.set_constraint("valid_combination", 1.0)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)


@pytest.fixture
def dashboard(tmp_path):
    """(base URL, process) of optuna-dashboard serving a sqa-search study on 127.0.0.1."""
    command = _dashboard_command()
    fingerprint = {"device_type": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "threads": 1}
    folder = fake_study(tmp_path, ROWS, fingerprint, name=NAME, d_model=D, n_heads=H)
    storage = json.loads((folder / "study.json").read_text())["storage"]
    _add_rejected_trial(storage)
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "w+")
    process = subprocess.Popen([command, storage, "--host", "127.0.0.1", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"optuna-dashboard exited with {process.returncode}:\n{log.read()[-3000:]}")
            try:
                _get(f"{base}/api/studies")
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"optuna-dashboard did not answer within {START_S} s:\n{log.read()[-3000:]}")
                time.sleep(0.3)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_dashboard_lists_the_study_and_reads_its_trials(dashboard):
    base, _ = dashboard
    studies = _get(f"{base}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [NAME]
    assert studies[0]["directions"] == ["minimize", "minimize"]

    detail = _get(f"{base}/api/studies/{studies[0]['study_id']}")
    states = [t["state"] for t in detail["trials"]]
    assert states == ["Complete"] * len(ROWS) + ["Pruned"]
    labels = {a["value"] for t in detail["trials"] for a in t["user_attrs"] if a["key"] == "label"}
    assert labels == {spec.label for spec, _, _ in ROWS}
    # the dashboard's Pareto front is the project's (MQA is off it: SQA is faster and better)
    on_front = non_dominated_mask(np.array([[loss, latency] for _, loss, latency in ROWS]))
    best = {next(a["value"] for a in t["user_attrs"] if a["key"] == "label") for t in detail["best_trials"]}
    assert best == {spec.label for (spec, _, _), keep in zip(ROWS, on_front) if keep}
    assert "MQA 8q/1kv" not in best and len(best) == 4



@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser on PATH (Debian: apt-get install chromium)")
def test_dashboard_page_lists_the_study_in_a_browser(dashboard, tmp_path):
    base, _ = dashboard
    done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,800",
                           "--virtual-time-budget=15000", "--dump-dom", f"{base}/dashboard"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # the page's script fetched the study list from the server and drew a card for the study
    assert re.search(rf"<h5[^>]*>\d+\. {NAME}</h5>", done.stdout), done.stdout[-3000:]
