"""The bench command end to end on tiny shapes; predicted figures; option checks before any work."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from sqa_search.cli import bench as cli_bench
from sqa_search.cli import main as cli_main
from sqa_search.speed import bench
from sqa_search._figures import text_outside
from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.record import TimingResult

TINY = ["--d-model", "64", "--heads", "8", "--threads", "1", "--budget-s", "0.02", "--max-repeats", "4",
        "--no-progress"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_bench(argv):
    """`sqa-search bench ARGV` (parsing, work and printing, as a user runs it)."""
    return cli_main(["bench", *argv])


def parsed(argv):
    parser = argparse.ArgumentParser()
    cli_bench.add_arguments(parser)
    return parser.parse_args(argv)


def only(pattern, folder):
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_bench_measures_and_writes_csv_jsonl_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--seq-lens", "64,128", "--variants", "mha,gqa,sqa,swsqa", "--window", "32",
                   "--mode", "both", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    rc = run_bench(argv)
    assert rc == 0
    text = capsys.readouterr().out
    assert "MEASURED on cpu" in text and "PREDICTED" not in text
    assert "forward (prefill)" in text and "forward+backward (train)" in text
    assert "vs the same heads with full attention" in text  # swsqa against sqa
    assert "corrected to this machine's reference speed" in text  # the CPU speed correction is said
    assert "torch " in text and "): measured-corrected" in text and "s/step (measured-corrected)" in text

    rows = read_csv(only("*.csv", out))
    assert len(rows) == 2 * 2 * 4  # modes x N x variants
    assert {r["source"] for r in rows} == {"measured"}
    assert {r["latency_kind"] for r in rows} == {"measured-corrected"} and {r["clock"] for r in rows} == {"wall"}
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["mode"] for r in rows} == {"prefill", "train"}
    seconds = {(r["mode"], r["seq_len"], r["variant"]): float(r["seconds"]) for r in rows}
    for r in rows:
        assert float(r["seconds"]) > 0 and r["backend"] and r["fingerprint_id"]
        assert r["speed_corrected"] == "True" and float(r["raw_seconds"]) > 0 and float(r["machine_speed"]) > 0
        for base in ("mha", "gqa"):  # the baseline's seconds at the same mode and N over this row's
            expected = seconds[(r["mode"], r["seq_len"], base)] / float(r["seconds"])
            assert float(r[f"speedup_vs_{base}"]) == pytest.approx(expected, abs=1e-4), (base, r)
    sw = [r for r in rows if r["variant"] == "swsqa" and r["seq_len"] == "128"]
    assert all(r["window"] == "32" and r["backend"].startswith("blocked/") for r in sw)

    png = only("*.png", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    records = [TimingResult.from_dict(json.loads(line)) for line in only("*.jsonl", out).read_text().splitlines()]
    assert len(records) == len(rows)
    # the plot of these records, with the measured title (device, threads, passes, speed correction)
    args = parsed(argv)
    fig = bench.plot_figure(records, args, bench.make_plan(args))
    assert "MEASURED on cpu" in fig.get_suptitle() and "pooled from" in fig.get_suptitle()
    assert text_outside(fig) == []


def test_bench_decode_reports_the_kv_cache(tmp_path, capsys):
    rc = run_bench(TINY + ["--seq-lens", "96", "--variants", "mha,mqa,swsqa", "--window", "32", "--mode", "decode",
                            "--out", str(tmp_path), "--no-cache"])
    assert rc == 0
    assert "KV cache" in capsys.readouterr().out
    rows = {r["variant"]: r for r in read_csv(only("*.csv", tmp_path))}
    assert rows["mha"]["kv_cache_tokens"] == "96" and rows["swsqa"]["kv_cache_tokens"] == "32"
    assert int(rows["mqa"]["kv_cache_bytes"]) * 8 == int(rows["mha"]["kv_cache_bytes"])


def test_cli_wires_the_bench(tmp_path, capsys):
    from sqa_search import cli

    rc = cli.main(["bench"] + TINY + ["--seq-lens", "32", "--variants", "mha,4/2", "--no-cache"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MEASURED" in text and "SQA 4q/2kv" in text

    rc = cli.main(["bench"] + TINY + ["--seq-lens", "32", "--variants", "mha", "--no-cache", "--no-speed-correction",
                                      "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "corrected to this machine" not in text and "s/step (measured-raw)" in text
    (row,) = read_csv(only("*.csv", tmp_path))
    assert row["speed_corrected"] == "False" and row["seconds"] == row["raw_seconds"]
    assert row["latency_kind"] == "measured-raw"


def test_hardware_profile_prints_predicted_figures(tmp_path, capsys):
    rc = run_bench(["--hardware", "h100-sxm", "--seq-lens", "1k,4k", "--mode", "both", "--out", str(tmp_path),
                     "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PREDICTED (profile h100-sxm, calibration:" in text and "not measured" in text
    assert "MEASURED" not in text
    rows = read_csv(only("*.csv", tmp_path))
    assert len(rows) == 2 * 2 * 8
    assert {r["source"] for r in rows} == {"predicted"} and {r["latency_kind"] for r in rows} == {"predicted"}
    assert "s/step (predicted)" in text and {r["clock"] for r in rows} == {""}
    assert {r["profile"] for r in rows} == {"h100-sxm"}
    assert all(r["calibration"] for r in rows)
    assert {r["dtype"] for r in rows} == {"bfloat16"}  # a GPU profile defaults to bf16
    assert "predicted-h100-sxm" in only("*.png", tmp_path).name
    by = {(r["mode"], r["seq_len"], r["variant"]): float(r["seconds"]) for r in rows}
    # fewer query heads, less predicted time
    assert by[("prefill", "4096", "xsqa")] < by[("prefill", "4096", "sqa")] < by[("prefill", "4096", "mha")]


def test_plot_fits_its_title(tmp_path):
    """The default one-panel plot: its two-line PREDICTED title was wider than the figure."""
    args = parsed(["--hardware", "a100-80gb", "--what", "model", "--seq-lens", "1k,4k", "--no-progress"])
    plan = bench.make_plan(args)
    fig = bench.plot_figure(bench.bench_records(args, plan), args, plan)
    title = " ".join(fig.get_suptitle().split())
    assert title == " ".join(bench.title(args, plan, [], None).split())  # wrapped, every word kept
    assert title.startswith("PREDICTED (profile a100-80gb") and "not measured" in title
    assert text_outside(fig) == []
    bench.write_plot(tmp_path / "plot.png", bench.bench_records(args, plan), args, plan)
    assert (tmp_path / "plot.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--variants", "mha,bogus"], ["--variants", "'bogus'", "mha, gqa", "q/kv"]),
        (["--variants", "20/4"], ["--variants", "'20/4'", "n_q_heads"]),
        (["--variants", "8/x"], ["--variants", "'8/x'", "q/kv/W"]),
        (["--seq-lens", "1024,12x"], ["--seq-lens", "'12x'"]),
        (["--seq-lens", "0"], ["--seq-lens", "'0'", ">= 1"]),
        (["--hardware", "abacus"], ["--hardware", "'abacus'", "h100-sxm", "cpu-generic"]),
        (["--mode", "decode", "--bidirectional"], ["--mode decode", "causal"]),
        (["--heads", "7"], ["--heads", "7", "--d-model 256"]),
        (["--dtype", "float8"], ["--dtype", "'float8'", "bfloat16"]),
        (["--batch", "0"], ["--batch", "0", ">= 1"]),
        (["--budget-s", "-1"], ["--budget-s", "-1"]),
    ],
)
def test_bad_options_fail_before_any_work(argv, needles, tmp_path, capsys):
    out = tmp_path / "never"
    rc = run_bench(argv + ["--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_parse_variants_names_and_heads():
    specs = bench.parse_variants("sqa,8/2,8/4/64,SW-SQA", d_model=256, n_heads=16, window=128, causal=True)
    assert [(s.n_q_heads, s.n_kv_heads, s.window) for s in specs] == [(8, 4, None), (8, 2, None), (8, 4, 64), (8, 4, 128)]
    assert specs[0] == AttentionSpec.variant("sqa", 256, 16)
    enc = bench.parse_variants("xsqa", d_model=256, n_heads=16, window=128, causal=False)
    assert enc[0].causal is False
    assert bench.parse_variants("mha,mha", d_model=64, n_heads=8, window=32, causal=True) == [
        AttentionSpec.variant("mha", 64, 8)
    ]


def test_parse_seq_lens():
    assert bench.parse_seq_lens("4096, 1k,4k") == [1024, 4096]
    with pytest.raises(bench.BenchError, match="--seq-lens"):
        bench.parse_seq_lens(" , ")


def test_variants_take_global_tokens_as_a_fourth_field():
    from sqa_search.speed.bench import parse_variants

    (spec,) = parse_variants("8/4/128/16", d_model=256, n_heads=16, window=64, causal=True)
    assert (spec.n_q_heads, spec.n_kv_heads, spec.window, spec.n_global) == (8, 4, 128, 16)
