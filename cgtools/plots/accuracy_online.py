"""Fig. 1b: accuracy A_l of samples per level vs the number of training examples seen.

Reads training metrics tables (RUN_DIR/metrics.parquet, schema metrics/1): the column
sample_accuracy (list A_1..A_L of a batch of samples at each validation) against `examples`
(default) or `step` (--x step). One panel per run; a panel is titled by its run directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cgtools.errors import ConfigError, InputError
from cgtools.plots import PlotOptions
from cgtools.plots.style import errorbar, label, level_colors, log_axis, new_figure, title

INPUTS = None  # training metrics tables, not results tables
X_COLUMNS = ("examples", "step")


def figure(tables, options: PlotOptions):
    x = options.x or "examples"
    if x not in X_COLUMNS:
        raise ConfigError(f"accuracy-online plots against {' or '.join(X_COLUMNS)}, not {x!r}")
    if options.group:
        raise ConfigError("--group is not used by accuracy-online (one panel per metrics table)")
    runs = [_curves(t, x) for t in tables]
    depth = max(acc.shape[1] for _, acc, _ in runs)
    colors = level_colors(list(range(1, depth + 1)))
    fig, axes = new_figure(len(runs))
    for ax, (xs, acc, name) in zip(axes, runs):
        for level in range(1, acc.shape[1] + 1):
            tag = f"level {level}" + (" = L" if level == acc.shape[1] else "")
            errorbar(ax, xs, acc[:, level - 1], color=colors[level], ms=3, label=tag)
        log_axis(ax, "x", xs)
        ax.set(xlabel=label(x), ylabel="accuracy $A_\\ell$ (fraction of samples)", ylim=(-0.03, 1.03),
               title=name if len(runs) > 1 else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    title(fig, options.title or (f"Accuracy per level during training ({runs[0][2]})" if len(runs) == 1
                                 else "Accuracy per level during training"))
    return fig


def _curves(table, x: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(x [n], A [n, L], run name) from the rows that measured samples (and have x > 0 for a
    log axis: the first validation can be at 0 examples)."""
    for column in (x, "sample_accuracy"):
        if column not in table.table.column_names:
            raise InputError(f"{table.where}: no {column!r} column")
    rows = [r for r in table.rows() if r["sample_accuracy"] and r[x] is not None and r[x] > 0]
    if not rows:
        raise InputError(f"{table.where}: no row with sample_accuracy (train without sample checks?)")
    depths = {len(r["sample_accuracy"]) for r in rows}
    if len(depths) != 1:
        raise InputError(f"{table.where}: sample_accuracy lists of different lengths {sorted(depths)}")
    rows.sort(key=lambda r: r[x])
    path = Path(table.where)
    name = path.parent.name if path.name == "metrics.parquet" and path.parent.name else path.stem
    return (np.array([r[x] for r in rows], float),
            np.array([r["sample_accuracy"] for r in rows], float), name)
