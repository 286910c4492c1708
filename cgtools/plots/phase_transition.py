"""The forward-backward phase transition (companion paper): the fraction of nodes changed per level
vs noise, and the root class across depths.

Reads 'forward-backward' tables (one sweep over noise each). One row of panels per noise process:
(a) changed fraction per level (tokens ... root) vs noise E for the deepest sweep (or `main_depth`),
(b) with several sweeps, the probability that the root class is kept (root_kept_expected, BP's
low-variance estimate, when present) for every sweep, (c) when measured, the susceptibility
χ = Σ_{r≥1} C(r) of token changes. Mean-field predictions (cgtools.analysis.mean_field), when
attached to a curve, are drawn dashed; the deepest one's L → ∞ critical noise E_c dotted.
pipelines/phase_transition/plot.py draws its figure with :func:`draw`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cgtools.errors import InputError
from cgtools.formats.results import Results
from cgtools.plots import PlotOptions
from cgtools.plots.style import new_figure, sequential_colors, title

INPUTS = ("forward-backward",)
PANEL = (5.0, 4.4)


@dataclass
class TransitionCurve:
    """One sweep: noise [n] increasing, changed [n, L+1] (levels 0..L), root_kept [n],
    susceptibility [n] or None; n_pairs = (sentence, noise draw) pairs per noise level.
    mean_field: the dict of cgtools.analysis.mean_field.mean_field (noise, changed, root_kept,
    critical_noise), or None."""

    process: str
    depth: int
    label: str
    noise: np.ndarray
    changed: np.ndarray
    root_kept: np.ndarray
    susceptibility: np.ndarray | None
    n_pairs: int
    mean_field: dict | None = None


def curve_from_results(result: Results, label: str | None = None) -> TransitionCurve:
    """A TransitionCurve from a forward-backward results table (rows sorted by noise)."""
    rows = sorted(result.rows(), key=lambda r: r["noise"])
    if not rows:
        raise InputError(f"{result.where}: no rows")
    changed = np.array([r["changed"] for r in rows], float)
    expected = [r.get("root_kept_expected") for r in rows]
    root = np.array(expected if None not in expected else [r["root_kept"] for r in rows], float)
    chi = [r.get("susceptibility") for r in rows]
    depth = changed.shape[1] - 1
    return TransitionCurve(
        process=str(rows[0].get("process") or "unknown"), depth=depth,
        label=label or f"L = {depth}", noise=np.array([r["noise"] for r in rows], float),
        changed=changed, root_kept=root,
        susceptibility=np.array(chi, float) if None not in chi else None, n_pairs=int(rows[0]["n"]))


def attach_mean_field(curve: TransitionCurve, grammar: dict | None, where: str) -> None:
    """Compute the mean-field prediction for the curve's grammar and process (201 noise levels)."""
    from cgtools.analysis.mean_field import mean_field
    from cgtools.diffusion.registry import make_process
    from cgtools.training.presets import DEFAULT_PRESET, process_config

    if not grammar:
        raise InputError(f"{where}: no grammar in the metadata for the mean-field theory")
    v = grammar["vocab"]
    process = make_process(process_config(DEFAULT_PRESET, curve.process), v)
    curve.mean_field = mean_field(grammar["depth"], grammar["branching"], v, grammar["synonyms"],
                                  grammar.get("n_classes"), list(np.linspace(0, 1, 201)), process)


def level_name(level: int, depth: int) -> str:
    return "tokens" if level == 0 else ("root" if level == depth else f"level {level}")


def draw(curves: list[TransitionCurve], main_depth: int | None = None, text: str | None = None):
    """The figure: one row per process; columns (a) levels, (b) root vs sweeps, (c) χ."""
    processes = list(dict.fromkeys(c.process for c in curves))
    by_process = {p: [c for c in curves if c.process == p] for p in processes}
    compare = any(len(cs) > 1 for cs in by_process.values())
    chi = any(c.susceptibility is not None for c in curves)
    columns = 1 + compare + chi
    fig, axes = new_figure(len(processes) * columns, columns=columns, panel_size=PANEL)
    for row, process in enumerate(processes):
        panels = iter(axes[row * columns:(row + 1) * columns])
        cs = sorted(by_process[process], key=lambda c: c.depth)
        main = next((c for c in reversed(cs) if c.depth == main_depth), cs[-1])
        _levels(next(panels), main)
        if compare:
            _roots(next(panels), cs)
        if chi:
            _susceptibility(next(panels), cs)
    title(fig, text)
    return fig


def _levels(ax, curve: TransitionCurve) -> None:
    colors = sequential_colors(curve.depth + 1, "plasma", 0.85)
    mf = curve.mean_field
    for level in range(curve.depth + 1):
        ax.plot(curve.noise, curve.changed[:, level], "o-", ms=3, color=colors[level],
                label=level_name(level, curve.depth))
        if mf is not None:
            ax.plot(mf["noise"], np.asarray(mf["changed"])[:, level], "--", lw=1, color=colors[level])
    suffix = " (dashed: mean field)" if mf is not None else ""
    ax.set(xlabel="noise E (probability a token is corrupted)", ylabel="fraction of nodes changed",
           title=f"{curve.process}: {curve.label}, per level{suffix}", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _roots(ax, curves: list[TransitionCurve]) -> None:
    by_depth = all(c.label == f"L = {c.depth}" for c in curves)
    colors = sequential_colors(len(curves))
    for color, c in zip(colors, curves):
        ax.plot(c.noise, c.root_kept, "o-", ms=2.5, color=color, label=c.label)
    deepest = curves[-1].mean_field
    if deepest is not None:
        ax.plot(deepest["noise"], deepest["root_kept"], "k--", lw=1,
                label=f"mean field L = {curves[-1].depth}")
        if deepest.get("critical_noise") is not None:
            ax.axvline(deepest["critical_noise"], color="k", ls=":", lw=1, label="mean field E_c (L → ∞)")
    ax.set(xlabel="noise E (probability a token is corrupted)", ylabel="P(root class kept)",
           title=f"{curves[0].process}: root class" + (" vs depth" if by_depth else ""), xlim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _susceptibility(ax, curves: list[TransitionCurve]) -> None:
    colors = sequential_colors(len(curves))
    for color, c in zip(colors, curves):
        if c.susceptibility is not None:
            ax.plot(c.noise, c.susceptibility, "o-", ms=2.5, color=color, label=c.label)
    ax.set(xlabel="noise E (probability a token is corrupted)",
           ylabel=r"susceptibility $\chi = \Sigma_{r \geq 1}\, C(r)$",
           title=f"{curves[0].process}: susceptibility of token changes", xlim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def figure(tables: list[Results], options: PlotOptions):
    curves = []
    for t in tables:
        label = None
        if options.group:
            if options.group not in t.tags:
                raise InputError(f"{t.where}: no {options.group!r} tag to label the curve with")
            label = f"{options.group} = {t.tags[options.group]}"
        curve = curve_from_results(t, label)
        if options.mean_field:
            attach_mean_field(curve, t.meta.get("grammar"), t.where)
        curves.append(curve)
    labels = [(c.process, c.label) for c in curves]
    for c, t in zip(curves, tables):  # two sweeps with one label: tell them apart by file
        if labels.count((c.process, c.label)) > 1:
            c.label = f"{c.label} ({t.where})"
    return draw(curves, text=options.title or "Forward-backward experiment")
