"""The report's plots: pareto.png and hypervolume.png fit their text; pareto.html carries plotly.js
itself (no network needed) and draws the front in the front's colour. The page in a real browser
is tested in test_browser.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from sqa_search._figures import text_outside
from sqa_search.search.report import (FRONT_COLOUR, front_columns, front_figure, hypervolume_figure, pareto_table,
                                      write_report)
from sqa_search.layer.spec import AttentionSpec
from sqa_search.search.engine import open_study
from study_helpers import fake_study

D, H = 64, 8
ROWS = [(AttentionSpec.variant(v, D, H), loss, latency) for v, loss, latency in
        [("mha", 2.000, 0.010), ("gqa", 2.010, 0.009), ("mqa", 2.030, 0.0085), ("sqa", 2.015, 0.006),
         ("ssqa", 2.018, 0.0062), ("xsqa", 2.060, 0.004), ("xsmqa", 2.090, 0.0038)]]
LONG_NAME = "-".join(["a-study-of-every-head-configuration"] * 4)  # 143 characters: the title must wrap


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    fingerprint = {"device_type": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "threads": 1}
    return open_study(fake_study(tmp_path_factory.mktemp("report"), ROWS, fingerprint, name=LONG_NAME,
                                 d_model=D, n_heads=H))


def test_pareto_and_hypervolume_plots_fit_their_text(study):
    frame, front, _ = pareto_table(study)
    fig = front_figure(study, frame, front)
    title = fig.axes[0].get_title()
    assert "\n" in title and title.split("\n")[0].startswith("a-study-of")
    assert text_outside(fig) == []
    labels = {t.get_text() for t in fig.axes[0].texts}  # every named variant is annotated
    assert labels == {spec.label for spec, _, _ in ROWS}
    assert text_outside(hypervolume_figure(study, frame)) == []


def test_pareto_html_needs_no_network_and_draws_the_front_in_its_colour(study, tmp_path):
    written = write_report(study, tmp_path)
    page = (tmp_path / "pareto.html").read_text()
    assert tmp_path / "pareto.html" in written["plots"]
    assert not re.search(r"<script[^>]+src=", page)  # nothing to fetch: no CDN, no file beside it
    assert re.search(r"plotly\.js v\d+\.\d+", page) and len(page) > 3_000_000  # the library itself is inside
    traces = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", page, re.S).group(1))
    front = next(t for t in traces if t["name"] == "Pareto front")
    assert front["line"]["color"] == front["marker"]["color"] == FRONT_COLOUR
    assert set(front["text"]) == {"xSMQA 2q/1kv", "xSQA 2q/2kv", "SQA 4q/2kv", "GQA 8q/2kv", "MHA 8q/8kv"}

    # pareto.png draws the front in the same colour
    import matplotlib.image

    rgb = matplotlib.image.imread(tmp_path / "pareto.png")[..., :3]
    target = np.array([int(FRONT_COLOUR[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    assert (np.abs(rgb - target) <= 6 / 255).all(axis=-1).sum() > 300


# ----- noise: the quickstart, with 4 seeds where there are SEs and a 1.7 ms timing IQR -----------
IQR = 1.7e-3


def _noisy(loss, se, latency, seq_len=128):
    seeds = [loss] if se is None else [loss - 1.5 * se, loss - 0.5 * se, loss + 0.5 * se, loss + 1.5 * se]
    return {"quality_se": se, "quality_values": seeds,
            "timing": [{"seq_len": seq_len, "median_s": latency, "iqr_s": IQR, "raw_median_s": latency,
                        "backend": "sdpa/flash", "flags": [], "fingerprint_id": "f00d"}]}


NOISY = [(AttentionSpec.variant(v, D, H), loss, latency, _noisy(loss, se, latency)) for v, loss, se, latency in
         [("mha", 2.300, 0.010, 0.0600),     # on the exact front; GQA is faster beyond noise, its loss within noise
          ("gqa", 2.305, 0.005, 0.0550),
          ("sqa", 2.330, 0.005, 0.04774),
          ("ssqa", 2.370, 0.005, 0.04770),   # 0.04 ms faster than SQA, its loss worse beyond noise
          ("mqa", 2.336, 0.005, 0.0479),     # behind SQA, within noise in both: not on the exact front
          ("xsqa", 2.500, None, 0.0300)]]    # one seed: no SE


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    fingerprint = {"device_type": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "threads": 1}
    return open_study(fake_study(tmp_path_factory.mktemp("noisy"), NOISY, fingerprint, name="noisy",
                                 d_model=D, n_heads=H))


def test_the_front_table_carries_the_noise_and_names_the_groups(noisy, tmp_path):
    frame, front, _ = pareto_table(noisy)
    assert list(front.label) == ["xSQA 2q/2kv", "sSQA 4q/4kv", "SQA 4q/2kv", "GQA 8q/2kv", "MHA 8q/8kv"]
    by = front.set_index("label")
    assert not by.loc["sSQA 4q/4kv", "beyond_noise"] and by.loc["sSQA 4q/4kv", "beaten_by"] == "SQA 4q/2kv"
    assert not by.loc["MHA 8q/8kv", "beyond_noise"] and by.loc["MHA 8q/8kv", "beaten_by"] == "GQA 8q/2kv"
    assert by.beyond_noise.sum() == 3
    near = front.attrs["near_front"]
    assert near == [{"label": "MQA 8q/1kv", "group": by.loc["SQA 4q/2kv", "group"]}]
    assert by.group.tolist() == ["A", "B", "C", "D", "E"]
    assert frame.set_index("label").latency_iqr_s.dropna().tolist() == pytest.approx([IQR] * 6)

    shown = front_columns(front, noisy.space).set_index("label")
    assert shown.loc["SQA 4q/2kv", "quality (± noise)"] == "2.3300 ± 0.005 (SE, 4 seeds)"
    # one seed: the study's pooled seed sd stands in, labelled so (sd of the 4-seed values: 0.0082)
    assert shown.loc["xSQA 2q/2kv", "quality (± noise)"] == "2.5000 ± 0.0082 (pooled sd, 1 seed)"
    assert shown.loc["SQA 4q/2kv", "latency (IQR)"] == "47.740 ms, IQR 1.700 ms"
    assert shown.loc["sSQA 4q/4kv", "beyond noise"] == "no: SQA 4q/2kv beats it"

    write_report(noisy, tmp_path)
    stored = pd.read_csv(tmp_path / "pareto.csv")
    assert {"quality_se", "quality_n", "latency_iqr_s", "group", "beyond_noise", "beaten_by"} <= set(stored.columns)
    assert stored.quality.tolist() == pytest.approx(front.quality.tolist())  # numbers, not text
    report = (tmp_path / "report.md").read_text()
    for needle in ("Of the exact front's 5 points, 2 are separated beyond noise",
                   "sSQA 4q/4kv is on the exact front only by differences within noise: SQA 4q/2kv beats it",
                   "MHA 8q/8kv is on the exact front only by differences within noise: GQA 8q/2kv beats it",
                   "Group C cannot be told apart: SQA 4q/2kv, MQA 8q/1kv",
                   "Within noise of the front, though not on it: MQA 8q/1kv (group C)",
                   "1 front point(s) have one seed: their ± is the study's pooled seed sd", "2.3300 ± 0.005 (SE, 4 seeds)", "IQR 1.700 ms"):
        assert needle in report, needle


def test_the_plots_draw_error_bars(noisy, tmp_path):
    frame, front, _ = pareto_table(noisy)
    fig = front_figure(noisy, frame, front)
    assert text_outside(fig) == []
    ax = fig.axes[0]
    bars = next(c for c in ax.containers if "Pareto front" in str(c.get_label()))
    x_bars, y_bars = bars.lines[2]  # the LineCollections of the x and y error bars
    widths = [seg[1][0] - seg[0][0] for seg in x_bars.get_segments()]
    heights = [seg[1][1] - seg[0][1] for seg in y_bars.get_segments()]
    assert widths == pytest.approx([IQR] * 5)  # the bar spans the IQR
    # +-2 SE (SEs 0.005, 0.01); the one-seed point +-2 pooled seed sd (0.00816), spans of 4 noise scales
    assert heights == pytest.approx([0.0327, 0.02, 0.02, 0.02, 0.04], abs=1e-4)
    labels = {t.get_text() for t in ax.texts}
    assert {"SQA 4q/2kv (C)", "MQA 8q/1kv (C)", "MHA 8q/8kv"} <= labels  # a shared group is named on the plot

    write_report(noisy, tmp_path)
    page = (tmp_path / "pareto.html").read_text()
    traces = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", page, re.S).group(1))
    drawn = next(t for t in traces if t["name"] == "Pareto front")
    assert drawn["error_y"]["array"] == pytest.approx([0.01633, 0.01, 0.01, 0.01, 0.02], abs=1e-4)  # half-widths: 2 SE
    assert drawn["error_x"]["array"] == pytest.approx([IQR / 2] * 5)
    assert drawn["error_x"]["color"] == drawn["error_y"]["color"] == FRONT_COLOUR
    assert any("2.3300 ± 0.005 (SE, 4 seeds)" in t for t in drawn["hovertext"])
    assert drawn["marker"]["symbol"] == ["circle", "circle-open", "circle", "circle", "circle-open"]
