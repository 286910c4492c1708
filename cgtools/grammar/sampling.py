"""Drawing distinct sentences uniformly, and the synonym-exchange perturbation R_l x.

Distinct sentences = distinct derivations (see derivations.py). A uniformly random set of P keys
is drawn by rejection: draw keys uniformly with replacement, drop repeats and excluded keys, repeat
until P remain, keep a uniformly random P of them in a uniformly random order. The procedure is
symmetric under any relabelling of the allowed sentences, so every P-subset and every order is
equally likely. When P is more than half of what is available (small languages), the allowed
indices are enumerated and shuffled instead. All randomness comes from fixed-size internal rounds,
never from the output batch size, so the output does not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from cgtools.errors import ConfigError
from cgtools.grammar.derivations import KeyLayout, expand, key_rows
from cgtools.grammar.rhm import Grammar
from cgtools.seeding import generator, item_words, words_to_below

PerturbMode = Literal["synonym", "resample"]


def _from_rows(rows: np.ndarray, words: int) -> np.ndarray:
    if words == 1:
        return rows.reshape(-1, 1)
    return np.ascontiguousarray(rows).view(np.int64).reshape(-1, words)


def _sorted_unique(rows: np.ndarray) -> np.ndarray:
    """Sorted distinct elements; sorts `rows` in place to avoid a second full-size copy."""
    if rows.size == 0:
        return rows
    if rows.dtype.kind == "V":  # multi-word keys: no comparison ufuncs for void, np.unique sorts bytes
        return np.unique(rows)
    rows.sort()
    keep = np.empty(rows.size, dtype=bool)
    keep[0] = True
    np.not_equal(rows[1:], rows[:-1], out=keep[1:])
    return rows if keep.all() else rows[keep]  # repeats are rare: usually no copy


def sample_distinct_keys(grammar: Grammar, n: int, seed: int,
                         exclude: np.ndarray | None = None) -> np.ndarray:
    """n distinct derivation keys [n, W], uniform over sentences not in `exclude`, random order.

    `exclude` holds keys [E, W] of valid derivations (repeats allowed). Raises ConfigError when
    fewer than n sentences are available.
    """
    layout = KeyLayout.for_grammar(grammar)
    words, total = layout.words, grammar.n_sentences
    excl = _sorted_unique(key_rows(exclude).copy()) if exclude is not None and len(exclude) else None
    n_excl = 0 if excl is None else excl.size
    available = total - n_excl
    if n > available:
        extra = f" ({n_excl} excluded)" if n_excl else ""
        raise ConfigError(f"asked for {n} distinct sentences but the grammar has only "
                          f"{total}{extra}; {available} are available")
    rng = generator(seed, "sentences")
    if n == 0:
        return np.empty((0, words), dtype=np.int64)
    if words == 1 and 2 * n >= available:
        pool = np.arange(total, dtype=np.int64)
        if excl is not None:
            pool = pool[~np.isin(pool, excl, assume_unique=True)]
        rng.shuffle(pool)
        return pool[:n].reshape(-1, 1)

    radices = layout.radices()
    accepted = None
    while accepted is None or accepted.size < n:
        have = 0 if accepted is None else accepted.size
        need, room = n - have, available - have
        if total > 1 << 50:
            draws = need + 16  # repeats are astronomically rare
        else:
            # Draws whose expected number of new allowed keys is `need`, plus a little slack.
            draws = math.log1p(-need / room) / math.log1p(-1 / total)
            draws = int(draws * 1.01) + 64
        if words == 1:
            rows = rng.integers(0, radices[0], size=draws, dtype=np.int64)
        else:
            cand = np.empty((draws, words), dtype=np.int64)
            for w, radix in enumerate(radices):
                cand[:, w] = rng.integers(0, radix, size=draws, dtype=np.int64)
            rows = key_rows(cand)
        if accepted is not None:
            rows = np.concatenate([accepted, rows])
        accepted = None
        rows = _sorted_unique(rows)
        if excl is not None:
            rows = rows[~np.isin(rows, excl, assume_unique=True)]
        accepted = rows
    rng.shuffle(accepted)
    return _from_rows(accepted[:n], words)


@dataclass(frozen=True)
class SentenceBatch:
    """One batch of generated sentences; arrays are int64."""

    start: int  # row number of the first sentence in the whole output
    tokens: np.ndarray  # [B, d]
    latents: list[np.ndarray] | None  # latents[l] = level-l symbols [B, s^(L-l)], l = 1..L (index 0 unused)
    perturbed: np.ndarray | None  # [B, d], R_l applied to each sentence


def perturb_digits(grammar: Grammar, digits: np.ndarray, level: int, seed: int, start: int,
                   mode: PerturbMode = "synonym") -> np.ndarray:
    """Apply R_level to derivations (digits [B, K] of rows start..start+B-1).

    Latents at levels >= `level` are kept; the productions of level-`level` nodes and of every
    node below are redrawn. In "synonym" mode (default, the paper's "substituting the tuples with
    a synonym") each level-`level` node takes one of its m-1 *other* productions; in "resample"
    mode it is redrawn uniformly among all m. Lower levels are always redrawn uniformly.
    Randomness is per row (counter-based), so batching does not matter.
    """
    g, m = grammar, grammar.synonyms
    if not 1 <= level <= g.depth:
        raise ConfigError(f"perturbation level must be in 1..{g.depth}, got {level}")
    if mode == "synonym" and m < 2:
        raise ConfigError("synonym perturbation needs m >= 2 (with m = 1 there are no synonyms)")
    width_top = g.width(level)
    n_redrawn = sum(g.width(k) for k in range(1, level + 1))  # digits of levels level..1 (the suffix)
    words = item_words(seed, f"perturb-{level}-{mode}", start, digits.shape[0], n_redrawn)
    out = digits.copy()
    suffix = out[:, out.shape[1] - n_redrawn:]  # view: levels `level` (first width_top) .. 1
    if mode == "synonym":
        shift = 1 + words_to_below(words[:, :width_top], m - 1)
        suffix[:, :width_top] = (suffix[:, :width_top] + shift) % m
        suffix[:, width_top:] = words_to_below(words[:, width_top:], m)
    else:
        suffix[:, :] = words_to_below(words, m)
    return out


def generate_sentences(grammar: Grammar, n: int, seed: int, *, exclude: np.ndarray | None = None,
                       batch_size: int = 65536, latents: bool = False,
                       perturb_level: int | None = None,
                       perturb_mode: PerturbMode = "synonym") -> Iterator[SentenceBatch]:
    """Yield n distinct uniformly drawn sentences in batches (content independent of batch_size)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    layout = KeyLayout.for_grammar(grammar)
    keys = sample_distinct_keys(grammar, n, seed, exclude)
    for start in range(0, n, batch_size):
        classes, digits = layout.decode(keys[start:start + batch_size])
        nodes = expand(grammar, classes, digits)
        perturbed = None
        if perturb_level is not None:
            new_digits = perturb_digits(grammar, digits, perturb_level, seed, start, perturb_mode)
            perturbed = expand(grammar, classes, new_digits)[0]
        yield SentenceBatch(start, nodes[0], nodes if latents else None, perturbed)
