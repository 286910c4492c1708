"""Fig. 1c: token-token correlation magnitude vs distance, log-log, one curve per value of a tag.

Reads 'correlation' tables (correlate -o). Curves: one per value of --group (default P; without
that tag, one per table), replicates averaged. Per curve, its sampling-noise floor as a dashed
line of the same colour; the exact correlation of the grammar (modes exact, exact-pooled,
exact-tree) in black and the theory's power law (column `theory`) as a red dashed line, when
present. Tree modes (by LCA level) plot against that level. Points at or below zero cannot be
shown on a log axis and are dropped.
"""

from __future__ import annotations

from cgtools.errors import InputError
from cgtools.plots import PlotOptions
from cgtools.plots.style import errorbar, label, new_figure, plain_log_ticks, sequential_colors, title
from cgtools.plots.tables import FILE, describe, mean_curve, split, tidy_rows

INPUTS = ("correlation",)


def figure(tables, options: PlotOptions):
    x = options.x or "distance"
    rows = tidy_rows(tables)
    # modes: positional | pooled | tree and their exact-* counterparts (cgtools.analysis.correlation)
    exact = [r for r in rows if str(r.get("mode")).startswith("exact")]
    measured = [r for r in rows if not str(r.get("mode")).startswith("exact")]
    trees = {str(r.get("mode")).endswith("tree") for r in rows}
    if len(trees) > 1:
        raise InputError("tables by LCA level (tree modes) and by distance cannot share a figure")
    by_level = trees == {True}
    group = options.group or "P"
    if not any(r.get(group) is not None for r in measured):
        if options.group:
            raise InputError(f"no table has a {group!r} tag to group by")
        group = FILE  # untagged tables: one curve per file
    curves = split(measured, group)
    fig, (ax,) = new_figure(1, panel_size=(6.4, 4.6))
    colors = sequential_colors(len(curves))
    handles = []  # legend order: measured curves, exact, theory, noise floor
    for color, (value, curve) in zip(colors, curves.items()):
        name = value if group == FILE else describe(value, group)
        handles.append(_draw(ax, *mean_curve(curve, x, "correlation")[:3], color=color, label=name))
        xs, floor, _, _ = mean_curve(curve, x, "noise_floor")
        keep = (xs > 0) & (floor > 0)
        if keep.any():
            ax.plot(xs[keep], floor[keep], ls="--", lw=1, color=color)
    if exact:
        handles.append(_draw(ax, *mean_curve(exact, x, "correlation")[:3], color="black", marker=None,
                             lw=1.8, label="exact (grammar)"))
    xs, pred, _, _ = mean_curve(rows, x, "theory")
    keep = (xs > 0) & (pred > 0)
    if keep.any():
        handles += ax.plot(xs[keep], pred[keep], ls="--", color="tab:red", lw=1.8, label="theory (power law)")
    if any(r.get("noise_floor") is not None for r in measured):
        handles += ax.plot([], [], ls="--", lw=1, color="0.4", label="noise floor (same colour)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "x")
    xlabel = "level of the lowest common ancestor" if by_level and x == "distance" else label(x)
    ax.set(xlabel=xlabel, ylabel=r"correlation magnitude $\|C(t)\|_F / v$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=[h for h in handles if h is not None], fontsize=8, loc="best")
    title(fig, options.title or "Token-token correlations")
    return fig


def _draw(ax, xs, mean, se, **style):
    """The positive part of a curve (a log axis cannot show the rest); its legend handle."""
    keep = (xs > 0) & (mean > 0)
    if not keep.any():
        return None
    style.setdefault("ms", 3.5)
    return errorbar(ax, xs[keep], mean[keep], se[keep], **style)
