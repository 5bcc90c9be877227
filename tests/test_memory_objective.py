"""Peak memory as a study objective (`objectives.memory: true`), end to end: measured by the timing
on this machine or predicted by the cost model for a profile, stored with each trial, and shown by
show (front and trials table), recommend (its table and JSON) and export (config and README)."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import yaml

from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.cost import peak_memory, predict
from sqa_search.speed.hardware import load_profile
from sqa_search.speed.workload import Workload

TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa", "xsqa"]},
    "objectives": {"memory": True},
    "study": {"sampler": "random", "seed": 0, "trials": 3},
    "training": {"task": "lm", "budget_steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1},
}


def _cli(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "sqa_search.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prediction_counts_what_grows_with_heads_and_length():
    mha, sqa = AttentionSpec.variant("mha", 256, 16), AttentionSpec.variant("sqa", 256, 16)
    w = Workload("prefill", 4096)
    assert peak_memory(sqa, w) < peak_memory(mha, w)  # fewer heads, fewer activations
    assert peak_memory(mha, w.at(8192)) > 1.9 * peak_memory(mha, w)  # linear in N on a flash path
    assert peak_memory(mha, Workload("train", 4096)) > peak_memory(mha, w)  # saved activations + grads
    # decode: the KV cache dominates, so it shrinks with the KV heads and not the query heads
    decode = Workload("decode", 8192)
    xsmqa, xsqa = AttentionSpec.variant("xsmqa", 256, 16), AttentionSpec.variant("xsqa", 256, 16)
    assert peak_memory(xsmqa, decode) < peak_memory(xsqa, decode)
    pred = predict(mha, load_profile("h100"), w)
    assert pred.peak_memory_bytes == peak_memory(mha, w, path=pred.path)
    assert pred.latency.peak_memory_bytes == pred.peak_memory_bytes


@pytest.mark.slow
@pytest.mark.parametrize("hardware", ["local", "h100"])
def test_memory_objective_end_to_end(tmp_path, hardware):
    data = {**TINY, "name": f"mem_{hardware}", "target": {**TINY["target"], "hardware": hardware}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data))
    _cli("run", "space.yaml", "--studies-dir", "studies", cwd=tmp_path)
    folder = tmp_path / "studies" / f"mem_{hardware}"

    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name=data["name"], storage=storage)
    assert [d.name for d in study.directions] == ["MINIMIZE"] * 3
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    for t in done:
        peak = t.values[2]
        stored = max(row["peak_mem_bytes"] for row in t.user_attrs["timing"])
        assert peak == stored and peak > 0
        if hardware == "h100":  # predicted: exactly the cost model's figure at the study's workload
            spec = AttentionSpec.from_dict(t.user_attrs["spec"])
            workload = Workload("prefill", 64, dtype="bfloat16")  # a CUDA target defaults to bfloat16
            assert peak == predict(spec, load_profile("h100"), workload).peak_memory_bytes

    rows = pd.read_csv(folder / "results.csv")
    assert rows.peak_memory_bytes.notna().sum() == 3
    text = (folder / "report.md").read_text()
    assert "peak_memory_bytes" in text

    args = ("recommend", "--study", folder, "--hardware", hardware, "--seq-len", "64", "--mode", "prefill")
    assert "peak_memory_bytes" in _cli(*args, cwd=tmp_path)
    assert "peak_memory_bytes" in json.dumps(json.loads(_cli(*args, "--json", cwd=tmp_path)))

    _cli("export", "--study", folder, "--pick", "knee", "--out", tmp_path / "exp", cwd=tmp_path)
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert "peak_memory_bytes" in json.dumps(config)
    assert "peak_memory_bytes" in (tmp_path / "exp" / "README.md").read_text()
