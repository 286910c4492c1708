"""`cgtools measure-accuracy`: A_1..A_L of sequences, memorisation and novelty."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.analysis.accuracy import measure_accuracy as measure
from cgtools.cli.options import BatchOpt, GrammarOpt, JsonOpt
from cgtools.cli.output import emit_json, emit_table, fmt
from cgtools.formats.files import open_input
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.source import resolve_grammar


def measure_accuracy(
    seqs: Annotated[str, typer.Argument(help="Sequences table ('-' = stdin).", metavar="SEQS")] = "-",
    grammar: GrammarOpt = None,
    train: Annotated[Optional[Path], typer.Option("--train", "-t", help="Training table: report copies (memorized) and novel grammatical samples.", metavar="FILE")] = None,
    column: Annotated[str, typer.Option("--column", help="List column to measure (e.g. 'perturbed').")] = "tokens",
    json_out: JsonOpt = False,
    batch_size: BatchOpt = 65536,
) -> None:
    """Accuracy A_l: the fraction of sequences whose rules hold at every level 1..l.

    A_L is the fraction of fully grammatical sequences. With --train, also the fraction of
    sequences that copy a training sentence (memorized) and that are grammatical and new
    (novel_valid). The grammar comes from SEQS's metadata unless --grammar is given.

    Examples:

      cgtools sample run/model.safetensors -n 1024 | cgtools measure-accuracy - --train train.parquet

      cgtools measure-accuracy samples.parquet --json
    """
    table = SequencesTable(open_input(seqs))
    g = resolve_grammar(open_input(grammar) if grammar is not None else None, table)
    train_tokens = None
    if train is not None:
        train_table = SequencesTable(open_input(train))
        train_tokens = train_table.read_column(length=g.length)
    report = measure(table.iter_column(column, batch_size=batch_size), g, train_tokens,
                     where=table.source.display(), total=table.num_rows)
    if json_out:
        emit_json(report.to_json())
        return
    rows = [("sequences", str(report.n)), ("distinct", fmt(report.distinct))]
    rows += [(f"A_{level}", fmt(a)) for level, a in enumerate(report.accuracy, 1)]
    if report.memorized is not None:
        rows += [("memorized", fmt(report.memorized)), ("novel_valid", fmt(report.novel_valid)),
                 ("distinct_novel_valid", str(report.distinct_novel_valid))]
    emit_table(rows, ("measure", "value"))
