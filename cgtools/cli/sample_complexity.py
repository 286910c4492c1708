"""`cgtools sample-complexity`: P* from a sweep over the training-set size, and its scaling with m."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import ForceOpt, JsonOpt
from cgtools.cli.output import emit_json, emit_table, fmt


def sample_complexity(
    results: Annotated[List[str], typer.Argument(help="'accuracy' or 'cluster' results tables of a sweep, each tagged with P (and m, L, seed...).", metavar="RESULTS...")],
    threshold: Annotated[float, typer.Option("--threshold", help="P* is where the curve first rises through this value (the paper: A_L = 1/2).")] = 0.5,
    level: Annotated[Optional[str], typer.Option("--level", "-l", help="Level l whose accuracy (or ARI) is used [default: the last level of each group].", metavar="L")] = None,
    crossing: Annotated[str, typer.Option("--crossing", help="'first' upward crossing of the threshold (the paper's P*) or 'last' (after which the curve stays above: skips a bump at small P from a memorised training set).", metavar="WHICH")] = "first",
    by: Annotated[Optional[str], typer.Option("--by", help="Comma-separated tags that define a group (one P* each) [default: m,L when present; cluster tables also their settings context, method, oracle, weighted, node, position when they vary].", metavar="TAG,...")] = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write a 'sample-complexity' results table, one row per group ('-' = stdout).", metavar="TABLE")] = None,
    force: ForceOpt = False,
) -> None:
    """Sample complexity P*: the training-set size at which A_L (or the ARI) crosses a threshold.

    Reads the tables of a sweep over P (`measure-accuracy -o` or `cluster -o`, each run tagged
    with --tag P=<size>, and m, L, seed...). Runs with the same tags and P (several seeds) are
    averaged; P* is the first (--crossing last: the last) upward crossing of the mean curve, interpolated linearly in log P
    between the two bracketing points, with the interval [p_star_lo, p_star_hi] where the
    mean +/- standard error curves cross. A curve that never crosses gives P* = null, a warning
    and the one-sided bracket (status 'above': P* <= smallest P; 'below': P* > largest P).

    Across groups that differ in m, a least-squares fit log P* = a + b log m gives the exponent b
    with its standard error, next to the theory's exponent: L + 1 for the last level (the rules of
    level l need P_l = v m^(l+1) / (1 - m/v^(s-1)) sentences; clustering level l needs P_{l+1}),
    with the predicted P* itself when s and v are known from the tags or the tables' grammar.

    Examples:

      cgtools sample-complexity sweep/acc_m*_P*_seed*.parquet --json

      cgtools sample-complexity sweep/cluster_*.parquet --level 2 --by m,L,context -o pstar.parquet
    """
    from cgtools.analysis.sample_complexity import CROSSINGS, SAMPLE_COMPLEXITY_KIND, QUANTITY, estimate
    from cgtools.analysis.sweep import sweep_table
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import read_results, results_table, write_results

    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    if crossing not in CROSSINGS:
        raise typer.BadParameter(f"must be one of {', '.join(CROSSINGS)}", param_hint="--crossing")
    by_tags = None if by is None else [t.strip() for t in by.split(",") if t.strip()]
    if out is not None:
        check_output(out, force)
    sources = [open_input(path) for path in results]
    tables = [read_results(source, kind=tuple(QUANTITY)) for source in sources]
    result = estimate(sweep_table(tables), threshold=threshold, level=_one_level(level), by=by_tags,
                      which=crossing)
    if out is not None:
        table = results_table(result.columns(), kind=SAMPLE_COMPLEXITY_KIND,
                              provenance=provenance("sample-complexity", None, sources),
                              source_kind=tables[0].kind, quantity=result.quantity,
                              threshold=threshold, crossing=crossing, by=result.by, fit=[f.to_json() for f in result.fits])
        write_results(table, out, force)
    if json_out:
        emit_json(result.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    header = tuple(result.by) + ("level", "P*", "P*_lo", "P*_hi", "status", "points", "theory P*")
    emit_table([tuple(str(g.key[k]) for k in result.by)
                + (str(g.level) if g.level is not None else "-", fmt(g.p_star), fmt(g.p_star_lo),
                   fmt(g.p_star_hi), g.status, str(g.size.size), fmt(g.theory_p_star))
                for g in result.groups], header)
    for f in result.fits:
        if f.exponent is None:
            continue
        where = ", ".join(f"{k}={v}" for k, v in f.key.items())
        err = f" ± {fmt(f.exponent_err, 3)}" if f.exponent_err is not None else ""
        theory = f" (theory: {f.theory_exponent})" if f.theory_exponent is not None else ""
        emit_table([(f"P* ∝ m^b{' at ' + where if where else ''}:", f"b = {fmt(f.exponent, 3)}{err}{theory}")])


def _one_level(spec: str | None) -> int | None:
    """--level is text in every command (cluster takes lists); here it is one level >= 1."""
    if spec is None:
        return None
    if not spec.strip().isdigit() or int(spec) < 1:
        raise typer.BadParameter("must be one level, an integer >= 1", param_hint="--level")
    return int(spec)
