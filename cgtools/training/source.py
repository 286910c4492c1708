"""The data a training run reads: tokens, the validation split, the grammar if there is one, and
the DataSpec an architecture is sized from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cgtools.errors import InputError
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.rhm import Grammar
from cgtools.grammar.source import check_same_grammar, resolve_grammar
from cgtools.models.registry import DataSpec


@dataclass(frozen=True)
class TrainingData:
    train: np.ndarray  # [P, d] int64
    val: np.ndarray  # [N, d] int64
    grammar: Grammar | None
    spec: DataSpec


def training_data(table: SequencesTable, val_table: SequencesTable) -> TrainingData:
    """Read a training and a validation table. With a grammar (RHM data) the sizes come from it
    and the validation table must share it; without one (text) the vocabulary is the metadata's
    "vocab" or, failing that, the largest token id + 1 over both tables."""
    grammar = resolve_grammar(None, table, required=False)
    if grammar is not None:
        check_same_grammar(grammar, val_table, f"was drawn from a different grammar than {table.display()}")
        length = grammar.length
        train = table.read_column(length=length)
        val = val_table.read_column(length=length)
        spec = DataSpec(vocab=grammar.vocab, length=length, depth=grammar.depth,
                        branching=grammar.branching)
        return TrainingData(train, val, grammar, spec)
    train = table.read_column()
    val = val_table.read_column(length=train.shape[1] if train.size else None)
    if not train.size:
        raise InputError(f"{table.display()}: no training sequences")
    vocab = table.meta.get("vocab") or int(max(train.max(), val.max() if val.size else 0)) + 1
    return TrainingData(train, val, None, DataSpec(vocab=int(vocab), length=train.shape[1]))
