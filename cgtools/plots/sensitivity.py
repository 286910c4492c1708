"""Fig. 6: relative sensitivity S_{k,l} of each U-Net block k to synonym exchanges at level l,
vs the training-set size P.

Reads 'sensitivity' tables (one row per block and level; seeds at the same P averaged, error bars:
standard error). One panel per block, in network order (block_index); one colour per level.
Accuracy tables given alongside add the paper's dashed lines 1 - A_l (the fraction of samples
breaking level-l rules) to every panel. --group TAG: one row of panels per value of TAG.
"""

from __future__ import annotations

from cgtools.errors import InputError
from cgtools.plots import PlotOptions
from cgtools.plots.levels import colors_for
from cgtools.plots.style import errorbar, label, log_axis, new_figure, title
from cgtools.plots.tables import describe, mean_curve, require, split, tidy_rows

INPUTS = ("sensitivity", "accuracy")


def figure(tables, options: PlotOptions):
    x = options.x or "P"
    sens = tidy_rows([t for t in tables if t.kind == "sensitivity"])
    acc = tidy_rows([t for t in tables if t.kind == "accuracy"])
    if not sens:
        raise InputError("no 'sensitivity' table given (accuracy tables only add the 1 - A_l lines)")
    require(sens + acc, x, "the x axis", f" (tag each run with --tag {x}=VALUE)")
    if options.group:
        require(sens, options.group, "--group")
    blocks = sorted({(r["block_index"], r["block"]) for r in sens})
    groups = split(sens, options.group) if options.group else {None: sens}
    columns = len(blocks) if options.group else None  # None: balanced grid
    fig, axes = new_figure(len(blocks) * len(groups), columns=columns)
    colors = colors_for(sens + acc)
    panel = 0
    for value, group_rows in groups.items():
        group_acc = [r for r in acc if not options.group or r.get(options.group) == value]
        for index, block in blocks:
            ax = axes[panel]
            panel += 1
            block_rows = [r for r in group_rows if r["block_index"] == index]
            for level, level_rows in split(block_rows, "level").items():
                xs, mean, se, _ = mean_curve(level_rows, x, "sensitivity")
                errorbar(ax, xs, mean, se, color=colors.get(level), ms=3, label=f"level {level}")
            for level, level_rows in split(group_acc, "level").items():
                xs, mean, _, _ = mean_curve(level_rows, x, "accuracy")
                ax.plot(xs, 1 - mean, ls="--", lw=1, color=colors.get(level))
            log_axis(ax, "x", [r[x] for r in block_rows + group_acc])
            where = describe(value, options.group)
            ax.set(xlabel=label(x), ylabel="relative sensitivity $S_{k,\\ell}$", ylim=(-0.03, None),
                   title=f"{block}" + (f" ({where})" if where else ""))
            ax.grid(alpha=0.3)
            if panel == 1:
                if group_acc:
                    ax.plot([], [], ls="--", lw=1, color="0.4", label="$1 - A_\\ell$ (dashed)")
                ax.legend(fontsize=7)
    title(fig, options.title or "Sensitivity of the network's blocks to synonym exchanges")
    return fig
