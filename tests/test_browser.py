"""pareto.html in a real browser (Debian's headless Chromium) on a machine with no network: the
page draws the front, and every text of the plot lies inside it. The same figure with plotly.js
from a CDN, in the same conditions, stays blank: proof that the network really was off."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sqa_search.search.report import FRONT_COLOUR, front_plotly_figure, pareto_table, write_report
from sqa_search.layer.spec import AttentionSpec
from sqa_search.search.engine import open_study
from study_helpers import fake_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser on PATH (Debian: apt-get install chromium)"),
]
WINDOW = (1000, 700)  # a laptop's browser window, in CSS pixels
D, H = 64, 8
ROWS = [(AttentionSpec.variant(v, D, H), loss, latency) for v, loss, latency in
        [("mha", 2.000, 0.010), ("gqa", 2.010, 0.009), ("mqa", 2.030, 0.0085), ("sqa", 2.015, 0.006),
         ("ssqa", 2.018, 0.0062), ("xsqa", 2.060, 0.004), ("xsmqa", 2.090, 0.0038)]]


def _offline_prefix() -> list[str]:
    """A command prefix that runs its command in a network namespace of its own: no interface
    but a loopback that is down, so no name resolves and no address is reachable."""
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):  # root, or a user namespace
        if shutil.which("unshare") and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("cannot create a network namespace (unshare --net) to run the browser offline")


# Run inside the namespace: neither the CDN's name nor a public address may answer.
NETWORK_PROBE = """
import socket
for what, attempt in (("name", lambda: socket.getaddrinfo("cdn.plot.ly", 443)),
                      ("address", lambda: socket.create_connection(("1.1.1.1", 443), timeout=3))):
    try:
        attempt()
        print(what, "reachable")
    except OSError as exc:
        print(what, "unreachable:", exc)
"""


@pytest.fixture(scope="module")
def offline():
    prefix = _offline_prefix()
    out = subprocess.run(prefix + [sys.executable, "-c", NETWORK_PROBE], capture_output=True, text=True,
                         timeout=60).stdout
    answers = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(answers) == {"name", "address"} and all(a.startswith("unreachable") for a in answers.values()), \
        f"the namespace still reaches the network:\n{out}"
    return prefix


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    fingerprint = {"device_type": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "threads": 1}
    handle = open_study(fake_study(tmp, ROWS, fingerprint, name="a-long-study-name-for-the-prefill-sweep-at-8k",
                                   d_model=D, n_heads=H))
    write_report(handle)
    return handle


def _chromium(offline, tmp_path, page, *args) -> subprocess.CompletedProcess:
    cmd = offline + [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     # virtual time runs the page's scripts and timers to completion before the shot
                     "--virtual-time-budget=20000", *args, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _pixels_of(png, colour: str) -> int:
    """How many pixels of the screenshot `png` have `colour` ("#rrggbb"), to within 6/255 a channel."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(rgb - target) <= 6 / 255).all(axis=-1).sum())


def test_pareto_html_draws_the_front_with_no_network(study, offline, tmp_path):
    page = study.directory / "pareto.html"
    assert not re.search(r"<script[^>]+src=", page.read_text()), "pareto.html loads a script from elsewhere"
    frame, front, _ = pareto_table(study)
    cdn = tmp_path / "pareto-cdn.html"  # what pareto.html was before: the same figure, plotly.js from a CDN
    front_plotly_figure(study, frame, front).write_html(cdn, include_plotlyjs="cdn")

    _chromium(offline, tmp_path, page, f"--screenshot={tmp_path / 'offline.png'}")
    _chromium(offline, tmp_path, cdn, f"--screenshot={tmp_path / 'cdn.png'}")

    drawn, blank = _pixels_of(tmp_path / "offline.png", FRONT_COLOUR), _pixels_of(tmp_path / "cdn.png", FRONT_COLOUR)
    print(f"\nheadless Chromium, no network: {drawn} pixels of the front's colour {FRONT_COLOUR} in pareto.html, "
          f"{blank} in the same figure with plotly.js from the CDN")
    # the front: 5 points and the lines between them span hundreds of pixels of its colour
    assert len(front) == 5 and drawn > 300, f"{drawn} pixels of the front's colour in the offline page"
    assert blank == 0, f"the CDN page drew {blank} pixels of the front's colour: was the network really off?"


# Appended to a copy of pareto.html: once plotly has drawn, list every text of the plot whose box
# leaves the plot's area (where the browser cuts it off) or, for the title, reaches into the plotted
# area; write the list into the page.
FIT_SCRIPT = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const area = document.querySelector(".js-plotly-plot .main-svg").getBoundingClientRect();
  const plotTop = document.querySelector(".js-plotly-plot .nsewdrag").getBoundingClientRect().top;
  const outside = [], checked = [];
  for (const t of document.querySelectorAll(".js-plotly-plot text")) {
    const r = t.getBoundingClientRect(), text = t.textContent.trim();
    if (!text || r.width === 0) continue;
    checked.push(text);
    const where = `${text} at x ${r.left.toFixed(0)}..${r.right.toFixed(0)}, y ${r.top.toFixed(0)}..${r.bottom.toFixed(0)}`;
    if (r.left < area.left - 0.5 || r.right > area.right + 0.5 || r.top < area.top - 0.5 || r.bottom > area.bottom + 0.5)
      outside.push(`${where} of ${area.width.toFixed(0)}x${area.height.toFixed(0)}`);
    // the title and its subtitle sit above the plotted area, not over the front's labels
    if (t.matches(".gtitle, .gtitle-subtitle") && r.bottom > plotTop + 0.5)
      outside.push(`${where}: the title reaches into the plot area, which starts at y ${plotTop.toFixed(0)}`);
  }
  const pre = document.createElement("pre");
  pre.id = "fit";
  pre.textContent = JSON.stringify({checked, outside});
  document.body.appendChild(pre);
}, 2000));
</script>"""


def test_pareto_html_text_fits_the_window(study, offline, tmp_path):
    page = tmp_path / "pareto-fit.html"
    page.write_text((study.directory / "pareto.html").read_text().replace("</body>", FIT_SCRIPT + "</body>"))
    dom = _chromium(offline, tmp_path, page, "--dump-dom").stdout
    found = re.search(r'<pre id="fit">(.*?)</pre>', dom, re.S)
    assert found, "the page never finished drawing"
    report = json.loads(html.unescape(found.group(1)))
    checked = report["checked"]
    assert len(checked) > 10, checked  # it saw the plot's texts: title, axes, ticks, the front's labels, legend
    assert report["outside"] == []
    assert study.space.name in checked and "val_loss vs latency (prefill, measured-raw)" in checked
    assert "MHA 8q/8kv" in checked and any(t.startswith("latency s") for t in checked)
