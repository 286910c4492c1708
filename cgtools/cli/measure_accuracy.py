"""`cgtools measure-accuracy`: A_1..A_L of sequences, memorisation and novelty."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.analysis.accuracy import ACCURACY_COLUMNS, ACCURACY_KIND, accuracy_columns, measure_accuracy as measure
from cgtools.cli.options import BatchOpt, ForceOpt, GrammarOpt, JsonOpt, TagOpt
from cgtools.cli.output import emit_json, emit_table, fmt
from cgtools.formats.files import check_output, open_input
from cgtools.formats.metadata import provenance
from cgtools.formats.results import parse_tags, results_table, write_results
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.source import resolve_grammar


def measure_accuracy(
    seqs: Annotated[str, typer.Argument(help="Sequences table ('-' = stdin).", metavar="SEQS")] = "-",
    grammar: GrammarOpt = None,
    train: Annotated[Optional[Path], typer.Option("--train", "-t", help="Training table: report copies (memorized) and novel grammatical samples.", metavar="FILE")] = None,
    column: Annotated[str, typer.Option("--column", help="List column to measure (e.g. 'perturbed').")] = "tokens",
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Also write an 'accuracy' results table: one row per level (level, accuracy, n, memorized, novel_valid, tags) ('-' = stdout).", metavar="TABLE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
    batch_size: BatchOpt = 65536,
) -> None:
    """Accuracy A_l: the fraction of sequences whose rules hold at every level 1..l.

    A_L is the fraction of fully grammatical sequences. With --train, also the fraction of
    sequences that copy a training sentence (memorized) and that are grammatical and new
    (novel_valid). The grammar comes from SEQS's metadata unless --grammar is given.

    With -o TABLE the results also go to a results table of kind 'accuracy' (one row per level;
    --tag KEY=VALUE labels it, e.g. with the run's P and seed, for `cgtools sample-complexity` and
    `cgtools plot accuracy`); stdout then stays empty unless --json.

    Examples:

      cgtools sample run/model.safetensors -n 1024 | cgtools measure-accuracy - --train train.parquet

      cgtools measure-accuracy samples.parquet --json

      cgtools measure-accuracy samples.parquet --train train.parquet -o acc.parquet --tag P=512 --tag seed=0
    """
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    tags = parse_tags(tag)
    clash = sorted(set(tags) & set(ACCURACY_COLUMNS))
    if clash:
        raise typer.BadParameter(f"{clash[0]!r} is a column of the accuracy table; choose another tag name",
                                 param_hint="--tag")
    if out is not None:
        check_output(out, force)  # before the work, not after it
    source = open_input(seqs)
    table = SequencesTable(source)
    gsource = open_input(grammar) if grammar is not None else None
    g = resolve_grammar(gsource, table)
    sources = [source] + ([gsource] if gsource else [])
    train_tokens = None
    if train is not None:
        tsource = open_input(train)
        sources.append(tsource)
        train_table = SequencesTable(tsource)
        train_tokens = train_table.read_column(length=g.length)
    report = measure(table.iter_column(column, batch_size=batch_size), g, train_tokens,
                     where=table.source.display(), total=table.num_rows)
    if out is not None:
        results = results_table(accuracy_columns(report), kind=ACCURACY_KIND, tags=tags,
                                provenance=provenance("measure-accuracy", None, sources),
                                grammar=g.to_json(), column=column, distinct=report.distinct,
                                distinct_novel_valid=report.distinct_novel_valid)
        write_results(results, out, force)
    if json_out:
        emit_json(report.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    rows = [("sequences", str(report.n)), ("distinct", fmt(report.distinct))]
    rows += [(f"A_{level}", fmt(a)) for level, a in enumerate(report.accuracy, 1)]
    if report.memorized is not None:
        rows += [("memorized", fmt(report.memorized)), ("novel_valid", fmt(report.novel_valid)),
                 ("distinct_novel_valid", str(report.distinct_novel_valid))]
    emit_table(rows, ("measure", "value"))
