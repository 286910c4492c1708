"""Derivations: the one-to-one map between sentences and (root class, production choices).

With unambiguous rules every sentence has exactly one parse tree, so a sentence *is* its
derivation: a root class c in [0, n) and one production choice in [0, m) per internal node.
Choices are listed level by level from the root down (level L, then L-1, ..., then 1) and left to
right within a level; shape [B, K] with K = (d-1)/(s-1).

The derivation's mixed-radix index (class most significant) can exceed 2^63, so it is stored as a
*key* of W int64 words: the digit string [c, r_1, ..., r_K] is cut into W groups, each group
packed in base m (the first also holds c) and small enough for one word. Lexicographic order of
keys equals the order of indices, and the map is exact (no hashing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cgtools.grammar.rhm import Grammar

_WORD_LIMIT = 1 << 62  # radix of one key word; keeps products and sums inside int64


@dataclass(frozen=True)
class KeyLayout:
    """How the K production digits are grouped into key words."""

    n_classes: int
    synonyms: int
    groups: tuple[int, ...]  # number of production digits in each word (word 0 also holds the class)

    @classmethod
    def for_grammar(cls, g: Grammar) -> "KeyLayout":
        m, remaining, groups = g.synonyms, g.n_internal, []
        radix = g.n_classes
        count = 0
        while remaining:
            if m == 1 or radix * m <= _WORD_LIMIT:
                radix *= m
                count += 1
                remaining -= 1
            else:
                groups.append(count)
                radix, count = 1, 0
        groups.append(count)
        return cls(g.n_classes, m, tuple(groups))

    @property
    def words(self) -> int:
        return len(self.groups)

    def radices(self) -> list[int]:
        """Number of values each word takes; keys are uniform iff every word is uniform in [0, radix)."""
        out = [self.n_classes * self.synonyms ** self.groups[0]]
        out += [self.synonyms**g for g in self.groups[1:]]
        return out

    def encode(self, classes: np.ndarray, digits: np.ndarray) -> np.ndarray:
        """classes [B], digits [B, K] -> keys [B, W] int64."""
        keys = np.empty((classes.shape[0], self.words), dtype=np.int64)
        start = 0
        for w, g in enumerate(self.groups):
            acc = classes.astype(np.int64) if w == 0 else np.zeros(classes.shape[0], np.int64)
            for j in range(start, start + g):
                acc = acc * self.synonyms + digits[:, j]
            keys[:, w] = acc
            start += g
        return keys

    def decode(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys [B, W] -> (classes [B] int64, digits [B, K] int64)."""
        n, m = keys.shape[0], self.synonyms
        digits = np.empty((n, sum(self.groups)), dtype=np.int64)
        shift = m.bit_length() - 1 if m & (m - 1) == 0 else None  # power of two: shifts, not divisions
        start = 0
        classes = None
        for w, g in enumerate(self.groups):
            acc = keys[:, w].astype(np.int64, copy=True)
            for j in range(start + g - 1, start - 1, -1):
                if shift is not None:
                    np.bitwise_and(acc, m - 1, out=digits[:, j])
                    acc >>= shift
                else:
                    acc, digits[:, j] = np.divmod(acc, m)
            if w == 0:
                classes = acc
            start += g
        return classes, digits


def expand(g: Grammar, classes: np.ndarray, digits: np.ndarray) -> list[np.ndarray]:
    """Build the trees of B derivations.

    Returns `nodes` with nodes[l] the level-l symbols, int64 [B, s^(L-l)], for l = 0..L
    (nodes[0] are the tokens, nodes[L] the root).
    """
    b, s, m = classes.shape[0], g.branching, g.synonyms
    nodes: list[np.ndarray] = [None] * (g.depth + 1)  # type: ignore[list-item]
    h = classes.astype(np.int64).reshape(b, 1)
    nodes[g.depth] = h
    offset = 0
    for level in range(g.depth, 0, -1):
        width = h.shape[1]
        entry = h * m + digits[:, offset:offset + width]  # [B, width] row of (symbol, choice)
        offset += width
        children = np.empty((b, width, s), dtype=np.int64)
        for j in range(s):
            # 1-D gathers per child position are much faster than one 2-D row gather
            column = np.ascontiguousarray(g.rules[level - 1][:, :, j]).reshape(-1)  # [symbols*m]
            children[:, :, j] = np.take(column, entry, mode="clip")
        h = children.reshape(b, width * s)
        nodes[level - 1] = h
    return nodes


def digits_from_choices(choices: list[np.ndarray]) -> np.ndarray:
    """Per-level production choices -> digit array [B, K].

    `choices[l]` holds the choice index of each level-l node, [B, s^(L-l)], for l = 1..L
    (index 0 unused), as returned by the parser.
    """
    return np.concatenate([choices[level] for level in range(len(choices) - 1, 0, -1)], axis=1)


def choices_from_digits(g: Grammar, digits: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`digits_from_choices`: list indexed by level (entry 0 is None)."""
    out: list[np.ndarray] = [None] * (g.depth + 1)  # type: ignore[list-item]
    offset = 0
    for level in range(g.depth, 0, -1):
        width = g.width(level)
        out[level] = digits[:, offset:offset + width]
        offset += width
    return out


def key_rows(keys: np.ndarray) -> np.ndarray:
    """[B, W] keys -> 1-D array with one comparable element per row (int64, or void for W > 1),
    usable with np.isin / np.unique / sort. May share memory with `keys`."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if keys.shape[1] == 1:
        return keys[:, 0]
    return keys.view(np.dtype((np.void, 8 * keys.shape[1]))).ravel()


def keys_to_index(layout: KeyLayout, keys: np.ndarray) -> list[int]:
    """Exact Python-int derivation indices of keys [B, W] (for tests and small outputs)."""
    radices = layout.radices()
    out = []
    for row in keys.tolist():
        idx = 0
        for value, radix in zip(row, radices):
            idx = idx * radix + value
        out.append(idx)
    return out


def index_to_keys(layout: KeyLayout, indices: list[int]) -> np.ndarray:
    """Inverse of :func:`keys_to_index`."""
    radices = layout.radices()
    keys = np.empty((len(indices), layout.words), dtype=np.int64)
    for i, idx in enumerate(indices):
        for w in range(layout.words - 1, -1, -1):
            idx, keys[i, w] = divmod(idx, radices[w])
    return keys
