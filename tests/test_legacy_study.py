"""A study folder and an export written before the package was reorganised still open, through the
commands a user runs: show recomputes the same front, recommend and export read its trials, and
load_layer builds the exported layer. The fixture is tests/fixtures/legacy_v1 (see its README)."""

from __future__ import annotations

import json
import shutil
import sys
import subprocess
from pathlib import Path

import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_v1"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sqa_search.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def old_study(tmp_path):
    """The old folder copied elsewhere: its study.json still names the path it was made at."""
    folder = tmp_path / "studies" / "legacy_v1"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("export", "*.csv", "README.md", "tiny.yaml"))
    recorded = json.loads((folder / "study.json").read_text())["storage"]
    assert not Path(recorded.removeprefix("sqlite:///")).exists()  # the moved-folder case is exercised
    return folder


def test_show_recomputes_the_old_front(old_study, tmp_path):
    done = _cli("show", old_study, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    old_front = pd.read_csv(FIXTURE / "pareto.csv")
    new_front = pd.read_csv(old_study / "pareto.csv")
    assert list(new_front.trial) == list(old_front.trial)
    assert list(new_front.label) == list(old_front.label)
    assert new_front.quality.tolist() == pytest.approx(old_front.quality.tolist())
    assert new_front.latency_s.tolist() == pytest.approx(old_front.latency_s.tolist())
    old_rows = pd.read_csv(FIXTURE / "results.csv")
    new_rows = pd.read_csv(old_study / "results.csv")
    assert list(new_rows.label) == list(old_rows.label)
    assert list(new_rows.state) == list(old_rows.state)


def test_recommend_and_export_read_the_old_trials(old_study, tmp_path):
    done = _cli("recommend", "--study", old_study, "--seq-len", "64", "--mode", "prefill", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "legacy_v1" in done.stdout
    out = tmp_path / "export"
    done = _cli("export", "--study", old_study, "--pick", "knee", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    old = json.loads((FIXTURE / "export" / "config.json").read_text())
    assert config["spec"] == old["spec"] and config["source"]["trial"] == old["source"]["trial"]


def test_old_export_config_loads():
    import torch
    from sqa_search import load_layer

    layer = load_layer(FIXTURE / "export" / "config.json")
    assert (layer.spec.n_q_heads, layer.spec.n_kv_heads) == (1, 1)
    assert layer(torch.randn(1, 16, 32)).shape == (1, 16, 32)


def test_run_resumes_the_old_study(old_study, tmp_path):
    """The space it was made from has the same fingerprint today: `run` resumes it (nothing left to
    do at 6 trials, one more with --trials 7) instead of refusing a changed space."""
    import optuna

    shutil.copy(FIXTURE / "tiny.yaml", tmp_path / "tiny.yaml")
    done = _cli("run", "tiny.yaml", "--studies-dir", "studies", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    storage = f"sqlite:///{old_study / 'study.db'}"
    assert len(optuna.load_study(study_name="legacy_v1", storage=storage).trials) == 6
    done = _cli("run", "tiny.yaml", "--studies-dir", "studies", "--trials", "7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="legacy_v1", storage=storage).trials
    assert len(trials) == 7 and trials[-1].state.name in ("COMPLETE", "PRUNED")
