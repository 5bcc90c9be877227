"""Results of a study: the trials table, the Pareto set against MHA and GQA, hypervolume, plots,
and a short markdown report. `sqa-search show studies/<name>` prints and writes them (cli/show.py),
and `sqa-search run` writes them at the end of a study (cli/run.py).

The objectives come from the search space (`SearchSpace.front_objectives`), and every trial's
figures from its `TrialRecord`: a new objective needs no change here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._figures import fit_text, save
from .pareto import hypervolume_history, non_dominated_mask, reference_point
from .recovery import INTERRUPTED, is_interrupted
from .records import TrialRecord, from_trial, read_records
from .samplers import distinct_configurations
from .space import SEARCH_PARAMS

__all__ = ["trials_frame", "pareto_table", "front_columns", "write_report", "front_figure",
           "front_plotly_figure", "hypervolume_figure", "FRONT_COLOUR"]


def _trial_row(handle, trial, record: TrialRecord) -> dict:
    row = {
        "trial": record.number, "state": record.state, "label": record.label,
        "variant": record.variant, "family": record.family,
        **{name: record.params.get(name) for name in SEARCH_PARAMS},
        "quality": record.quality, "latency_s": record.latency_s,
        "kv_cache_bytes": record.kv_cache_bytes, "n_params": record.n_params,
        "val_loss": record.train_value("val_loss"), "mqar_accuracy": record.train_value("mqar_accuracy"),
        "train_wall_s": record.train_value("wall_s"), "tokens_per_s": record.train_value("tokens_per_s"),
        "latency_source": record.latency_source, "duplicate_of": record.duplicate_of,
        "fail_reason": record.reason
        or (f"{INTERRUPTED} (no result, no reason: its worker was lost)" if is_interrupted(trial) else None),
        "fingerprint_id": record.fingerprint_id, "backend": record.backend,
        "datetime_start": record.datetime_start, "duration_s": record.duration_s,
    }
    for objective in handle.space.declared_objectives():  # an objective without a column of its own above
        row.setdefault(objective.column, objective.value(record))
    return row


def trials_frame(handle):
    """All trials as a pandas DataFrame with the columns `show` and the report use."""
    import pandas as pd  # pandas is slow to import: not for `sqa-search --help`

    frame = pd.DataFrame([_trial_row(handle, t, from_trial(t)) for t in handle.study.get_trials(deepcopy=False)])
    frame.attrs["objectives"] = handle.space.objective_names
    return frame


def pareto_table(handle):
    """(all trials, Pareto set, hypervolume): the Pareto set with speedup and quality change
    against MHA and GQA where those were evaluated."""
    frame = trials_frame(handle)
    done = frame[frame.state == "COMPLETE"].copy()
    if done.empty:
        return frame, done, float("nan")
    objectives = handle.space.front_objectives()
    cols = [o.column for o in objectives]
    dirs = [o.direction for o in objectives]
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


def front_columns(front, space=None):
    """The front's table as `run`, `show` and report.md print it; a declared objective without a
    place in the usual columns is shown before the latency source."""
    keep = ["trial", "label", "quality", "latency_s", "speedup_vs_mha", "quality_change_vs_mha_%",
            "speedup_vs_gqa", "quality_change_vs_gqa_%", "kv_cache_bytes", "latency_source"]
    if space is not None:
        keep[-1:-1] = [o.column for o in space.declared_objectives() if o.column not in keep]
    return front[[c for c in keep if c in front.columns]]


# The front's colour in both plots; nothing else in them is this red, so a test can find the front.
FRONT_COLOUR = "#d62728"


def _front_title(handle) -> tuple[str, str]:
    """(what the front plots show, where the latency comes from); the title is "<study>: <what>"."""
    space = handle.space
    source = "measured" if space.target.measured else f"predicted ({space.target.hardware})"
    quality, _ = _plotted(space)
    return f"{quality.name} vs latency ({space.target.mode}, {source})", source


def _plotted(space):
    """(y, x) of the front plots: the first two declared objectives, quality and latency."""
    quality, latency = space.declared_objectives()[:2]
    return quality, latency


def front_figure(handle, frame, front):
    """The matplotlib figure of pareto.png: every complete trial, the front, the named variants."""
    import matplotlib  # matplotlib and plotly load only when a figure is drawn (seconds)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame.state == "COMPLETE"]
    subject, source = _front_title(handle)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    y, x = (o.column for o in _plotted(handle.space))
    ax.scatter(done[x], done[y], c="#bbbbbb", label="trials", zorder=2)
    ax.plot(front[x], front[y], "-o", c=FRONT_COLOUR, label="Pareto front", zorder=3)
    for _, row in done.drop_duplicates("label").iterrows():
        if row.variant:
            ax.annotate(row.label, (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency per step, s ({source})")
    ax.set_ylabel(_plotted(handle.space)[0].name)
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
    y, x = (o.column for o in _plotted(handle.space))
    figure.add_trace(go.Scatter(x=done[x], y=done[y], mode="markers", name="trials",
                                text=done.label, marker=dict(color="#999999")))
    figure.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines+markers+text", name="Pareto front",
                                text=front.label, textposition="top center", cliponaxis=False,  # edge labels whole
                                line=dict(color=FRONT_COLOUR), marker=dict(color=FRONT_COLOUR)))
    # the study's name and what is plotted on two lines: a long name still fits a laptop's window
    figure.update_layout(title=dict(text=handle.space.name, subtitle=dict(text=subject)),
                         xaxis_title=f"latency s ({source})", yaxis_title=_plotted(handle.space)[0].name,
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
    png = out / "pareto.png"
    save(front_figure(handle, frame, front), png)
    return [png, write_front_html(handle, frame, front, out / "pareto.html")]


def hypervolume_figure(handle, frame):
    """The figure of hypervolume.png (hypervolume after each completed trial); None below 2 trials."""
    import matplotlib  # matplotlib and plotly load only when a figure is drawn (seconds)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame.state == "COMPLETE"].sort_values("trial")
    if len(done) < 2:
        return None
    objectives = _plotted(handle.space)  # quality and latency
    cols = [o.column for o in objectives]
    dirs = [o.direction for o in objectives]
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
        front_columns(front, handle.space).to_csv(out / "pareto.csv", index=False)
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
        f"{len(failed)} failed; {distinct_configurations(read_records(handle.study))} distinct configurations "
        f"evaluated). Hypervolume (quality x latency): {hv:.4g}.",
        "",
        "## Pareto front",
        "",
        front_columns(front, space).to_markdown(index=False, floatfmt=".4g") if not front.empty else "(no complete trial)",
        "",
    ]
    if not front.empty:
        lines += ["![Pareto front](pareto.png)", "", "![Hypervolume history](hypervolume.png)", ""]
    if len(failed):
        lines += ["## Failed trials", "", failed[["trial", "label", "fail_reason"]].to_markdown(index=False), ""]
    (out / "report.md").write_text("\n".join(lines))
    written["report"] = out / "report.md"
    return written
