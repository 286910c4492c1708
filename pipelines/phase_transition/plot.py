"""Figure and summary of the forward-backward phase transition (pipelines/phase_transition).

Reads fb_<process>_L<L>.parquet (cgtools forward-backward sweeps) and mf_<process>_L<L>.json
(cgtools theory --noise-grid) from OUT and draws, with cgtools.plots.phase_transition (the
figure of `cgtools plot phase-transition`), for each process (rows):
  (a) the fraction of changed nodes per level vs noise at the main depth, with the mean field;
  (b) the root's kept probability vs noise for every depth, with the mean field at the deepest;
  (c) the susceptibility χ = Σ_{r≥1} C(r) of token changes vs noise for every depth.
The summary (JSON, and a Markdown table on stdout) gives per process and depth the measured
midpoint of the root crossover E_1/2, its width (from 3/4 to 1/4 of the drop), where the root
curve crosses the one of depth L-1 (finite-size crossing: an estimate of the critical noise), the
noise of the susceptibility peak, and the mean-field midpoint and L → ∞ critical noise.

Usage: python plot.py OUT --main-depth 6 --depths 2 3 4 --processes uniform masked -o fig.png
       [--summary summary.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cgtools.formats.files import open_input
from cgtools.formats.results import read_results
from cgtools.plots.phase_transition import TransitionCurve, curve_from_results, draw
from cgtools.plots.style import save_figure


def crossing(x: np.ndarray, y: np.ndarray, level: float) -> float | None:
    """First x where the decreasing curve y falls below `level` (linear interpolation)."""
    below = np.flatnonzero(y < level)
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(x[0])
    return float(x[i - 1] + (x[i] - x[i - 1]) * (y[i - 1] - level) / (y[i - 1] - y[i]))


def root_transition(noise: np.ndarray, kept: np.ndarray) -> dict:
    """Midpoint and 3/4 -> 1/4 width of a root-kept curve going from 1 to kept[-1]."""
    lo = kept[-1]
    at = {f: crossing(noise, kept, lo + f * (1 - lo)) for f in (0.75, 0.5, 0.25)}
    width = None if at[0.75] is None or at[0.25] is None else at[0.25] - at[0.75]
    return {"midpoint": at[0.5], "width": width}


def curve_crossing(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> float | None:
    """Interior x where curves a and b cross (sign change of a - b, ignoring the ends where both
    are at 1 or at the floor); None if they do not."""
    diff = a - b
    lo = min(a[-1], b[-1])
    mid = 0.5 * (a + b)
    middle = (mid > lo + 0.1 * (1 - lo)) & (mid < lo + 0.9 * (1 - lo))  # skip sampling noise at the ends
    inside = np.flatnonzero(middle[:-1] & (np.sign(diff[:-1]) != np.sign(diff[1:])))
    if inside.size == 0:
        return None
    i = int(inside[0])
    return float(x[i] + (x[i + 1] - x[i]) * diff[i] / (diff[i] - diff[i + 1]))


def load(out: Path, process: str, depth: int) -> TransitionCurve:
    """The sweep fb_<process>_L<depth>.parquet with its mean field mf_<process>_L<depth>.json."""
    curve = curve_from_results(read_results(open_input(out / f"fb_{process}_L{depth}.parquet"),
                                            kind="forward-backward"))
    curve.mean_field = json.loads((out / f"mf_{process}_L{depth}.json").read_text())["mean_field"]
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--main-depth", type=int, required=True)
    ap.add_argument("--depths", type=int, nargs="+", required=True)
    ap.add_argument("--processes", nargs="+", default=["uniform", "masked"])
    ap.add_argument("-o", "--figure", type=Path, required=True)
    ap.add_argument("--summary", type=Path)
    args = ap.parse_args()
    depths = sorted(args.depths)
    main_depth = args.main_depth if args.main_depth in depths else depths[-1]

    curves = [load(args.out, process, depth) for process in args.processes for depth in depths]
    # the figure is `cgtools plot phase-transition`'s (cgtools.plots.phase_transition)
    save_figure(draw(curves, main_depth), args.figure, force=True, dpi=80)

    summary: dict = {}
    for process in args.processes:
        summary[process] = {}
        previous = None
        for c in (c for c in curves if c.process == process):
            chi = c.susceptibility if c.susceptibility is not None else np.full_like(c.noise, np.nan)
            peak = int(np.nanargmax(chi)) if np.isfinite(chi).any() else 0
            summary[process][c.depth] = {
                **root_transition(c.noise, c.root_kept),
                "chi_peak_noise": float(c.noise[peak]), "chi_peak": float(chi[peak]),
                "mean_field_midpoint": c.mean_field["transition_noise"],
                "mean_field_critical_noise": c.mean_field["critical_noise"],
                "sentences": c.n_pairs,
                # finite-size crossing of the root curves of depths L-1 and L: estimates E_c
                "crossing_with_previous_depth": None if previous is None else curve_crossing(c.noise, previous, c.root_kept),
            }
            previous = c.root_kept

    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print("| process | L | E_1/2 (BP) | width | crossing with L-1 | χ peak at | χ max | E_1/2 (mean field) | "
          "E_c mean field (L→∞) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for process, rows in summary.items():
        for depth, r in rows.items():
            print(f"| {process} | {depth} | {fmt(r['midpoint'])} | {fmt(r['width'])} | "
                  f"{fmt(r['crossing_with_previous_depth'])} | {fmt(r['chi_peak_noise'])} | "
                  f"{fmt(r['chi_peak'])} | {fmt(r['mean_field_midpoint'])} | {fmt(r['mean_field_critical_noise'])} |")


if __name__ == "__main__":
    main()
