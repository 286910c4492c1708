"""Helper of the diffusion pipelines (pipelines/diffusion.mk): the text summary of a sweep over P.

    diffusion.py summary ACC... -L 3 -s 2 -v 8 -m 2 -o summary.txt [--json summary.json]

Reads the 'accuracy' tables (measure-accuracy -o, tagged P and seed), and prints per P the mean
and standard error over seeds of A_1..A_L, the copies and the new grammatical sentences; whether
the levels are staged (A_1 >= A_2 >= ... >= A_L at every P within two standard errors, and strictly
A_1 > A_L at some P); and per level the measured P_l* (A_l first crosses 1/2, interpolated in log
P: cgtools.analysis.sample_complexity.crossing) next to the theory's P_l.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

import numpy as np


def summarise(paths: list[str], depth: int, branching: int, vocab: int, synonyms: int, threshold: float,
              which: str = "first") -> dict:
    from cgtools.analysis.sample_complexity import crossing
    from cgtools.analysis.theory import theory
    from cgtools.formats.files import open_input
    from cgtools.formats.results import read_results

    acc = defaultdict(list)  # (P, level) -> [accuracy per seed]
    extra = defaultdict(list)  # (P, column) -> [value per seed], level L rows
    for path in paths:
        for r in read_results(open_input(path), kind="accuracy").rows():
            acc[(int(r["P"]), int(r["level"]))].append(float(r["accuracy"]))
            if int(r["level"]) == depth:
                for col in ("memorized", "novel_valid"):
                    if r.get(col) is not None:
                        extra[(int(r["P"]), col)].append(float(r[col]))
    sizes = sorted({p for p, _ in acc})
    levels = list(range(1, depth + 1))
    mean = lambda xs: float(np.mean(xs))
    se = lambda xs: float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0
    rows = []
    for p in sizes:
        row = {"P": p, "seeds": len(acc[(p, 1)])}
        for l in levels:
            row[f"A{l}"], row[f"A{l}_se"] = mean(acc[(p, l)]), se(acc[(p, l)])
        for col in ("memorized", "novel_valid"):
            if extra[(p, col)]:
                row[col] = mean(extra[(p, col)])
        rows.append(row)
    th = theory(depth, branching, vocab, synonyms)
    p_star = []
    for l in levels:
        value, status = crossing(np.array(sizes, float), np.array([r[f"A{l}"] for r in rows]), threshold,
                                 which)
        p_star.append({"level": l, "measured": value, "status": status,
                       "theory": th["sample_complexity"][l - 1]})
    # staging: no level above the one below it beyond two standard errors, and a visible gap
    ordered = all(r[f"A{l}"] + 2 * math.hypot(r[f"A{l}_se"], r[f"A{l + 1}_se"]) >= r[f"A{l + 1}"]
                  for r in rows for l in levels[:-1])
    gap = max((r["A1"] - r[f"A{depth}"] for r in rows), default=0.0)
    return {"grammar": {"L": depth, "s": branching, "v": vocab, "m": synonyms, "language": th["n_sentences"]},
            "threshold": threshold, "crossing": which, "rows": rows, "p_star": p_star, "staged": ordered,
            "largest_gap_A1_minus_AL": gap, "all_levels_at_largest_P": min(rows[-1][f"A{l}"] for l in levels)}


def text(s: dict) -> str:
    g, L = s["grammar"], s["grammar"]["L"]
    lines = [f"Diffusion sweep over P: L = {g['L']}, s = {g['s']}, v = {g['v']}, m = {g['m']} "
             f"(language: {g['language']} sentences)", ""]
    head = "".join(f"{'A_' + str(l):>15}" for l in range(1, L + 1))
    lines.append(f"{'P':>6}{'seeds':>6}{head}{'copies':>9}{'novel':>8}")
    for r in s["rows"]:
        # ± the standard error over seeds (none with one seed)
        cells = "".join(f"{r[f'A{l}']:>9.3f} ±{r[f'A{l}_se']:.3f}" if r["seeds"] > 1 else f"{r[f'A{l}']:>15.3f}"
                        for l in range(1, L + 1))
        lines.append(f"{r['P']:>6}{r['seeds']:>6}{cells}{r.get('memorized', float('nan')):>9.3f}"
                     f"{r.get('novel_valid', float('nan')):>8.3f}")
    lines += ["", f"P_l* (A_l {s['crossing']} crosses {s['threshold']:g} upwards, log-interpolated) vs the theory "
                  f"P_l = v m^(l+1) / (1 - m/v^(s-1)):"]
    for p in s["p_star"]:
        measured = f"{p['measured']:.0f}" if p["measured"] is not None else p["status"]
        ratio = f"  (ratio {p['measured'] / p['theory']:.2f})" if p["measured"] is not None else ""
        lines.append(f"  level {p['level']}: measured {measured:>8}, theory {p['theory']:.0f}{ratio}")
    lines += ["", f"staged (A_1 >= ... >= A_L at every P within 2 s.e.): {'yes' if s['staged'] else 'no'}; "
                  f"largest A_1 - A_L: {s['largest_gap_A1_minus_AL']:.2f}; "
                  f"lowest level accuracy at the largest P: {s['all_levels_at_largest_P']:.3f}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary")
    p.add_argument("acc", nargs="+")
    p.add_argument("-L", type=int, required=True)
    p.add_argument("-s", type=int, required=True)
    p.add_argument("-v", type=int, required=True)
    p.add_argument("-m", type=int, required=True)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--crossing", choices=("first", "last"), default="first",
                   help="P_l*: the first upward crossing, or the last (skips a memorisation bump at small P)")
    p.add_argument("--pstar", help="the sample-complexity table (not read; a make prerequisite)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--json")
    args = parser.parse_args()
    s = summarise(args.acc, args.L, args.s, args.v, args.m, args.threshold, args.crossing)
    from cgtools.formats.files import write_text

    for path, body in ((args.out, text(s)), (args.json, json.dumps(s, indent=2) + "\n")):
        if path:
            write_text(path, body)
    sys.stdout.write(text(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
