"""Bottom-up parsing of token sequences with per-level lookup tables (no Python loop per sentence).

Every s-tuple of level-(l-1) symbols is looked up among the level-l productions. Unambiguity makes
the answer unique: a (symbol, choice) pair or "invalid". An invalid node makes its parent invalid,
so `valid[l]` says that *all* rules at levels 1..l hold (the nested accuracy A_l of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cgtools.grammar.derivations import KeyLayout, digits_from_choices
from cgtools.grammar.rhm import Grammar, tuple_codes

# Dense lookup tables up to this many possible tuples per level (int32 entries: 64 MiB).
_DENSE_LIMIT = 1 << 24


@dataclass
class Parse:
    """Result of parsing B sequences.

    symbols[l]: int64 [B, s^(L-l)], the level-l symbols (-1 where the subtree is invalid), l = 0..L.
    choices[l]: int64 [B, s^(L-l)], the production used by each level-l node (-1 if invalid), l >= 1.
    valid[l]:   bool [B], every node at levels 1..l is valid, l = 1..L (valid[0] is all True).
    """

    symbols: list[np.ndarray]
    choices: list[np.ndarray]
    valid: list[np.ndarray]

    @property
    def grammatical(self) -> np.ndarray:
        return self.valid[-1]


class _LevelTable:
    """Maps the base-v code of a tuple to (symbol, choice) for one level; -1 when not a production."""

    def __init__(self, rules: np.ndarray, vocab: int) -> None:
        n_sym, m, s = rules.shape
        codes = tuple_codes(rules.reshape(-1, s), vocab)  # [n_sym*m], entry a*m+k
        self.dense = vocab**s <= _DENSE_LIMIT
        self.m = m
        if self.dense:
            self.table = np.full(vocab**s, -1, dtype=np.int32)
            self.table[codes] = np.arange(codes.size, dtype=np.int32)
        else:
            order = np.argsort(codes)
            self.sorted_codes = codes[order]
            self.sorted_entry = order.astype(np.int64)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """codes int64 (any shape, -1 = invalid input) -> entry a*m+k or -1."""
        bad = codes < 0
        safe = np.where(bad, 0, codes)
        if self.dense:
            entry = self.table[safe].astype(np.int64)
        else:
            pos = np.searchsorted(self.sorted_codes, safe)
            pos = np.minimum(pos, self.sorted_codes.size - 1)
            hit = self.sorted_codes[pos] == safe
            entry = np.where(hit, self.sorted_entry[pos], -1)
        entry[bad] = -1
        return entry


class Parser:
    """Reusable parser for one grammar (builds the lookup tables once)."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.tables = [_LevelTable(r, grammar.vocab) for r in grammar.rules]
        self.layout = KeyLayout.for_grammar(grammar)

    def parse(self, tokens: np.ndarray) -> Parse:
        """tokens int [B, d] with values in [0, v) -> Parse."""
        g = self.grammar
        b, s = tokens.shape[0], g.branching
        h = np.asarray(tokens, dtype=np.int64)
        symbols, choices, valid = [h], [None], [np.ones(b, dtype=bool)]
        for level in range(1, g.depth + 1):
            children = h.reshape(b, -1, s)  # [B, width, s]
            codes = tuple_codes(children, g.vocab)
            codes[(children < 0).any(axis=-1)] = -1  # an invalid child invalidates the node
            entry = self.tables[level - 1].lookup(codes)  # [B, width]
            ok = entry >= 0
            h = np.where(ok, entry // g.synonyms, -1)
            symbols.append(h)
            choices.append(np.where(ok, entry % g.synonyms, -1))
            valid.append(ok.all(axis=1))
        return Parse(symbols, choices, valid)

    def keys(self, parse: Parse) -> np.ndarray:
        """Derivation keys [B, W] of parsed sequences (meaningful only where grammatical)."""
        g = self.grammar
        choices = [np.maximum(c, 0) if c is not None else None for c in parse.choices]
        digits = digits_from_choices(choices)
        return self.layout.encode(np.maximum(parse.symbols[g.depth][:, 0], 0), digits)
