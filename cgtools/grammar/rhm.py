"""The Random Hierarchy Model grammar: rule tables, how they are drawn, and their JSON form.

Levels are numbered from the leaves: level 0 holds the visible tokens, level L the root.
`rules[l-1]` is an int array of shape [symbols at level l, m, s]: row a, column k lists the s
level-(l-1) symbols of the k-th production of level-l symbol a. Level L has `n_classes` symbols,
every other level `vocab` symbols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cgtools.errors import ConfigError, SchemaError
from cgtools.seeding import generator

# Above this many possible s-tuples the rule tables would not fit in memory anyway.
_MAX_TUPLES = 1 << 40


@dataclass(frozen=True, eq=False)
class Grammar:
    """A frozen RHM instance. Use :func:`draw_grammar` or :meth:`from_json` to build one."""

    depth: int  # L
    branching: int  # s
    vocab: int  # v
    synonyms: int  # m
    n_classes: int  # n, symbols at the root level
    seed: int | None
    rules: tuple[np.ndarray, ...] = field(repr=False)  # rules[l-1]: int64 [symbols_l, m, s]

    def __post_init__(self) -> None:
        check_parameters(self.depth, self.branching, self.vocab, self.synonyms, self.n_classes)
        _validate_rules(self)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """d = s^L, the number of visible tokens."""
        return self.branching**self.depth

    @property
    def n_internal(self) -> int:
        """Number of internal nodes, (d-1)/(s-1): one production choice each."""
        return sum(self.branching**k for k in range(self.depth))

    @property
    def n_sentences(self) -> int:
        """n_classes * m^((d-1)/(s-1)), exact (may exceed 2^63)."""
        return self.n_classes * self.synonyms**self.n_internal

    def symbols(self, level: int) -> int:
        """Number of symbols at `level` (0 = tokens, L = root)."""
        return self.n_classes if level == self.depth else self.vocab

    def width(self, level: int) -> int:
        """Number of nodes at `level`: s^(L-level)."""
        return self.branching ** (self.depth - level)

    # ---- equality and (de)serialisation --------------------------------------------------------
    def same_rules(self, other: "Grammar") -> bool:
        """True when both grammars define the same language with the same rule numbering."""
        return (
            (self.depth, self.branching, self.vocab, self.synonyms, self.n_classes)
            == (other.depth, other.branching, other.vocab, other.synonyms, other.n_classes)
            and all(np.array_equal(a, b) for a, b in zip(self.rules, other.rules))
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grammar) and self.same_rules(other)

    def __hash__(self) -> int:
        return hash((self.depth, self.branching, self.vocab, self.synonyms, self.n_classes,
                     tuple(r.tobytes() for r in self.rules)))

    def to_json(self) -> dict:
        """The grammar object of DESIGN.md §3."""
        return {
            "depth": self.depth,
            "branching": self.branching,
            "vocab": self.vocab,
            "synonyms": self.synonyms,
            "n_classes": self.n_classes,
            "seed": self.seed,
            "rules": [r.tolist() for r in self.rules],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Grammar":
        """Inverse of :meth:`to_json`; raises SchemaError on anything malformed."""
        try:
            keys = ("depth", "branching", "vocab", "synonyms", "n_classes")
            depth, branching, vocab, synonyms, n_classes = (int(obj[k]) for k in keys)
            rules = tuple(np.asarray(r, dtype=np.int64) for r in obj["rules"])
            seed = obj.get("seed")
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"malformed grammar object ({exc})") from None
        try:
            return cls(depth, branching, vocab, synonyms, n_classes,
                       None if seed is None else int(seed), rules)
        except ConfigError as exc:
            raise SchemaError(f"invalid grammar: {exc}") from None

    def tensors(self) -> dict[str, np.ndarray]:
        """Rule tables as `rules.1` … `rules.L` (the safetensors layout of DESIGN.md §3)."""
        return {f"rules.{level}": np.ascontiguousarray(r) for level, r in enumerate(self.rules, 1)}


def check_parameters(depth: int, branching: int, vocab: int, synonyms: int, n_classes: int) -> None:
    """Raise ConfigError unless an unambiguous grammar with these parameters exists."""
    if depth < 1:
        raise ConfigError(f"depth L must be >= 1, got {depth}")
    if branching < 2:
        raise ConfigError(f"branching s must be >= 2, got {branching}")
    if vocab < 1 or synonyms < 1 or n_classes < 1:
        raise ConfigError("vocab v, synonyms m and n_classes must all be >= 1")
    n_tuples = vocab**branching
    if n_tuples > _MAX_TUPLES:
        raise ConfigError(f"v^s = {vocab}^{branching} is too large (max 2^40 possible tuples)")
    if depth > 1 and vocab * synonyms > n_tuples:
        raise ConfigError(
            f"m = {synonyms} synonyms is impossible with v = {vocab}, s = {branching}: unambiguous "
            f"rules need m <= v^(s-1) = {vocab ** (branching - 1)}")
    if n_classes * synonyms > n_tuples:
        raise ConfigError(
            f"n_classes * m = {n_classes * synonyms} exceeds the v^s = {n_tuples} possible "
            f"{branching}-tuples: the root's rules cannot be unambiguous")


def _validate_rules(g: Grammar) -> None:
    if len(g.rules) != g.depth:
        raise ConfigError(f"expected {g.depth} rule tables, got {len(g.rules)}")
    for level, table in enumerate(g.rules, 1):
        shape = (g.symbols(level), g.synonyms, g.branching)
        if table.shape != shape:
            raise ConfigError(f"rules of level {level} have shape {table.shape}, expected {shape}")
        if table.size and (table.min() < 0 or table.max() >= g.vocab):
            raise ConfigError(f"rules of level {level} use symbols outside [0, {g.vocab})")
        codes = tuple_codes(table.reshape(-1, g.branching), g.vocab)
        if np.unique(codes).size != codes.size:
            raise ConfigError(f"rules of level {level} are ambiguous: a tuple is produced twice")


def tuple_codes(tuples: np.ndarray, vocab: int) -> np.ndarray:
    """Base-v integer of each s-tuple, first element most significant. [..., s] -> [...] int64."""
    tuples = np.asarray(tuples, dtype=np.int64)
    code = np.zeros(tuples.shape[:-1], dtype=np.int64)
    for j in range(tuples.shape[-1]):
        code = code * vocab + tuples[..., j]
    return code


def decode_tuple_codes(codes: np.ndarray, vocab: int, branching: int) -> np.ndarray:
    """Inverse of :func:`tuple_codes`: [...] int64 -> [..., s] int64."""
    codes = np.asarray(codes, dtype=np.int64)
    out = np.empty(codes.shape + (branching,), dtype=np.int64)
    for j in range(branching - 1, -1, -1):
        out[..., j] = codes % vocab
        codes = codes // vocab
    return out


def draw_grammar(depth: int, branching: int, vocab: int, synonyms: int,
                 n_classes: int | None = None, seed: int = 0) -> Grammar:
    """Draw an RHM grammar as the paper defines it.

    For each level l = 1..L, (symbols at l) * m distinct s-tuples of level-(l-1) symbols are drawn
    uniformly without replacement among the v^s possible ones and dealt out in order: symbol a
    gets tuples a*m .. a*m+m-1. Distinct tuples make the grammar unambiguous.
    """
    n_classes = vocab if n_classes is None else n_classes
    check_parameters(depth, branching, vocab, synonyms, n_classes)
    rules = []
    for level in range(1, depth + 1):
        n_sym = n_classes if level == depth else vocab
        rng = generator(seed, "grammar", level)
        codes = rng.choice(vocab**branching, size=n_sym * synonyms, replace=False)
        rules.append(decode_tuple_codes(codes, vocab, branching).reshape(n_sym, synonyms, branching))
    return Grammar(depth, branching, vocab, synonyms, n_classes, seed, tuple(rules))


def log10_sentences(g: Grammar) -> float:
    """log10 of the number of distinct sentences (for display when it is astronomically large)."""
    return math.log10(g.n_classes) + g.n_internal * math.log10(g.synonyms)
