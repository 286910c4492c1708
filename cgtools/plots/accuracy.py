"""Fig. 1a: accuracy A_l of generated samples per level vs the training-set size P.

Reads 'accuracy' tables (measure-accuracy -o, one per run, tagged with P and seed); several
seeds at the same P are averaged (error bars: standard error). --group TAG draws one panel per
value of TAG. Dotted vertical lines: the theory's P_l = v m^(l+1) / (1 - m/v^(s-1)) when the
grammar (L, s, v, m) of a panel is known.
"""

from __future__ import annotations

from cgtools.analysis.theory import theory
from cgtools.errors import ConfigError
from cgtools.plots import PlotOptions
from cgtools.plots.levels import colors_for, depth_of, draw_levels
from cgtools.plots.style import label, log_axis, new_figure, title
from cgtools.plots.tables import describe, require, split, tidy_rows

INPUTS = ("accuracy",)


def figure(tables, options: PlotOptions):
    x = options.x or "P"
    rows = tidy_rows(tables)
    require(rows, x, "the x axis", f" (tag each run with --tag {x}=VALUE)")
    panels = split(rows, options.group) if options.group else {None: rows}
    if options.group:
        require(rows, options.group, "--group")
    colors = colors_for(rows)
    fig, axes = new_figure(len(panels))
    for ax, (value, panel) in zip(axes, panels.items()):
        draw_levels(ax, panel, x, "accuracy", colors, depth_of(panel))
        logx = log_axis(ax, "x", [r[x] for r in panel])
        if x == "P" and logx:
            _theory_lines(ax, panel, colors)
        ax.set(xlabel=label(x), ylabel="accuracy $A_\\ell$ (fraction of samples)", ylim=(-0.03, 1.03),
               title=describe(value, options.group))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    title(fig, options.title or "Accuracy per level of the grammar")
    return fig


def _theory_lines(ax, rows, colors) -> None:
    """P_l of the theory for the panel's grammar, as dotted lines in the level's colour."""
    params = {}
    for name in ("L", "s", "v", "m"):
        values = {r.get(name) for r in rows}
        if len(values) != 1 or not isinstance(next(iter(values)), int):
            return
        params[name] = values.pop()
    try:
        pred = theory(params["L"], params["s"], params["v"], params["m"])
    except ConfigError:
        return
    lo, hi = ax.get_xlim()
    drawn = False
    for level, p_l in zip(pred["levels"], pred["sample_complexity"]):
        if p_l is not None and level in colors and lo <= p_l <= hi:
            ax.axvline(p_l, color=colors[level], ls=":", lw=1.2)
            drawn = True
    if drawn:  # one neutral legend entry for all levels
        ax.plot([], [], color="0.4", ls=":", lw=1.2, label="theory $P_\\ell$ (dotted)")
    ax.set_xlim(lo, hi)
