"""The data a training run reads: tokens, the validation split, the grammar if there is one, and
the DataSpec an architecture is sized from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cgtools.errors import InputError
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.rhm import Grammar
from cgtools.grammar.source import check_same_grammar, resolve_grammar
from cgtools.models.registry import DataSpec


#: Metadata keys of a training table that its checkpoints and their samples carry, so that the
#: samples can be decoded downstream (`cgtools detokenize` reads "tokenizer").
CARRIED_KEYS = ("tokenizer", "vocab")


def carried_meta(meta: dict) -> dict:
    """The CARRIED_KEYS present (and not None) in a table's or checkpoint's metadata."""
    return {k: meta[k] for k in CARRIED_KEYS if meta.get(k) is not None}


@dataclass(frozen=True)
class TrainingData:
    train: np.ndarray  # [P, d] int64
    val: np.ndarray  # [N, d] int64
    grammar: Grammar | None
    spec: DataSpec
    meta: dict = field(default_factory=dict)  # carried_meta of the training table


def training_data(table: SequencesTable, val_table: SequencesTable, *, online: bool = False,
                  allow_overlap: bool = False) -> TrainingData:
    """Read and check a training and a validation table, before any training starts.

    With a grammar (RHM data) the sizes come from it and the validation table must share it;
    without one (text) the vocabulary is the metadata's "vocab" or, failing that, the largest
    token id + 1 over both tables. InputError for: no validation (or, offline, no training)
    sequences, token ids outside the vocabulary, and validation sequences that also occur in the
    training data (early stopping would measure memorisation) unless allow_overlap.
    """
    grammar = resolve_grammar(None, table, required=False)
    if grammar is not None:
        check_same_grammar(grammar, val_table, f"was drawn from a different grammar than {table.display()}")
        length = grammar.length
        train = table.read_column(length=length)
        val = val_table.read_column(length=length)
        spec = DataSpec(vocab=grammar.vocab, length=length, depth=grammar.depth,
                        branching=grammar.branching)
    else:
        train = table.read_column()
        val = val_table.read_column(length=train.shape[1] if train.size else None)
        if not train.size:
            raise InputError(f"{table.display()}: no training sequences")
        vocab = table.meta.get("vocab") or int(max(train.max(), val.max() if val.size else 0)) + 1
        spec = DataSpec(vocab=int(vocab), length=train.shape[1])
    if not len(val):
        raise InputError(f"{val_table.display()}: no validation sequences")
    if not online and not len(train):
        raise InputError(f"{table.display()}: no training sequences")
    for tokens, t in ((train, table), (val, val_table)):
        if tokens.size and (tokens.min() < 0 or tokens.max() >= spec.vocab):
            raise InputError(f"{t.display()}: token ids outside the vocabulary [0, {spec.vocab}) "
                             f"(found {int(tokens.min())}..{int(tokens.max())})")
    if not allow_overlap and len(train):
        shared = overlap_fraction(val, train)
        if shared > 0:
            raise InputError(f"{val_table.display()}: {shared:.1%} of the validation sequences are also in "
                             f"{table.display()} (early stopping would measure memorisation); draw a disjoint "
                             f"split (rhm-gen --exclude) or pass --allow-overlap")
    return TrainingData(train, val, grammar, spec, carried_meta(table.meta))


def overlap_fraction(rows: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of `rows` [N, d] that equal some row of `reference` [P, d]."""
    if not len(rows) or not len(reference):
        return 0.0
    as_void = lambda a: np.ascontiguousarray(a, dtype=np.int64).view(  # noqa: E731
        np.dtype((np.void, a.shape[1] * 8))).ravel()
    return float(np.isin(as_void(rows), as_void(reference)).mean())
