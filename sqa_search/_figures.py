"""Matplotlib figures that fit their text: titles wrapped to the width they have, a layout that
keeps every label inside the figure, and the check the tests use to prove it.

A title built from a run's settings (device, shape, calibration) is as long as those settings
make it; a fixed figure size then cuts it off at both edges. `fit_text` wraps such titles, then
lays the figure out; `text_outside` names whatever text still leaves the figure.
"""

from __future__ import annotations

import math
import textwrap

__all__ = ["fit_text", "text_outside", "save"]

_MARGIN_PX = 4  # keep text this far from the figure's edge
_MIN_CHARS = 12  # narrower than this, wrapping would not help
_MIN_FONT_PT = 8.5  # titles shrink to this before they wrap


def _wrap_line(line: str, chars: int) -> str:
    """`line` wrapped to at most `chars` characters a line, in as few and as even lines as that
    allows (so a caveat at the end of a title is not left alone on a line)."""
    lines = textwrap.wrap(line, chars, break_on_hyphens=False) or [line]
    for even in range(math.ceil(len(line) / len(lines)), chars):
        balanced = textwrap.wrap(line, even, break_on_hyphens=False)
        if len(balanced) == len(lines):
            return "\n".join(balanced)
    return "\n".join(lines)


def _wrap_lines(text: str, chars: int) -> str:
    """Wrap each line of `text` to `chars` characters, keeping its own line breaks."""
    return "\n".join(_wrap_line(line, chars) for line in text.split("\n"))


def _wrap_to_width(artist, max_px: float, renderer) -> None:
    """Make `artist`'s text at most `max_px` wide: a text a little too wide gets a smaller font
    (down to `_MIN_FONT_PT`), a longer one is wrapped."""
    original = artist.get_text()
    width = artist.get_window_extent(renderer).width
    if not original or width <= max_px:
        return
    size = artist.get_fontsize()
    artist.set_fontsize(max(_MIN_FONT_PT, min(size, size * max_px / width)))
    width = artist.get_window_extent(renderer).width
    if width <= max_px:
        return
    longest = max(len(line) for line in original.split("\n"))
    chars = max(_MIN_CHARS, int(longest * max_px / width))
    while True:
        artist.set_text(_wrap_lines(original, chars))
        if artist.get_window_extent(renderer).width <= max_px or chars <= _MIN_CHARS:
            return
        chars = max(_MIN_CHARS, chars - max(1, chars // 20))


def _titles(fig):
    """(artist, the width in pixels it may take): the suptitle over the figure, axes titles over their axes."""
    out = []
    if fig._suptitle is not None:  # public getter only for its text (get_suptitle), not the artist
        out.append((fig._suptitle, fig.bbox.width - 2 * _MARGIN_PX))
    for ax in fig.axes:
        for artist in (ax.title, ax._left_title, ax._right_title):
            out.append((artist, ax.bbox.width))
    return out


def _height(artist, renderer) -> float:
    return artist.get_window_extent(renderer).height if artist.get_text() else 0.0


def fit_text(fig) -> None:
    """Wrap titles wider than their room, then lay out the figure so that its labels, tick
    labels, legends and annotations lie inside it. Call after everything is drawn on `fig`.

    The figure grows by the height the wrapped lines add, so wrapping a title never takes room
    from the plot under it."""
    renderer = fig.canvas.get_renderer()
    # Twice: the first layout gives the axes their widths, which bound the axes titles.
    for _ in range(2):
        grown = {"suptitle": 0.0, "axes titles": 0.0}  # pixels the wrapped lines add
        for artist, room in _titles(fig):
            before = _height(artist, renderer)
            _wrap_to_width(artist, room, renderer)
            which = "suptitle" if artist is fig._suptitle else "axes titles"
            grown[which] = max(grown[which], _height(artist, renderer) - before)
        extra_px = sum(grown.values())
        if extra_px > 0:
            width, height = fig.get_size_inches()
            fig.set_size_inches(width, height + extra_px / fig.dpi)
            renderer = fig.canvas.get_renderer()
        fig.tight_layout(pad=0.6)


def _stale_tick_labels(fig) -> set[int]:
    """ids of tick labels matplotlib keeps but does not draw: their tick lies outside the view."""
    stale = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(low), abs(high), 1e-300)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - slack <= tick.get_loc() <= high + slack:
                    stale.update((id(tick.label1), id(tick.label2)))
    return stale


def text_outside(fig, tolerance_px: float = 0.5) -> list[str]:
    """What of `fig`'s drawn content lies outside the figure, one line per text artist
    ("'<text>' at x x0..x1, y y0..y1 px, figure WxH px"); empty when everything fits.

    Renders the figure first. Covers every drawn text (titles, axis and tick labels, legend
    entries, annotations); the figure's tight bounding box (what `savefig(bbox_inches="tight")`
    would keep) catches any other artist."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height

    def outside(box) -> bool:
        return (box.x0 < -tolerance_px or box.y0 < -tolerance_px
                or box.x1 > width + tolerance_px or box.y1 > height + tolerance_px)

    def where(box) -> str:
        return f"at x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f} px, figure {width:.0f}x{height:.0f} px"

    stale = _stale_tick_labels(fig)
    problems = []
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text() and id(text) not in stale:
            box = text.get_window_extent(renderer)
            if outside(box):
                problems.append(f"{text.get_text()!r} {where(box)}")
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> pixels
    if not problems and outside(tight):
        problems.append(f"an artist reaches {where(tight)}")
    return problems


def save(fig, path) -> None:
    """Save `fig` at its own dpi and close it: the file shows exactly the layout that
    `fit_text` made and `text_outside` checks."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
