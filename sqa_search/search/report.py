"""Results of a study: the trials table, the Pareto set against MHA and GQA, hypervolume, plots,
and a short markdown report. `sqa-search show studies/<name>` prints and writes them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .pareto import hypervolume_history, non_dominated_mask, reference_point

__all__ = ["pareto_table", "write_report", "add_arguments", "run"]


def _objectives(handle):
    space = handle.space
    if space.study.mode == "pareto":
        return space.objective_names, space.directions
    return [space.objectives.quality], space.directions[:1]


def pareto_table(handle):
    """(all trials, Pareto set, hypervolume): the Pareto set with speedup and quality change
    against MHA and GQA where those were evaluated."""
    from .engine import trials_frame

    frame = trials_frame(handle)
    names, directions = _objectives(handle)
    done = frame[frame.state == "COMPLETE"].copy()
    if done.empty:
        return frame, done, float("nan")
    # latency is always a column, even in constrained mode: the front is loss against speed
    cols = ["quality", "latency_s"] + (["kv_cache_bytes"] if "kv_cache_bytes" in names else [])
    dirs = [directions[0]] + ["minimize"] * (len(cols) - 1)
    unique = done.drop_duplicates(subset=["label"]).copy()
    points = unique[cols].to_numpy(dtype=float)
    unique["pareto"] = non_dominated_mask(points, dirs)
    ref = reference_point(points, dirs)
    hv = float(hypervolume_history(points, ref, dirs)[-1]) if len(points) else float("nan")
    for base in ("mha", "gqa"):
        rows = unique[unique.variant == base]
        if rows.empty:
            unique[f"speedup_vs_{base}"] = np.nan
            unique[f"quality_change_vs_{base}_%"] = np.nan
            continue
        ref_row = rows.iloc[0]
        unique[f"speedup_vs_{base}"] = ref_row.latency_s / unique.latency_s
        unique[f"quality_change_vs_{base}_%"] = 100 * (unique.quality - ref_row.quality) / abs(ref_row.quality)
    front = unique[unique.pareto].sort_values("latency_s")
    return frame, front, hv


def _front_columns(front):
    keep = ["trial", "label", "quality", "latency_s", "speedup_vs_mha", "quality_change_vs_mha_%",
            "speedup_vs_gqa", "quality_change_vs_gqa_%", "kv_cache_bytes", "latency_source"]
    return front[[c for c in keep if c in front.columns]]


# The front's colour in both plots; nothing else in them is this red, so a test can find the front.
FRONT_COLOUR = "#d62728"


def _front_title(handle) -> tuple[str, str]:
    """(what the front plots show, where the latency comes from); the title is "<study>: <what>"."""
    space = handle.space
    source = "measured" if space.target.measured else f"predicted ({space.target.hardware})"
    return f"{space.objectives.quality} vs latency ({space.target.mode}, {source})", source


def front_figure(handle, frame, front):
    """The matplotlib figure of pareto.png: every complete trial, the front, the named variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._figures import fit_text

    done = frame[frame.state == "COMPLETE"]
    subject, source = _front_title(handle)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter(done.latency_s, done.quality, c="#bbbbbb", label="trials", zorder=2)
    ax.plot(front.latency_s, front.quality, "-o", c=FRONT_COLOUR, label="Pareto front", zorder=3)
    for _, row in done.drop_duplicates("label").iterrows():
        if row.variant:
            ax.annotate(row.label, (row.latency_s, row.quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency per step, s ({source})")
    ax.set_ylabel(handle.space.objectives.quality)
    ax.set_title(f"{handle.space.name}: {subject}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fit_text(fig)
    return fig


def front_plotly_figure(handle, frame, front):
    """The plotly figure of pareto.html, the interactive twin of pareto.png."""
    import plotly.graph_objects as go

    done = frame[frame.state == "COMPLETE"]
    subject, source = _front_title(handle)
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=done.latency_s, y=done.quality, mode="markers", name="trials",
                                text=done.label, marker=dict(color="#999999")))
    figure.add_trace(go.Scatter(x=front.latency_s, y=front.quality, mode="lines+markers+text", name="Pareto front",
                                text=front.label, textposition="top center", cliponaxis=False,  # edge labels whole
                                line=dict(color=FRONT_COLOUR), marker=dict(color=FRONT_COLOUR)))
    # the study's name and what is plotted on two lines: a long name still fits a laptop's window
    figure.update_layout(title=dict(text=handle.space.name, subtitle=dict(text=subject)),
                         xaxis_title=f"latency s ({source})", yaxis_title=handle.space.objectives.quality,
                         xaxis_type="log")
    return figure


def write_front_html(handle, frame, front, path: Path) -> Path:
    """Write pareto.html with plotly.js (about 4.6 MB) embedded, not loaded from a CDN: the page
    must draw on an offline machine (most GPU cluster nodes), and a single file keeps working when
    it alone is copied or mailed, which a plotly.min.js beside it (include_plotlyjs="directory")
    would not."""
    front_plotly_figure(handle, frame, front).write_html(path, include_plotlyjs=True)
    return path


def _plot_front(handle, frame, front, out: Path) -> list[Path]:
    from .._figures import save

    png = out / "pareto.png"
    save(front_figure(handle, frame, front), png)
    return [png, write_front_html(handle, frame, front, out / "pareto.html")]


def hypervolume_figure(handle, frame):
    """The figure of hypervolume.png (hypervolume after each completed trial); None below 2 trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._figures import fit_text

    done = frame[frame.state == "COMPLETE"].sort_values("trial")
    if len(done) < 2:
        return None
    names, directions = _objectives(handle)
    cols = ["quality", "latency_s"]
    dirs = [directions[0], "minimize"]
    points = done[cols].to_numpy(dtype=float)
    history = hypervolume_history(points, reference_point(points, dirs), dirs)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(range(1, len(history) + 1), history, "-o")
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume (quality x latency)")
    ax.set_title(f"{handle.space.name}: hypervolume history")
    ax.grid(True, alpha=0.3)
    fit_text(fig)
    return fig


def _plot_hypervolume(handle, frame, out: Path) -> Path | None:
    from .._figures import save

    fig = hypervolume_figure(handle, frame)
    if fig is None:
        return None
    save(fig, out / "hypervolume.png")
    return out / "hypervolume.png"


def write_report(handle, out: Path | None = None) -> dict:
    """Write results.csv, results.parquet, pareto.png/.html, hypervolume.png and report.md."""
    out = Path(out or handle.directory)
    out.mkdir(parents=True, exist_ok=True)
    frame, front, hv = pareto_table(handle)
    frame.to_csv(out / "results.csv", index=False)
    written = {"csv": out / "results.csv"}
    try:
        frame.drop(columns=["datetime_start"]).to_parquet(out / "results.parquet", index=False)
        written["parquet"] = out / "results.parquet"
    except ImportError:
        pass
    if not front.empty:
        _front_columns(front).to_csv(out / "pareto.csv", index=False)
        written["plots"] = _plot_front(handle, frame, front, out)
        hv_plot = _plot_hypervolume(handle, frame, out)
        if hv_plot:
            written["plots"].append(hv_plot)
    space, t = handle.space, handle.space.target
    failed = frame[frame.state == "FAIL"]
    lines = [
        f"# Study `{space.name}`",
        "",
        f"Search space: {space.source}. Model d_model={space.model.d_model}, H={space.model.n_heads}, "
        f"{space.model.n_layers} layers, {'decoder' if space.model.causal else 'encoder'}.",
        f"Target: {t.hardware}, {t.mode}, {t.dtype}, batch {t.batch}, N={list(t.seq_len)}, timing the {t.what}. "
        f"Latency is {'measured on this machine' if t.measured else 'PREDICTED by the cost model'}.",
        f"Trials: {len(frame)} ({(frame.state == 'COMPLETE').sum()} complete, {(frame.state == 'PRUNED').sum()} pruned, "
        f"{len(failed)} failed). Hypervolume (quality x latency): {hv:.4g}.",
        "",
        "## Pareto front",
        "",
        _front_columns(front).to_markdown(index=False, floatfmt=".4g") if not front.empty else "(no complete trial)",
        "",
    ]
    if not front.empty:
        lines += ["![Pareto front](pareto.png)", "", "![Hypervolume history](hypervolume.png)", ""]
    if len(failed):
        lines += ["## Failed trials", "", failed[["trial", "label", "fail_reason"]].to_markdown(index=False), ""]
    (out / "report.md").write_text("\n".join(lines))
    written["report"] = out / "report.md"
    return written


# ----- `sqa-search show` ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="a study folder, e.g. studies/quickstart")
    parser.add_argument("--out", help="where to write CSV, parquet, plots and report (default: the study folder)")
    parser.add_argument("--all", action="store_true", help="print every trial, not only the Pareto set")


def run(args) -> int:
    import pandas as pd

    from .engine import open_study

    handle = open_study(args.study)
    frame, front, hv = pareto_table(handle)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        if args.all:
            print(frame.drop(columns=["datetime_start"]).to_string(index=False))
            print()
        print(f"Pareto set of {handle.space.name} ({(frame.state == 'COMPLETE').sum()} complete trials, "
              f"hypervolume {hv:.4g}):")
        print(_front_columns(front).to_string(index=False) if not front.empty else "(no complete trial)")
    written = write_report(handle, Path(args.out) if args.out else None)
    print(f"\nwritten: {', '.join(str(p) for k, v in written.items() for p in (v if isinstance(v, list) else [v]))}")
    return 0
