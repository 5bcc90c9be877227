"""Every place a speed figure reaches a reader says what it is: measured-corrected (a CPU timing
scaled to the machine's reference speed), measured-raw, or predicted (issue 14, point 4).

Real tiny studies, run and read through the commands a user runs: show (its printout, results.csv,
report.md, the front plot's axis), recommend (text and JSON) and export (README and config.json)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sqa_search.cli import main as cli_main
from sqa_search.layer.spec import AttentionSpec
from sqa_search.search.engine import run_study
from sqa_search.search.report import front_figure, pareto_table
from study_helpers import fake_study, space_file

TINY = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill", "timing_budget_s": 0.05, "threads": 1},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa", "xsqa"]},
    "constraints": {"kv_divides_q": True},
    "study": {"sampler": "random", "seed": 0, "trials": 3},
    "training": {"task": "lm", "budget_steps": 3, "batch_size": 2, "seq_len": 32, "eval_batches": 1},
}


def _cli(capsys, *args) -> str:
    assert cli_main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def _study(tmp_path, name, **changes):
    handle = run_study(space_file(tmp_path, TINY, name, **changes), studies_dir=tmp_path / "studies", progress=False)
    return handle, handle.directory


def _read_back(capsys, tmp_path, folder):
    """(show's printout, results.csv, report.md, recommend's text, its JSON, the export's README, config)."""
    shown = _cli(capsys, "show", folder)
    results = pd.read_csv(folder / "results.csv")
    report = (folder / "report.md").read_text()
    text = _cli(capsys, "recommend", "--study", folder, "--seq-len", "64", "--mode", "prefill")
    as_json = json.loads(_cli(capsys, "recommend", "--study", folder, "--seq-len", "64", "--mode", "prefill",
                              "--json"))
    out = tmp_path / f"export-{folder.name}"
    _cli(capsys, "export", "--study", folder, "--pick", "knee", "--out", out)
    return shown, results, report, text, as_json, (out / "README.md").read_text(), json.loads(
        (out / "config.json").read_text())


@pytest.mark.slow
def test_a_measured_cpu_study_says_its_latencies_are_speed_corrected(tmp_path, capsys):
    handle, folder = _study(tmp_path, "measured")
    shown, results, report, text, as_json, readme, config = _read_back(capsys, tmp_path, folder)
    done = results[results.state == "COMPLETE"]
    assert len(done) and set(done.latency_kind) == {"measured-corrected"}
    assert all(source.endswith(", speed-corrected") and source.startswith("measured on ")
               for source in done.latency_source)
    assert "measured-corrected" in shown  # the front's latency_kind column
    assert "measured-corrected" in report and "reference speed" in report
    assert "measured-corrected" in front_figure(handle, *pareto_table(handle)[:2]).axes[0].get_xlabel()

    assert "speed: MEASURED (speed-corrected)" in text and "speed:measured-corrected" in text
    assert "median of repeated timings, measured-corrected" in text  # the footnote
    assert as_json["speed_kind"] == "measured-corrected"
    assert {c["latency_kind"] for c in as_json["candidates"]} == {"measured-corrected"}
    assert all("speed-corrected" in c["latency_source"] for c in as_json["candidates"])

    assert "Latency figures are measured-corrected" in readme and ", speed-corrected |" in readme
    assert config["figures"]["latency_kind"] == "measured-corrected"
    assert config["figures"]["latency_source"].endswith(", speed-corrected")


@pytest.mark.slow
def test_a_predicted_study_says_predicted_everywhere(tmp_path, capsys):
    handle, folder = _study(tmp_path, "predicted", target={**TINY["target"], "hardware": "cpu-generic"})
    shown, results, report, text, as_json, readme, config = _read_back(capsys, tmp_path, folder)
    done = results[results.state == "COMPLETE"]
    assert len(done) and set(done.latency_kind) == {"predicted"}
    assert all(source.startswith("predicted for cpu-generic") for source in done.latency_source)
    assert "predicted" in shown and "measured-" not in shown
    assert "PREDICTED by the cost model: predicted" in report
    assert "predicted (cpu-generic)" in front_figure(handle, *pareto_table(handle)[:2]).axes[0].get_xlabel()

    assert "speed: PREDICTED by the cost model" in text and "speed:predicted" in text
    assert "MEASURED (" not in text and "speed:measured" not in text
    assert as_json["speed_kind"] == "predicted"
    assert {c["latency_kind"] for c in as_json["candidates"]} == {"predicted"}

    assert "Latency figures are predicted" in readme and "measured-" not in readme
    assert config["figures"]["latency_kind"] == "predicted"


def test_raw_timings_say_raw(tmp_path, capsys):
    """A study whose timings were not speed-corrected (a GPU's, or one stored without the
    correction) says raw, in recommend and export alike."""
    from sqa_search.speed.hardware import fingerprint

    fp = fingerprint("cpu").to_dict()  # this machine's, as a study stores it: recommend uses its timings
    name = fp["device_name"]
    rows = [(AttentionSpec.variant(v, 64, 8), loss, lat)
            for v, loss, lat in (("mha", 2.0, 0.004), ("gqa", 2.01, 0.0035), ("sqa", 2.02, 0.002))]
    folder = fake_study(tmp_path, rows, fp)
    text = _cli(capsys, "recommend", "--study", folder, "--seq-len", "128", "--mode", "prefill", "--device", "cpu")
    assert "speed: MEASURED (raw)" in text and "speed:measured-raw" in text
    assert "speed-corrected" not in text
    as_json = json.loads(_cli(capsys, "recommend", "--study", folder, "--seq-len", "128", "--mode", "prefill",
                              "--device", "cpu", "--json"))
    assert as_json["speed_kind"] == "measured-raw"
    assert all(c["latency_source"].startswith(f"measured on {name}, raw (") for c in as_json["candidates"])
    out = tmp_path / "export"
    _cli(capsys, "export", "--study", folder, "--pick", "knee", "--out", out)
    readme = (out / "README.md").read_text()
    assert "Latency figures are measured-raw" in readme and f"measured on {name}, raw |" in readme
    assert json.loads((out / "config.json").read_text())["figures"]["latency_kind"] == "measured-raw"


def test_a_latency_budget_says_which_seconds_it_was_held_to(tmp_path):
    """max_latency_s is compared with the study's latency figure: the prune reason says it was
    measured-corrected seconds (on a CPU), not the clock's raw ones."""
    handle, _ = _study(tmp_path, "budget", study={"sampler": "random", "seed": 0, "trials": 1, "mode": "constrained"},
                       constraints={"kv_divides_q": True, "max_latency_s": 1e-9})
    reasons = [t.user_attrs.get("prune_reason") or "" for t in handle.study.trials]
    over = [r for r in reasons if r.startswith("latency ")]
    assert over and all(", speed-corrected) > max_latency_s 1e-09 s" in r for r in over), reasons
