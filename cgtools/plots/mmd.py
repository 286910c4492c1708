"""Fig. 5b: MMD between generated and real images vs training, one curve per feature depth.

Reads 'mmd' tables (cgtools mmd -o). x: the tag --x (default `step`, the training step of the
checkpoint that made the images), log scale. One curve per depth (the `layer` column, ordered by
`depth`: shallow light, deep dark), replicates at one x averaged with standard-error bars (a
single table's bootstrap error when there is one replicate). Two panels, both log-log (values at
or below 0 are not drawn): MMD² itself, and MMD² divided by its value at the first x of that
depth, so that depths of different scales can be compared: the paper's observation is that
shallow depths reach their floor first. Tables tagged `reference` (any value; e.g. real training
images against the held-out ones) give each depth's resolution, drawn as a dashed horizontal
line in its colour on the first panel: the larger of their MMD² and its bootstrap error (below
it, generated and real images cannot be told apart with these sample sizes).
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
            errorbar(relative, xs[positive], mean[positive] / mean[0], se[positive] / mean[0], color=colors[key],
                     label=name, ms=3.5)
    drawn = False
    for value, ref in split(reference, REFERENCE_TAG).items():
        for key in depths:
            rows_k = [r for r in ref if (r["depth"], r["layer"]) == key and r.get("mmd2") is not None]
            if rows_k:
                level = max(float(np.mean([r["mmd2"] for r in rows_k])),
                            float(np.mean([r.get("mmd2_err") or 0.0 for r in rows_k])))
                if level > 0:
                    raw.axhline(level, color=colors[key], ls="--", lw=1.0)
                    drawn = True
    for ax in (raw, relative):
        ax.set_xscale("log")
        plain_log_ticks(ax, "x", sorted({float(r[x]) for r in measured}))
        ax.set_xlabel(label(x))
        ax.grid(alpha=0.3, which="both")
    raw.set_yscale("log")
    relative.set_yscale("log")
    raw.set_ylabel(r"MMD$^2$ (Gaussian kernel, median bandwidth)")
    relative.set_ylabel(r"MMD$^2$ / MMD$^2$ at the first step")
    if drawn:
        raw.plot([], [], color="grey", ls="--", lw=1.0, label="real vs real: resolution (dashed)")
    raw.legend(fontsize=7, loc="best")
    title(fig, options.title or "MMD between generated and real images vs training")
    return fig
