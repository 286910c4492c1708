"""Helper of the clustering sample-complexity pipelines (pipelines/fig2, pipelines/fig7).

Two subcommands, both called by pipelines/clustering.mk:

grid     The P values of each sweep, from the theory (cgtools.analysis.theory, Eq. 6): a lattice
         P_L * STEP^k (k integer, so P_L itself is a point) cut to [LO * P_LO_LEVEL, HI * P_L],
         one per algorithm (hier: ARI of every level, so it starts below the lowest level's
         threshold; oracle: the top level only). Prints one word per (m, algorithm) for make:
             m4:hier:120,170,240,... m4:oracle:...  m4:nmax:36000
         (nmax: the sentences rhm-gen draws for that m; each run reads the first P of them).
         Refuses a sweep that needs more distinct sentences than the language holds, and warns
         when the threshold P_L is not well inside it (the finite-population regime, where the
         whole language measures the correlations exactly and P* loses its meaning).

summary  Reads the 'sample-complexity' tables of the pipeline (cgtools sample-complexity -o) and
         writes the fitted exponents (with their standard errors) next to the theory's, and the
         P* table (measured, bracket, status, the theory's P_L and the ratio), as JSON and as text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def grid(args: argparse.Namespace) -> int:
    from cgtools.analysis.theory import theory

    words = []
    for m in args.ms:
        th = theory(args.depth, args.branching, args.vocab, m, args.n_classes)
        p_levels = th["sample_complexity"]
        if p_levels[-1] is None:
            sys.exit(f"clustering.py grid: m = {m}: every tuple is a production (f >= 1); no correlations")
        anchor = p_levels[-1]
        language = th["n_sentences"]
        if language is not None and anchor > language / 10:
            print(f"clustering.py grid: warning: m = {m}: P_L = {anchor:.0f} is {anchor / language:.2g} of the "
                  f"language ({language} sentences); P* is not well inside it", file=sys.stderr)
        nmax = 0
        for spec in args.algo:
            name, level, factor = spec.split(":")
            lo = float(factor) * p_levels[int(level) - 1]
            hi = args.hi * anchor
            k_lo = math.ceil(math.log(lo / anchor, args.step) - 1e-9)
            k_hi = math.floor(math.log(hi / anchor, args.step) + 1e-9)
            sizes = sorted({max(1, round(anchor * args.step**k)) for k in range(k_lo, k_hi + 1)})
            if language is not None and sizes and sizes[-1] > language:
                sys.exit(f"clustering.py grid: m = {m}: the sweep goes to P = {sizes[-1]} but the language "
                         f"has only {language} sentences; lower HI or choose a larger grammar")
            words.append(f"m{m}:{name}:{','.join(map(str, sizes))}")
            nmax = max([nmax, *sizes])
        words.append(f"m{m}:nmax:{nmax}")
    print(" ".join(words))
    return 0


def _fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def summary(args: argparse.Namespace) -> int:
    from cgtools.formats.files import open_input, write_text
    from cgtools.formats.results import read_results

    settings = ("source", "context", "oracle", "method")
    fits, table = [], []
    grammar = None
    for path in args.pstar:
        res = read_results(open_input(path), kind="sample-complexity")
        # the P* of trained diffusion models (A_L crossings) beside the clustering's (ARI)
        source = "diffusion" if res.meta.get("source_kind") == "accuracy" else "cluster"
        if source == "cluster":
            grammar = grammar or res.meta.get("grammar")
        rows = [{"source": source, **r} for r in res.rows()]
        seen = set()
        for r in sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in settings) + (r["m"],)):
            series = {k: r[k] for k in settings if k in r}
            ratio = (r["p_star"] / r["theory_p_star"]
                     if r.get("p_star") is not None and r.get("theory_p_star") else None)
            table.append({"level": r["level"], **series, "m": r["m"], "p_star": r["p_star"],
                          "p_star_lo": r["p_star_lo"], "p_star_hi": r["p_star_hi"], "status": r["status"],
                          "n_points": r["n_points"], "n_seeds": r["n_seeds"],
                          "theory_p_star": r["theory_p_star"], "ratio_to_theory": ratio})
            key = (r["level"], *series.values())
            if key in seen:
                continue
            seen.add(key)
            members = [x for x in rows if all(x.get(k) == v for k, v in series.items())
                       and x["level"] == r["level"]]
            exponent, err, theory_exp = r.get("exponent"), r.get("exponent_err"), r.get("theory_exponent")
            fit = {"level": r["level"], **series, "m": sorted(x["m"] for x in members if x["p_star"] is not None),
                   "exponent": exponent, "exponent_err": err, "theory_exponent": theory_exp,
                   "prefactor": r.get("prefactor")}
            if exponent is not None and theory_exp:
                fit["relative_deviation"] = exponent / theory_exp - 1
                fit[f"within_{args.tolerance:g}"] = abs(exponent / theory_exp - 1) <= args.tolerance
            fits.append(fit)
    out = {"figure": args.figure, "threshold": args.threshold, "tolerance": args.tolerance,
           "grammar": {k: grammar.get(k) for k in ("depth", "branching", "vocab", "n_classes")} if grammar else None,
           "synonyms": sorted({row["m"] for row in table}), "seeds": args.seeds,
           "fits": fits, "p_star": table}
    write_text(args.json, json.dumps(out, indent=2) + "\n")

    shown = [k for k in settings if any(k in f for f in fits)]  # the settings that name a series
    head = " ".join(f"{k:>9}" for k in shown)
    cells = lambda r: " ".join(f"{str(r.get(k, '-')):>9}" for k in shown)
    lines = [f"{args.figure}: sample complexity P* (clustering: first ARI crossing of {args.threshold:g}; "
             f"diffusion: last upward crossing of A_L = 1/2; seeds averaged), fit log P* = a + b log m"]
    if grammar:
        lines.append(f"grammar: L = {grammar['depth']}, s = {grammar['branching']}, v = {grammar['vocab']}, "
                     f"n_classes = {grammar['n_classes']}; m = {out['synonyms']}; seeds = {args.seeds}")
    lines += ["", f"level {head}  {'exponent b':>13}  theory  deviation  m with a P*"]
    for f in fits:
        b = "-" if f["exponent"] is None else f"{f['exponent']:.2f}" + (
            f" ± {f['exponent_err']:.2f}" if f["exponent_err"] is not None else "")
        dev = f.get("relative_deviation")
        lines.append(f"{f['level']:>5} {cells(f)}  {b:>13}  {_fmt(f['theory_exponent'], 'd'):>6}  "
                     f"{'-' if dev is None else format(100 * dev, '+.0f') + ' %':>9}  {f['m']}")
    lines += ["", f"level {head} {'m':>3}  {'P*':>8}  {'[lo, hi]':>17}  {'status':>8}  {'P_(l+1)':>10}  "
                  f"{'P*/P_L':>6}"]
    for r in table:
        bracket = f"[{_fmt(r['p_star_lo'], '.0f')}, {_fmt(r['p_star_hi'], '.0f')}]"
        lines.append(f"{r['level']:>5} {cells(r)} {r['m']:>3}  {_fmt(r['p_star'], '.0f'):>8}  {bracket:>17}  "
                     f"{r['status']:>8}  {_fmt(r['theory_p_star'], '.0f'):>10}  {_fmt(r['ratio_to_theory'], '.2f'):>6}")
    text = "\n".join(lines) + "\n"
    write_text(args.text, text)
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="P values of each sweep (for make)")
    g.add_argument("-L", dest="depth", type=int, required=True)
    g.add_argument("-s", dest="branching", type=int, required=True)
    g.add_argument("-v", dest="vocab", type=int, required=True)
    g.add_argument("--n-classes", type=int, default=None)
    g.add_argument("--ms", type=int, nargs="+", required=True)
    g.add_argument("--algo", action="append", required=True, metavar="NAME:LEVEL:LO",
                   help="a sweep starting at LO * P_LEVEL (repeatable)")
    g.add_argument("--hi", type=float, required=True, help="the sweeps end at HI * P_L")
    g.add_argument("--step", type=float, default=math.sqrt(2), help="ratio of consecutive P")
    g.set_defaults(run=grid)
    s = sub.add_parser("summary", help="exponents and P* table from sample-complexity tables")
    s.add_argument("pstar", nargs="+", help="'sample-complexity' results tables")
    s.add_argument("--figure", required=True)
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--tolerance", type=float, default=0.15, help="relative band around the theory exponent")
    s.add_argument("--seeds", type=int, nargs="*", default=[])
    s.add_argument("--json", required=True)
    s.add_argument("--text", required=True)
    s.set_defaults(run=summary)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
