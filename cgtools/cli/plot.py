"""`cgtools plot`: the paper's figures from results tables."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import ForceOpt, LimitOpt
from cgtools.plots import KINDS


def plot(
    kind: Annotated[str, typer.Argument(help=f"Figure: {', '.join(KINDS)}.", metavar="KIND")],
    tables: Annotated[List[str], typer.Argument(help="Results tables (training metrics tables for accuracy-online; one image table for grid).", metavar="TABLE...")],
    out: Annotated[str, typer.Option("--out", "-o", help="Figure file; the format comes from the suffix: .png, .svg or .pdf.", metavar="FIG")],
    x: Annotated[Optional[str], typer.Option("--x", help="Tag or column on the x axis [default: P; accuracy-online: examples (or step); correlation: distance; sample-complexity: m].", metavar="TAG")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="Tag whose values get separate panels (accuracy, cluster, sensitivity), curves (correlation [default: P], sample-complexity) or curve labels (phase-transition).", metavar="TAG")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title.")] = None,
    mean_field: Annotated[bool, typer.Option("--mean-field", help="phase-transition: overlay the mean-field theory of each table's grammar and process.")] = False,
    rows: Annotated[Optional[int], typer.Option("--rows", min=1, help="grid: rows of images [default: as square as possible].", metavar="R")] = None,
    cols: Annotated[Optional[int], typer.Option("--cols", min=1, help="grid: columns of images [default: as square as possible].", metavar="C")] = None,
    limit: LimitOpt = None,
    labels: Annotated[bool, typer.Option("--labels", help="grid: write each image's label (class name) under it, when the table has labels.")] = False,
    force: ForceOpt = False,
) -> None:
    """Draw one of the paper's figures from results tables (PNG, SVG or PDF by the suffix of -o).

    Kinds: accuracy (A_l per level vs P, log x, seeds averaged with standard-error bars; Fig. 1a),
    accuracy-online (A_l vs examples seen, from RUN_DIR/metrics.parquet; Fig. 1b), correlation
    (correlation vs distance, log-log, one curve per P with its noise floor dashed, the exact and
    theory curves when present; Fig. 1c), sample-complexity (P* vs m, log-log, with the fitted
    power law and the theory m^(L+1); Fig. 2, 7), cluster (ARI per level vs P), sensitivity
    (S_k,l vs P, one panel per block; accuracy tables add 1 - A_l dashed; Fig. 6),
    phase-transition (fraction of nodes changed per level vs noise, root class and susceptibility
    across sweeps; forward-backward tables), perplexity (perplexity vs context length, one curve per
    step; Fig. 8), mmd (MMD² per feature depth vs training step, raw and relative to the first
    step; tables tagged reference drawn dashed; Fig. 5b), grid (the first images of one image table, `cgtools images` or `datasets`
    Parquet, upscaled without smoothing so 8x8 digits are visible; --rows, --cols, --limit (the
    first N images; default R x C when both are given, else 64), --labels; titled from the table's
    metadata unless --title). A table of another kind is an
    error.

    Examples:

      cgtools plot accuracy sweep/acc_*.parquet -o fig1a.png

      cgtools plot correlation corr_P*.parquet --group P -o fig1c.pdf

      cgtools sample-complexity sweep/acc_*.parquet -o pstar.parquet && cgtools plot sample-complexity pstar.parquet -o fig2.svg

      cgtools plot phase-transition fb_uniform_L*.parquet --mean-field -o transition.png

      cgtools plot grid digits_test.parquet --rows 4 --cols 8 --labels -o digits.png
    """
    from cgtools.plots import PlotOptions, plot as draw_and_save

    if kind not in KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(KINDS)}", param_hint="KIND")
    draw_and_save(kind, tables, out, PlotOptions(x=x, group=group, title=title, mean_field=mean_field, rows=rows, cols=cols,
                                                  limit=limit, labels=labels), force)
