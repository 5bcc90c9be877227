"""Figures fit their text: the check finds a title cut off at the edges, and fit_text makes it fit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sqa_search._figures import fit_text, text_outside  # noqa: E402

LONG = ("MEASURED on cpu (AMD EPYC 7B13 64-Core Processor, 1 threads, torch 2.13.0+cpu)\n"
        "forward (prefill), attention layer, d_model 256, H 16, causal, batch 1, float32; seconds per step, "
        "median of timed repeats pooled from 3 passes over the grid")


def test_a_title_wider_than_the_figure_is_found_then_wrapped_to_fit():
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=110)
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.suptitle(LONG, fontsize=10)
    fig.tight_layout()
    cut = text_outside(fig)
    assert len(cut) == 1 and cut[0].startswith("'MEASURED on cpu") and "figure 715x550 px" in cut[0]

    fit_text(fig)
    assert text_outside(fig) == []
    assert fig.get_suptitle().split() == LONG.split()  # every word kept, only the line breaks differ
    assert fig.get_suptitle().count("\n") >= 2
    assert fig.get_size_inches()[1] > 5  # taller by the added lines: the plot keeps its height
    plt.close(fig)


def test_a_title_a_little_too_wide_gets_a_smaller_font_not_a_new_line():
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.set_title("hypervolume history of the study quickstart", fontsize=12)
    fig.tight_layout(pad=0.6)
    fig.canvas.draw()
    assert ax.title.get_window_extent().width > 1.05 * ax.bbox.width  # about 10% wider than its axes
    fit_text(fig)
    assert "\n" not in ax.get_title() and 8.5 <= ax.title.get_fontsize() < 12
    assert text_outside(fig) == []
    plt.close(fig)


def test_tick_labels_outside_the_view_are_not_counted():
    # matplotlib keeps tick objects beyond the axis limits (not drawn) with stale positions
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.set_yscale("log")
    ax.plot([1, 2], [2.004e-3, 2.029e-3])
    fit_text(fig)
    assert text_outside(fig) == []
    plt.close(fig)
