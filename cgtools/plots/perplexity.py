"""Fig. 8: conditional perplexity vs context length T, one curve per value of a tag.

Reads 'perplexity' tables (cgtools perplexity -o). Curves: one per value of --group (default
`step`, the training step of the model that made the texts; without that tag, one per table),
replicates averaged in nats, drawn as exp(mean nll) with the delta-method error exp(nll) x se.
Tables tagged `reference` (any value; e.g. the corpus's own validation texts) are drawn in black,
dashed: the dashed line of the paper's Fig. 8. Log-log axes.
"""

from __future__ import annotations

import numpy as np

from cgtools.plots import PlotOptions
from cgtools.plots.style import errorbar, label, new_figure, plain_log_ticks, sequential_colors, title
from cgtools.plots.tables import FILE, describe, mean_curve, require, split, tidy_rows

INPUTS = ("perplexity",)
REFERENCE_TAG = "reference"


def figure(tables, options: PlotOptions):
    x = options.x or "context_length"
    rows = tidy_rows(tables)
    require(rows, x, "the x axis")
    reference = [r for r in rows if r.get(REFERENCE_TAG) is not None]
    measured = [r for r in rows if r.get(REFERENCE_TAG) is None]
    group = options.group or "step"
    if not any(r.get(group) is not None for r in measured):
        if options.group:
            from cgtools.errors import InputError

            raise InputError(f"no table has a {group!r} tag to group by")
        group = FILE
    fig, (ax,) = new_figure(1, panel_size=(6.4, 4.6))
    curves = split(measured, group) if measured else {}
    handles = []
    for color, (value, curve) in zip(sequential_colors(len(curves)), curves.items()):
        name = value if group == FILE else describe(value, group)
        handles.append(_draw(ax, curve, x, color=color, label=name))
    for value, curve in split(reference, REFERENCE_TAG).items():
        handles.append(_draw(ax, curve, x, color="black", ls="--", marker=None, lw=1.6,
                             label=f"reference ({value})"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "x")
    plain_log_ticks(ax, "y")
    ax.set(xlabel=label(x) if x != "context_length" else "context length T (tokens of the scoring model)",
           ylabel=r"perplexity $\exp\langle -\log p(x_T \mid x_{<T}) \rangle$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=[h for h in handles if h is not None], fontsize=8, loc="best")
    title(fig, options.title or "Conditional perplexity vs context length")
    return fig


def _draw(ax, rows, x: str, **style):
    xs, nll, se, _ = mean_curve(rows, x, "nll")
    if not xs.size:
        return None
    if not np.any(se > 0):  # one table per curve: its own standard error over texts (null when n = 1)
        at, own, _, _ = mean_curve(rows, x, "nll_se")
        own_se = dict(zip(at.tolist(), own.tolist()))
        se = np.array([own_se.get(v, 0.0) for v in xs.tolist()])
    ppl = np.exp(nll)
    style.setdefault("ms", 3.5)
    return errorbar(ax, xs, ppl, ppl * se, **style)
