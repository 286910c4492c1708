"""Fig. 5b: MMD between generated and real images vs training, one curve per feature depth.

Reads 'mmd' tables (cgtools mmd -o). x: the tag --x (default `step`, the training step of the
checkpoint that made the images), log scale. One curve per depth (the `layer` column, ordered by
`depth`: shallow light, deep dark), replicates at one x averaged with standard-error bars (a
single table's bootstrap error when there is one replicate). Two panels: MMD² itself (log y; values
at or below 0 are not drawn on it) and MMD² divided by its value at the first x of that depth, so
that depths of different scales can be compared: the paper's observation is that shallow depths
reach their floor first. Tables tagged `reference` (any value; e.g. real training images against
the held-out ones) are drawn as dashed horizontal lines in each depth's colour: the floor a
perfect generator of that sample size would reach.
"""

from __future__ import annotations

import numpy as np

from cgtools.errors import InputError
from cgtools.plots import PlotOptions
from cgtools.plots.style import errorbar, label, new_figure, plain_log_ticks, sequential_colors, title
from cgtools.plots.tables import mean_curve, require, split, tidy_rows

INPUTS = ("mmd",)
REFERENCE_TAG = "reference"


def figure(tables, options: PlotOptions):
    x = options.x or "step"
    rows = tidy_rows(tables)
    reference = [r for r in rows if r.get(REFERENCE_TAG) is not None]
    measured = [r for r in rows if r.get(REFERENCE_TAG) is None]
    if not measured:
        raise InputError("no mmd table without a 'reference' tag to draw against training")
    require(measured, x, "the x axis", f" (tag the tables: cgtools mmd ... --tag {x}=VALUE)")
    depths = sorted({(r["depth"], r["layer"]) for r in measured})
    colors = dict(zip(depths, sequential_colors(len(depths), cmap="viridis_r", stop=1.0)))
    fig, (raw, relative) = new_figure(2, panel_size=(5.6, 4.4))
    for key in depths:
        curve = [r for r in measured if (r["depth"], r["layer"]) == key]
        xs, mean, se, reps = mean_curve(curve, x, "mmd2")
        if not xs.size:
            continue
        if not np.any(reps > 1):  # one table per point: its bootstrap error
            _, err, _, _ = mean_curve(curve, x, "mmd2_err")
            se = np.nan_to_num(err) if err.size == xs.size else se
        name = f"{key[1]} (depth {key[0]})"
        positive = mean > 0
        errorbar(raw, xs[positive], mean[positive], se[positive], color=colors[key], label=name, ms=3.5)
        if mean[0] > 0:
            errorbar(relative, xs, mean / mean[0], se / mean[0], color=colors[key], label=name, ms=3.5)
    for value, ref in split(reference, REFERENCE_TAG).items():
        for key in depths:
            values = [r["mmd2"] for r in ref if (r["depth"], r["layer"]) == key and r.get("mmd2") is not None]
            if values and np.mean(values) > 0:
                raw.axhline(float(np.mean(values)), color=colors[key], ls="--", lw=1.0)
    for ax in (raw, relative):
        ax.set_xscale("log")
        plain_log_ticks(ax, "x", sorted({float(r[x]) for r in measured}))
        ax.set_xlabel(label(x))
        ax.grid(alpha=0.3, which="both")
    raw.set_yscale("log")
    raw.set_ylabel(r"MMD$^2$ (Gaussian kernel, median bandwidth)")
    relative.set_ylabel(r"MMD$^2$ / MMD$^2$ at the first step")
    relative.axhline(0.0, color="grey", lw=0.8)
    raw.legend(fontsize=7, loc="best")
    if reference:
        raw.plot([], [], color="grey", ls="--", lw=1.0, label="reference (dashed, per depth)")
        raw.legend(fontsize=7, loc="best")
    title(fig, options.title or "MMD between generated and real images vs training")
    return fig
