"""Accuracy A_1..A_L of sequences under a grammar, with memorisation and novelty.

A_l is the fraction of sequences whose rules hold at every level 1..l (nested, as in the paper:
a level-2 node counts only if its leaf tuples are valid). With a training set, `memorized` is the
fraction of sequences equal to a training sentence and `novel_valid` the fraction that are
grammatical and not in the training set. All of it streams over batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from cgtools.errors import InputError
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import Grammar
from cgtools.logs import progress

ACCURACY_KIND = "accuracy"  # the kind of the results table written by `measure-accuracy -o`
ACCURACY_COLUMNS = ("level", "accuracy", "n", "memorized", "novel_valid")


@dataclass
class AccuracyReport:
    n: int
    accuracy: list[float]  # A_1..A_L
    distinct: float  # fraction of sequences that are distinct (1.0 when all differ)
    memorized: float | None = None  # fraction equal to a training sentence
    novel_valid: float | None = None  # fraction grammatical and not in the training set
    distinct_novel_valid: int | None = None  # number of different novel grammatical sequences

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def accuracy_columns(report: AccuracyReport) -> dict[str, pa.Array]:
    """Columns of an 'accuracy' results table: one row per level l = 1..L with level, accuracy
    (A_l), n, memorized and novel_valid (the same on every row; null without a training set)."""
    levels = len(report.accuracy)
    return {  # keys: ACCURACY_COLUMNS
        "level": pa.array(range(1, levels + 1), pa.int64()),
        "accuracy": pa.array(report.accuracy, pa.float64()),
        "n": pa.array([report.n] * levels, pa.int64()),
        "memorized": pa.array([report.memorized] * levels, pa.float64()),
        "novel_valid": pa.array([report.novel_valid] * levels, pa.float64()),
    }


def row_keys(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """One exact, comparable element per row: [B, d] ints -> [B] void (compact bytes of the row)."""
    dtype = np.uint8 if vocab <= 1 << 8 else np.uint16 if vocab <= 1 << 16 else np.int64
    rows = np.ascontiguousarray(tokens, dtype=dtype)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()


def check_tokens(tokens: np.ndarray, grammar: Grammar, where: str, offset: int = 0) -> None:
    """InputError unless tokens is [B, d] with values in [0, v)."""
    if tokens.ndim != 2 or tokens.shape[1] != grammar.length:
        raise InputError(f"{where}: sequences have length {tokens.shape[-1]}, the grammar needs "
                         f"d = {grammar.length}")
    bad = (tokens < 0) | (tokens >= grammar.vocab)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise InputError(f"{where}: token {int(tokens[row, col])} at row {offset + row}, position "
                         f"{col} is outside the vocabulary [0, {grammar.vocab})")


def measure_accuracy(batches: Iterable[np.ndarray], grammar: Grammar,
                     train: np.ndarray | None = None, where: str = "input",
                     total: int | None = None) -> AccuracyReport:
    """Stream token batches [B, d] through the parser; `train` is the training tokens [P, d].

    `total` (number of rows, if known) only sizes the progress bar.
    """
    parser = Parser(grammar)
    valid_counts = np.zeros(grammar.depth + 1, dtype=np.int64)
    n = memorized = novel = 0
    seen, novel_keys = [], []
    train_keys = None
    if train is not None:
        check_tokens(train, grammar, "training set")
        train_keys = np.unique(row_keys(train, grammar.vocab))
    with progress(total, "measure-accuracy") as bar:
        for tokens in batches:
            check_tokens(tokens, grammar, where, n)
            parse = parser.parse(tokens)
            valid_counts += np.array([v.sum() for v in parse.valid])
            keys = row_keys(tokens, grammar.vocab)
            seen.append(keys)
            if train_keys is not None:
                copy = np.isin(keys, train_keys)
                memorized += int(copy.sum())
                new_valid = parse.grammatical & ~copy
                novel += int(new_valid.sum())
                novel_keys.append(keys[new_valid])
            n += tokens.shape[0]
            bar.advance(tokens.shape[0])
    if n == 0:
        raise InputError(f"{where}: no sequences")
    distinct = np.unique(np.concatenate(seen)).size / n
    report = AccuracyReport(n=n, accuracy=(valid_counts[1:] / n).tolist(), distinct=distinct)
    if train_keys is not None:
        report.memorized = memorized / n
        report.novel_valid = novel / n
        report.distinct_novel_valid = int(np.unique(np.concatenate(novel_keys)).size)
    return report
