"""Results of a study: the trials table, the Pareto set against MHA and GQA, hypervolume, plots,
and a short markdown report. `sqa-search show studies/<name>` prints and writes them (cli/show.py),
and `sqa-search run` writes them at the end of a study (cli/run.py).

The objectives come from the search space (`SearchSpace.front_objectives`), and every trial's
figures from its `TrialRecord`: a new objective needs no change here.

Every figure comes with its noise: a loss with its standard error over seeds, or the study's pooled
seed sd where that is larger or the only estimate (`halving.quality_noise`, labelled so; "1 seed, no
SE" when there is none), a measured latency with its IQR. A configuration is its current trial
(`records.current_records`: a halving promotion in place of the trial it extends). The front is the exact Pareto front (hypervolume is computed on
it), and each of its points says whether it stands beyond noise (pareto.noise_aware_front) and
which group of points it cannot be told apart from (pareto.indistinct_groups); the plots draw the
noise as error bars.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._figures import fit_text, save
from .._format import fmt_s
from .pareto import (IQR_PER_SD, NOISE_Z, dominated_beyond_noise, group_names, hypervolume_history, indistinct_groups,
                     non_dominated_mask, reference_point)
from ..speed.workload import KIND_NOTES, latency_kind
from .recovery import INTERRUPTED, is_interrupted
from .records import TrialRecord, current_records, from_trial, read_records
from .halving import failed_promotions, halving_summary, pooled_seed_sd, quality_noise
from .samplers import distinct_configurations
from .space import SEARCH_PARAMS

__all__ = ["trials_frame", "pareto_table", "front_columns", "write_report", "front_figure",
           "front_plotly_figure", "hypervolume_figure", "FRONT_COLOUR", "NOISE_Z", "latency_iqr_s",
           "objective_noise", "noise_lines", "study_latency_kind"]



def latency_iqr_s(record: TrialRecord) -> float | None:
    """The interquartile range of a trial's summed latency (`TrialRecord.latency_iqr_s`)."""
    return record.latency_iqr_s


def _trial_row(handle, trial, record: TrialRecord) -> dict:
    row = {
        "trial": record.number, "state": record.state, "label": record.label,
        "variant": record.variant, "family": record.family,
        **{name: record.params.get(name) for name in SEARCH_PARAMS},
        "quality": record.quality, "quality_se": record.quality_se, "quality_n": len(record.quality_values),
        "latency_s": record.latency_s, "latency_iqr_s": latency_iqr_s(record),
        "kv_cache_bytes": record.kv_cache_bytes, "n_params": record.n_params,
        "val_loss": record.train_value("val_loss"), "mqar_accuracy": record.train_value("mqar_accuracy"),
        "train_wall_s": record.train_value("wall_s"), "tokens_per_s": record.train_value("tokens_per_s"),
        "latency_source": record.latency_source, "latency_kind": latency_kind(record.latencies),
        "duplicate_of": record.duplicate_of,
        "rung": record.rung, "promoted_from": record.promotion["from"] if record.promotion else None,
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

    trials = handle.study.get_trials(deepcopy=False)
    records = [from_trial(t) for t in trials]
    frame = pd.DataFrame([_trial_row(handle, t, r) for t, r in zip(trials, records)])
    # a configuration's result is its current trial (a halving promotion supersedes the trial it extends)
    current = current_records(records)
    numbers = {r.number for r in current}
    frame["current"] = [r.number in numbers for r in records]  # one row per configuration: its current result
    # a loss's noise: its own SE, or the study's pooled seed sd / sqrt(n) where that is larger or
    # the only one (one seed), labelled so (halving.quality_noise)
    pooled = pooled_seed_sd(current)
    noise = [quality_noise(r.quality_se, len(r.quality_values), pooled) if r.quality is not None else (None, None)
             for r in records]
    frame["quality_noise"] = [scale for scale, _ in noise]
    frame["quality_noise_kind"] = [kind for _, kind in noise]
    failed = failed_promotions(records)
    frame["promotion_failed"] = [failed.get(r.number) for r in records]
    frame.attrs["objectives"] = handle.space.objective_names
    return frame


def objective_noise(objective, table) -> np.ndarray:
    """One objective's noise scale for each row of a trials table (pareto.py's ``s``): a loss's
    standard error, a latency's IQR / 1.349 (the standard deviation of normal repeats with that
    IQR), 0 where there is no estimate (one seed, a prediction) and for other objectives."""
    if objective.column == "quality":
        return table.quality_noise.astype(float).fillna(0.0).to_numpy()
    if objective.column == "latency_s":
        return (table.latency_iqr_s.astype(float) / IQR_PER_SD).fillna(0.0).to_numpy()
    return np.zeros(len(table))


def _mark_noise(unique, objectives) -> None:
    """Columns of the distinct trials: beyond_noise (no other dominates it beyond noise), group (the
    letter shared by front points that cannot be told apart, named in order of latency) and
    beaten_by (the label of one that dominates it beyond noise)."""
    points = unique[[o.column for o in objectives]].to_numpy(dtype=float)
    noise = np.column_stack([objective_noise(o, unique) for o in objectives])
    dirs = [o.direction for o in objectives]
    beaten = dominated_beyond_noise(points, noise, dirs, NOISE_Z)
    finite = np.isfinite(points).all(axis=1)
    unique["beyond_noise"] = finite & ~beaten.any(axis=0)
    labels = unique.label.to_numpy()
    unique["beaten_by"] = [labels[np.flatnonzero(beaten[:, j])[0]] if beaten[:, j].any() else None
                           for j in range(len(unique))]
    among = (unique.pareto | unique.beyond_noise).to_numpy()
    groups = indistinct_groups(points, noise, dirs, NOISE_Z, among=among)
    latency = unique.latency_s.to_numpy(dtype=float)
    groups.sort(key=lambda g: (np.nanmin(latency[g]) if np.isfinite(latency[g]).any() else np.inf, g[0]))
    group = np.full(len(unique), None, dtype=object)
    for name, members in zip(group_names(len(groups)), groups):
        group[members] = name
    unique["group"] = group


def pareto_table(handle):
    """(all trials, Pareto set, hypervolume): the Pareto set with speedup and quality change
    against MHA and GQA where those were evaluated, and what noise makes of it (`_mark_noise`;
    the points within noise of the front but not on it are listed, as {"label", "group"}, in
    ``front.attrs["near_front"]``)."""
    frame = trials_frame(handle)
    done = frame[frame.state == "COMPLETE"].copy()
    if done.empty:
        return frame, done, float("nan")
    objectives = handle.space.front_objectives()
    cols = [o.column for o in objectives]
    dirs = [o.direction for o in objectives]
    unique = done[done.current.astype(bool)].drop_duplicates(subset=["label"]).copy()
    points = unique[cols].to_numpy(dtype=float)
    unique["pareto"] = non_dominated_mask(points, dirs)
    _mark_noise(unique, objectives)
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
    near = unique[~unique.pareto & unique.beyond_noise].sort_values("latency_s")
    front.attrs["near_front"] = [{"label": r.label, "group": r.group} for r in near.itertuples()]
    return frame, front, hv


def fmt_quality(value, se, n, kind: str | None = "SE") -> str:
    """A quality figure with its noise and what that is (`halving.quality_noise`): "2.3560 ± 0.02 (SE,
    4 seeds)", "2.3560 ± 0.02 (pooled sd, 1 seed)", "2.3560 ± 0.01 (pooled sd/√n, 2 seeds)", or
    "2.3560 (1 seed, no SE)"."""
    if value is None or value != value:
        return "-"
    seeds = "1 seed" if (n or 1) <= 1 else f"{int(n)} seeds"
    if se is None or se != se:
        return f"{value:.4f} ({seeds}, no SE)"
    return f"{value:.4f} ± {se:.2g} ({kind or 'SE'}, {seeds})"


def fmt_latency(value, iqr, source) -> str:
    """A latency with its spread: "47.70 ms, IQR 1.700 ms"; a prediction says so instead."""
    if value is None or value != value:
        return "-"
    if iqr is not None and iqr == iqr:
        return f"{fmt_s(value)}, IQR {fmt_s(iqr)}"
    return f"{fmt_s(value)} ({'predicted' if str(source or '').startswith('predicted') else 'no IQR'})"


def front_columns(front, space=None, *, formatted: bool = True):
    """The front's table as `run`, `show` and report.md print it (``formatted``: quality and
    latency as text with their uncertainty, the group that cannot be told apart and whether the
    point stands beyond noise), or as pareto.csv stores it (numbers, with quality_se, quality_n,
    latency_iqr_s, group, beyond_noise and beaten_by). A declared objective without a place in the
    usual columns is shown before the latency source."""
    keep = ["trial", "label", "quality", "latency_s", "speedup_vs_mha", "quality_change_vs_mha_%",
            "speedup_vs_gqa", "quality_change_vs_gqa_%", "kv_cache_bytes", "latency_kind", "latency_source"]
    if space is not None:
        keep[-1:-1] = [o.column for o in space.declared_objectives() if o.column not in keep]
    if not formatted:
        keep[4:4] = ["quality_se", "quality_noise", "quality_noise_kind", "quality_n", "latency_iqr_s", "group", "beyond_noise", "beaten_by"]
        return front[[c for c in keep if c in front.columns]]
    table = front[[c for c in keep if c in front.columns]].copy()
    if front.empty:
        return table
    table["quality"] = [fmt_quality(r.quality, r.quality_noise, r.quality_n, r.quality_noise_kind)
                        for r in front.itertuples()]
    table["latency_s"] = [fmt_latency(r.latency_s, r.latency_iqr_s, r.latency_source) for r in front.itertuples()]
    table.insert(4, "group", front.group)
    table.insert(5, "beyond noise", ["yes" if r.beyond_noise else f"no: {r.beaten_by} beats it"
                                     for r in front.itertuples()])
    return table.rename(columns={"quality": "quality (± noise)", "latency_s": "latency (IQR)"})


def noise_lines(front) -> list[str]:
    """What noise makes of the exact front, in words, for report.md."""
    if front.empty:
        return []
    near = front.attrs.get("near_front") or []
    groups = list(front.group) + [r["group"] for r in near]
    sizes = {g: groups.count(g) for g in groups}
    separated = front[front.beyond_noise & front.group.map(sizes).eq(1)]
    lines = [f"Of the exact front's {len(front)} points, {len(separated)} are separated beyond noise from every "
             f"other point (a difference counts when it exceeds {NOISE_Z:g} x the combined noise: a loss's "
             f"standard error over seeds, at least the pooled seed sd / √seeds, a latency's IQR / {IQR_PER_SD})."]
    for r in front[~front.beyond_noise].itertuples():
        lines.append(f"- {r.label} is on the exact front only by differences within noise: {r.beaten_by} "
                     f"beats it beyond noise.")
    for name in sorted(g for g in sizes if sizes[g] > 1):
        labels = [r.label for r in front.itertuples() if r.group == name] + [r["label"] for r in near
                                                                             if r["group"] == name]
        lines.append(f"- Group {name} cannot be told apart: {', '.join(labels)}.")
    if near:
        lines.append("- Within noise of the front, though not on it: "
                     + ", ".join(f"{r['label']} (group {r['group']})" for r in near) + ".")
    kinds = front.quality_noise_kind
    if (kinds == "pooled sd").any():
        lines.append(f"- {int((kinds == 'pooled sd').sum())} front point(s) have one seed: their ± is the study's pooled "
                     f"seed sd (over the candidates with several seeds), not a spread of their own.")
    if (kinds == "pooled sd/√n").any():
        lines.append(f"- {int((kinds == 'pooled sd/√n').sum())} front point(s) show the pooled seed sd / √seeds, "
                     f"larger than their own SE (an SE from 2-3 seeds is a rough guess).")
    if front.quality_noise.isna().any():
        lines.append(f"- {int(front.quality_noise.isna().sum())} front point(s) have one seed: their loss has no "
                     f"uncertainty estimate (training.replicates or study.halving gives it one).")
    for row in front[front.promotion_failed.notna()].itertuples():
        lines.append(f"- {row.label}: a promotion to more seeds failed ({row.promotion_failed}); its figure rests "
                     f"on its earlier seeds.")
    return lines


# The front's colour in both plots; nothing else in them is this red, so a test can find the front.
FRONT_COLOUR = "#d62728"


# What the plots' error bars span, in their legend and axis title.
ERROR_BARS = f"bars: quality ±{NOISE_Z:g} SE or pooled sd, latency IQR"


def error_bars(objective, table) -> np.ndarray:
    """Half-widths of one objective's error bars for each row: ±2 standard errors for quality (what
    the front's separation uses), half the interquartile range either side for latency (the bar
    spans the IQR), 0 where there is no estimate."""
    if objective.column == "quality":
        return NOISE_Z * table.quality_noise.astype(float).fillna(0.0).to_numpy()
    if objective.column == "latency_s":
        return (table.latency_iqr_s.astype(float) / 2).fillna(0.0).to_numpy()
    return np.zeros(len(table))


def point_names(front) -> dict:
    """label -> how the plots name a front point: with its group's letter when it shares the group
    with another point (they cannot be told apart), else its label alone."""
    if front.empty or "group" not in front:
        return {}
    rows = [(r.label, r.group) for r in front.itertuples()] + [(r["label"], r["group"])
                                                               for r in front.attrs.get("near_front") or []]
    groups = [group for _, group in rows]
    return {label: f"{label} ({group})" if groups.count(group) > 1 else label for label, group in rows}


def _front_title(handle) -> tuple[str, str]:
    """(what the front plots show, where the latency comes from); the title is "<study>: <what>"."""
    space = handle.space
    kind = study_latency_kind(handle) or ("measured" if space.target.measured else "predicted")
    source = kind if space.target.measured else f"{kind} ({space.target.hardware})"
    quality, _ = _plotted(space)
    return f"{quality.name} vs latency ({space.target.mode}, {source})", source


def study_latency_kind(handle) -> str | None:
    """The kind of the study's latency figures (measured-raw, measured-corrected, predicted; "a + b"
    when its trials mix them), read from its trials; None before any trial has a latency."""
    return latency_kind(lat for t in handle.study.get_trials(deepcopy=False) for lat in from_trial(t).latencies)


def _kind_note(kind: str | None) -> str:
    """': measured-corrected, seconds at ...' for report.md's target line ('' before any latency)."""
    return "" if kind is None else f": {kind}" + (f", {KIND_NOTES[kind]}" if kind in KIND_NOTES else "")


def _plotted(space):
    """(y, x) of the front plots: the first two declared objectives, quality and latency."""
    quality, latency = space.declared_objectives()[:2]
    return quality, latency


def front_figure(handle, frame, front):
    """The matplotlib figure of pareto.png: every complete trial, the front, the named variants."""
    import matplotlib  # matplotlib and plotly load only when a figure is drawn (seconds)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[(frame.state == "COMPLETE") & frame.current.astype(bool)]  # one point per configuration
    subject, source = _front_title(handle)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    y, x = (o.column for o in _plotted(handle.space))
    y_obj, x_obj = _plotted(handle.space)
    ax.errorbar(done[x], done[y], xerr=error_bars(x_obj, done), yerr=error_bars(y_obj, done), fmt="o",
                c="#bbbbbb", ecolor="#cccccc", elinewidth=1, label="trials", zorder=2)
    ax.errorbar(front[x], front[y], xerr=error_bars(x_obj, front), yerr=error_bars(y_obj, front), fmt="-o",
                c=FRONT_COLOUR, ecolor=FRONT_COLOUR, elinewidth=1, capsize=2, zorder=3,
                label=f"Pareto front ({ERROR_BARS})")
    if "beyond_noise" in front and not front.beyond_noise.all():
        beaten = front[~front.beyond_noise.astype(bool)]
        ax.scatter(beaten[x], beaten[y], facecolors="white", edgecolors=FRONT_COLOUR, zorder=4,
                   label="on the exact front by noise only")
    names = point_names(front)
    for _, row in done.drop_duplicates("label").iterrows():
        if row.variant:
            ax.annotate(names.get(row.label, row.label), (row[x], row[y]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
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

    done = frame[(frame.state == "COMPLETE") & frame.current.astype(bool)]  # one point per configuration
    subject, source = _front_title(handle)
    figure = go.Figure()
    y, x = (o.column for o in _plotted(handle.space))
    y_obj, x_obj = _plotted(handle.space)

    def bars(objective, rows, colour):
        return dict(type="data", array=list(error_bars(objective, rows)), visible=True, color=colour, thickness=1)

    names = point_names(front)
    figure.add_trace(go.Scatter(x=done[x], y=done[y], mode="markers", name="trials",
                                text=done.label, marker=dict(color="#999999"),
                                error_x=bars(x_obj, done, "#cccccc"), error_y=bars(y_obj, done, "#cccccc")))
    figure.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines+markers+text", name="Pareto front",
                                text=[names.get(label, label) for label in front.label], textposition="top center",
                                cliponaxis=False,  # edge labels whole
                                hovertext=[f"{r.label}: {fmt_quality(r.quality, r.quality_noise, r.quality_n, r.quality_noise_kind)}, "
                                           f"{fmt_latency(r.latency_s, r.latency_iqr_s, r.latency_source)}"
                                           for r in front.itertuples()],
                                line=dict(color=FRONT_COLOUR),
                                marker=dict(color=FRONT_COLOUR, symbol=[  # open: on the front by noise only
                                    "circle" if r.beyond_noise else "circle-open" for r in front.itertuples()]),
                                error_x=bars(x_obj, front, FRONT_COLOUR), error_y=bars(y_obj, front, FRONT_COLOUR)))
    # the study's name and what is plotted on two lines: a long name still fits a laptop's window
    figure.update_layout(title=dict(text=handle.space.name, subtitle=dict(text=subject)),
                         xaxis_title=f"latency s ({source}); {ERROR_BARS}", yaxis_title=_plotted(handle.space)[0].name,
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

    done = frame[(frame.state == "COMPLETE") & frame.current.astype(bool)].sort_values("trial")
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


def _promotions_note(frame) -> str:
    """", of which 8 halving promotions" when the study promoted any (they add seeds, not configurations)."""
    n = int(frame.promoted_from.notna().sum()) if "promoted_from" in frame else 0
    return f", of which {n} halving promotion{'s' if n != 1 else ''}" if n else ""


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
        front_columns(front, handle.space, formatted=False).to_csv(out / "pareto.csv", index=False)
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
        f"Latency is {'measured on this machine' if t.measured else 'PREDICTED by the cost model'}"
        f"{_kind_note(study_latency_kind(handle))}.",
        f"Trials: {len(frame)}{_promotions_note(frame)} ({(frame.state == 'COMPLETE').sum()} complete, "
        f"{(frame.state == 'PRUNED').sum()} pruned, "
        f"{len(failed)} failed; {distinct_configurations(read_records(handle.study))} distinct configurations "
        f"evaluated). Hypervolume (quality x latency): {hv:.4g}.",
        *([halving_summary(read_records(handle.study), space) + "."] if space.study.halving else []),
        "",
        "## Pareto front",
        "",
        front_columns(front, space).to_markdown(index=False, floatfmt=".4g") if not front.empty else "(no complete trial)",
        "",
    ]
    lines += noise_lines(front) + ([""] if not front.empty else [])
    if not front.empty:
        lines += ["![Pareto front](pareto.png)", "", "![Hypervolume history](hypervolume.png)", ""]
    if len(failed):
        lines += ["## Failed trials", "", failed[["trial", "label", "fail_reason"]].to_markdown(index=False), ""]
    (out / "report.md").write_text("\n".join(lines))
    written["report"] = out / "report.md"
    return written
