"""`cgtools detokenize`: a sequences table of text tokens -> a table (or a printout) of texts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.cli.options import ForceOpt, LimitOpt, OutOpt
from cgtools.cli.tokenize import tokenizer_option


def detokenize(
    table: Annotated[str, typer.Argument(help="Sequences table whose metadata names its tokenizer "
                                         "('-' = stdin).", metavar="TABLE")] = "-",
    out: OutOpt = "-",
    print_texts: Annotated[bool, typer.Option("--print", help="Print the texts on stdout instead (each after a "
                                              "'--- sequence I ---' line); with -o FILE, also write FILE.")] = False,
    tokenizer: Annotated[Optional[str], tokenizer_option("the one the table's metadata names")] = None,
    limit: LimitOpt = None,
    force: ForceOpt = False,
) -> None:
    """Decode a sequences table of text tokens into a Parquet table with a string column `text`.

    One row per sequence, decoded by the tokenizer the table's metadata names (or --tokenizer).
    A chunk boundary that cuts a multi-byte character shows it as U+FFFD.

    Examples:

      cgtools detokenize val.parquet -o val_texts.parquet

      cgtools detokenize samples.parquet --tokenizer train.parquet --print --limit 3
    """
    import sys

    from cgtools.formats.files import STDIO, check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.sequences import SequencesTable
    from cgtools.text.corpus import decode_table, table_tokenizer_spec, write_texts
    from cgtools.text.tokenizers import load_tokenizer

    write = not print_texts or out != STDIO
    if write:
        check_output(out, force)
    source = open_input(table)
    seqs = SequencesTable(source)
    tok = load_tokenizer(tokenizer if tokenizer is not None else table_tokenizer_spec(seqs))
    texts = decode_table(seqs, tok, limit)
    if write:
        write_texts(texts, out, force, meta={"tokenizer": tok.spec, "provenance": provenance("detokenize", None, [source])})
    if print_texts:
        for i, text in enumerate(texts):
            sys.stdout.write(f"--- sequence {i} ---\n{text}\n")
        sys.stdout.flush()
