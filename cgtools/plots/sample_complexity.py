"""Fig. 2 and 7: sample complexity P* vs the number of synonyms m, log-log.

Reads 'sample-complexity' tables (cgtools sample-complexity -o). One series per fit group (the
table's grouping tags other than m, e.g. L or the clustering context; --group TAG to choose),
with error bars [p_star_lo, p_star_hi]; groups that never crossed are drawn as open triangles at
their bound (up: P* > the largest P measured, down: P* <= the smallest). Per series: the fitted
power law with its exponent in the legend, and the theory, m^(L+1): the exact P_L when the
grammar (s, v) was known, else scaled through the data (geometric mean of P* / m^(L+1)).
"""

from __future__ import annotations

import math

import numpy as np

from cgtools.plots import PlotOptions
from cgtools.plots.style import MARKERS, label, new_figure, plain_log_ticks, title
from cgtools.plots.tables import require, split, tidy_rows

INPUTS = ("sample-complexity",)
PANEL = (6.4, 4.8)
SOURCE_NAMES = {"accuracy": "diffusion (A_L)", "cluster": "clustering (ARI)"}


def figure(tables, options: PlotOptions):
    x = options.x or "m"
    rows = []
    for t in tables:  # the input kind matters when accuracy and cluster P* share a figure
        for r in tidy_rows([t]):
            r["_source"] = SOURCE_NAMES.get(t.meta.get("source_kind"), t.meta.get("source_kind") or "")
            rows.append(r)
    require(rows, x, "the x axis", " (group the sweep by m: sample-complexity --by m,...)")
    keys = [options.group] if options.group else _fit_keys(tables, x)
    if len({r["_source"] for r in rows}) > 1:
        keys = ["_source"] + keys
    # a tag with one value everywhere names no series: it goes in the title instead
    constant = {k: rows[0].get(k) for k in keys if len({r.get(k) for r in rows}) == 1 and k != "_source"}
    keys = [k for k in keys if k not in constant]
    series = split(rows, keys) if keys else {None: rows}
    fig, (ax,) = new_figure(1, panel_size=PANEL)
    colors = [f"C{i}" for i in range(len(series))]
    handles = []
    for i, (value, points) in enumerate(series.items()):
        name = ", ".join(str(v) if k == "_source" else f"{k} = {v}"
                         for k, v in zip(keys, value) if v is not None) if keys else ""
        handles += _series(ax, points, x, colors[i], MARKERS[i % len(MARKERS)], name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "x", [r[x] for r in rows])
    plain_log_ticks(ax, "y")
    ax.set(xlabel=label(x), ylabel="sample complexity P* (training sentences)")
    ax.grid(alpha=0.3, which="both")
    if len(handles) > 4:  # beside the axes (a wider figure): a long legend would hide the points
        fig.set_size_inches(PANEL[0] + 5.0, PANEL[1])
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(handles=handles, fontsize=8, loc="upper left")
    fixed = ", ".join(f"{k} = {v}" for k, v in constant.items())
    title(fig, options.title or "Sample complexity vs number of synonyms" + (f" ({fixed})" if fixed else ""))
    return fig


def _fit_keys(tables, x: str) -> list[str]:
    """The grouping tags of the tables other than x (they define separate fits)."""
    keys: list[str] = []
    for t in tables:
        keys += [k for k in t.meta.get("by") or [] if k != x and k not in keys]
    return keys


def _series(ax, rows, x: str, color, marker: str, name: str) -> list:
    """Points, bounds, fit and theory of one series; returns their legend handles in that order."""
    handles = []
    rows = sorted(rows, key=lambda r: r[x])
    crossed = [r for r in rows if r.get("p_star") is not None]
    prefix = f"{name}: " if name else ""
    if crossed:
        m = np.array([r[x] for r in crossed], float)
        p = np.array([r["p_star"] for r in crossed], float)
        lo = np.array([r["p_star_lo"] if r.get("p_star_lo") is not None else r["p_star"] for r in crossed])
        hi = np.array([r["p_star_hi"] if r.get("p_star_hi") is not None else r["p_star"] for r in crossed])
        handles.append(ax.errorbar(m, p, yerr=[p - lo, hi - p], ls="none", marker=marker, ms=6, capsize=3,
                                   color=color, label=f"{prefix}measured $P^*$"))
    for status, bound, arrow in (("below", "p_star_lo", "^"), ("above", "p_star_hi", "v")):
        limits = [r for r in rows if r.get("status") == status and r.get(bound) is not None]
        if limits:
            sign = ">" if status == "below" else "≤"
            handles += ax.plot([r[x] for r in limits], [r[bound] for r in limits], ls="none", marker=arrow,
                               ms=7, mfc="none", color=color, label=f"{prefix}bound: $P^*$ {sign} (no crossing)")
    grid = np.geomspace(min(r[x] for r in rows), max(r[x] for r in rows), 50)
    fit = next((r for r in rows if r.get("exponent") is not None and r.get("prefactor") is not None), None)
    if fit is not None:
        err = f" \\pm {fit['exponent_err']:.2f}" if fit.get("exponent_err") is not None else ""
        handles += ax.plot(grid, fit["prefactor"] * grid ** fit["exponent"], color=color, lw=1.5,
                           label=f"{prefix}fit $P^* \\propto m^{{{fit['exponent']:.2f}{err}}}$")
    return handles + _theory(ax, rows, crossed, x, grid, color, prefix)


def _theory(ax, rows, crossed, x, grid, color, prefix) -> list:
    exponents = {r.get("theory_exponent") for r in rows} - {None}
    if len(exponents) != 1:
        return []
    b = exponents.pop()
    exact = [r for r in rows if r.get("theory_p_star") is not None]
    if len(exact) == len(rows) and len(rows) > 1:
        return ax.plot([r[x] for r in rows], [r["theory_p_star"] for r in rows], ls="--", color=color,
                       lw=1.2, alpha=0.8, label=f"{prefix}theory $v\\,m^{{{b}}} / (1 - m/v^{{s-1}})$")
    if crossed:
        scale = math.exp(np.mean([math.log(r["p_star"]) - b * math.log(r[x]) for r in crossed]))
        return ax.plot(grid, scale * grid**b, ls="--", color=color, lw=1.2, alpha=0.8,
                       label=f"{prefix}theory $\\propto m^{{{b}}}$ (scaled to the data)")
    return []
