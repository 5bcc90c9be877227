"""The report's plots: pareto.png and hypervolume.png fit their text; pareto.html carries plotly.js
itself (no network needed) and draws the front in the front's colour. The page in a real browser
is tested in test_browser.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sqa_search._figures import text_outside
from sqa_search.search.report import FRONT_COLOUR, front_figure, hypervolume_figure, pareto_table, write_report
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
