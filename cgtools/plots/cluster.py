"""Clustering accuracy (ARI between found clusters and the true synonym classes) per level vs
the training-set size P (the curves whose crossing gives the clustering P* of Fig. 2 and 7).

Reads 'cluster' tables; seeds at the same P are averaged (error bars: standard error). When the
tables hold several contexts or methods, each combination gets its own line style. --group TAG
draws one panel per value of TAG (e.g. m).
"""

from __future__ import annotations

from cgtools.plots import PlotOptions
from cgtools.plots.levels import colors_for, draw_levels
from cgtools.plots.style import LINESTYLES, MARKERS, label, log_axis, new_figure, title
from cgtools.plots.tables import describe, require, split, tidy_rows

INPUTS = ("cluster",)
VARIANTS = ("context", "method", "oracle", "weighted", "node", "position")  # cluster settings


def figure(tables, options: PlotOptions):
    x = options.x or "P"
    rows = tidy_rows(tables)
    require(rows, x, "the x axis", f" (tag each run with --tag {x}=VALUE)")
    if options.group:
        require(rows, options.group, "--group")
    variants = [c for c in VARIANTS if len({r.get(c) for r in rows}) > 1]
    panels = split(rows, options.group) if options.group else {None: rows}
    colors = colors_for(rows)
    fig, axes = new_figure(len(panels))
    for ax, (value, panel) in zip(axes, panels.items()):
        styles = split(panel, variants) if variants else {None: panel}
        for i, (variant, variant_rows) in enumerate(styles.items()):
            draw_levels(ax, variant_rows, x, "ari", colors, label=i == 0,
                        ls=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)])
            if variants:  # a legend entry for the line style
                ax.plot([], [], color="0.3", ls=LINESTYLES[i % len(LINESTYLES)],
                        marker=MARKERS[i % len(MARKERS)], label=describe(variant, variants))
        log_axis(ax, "x", [r[x] for r in panel])
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set(xlabel=label(x), ylabel="adjusted Rand index (ARI)", ylim=(-0.1, 1.05),
               title=describe(value, options.group))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", handlelength=3)
    title(fig, options.title or "Clustering of synonyms per level")
    return fig
