"""What every figure shares: the figure object, the output format, colours, labels, saving.

Figures are matplotlib.figure.Figure objects on an Agg canvas, never pyplot's global state, so
figures drawn in one process do not leak into each other.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from cgtools.errors import ConfigError
from cgtools.formats.files import atomic_output

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
PANEL_SIZE = (5.2, 3.9)  # inches per panel: readable at the default DPI
DPI = 110
MAX_COLUMNS = 4
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")

# axis labels (with units) for the columns figures use as x or y
LABELS = {
    "P": "training set size P (sentences)",
    "examples": "training examples seen (sentences)",
    "step": "training step (optimiser steps)",
    "m": "synonyms per symbol m",
    "L": "depth L",
    "v": "vocabulary size v",
    "noise": "noise E (probability a token is corrupted)",
    "distance": "distance t (tokens)",
    "block_index": "block (network order)",
    "seed": "seed",
}


def label(name: str) -> str:
    """Axis label with units for a column or tag name (the name itself when unknown)."""
    return LABELS.get(name, name)


def figure_format(path: str | os.PathLike) -> str:
    """'png', 'svg' or 'pdf' from the suffix of path; ConfigError otherwise."""
    name = os.fspath(path)
    suffix = os.path.splitext(name)[1].lower()
    if name == "-" or suffix not in FORMATS:
        raise ConfigError(f"cannot tell the figure format of {name!r}: the output name must end in "
                          f"{', '.join(FORMATS)}")
    return FORMATS[suffix]


def new_figure(n_panels: int, columns: int | None = None, rows: int | None = None,
               panel_size: tuple[float, float] = PANEL_SIZE) -> tuple[Figure, list[Axes]]:
    """A figure with n_panels axes in a grid (at most MAX_COLUMNS wide unless `columns` is given);
    returns the figure and the used axes in reading order (unused cells are removed)."""
    n_panels = max(n_panels, 1)
    nrows = rows or -(-n_panels // (columns or MAX_COLUMNS))
    cols = columns or -(-n_panels // nrows)  # balanced rows: 6 panels as 2 x 3, not 4 + 2
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, cols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def save_figure(fig: Figure, out: str | os.PathLike, force: bool, dpi: int = DPI) -> None:
    """Write fig atomically in the format of out's suffix (refuses to overwrite without force)."""
    fmt = figure_format(out)
    with atomic_output(out, force) as sink:
        fig.savefig(sink, format=fmt, dpi=dpi)


def sequential_colors(n: int, cmap: str = "viridis", stop: float = 0.9) -> list:
    """n distinguishable colours along a sequential map (for levels, depths, P values)."""
    return list(colormaps[cmap](np.linspace(0.0, stop, max(n, 1))))[:n] if n > 1 else [colormaps[cmap](0.0)]


def level_colors(levels: Sequence[int]) -> dict[int, tuple]:
    """One colour per grammar level, ordered from low (local) to high (global) levels."""
    return dict(zip(levels, sequential_colors(len(levels), "plasma", 0.85)))


def log_axis(ax: Axes, axis: str, values: Iterable[float]) -> bool:
    """Log scale on `axis` ('x' or 'y') when every value is positive; returns whether it did."""
    values = [v for v in values if v is not None]
    if values and min(values) > 0:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        if len(set(values)) <= 8 and max(values) / min(values) < 100:
            plain_log_ticks(ax, axis, values)  # a few values: ticks at them ('32', '128', '512')
        return True
    return False


def plain_log_ticks(ax: Axes, axis: str, values: Sequence[float] | None = None) -> None:
    """Readable labels on a log axis spanning less than ~2 decades: '2', '50', '300' rather than
    2x10^0 (matplotlib's minor labels). With `values` (e.g. m = 2, 3, 4, at most 8 of them) the
    ticks sit at the values."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    if values:
        values = sorted(set(values))
        if len(values) <= 8 and max(values) / min(values) < 100:
            target.set_ticks(values, [f"{v:g}" for v in values])
            target.set_minor_formatter(NullFormatter())
            return
    if lo > 0 and hi / lo < 100:
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25" else ""))  # label 2x and 5x only


def errorbar(ax: Axes, x, mean, se=None, **style):
    """A curve with error bars where se > 0 (the standard error over seeds)."""
    se = None if se is None or not np.any(np.asarray(se) > 0) else se
    style.setdefault("marker", "o")
    style.setdefault("ms", 4)
    style.setdefault("capsize", 2.5)
    return ax.errorbar(x, mean, yerr=se, **style)


def title(fig: Figure, text: str | None) -> None:
    if text:
        fig.suptitle(text)
