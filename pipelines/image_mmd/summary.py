"""Summary of the image MMD pipeline: per checkpoint and feature depth, the MMD² between the
samples and held-out real images, and the step at which each depth has converged.

Two convergence steps per depth (our definitions; the paper reads Fig. 5b by eye), each the first
checkpoint from which on a condition holds at every later checkpoint ("-" when it never does):
* relative: MMD² below FRACTION of its value at the first checkpoint sampled;
* indistinguishable: MMD² below SIGMAS bootstrap errors, i.e. the samples cannot be told from
  held-out real images at that depth with this many images.
The paper's claim, shallow features first, predicts convergence steps that do not decrease with
depth; the summary reports Spearman's rank correlation between depth and each convergence step
(depths that never converge rank last).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FRACTION = 0.1
SIGMAS = 3.0


def _rows(path: str) -> tuple[dict, list[dict]]:
    from cgtools.formats.files import open_input
    from cgtools.formats.results import read_results

    res = read_results(open_input(path), kind="mmd")
    return res.meta, res.rows()


def first_from_which_on(steps: list[int], holds: list[bool]) -> int | None:
    """The first step from which `holds` is true at every later step (None if not at the last)."""
    found = None
    for step, ok in zip(steps, holds):
        found = (step if found is None else found) if ok else None
    return found


def convergence_step(curve: list[tuple[int, float]], fraction: float = FRACTION) -> int | None:
    """First step from which on MMD² stays below `fraction` of the first value (None if never)."""
    if not curve or curve[0][1] <= 0:
        return None
    return first_from_which_on([s for s, _ in curve], [v <= fraction * curve[0][1] for _, v in curve])


def indistinguishable_step(curve: list[tuple[int, float, float | None]], sigmas: float = SIGMAS) -> int | None:
    """First step from which on MMD² < sigmas x its bootstrap error (None if never; a point
    without an error never counts)."""
    return first_from_which_on([s for s, _, _ in curve], [e is not None and v < sigmas * e for _, v, e in curve])


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mmd", nargs="+", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    with open(args.metrics, "rb") as f:  # one open file: the run may be rewriting it
        metrics = {m["step"]: m for m in pq.read_table(f).to_pylist()}
    per_step: dict[int, dict[int, dict]] = {}
    layers: dict[int, str] = {}
    backbone = None
    for path in args.mmd:
        meta, rows = _rows(path)
        backbone = meta.get("backbone", backbone)
        step = int(meta["tags"]["step"])
        for r in rows:
            per_step.setdefault(step, {})[r["depth"]] = r
            layers[r["depth"]] = r["layer"]
    _, ref_rows = _rows(args.reference)
    reference = {r["depth"]: r for r in ref_rows}
    steps, depths = sorted(per_step), sorted(layers)

    def cell(r: dict | None) -> str:
        if r is None:
            return f"{'-':>17}"
        err = r.get("mmd2_err")
        return f"{r['mmd2']:>9.4f} ± {err:<5.3f}" if err is not None else f"{r['mmd2']:>17.4f}"

    head = f"{'step':>6} {'val loss':>9}  " + "  ".join(f"{layers[d]:>17}" for d in depths)
    lines = [f"Images: MMD² (Gaussian kernel, median bandwidth; ± bootstrap error) between each checkpoint's "
             f"samples and held-out real images, in {backbone} features at each depth", "", head]
    for step in steps:
        loss = metrics.get(step, {}).get("val_loss")
        lines.append(f"{step:>6} {'-' if loss is None else f'{loss:.4f}':>9}  "
                     + "  ".join(cell(per_step[step].get(d)) for d in depths))
    lines.append(f"{'real':>6} {'':>9}  " + "  ".join(cell(reference.get(d)) for d in depths))
    lines += ["", f"'real': the training images against the held-out ones (the floor of a perfect generator).", ""]
    converged, alike, relative = {}, {}, {}
    for d in depths:
        curve = [(s, per_step[s][d]["mmd2"], per_step[s][d].get("mmd2_err")) for s in steps if d in per_step[s]]
        converged[d] = convergence_step([(s, v) for s, v, _ in curve])
        alike[d] = indistinguishable_step(curve)
        relative[d] = {s: (v / curve[0][1] if curve[0][1] > 0 else None) for s, v, _ in curve}
    lines += [f"convergence steps: 'relative' = MMD² below {FRACTION:g} x its value at step {steps[0]} from then on;",
              f"'indistinguishable' = MMD² below {SIGMAS:g} bootstrap errors from then on ('-': not by the last step)",
              f"  {'depth':>5} {'layer':>8} {'relative':>9} {'indistinguishable':>17} {'last/first':>11} "
              f"{'last/error':>11}"]
    for d in depths:
        last = per_step[steps[-1]].get(d, {})
        ratio = relative[d].get(steps[-1])
        signal = last["mmd2"] / last["mmd2_err"] if last.get("mmd2_err") else None
        lines.append(f"  {d:>5} {layers[d]:>8} {'-' if converged[d] is None else converged[d]:>9} "
                     f"{'-' if alike[d] is None else alike[d]:>17} {'-' if ratio is None else f'{ratio:.3g}':>11} "
                     f"{'-' if signal is None else f'{signal:.1f}':>11}")
    never = (max(steps) + 1) * 10
    rank = lambda steps_of: [float(never if steps_of[d] is None else steps_of[d]) for d in depths]  # noqa: E731
    rho = spearman([float(d) for d in depths], rank(converged))
    rho_alike = spearman([float(d) for d in depths], rank(alike))
    lines.append(f"Spearman rank correlation of depth with the convergence step: relative "
                 f"{'-' if rho is None else f'{rho:+.2f}'}, indistinguishable "
                 f"{'-' if rho_alike is None else f'{rho_alike:+.2f}'} (positive: shallow depths converge first)")
    out = {"backbone": backbone, "steps": steps, "layers": [layers[d] for d in depths],
           "mmd2": {str(s): [per_step[s].get(d, {}).get("mmd2") for d in depths] for s in steps},
           "mmd2_err": {str(s): [per_step[s].get(d, {}).get("mmd2_err") for d in depths] for s in steps},
           "reference": [reference.get(d, {}).get("mmd2") for d in depths],
           "convergence_step": [converged[d] for d in depths], "spearman": rho,
           "indistinguishable_step": [alike[d] for d in depths], "spearman_indistinguishable": rho_alike,
           "val_loss": {str(s): metrics.get(s, {}).get("val_loss") for s in steps}}
    text = "\n".join(lines) + "\n"
    from cgtools.formats.files import write_text

    write_text(args.out, text)
    write_text(str(Path(args.out).with_suffix(".json")), json.dumps(out, indent=2) + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
