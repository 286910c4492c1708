"""Token-token correlation magnitude versus distance (paper Sec. 3.2, Fig. 1c; Sec. 5.1, Fig. 4b).

For two positions i < j of N sequences over a vocabulary of v tokens, the empirical covariance of
one-hot(x_i) and one-hot(x_j) is the v×v matrix

    C_ij[a, b] = P̂(x_i = a, x_j = b) - P̂(x_i = a) P̂(x_j = b),

and its magnitude is the Frobenius norm divided by v,

    |C_ij| = ||C_ij||_F / v = sqrt(mean over the v² entries of C_ij[a, b]²),

the scale on which the paper's noise floor 1/(v sqrt N) holds: for independent tokens
E ||Ĉ||_F² = (1 - Σ p²)(1 - Σ q²)/N ≤ 1/N, so the unnormalised norm would sit v times above that
floor (DESIGN.md §4 says "Frobenius norm" and "1/(v sqrt N)"; only this normalisation makes both
true). `CorrelationResult.frobenius` gives the unnormalised v·|C|.

Modes (`distance` column in parentheses):

* positional (t = 1 … d-1), fixed-length sequences: C(t) = mean over i = 0 … d-1-t of |C_{i,i+t}|,
  each covariance from the N sequences;
* pooled (t), text: every pair (i, i+t) of every sequence enters one joint table; covariance with
  the pooled marginals of the first and of the second member; N = the number of such pairs;
* tree (LCA level k = 1 … L), RHM data: mean of |C_ij| over the pairs whose lowest common ancestor
  is at level k, i.e. k is the first level with i // s^k == j // s^k (k = 1: siblings);
* exact (see :func:`exact_correlation`): the same three measures for infinitely many sentences of a
  grammar, from the tree's Markov structure, without sampling.

Noise floor of one estimate from N pairs: 1/(v sqrt N) (:func:`noise_floor`).

Everything is computed from co-occurrence counts: a dense [cells, v, v] count table when v is
small, else counts of the distinct pairs only (keys a·v + b), merged batch by batch, with the norm
expanded over the non-zero entries (:func:`_sparse_norms`). Memory is proportional to the distinct
pairs of the cells held at once, never to N and never v×v for a large v; the cells (one per
covariance estimate) are split into passes over the input so that one pass holds at most
`max_entries` counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from cgtools.errors import InputError
from cgtools.grammar.rhm import Grammar
from cgtools.logs import progress

MODES = ("positional", "pooled", "tree")
EXACT_MODE = {"positional": "exact", "pooled": "exact-pooled", "tree": "exact-tree"}
# Dense count tables [cells, v, v] up to this v (v² = 65536 counters per cell); above it, sparse.
DENSE_MAX_VOCAB = 256
# Counts held in memory in one pass over the input (dense counters or distinct pairs).
DEFAULT_MAX_ENTRIES = 1 << 22
# Pair codes built at once from one slice of a batch (bounds the temporaries).
_CHUNK = 1 << 20

Batches = Callable[[], Iterable[np.ndarray]]  # a fresh iterator of int batches [B, len] per call


@dataclass
class CorrelationResult:
    """One row per distance (or LCA level); lists are aligned with `distance`."""

    mode: str  # positional | pooled | tree | exact | exact-pooled | exact-tree
    vocab: int  # v used for the normalisation and the noise floor
    n: int | None  # sequences measured (None: exact)
    distance: list[int]  # t, or the LCA level for tree modes
    correlation: list[float]  # mean ||C||_F / v
    pairs: list[int | None]  # token pairs entering one covariance estimate (None: exact)
    noise_floor: list[float | None]  # 1/(v sqrt(pairs)) (None: exact)
    theory: list[float | None] | None = None  # App. A magnitude, v, m large (needs a grammar)
    theory_finite_v: list[float | None] | None = None  # the same with Eq. 18's finite-v factor

    @property
    def frobenius(self) -> list[float]:
        """The unnormalised mean Frobenius norm, v·correlation."""
        return [self.vocab * c for c in self.correlation]

    def columns(self) -> dict[str, list]:
        """Columns of the results table (cgtools.formats.results)."""
        rows = len(self.distance)
        return {
            "distance": self.distance,
            "correlation": self.correlation,
            "noise_floor": self.noise_floor,
            "n": [self.n] * rows,
            "pairs": self.pairs,
            "mode": [self.mode] * rows,
            "theory": self.theory if self.theory is not None else [None] * rows,
            "theory_finite_v": self.theory_finite_v if self.theory_finite_v is not None else [None] * rows,
            "frobenius": self.frobenius,
        }

    def to_json(self) -> dict:
        out = {"mode": self.mode, "n": self.n, "vocab": self.vocab, "distance": self.distance,
               "correlation": self.correlation, "noise_floor": self.noise_floor, "pairs": self.pairs,
               "frobenius": self.frobenius}
        if self.theory is not None:
            out["theory"] = self.theory
            out["theory_finite_v"] = self.theory_finite_v
        return out


# Arrow type of every column of a `correlation` results table (nulls keep the type).
COLUMN_TYPES = {"distance": "int64", "correlation": "float64", "noise_floor": "float64", "n": "int64",
                "pairs": "int64", "mode": "string", "theory": "float64", "theory_finite_v": "float64",
                "frobenius": "float64"}


def results_columns(result: CorrelationResult) -> dict:
    """Typed Arrow columns of the results table: one row per distance (cgtools.formats.results)."""
    import pyarrow as pa

    return {name: pa.array(values, type=getattr(pa, COLUMN_TYPES[name])())
            for name, values in result.columns().items()}


def noise_floor(vocab: int, pairs: int) -> float:
    """1/(v sqrt N): the magnitude |C| of the covariance of N pairs of independent tokens.

    Precisely E|Ĉ|² = (1 - Σ_a p_a²)(1 - Σ_b q_b²) / (v² N) for independent members with laws p, q,
    so the floor is an upper bound of the noise, reached for a large, spread-out vocabulary.
    """
    return 1.0 / (vocab * math.sqrt(pairs))


def lca_levels(i: np.ndarray, j: np.ndarray, branching: int) -> np.ndarray:
    """Level of the lowest common ancestor of leaves i and j (i != j): the first k >= 1 with
    i // s^k == j // s^k. [K], [K] -> [K] int64."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    level = np.ones(i.shape, dtype=np.int64)
    a, b = i // branching, j // branching
    while (a != b).any():
        level += a != b
        a, b = a // branching, b // branching
    return level


# ---- theory --------------------------------------------------------------------------------------

def pair_magnitude(vocab: int, synonyms: int, branching: int, level: int, finite_v: bool = False) -> float:
    """Typical |C_ij| (RMS entry over RHM realisations) of two tokens whose LCA is at `level`.

    App. A's argument applied to two single tokens: siblings are tied by one production, and with
    near-uniform marginals the covariance has ⟨C²⟩ = (1 - f)/(v³ m), f = m/v^(s-1) (exact for
    s = 2). Each level further up puts one more transition matrix p^(1) on *each* branch, and each
    multiplies ⟨C²⟩ by v^(s-1)(v-1)/(m(v^s-1)) → 1/m (Eq. 18). Hence

        ⟨C²⟩ = (1 - f) / (v³ m^(2l-1))   (v, m large; `finite_v` keeps Eq. 18's exact factor),

    a power law C(t) ~ t^(-log m / log s) in the distance t ~ s^l of Cagnetta & Wyart (2024). It is
    Eq. (5)'s token-latent magnitude C^(l') = sqrt((1-f)/(v³ m^(l'+2))) at l' = 2l - 3, not at
    l' = l: a latent tuple sits one branch below the LCA, a token l - 1 transitions below it.
    """
    if level < 1:
        raise ValueError(f"LCA levels start at 1, got {level}")
    v, m, s = vocab, synonyms, branching
    f = m / v ** (s - 1)
    if f >= 1 or v < 2:
        return 0.0  # every tuple is a production: tokens are independent
    c2 = (1 - f) / (v**3 * m)
    ratio = v ** (s - 1) * (v - 1) / (m * (v**s - 1)) if finite_v else 1 / m
    return math.sqrt(c2) * ratio ** (level - 1)


def _theory_rows(grammar: Grammar, levels_of_rows: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per row, the mean of pair_magnitude over the LCA levels [K_row] of the row's pairs."""
    g = grammar
    table = np.array([[pair_magnitude(g.vocab, g.synonyms, g.branching, lv, finite) for lv in range(1, g.depth + 1)]
                      for finite in (False, True)])  # [2, L]
    rows = np.array([table[:, levels - 1].mean(axis=1) for levels in levels_of_rows])  # [rows, 2]
    return rows[:, 0].tolist(), rows[:, 1].tolist()


# ---- which pairs enter which estimate ----------------------------------------------------------

def _position_pairs(length: int, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j <= i + max_distance, ordered by distance then i. -> [K], [K]."""
    firsts, seconds = [], []
    for t in range(1, max_distance + 1):
        i = np.arange(length - t, dtype=np.int64)
        firsts.append(i)
        seconds.append(i + t)
    return np.concatenate(firsts), np.concatenate(seconds)


def _tree_pairs(grammar: Grammar, max_level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (i, j), i < j, with LCA level <= max_level, and that level. -> [K] x 3."""
    d = grammar.length
    i, j = np.triu_indices(d, k=1)
    level = lca_levels(i, j, grammar.branching)
    keep = level <= max_level
    return i[keep].astype(np.int64), j[keep].astype(np.int64), level[keep]


# ---- counting ------------------------------------------------------------------------------------

class _DistinctCounts:
    """Counts of distinct int64 keys, merged as slices arrive: memory ~ 3 x distinct keys."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        k, c = np.unique(keys, return_counts=True)
        self._pending.append((k, c.astype(np.int64)))
        self._pending_size += k.size
        # Merge once the pending slices outweigh the merged table: amortised O(distinct log distinct).
        if self._pending_size > max(self.keys.size, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_size = [], 0
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts) if keys.size else counts

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct keys [D] and their counts [D]."""
        self._merge()
        return self.keys, self.counts


def _dense_norms(counts: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Count tables [K, v, v] -> (|C| [K], pairs [K]); C = P - p q^T directly (no cancellation)."""
    pairs = counts.sum(axis=(1, 2))
    joint = counts / np.maximum(pairs, 1)[:, None, None]  # [K, v, v]
    cov = joint - joint.sum(2)[:, :, None] * joint.sum(1)[:, None, :]  # [K, v, v]
    return np.sqrt(np.einsum("kab,kab->k", cov, cov)) / vocab, pairs


def _segment_sum(values: np.ndarray, segments: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(segments, weights=values, minlength=n)


def _sparse_norms(keys: np.ndarray, counts: np.ndarray, vocab: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """|C| [K] and pairs [K] from the distinct keys cell·v² + a·v + b and their counts n_ab.

    With N = Σ n_ab, row sums r_a and column sums c_b of one cell,

        N⁴ ||C||_F² = Σ_nz (N n_ab - r_a c_b)² + Σ_zero (r_a c_b)²
                    = Σ_nz (N n_ab - r_a c_b)² + (Σ_a r_a²)(Σ_b c_b²) - Σ_nz (r_a c_b)²,

    sums over the non-zero entries only (the last two terms: the entries never seen).
    """
    v2 = vocab * vocab
    cell = keys // v2  # [D]
    a = (keys // vocab) % vocab
    b = keys % vocab
    pairs = np.bincount(cell, weights=counts, minlength=n_cells)  # [K] float, exact below 2^53
    r_keys, r_inv = np.unique(cell * vocab + a, return_inverse=True)  # marginal of the first member
    c_keys, c_inv = np.unique(cell * vocab + b, return_inverse=True)
    r = np.bincount(r_inv, weights=counts).astype(np.float64)  # [R]
    c = np.bincount(c_inv, weights=counts).astype(np.float64)  # [Q]
    n_cell = pairs[cell]  # [D]
    rc = r[r_inv] * c[c_inv]  # [D]
    seen = _segment_sum((n_cell * counts - rc) ** 2 - rc**2, cell, n_cells)
    r2 = _segment_sum(r**2, r_keys // vocab, n_cells)
    c2 = _segment_sum(c**2, c_keys // vocab, n_cells)
    total = np.maximum(seen + r2 * c2, 0.0)
    norms = np.sqrt(total) / np.maximum(pairs, 1) ** 2 / vocab
    return norms, pairs.astype(np.int64)


def _check_batch(tokens: np.ndarray, vocab: int, length: int | None, where: str, offset: int) -> None:
    if tokens.ndim != 2:
        raise InputError(f"{where}: expected a list column of token ids")
    if length is not None and tokens.shape[1] != length:
        raise InputError(f"{where}: sequences have length {tokens.shape[1]}, expected {length}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        bad = (tokens < 0) | (tokens >= vocab)
        row, col = map(int, np.argwhere(bad)[0])
        raise InputError(f"{where}: token {int(tokens[row, col])} at row {offset + row}, position {col} "
                         f"is outside the vocabulary [0, {vocab}) (give --vocab)")


@dataclass(frozen=True)
class _Cells:
    """The covariance estimates of one pass: fixed position pairs (first[k], second[k]) or, when
    `distance` is set, every pair at distance distance[k] pooled."""

    first: np.ndarray | None = None  # [K]
    second: np.ndarray | None = None  # [K]
    distance: np.ndarray | None = None  # [K]

    def __len__(self) -> int:
        return len(self.distance if self.distance is not None else self.first)

    def part(self, lo: int, hi: int) -> "_Cells":
        if self.distance is not None:
            return _Cells(distance=self.distance[lo:hi])
        return _Cells(first=self.first[lo:hi], second=self.second[lo:hi])


def _slices(tokens: np.ndarray, per_row: int) -> Iterator[np.ndarray]:
    rows = max(1, _CHUNK // max(per_row, 1))
    for lo in range(0, tokens.shape[0], rows):
        yield tokens[lo:lo + rows]


def _count_pass(batches: Iterable[np.ndarray], cells: _Cells, vocab: int, dense: bool, length: int | None,
                where: str, bar) -> tuple[np.ndarray, np.ndarray, int]:
    """One pass over the input: (|C| [K], pairs [K], rows read) of the cells."""
    k_cells, v2 = len(cells), vocab * vocab
    table = np.zeros(k_cells * v2, dtype=np.int64) if dense else None  # [K·v²]
    distinct = None if dense else _DistinctCounts()
    offset = np.arange(k_cells, dtype=np.int64) * v2  # [K]
    rows = 0
    for tokens in batches:
        _check_batch(tokens, vocab, length, where, rows)
        if cells.distance is None:
            for part in _slices(tokens, k_cells):
                codes = part[:, cells.first] * vocab + part[:, cells.second] + offset  # [b, K]
                _add(codes.ravel(), table, distinct)
        else:
            width = tokens.shape[1]
            for k, t in enumerate(cells.distance.tolist()):
                if t >= width:
                    continue
                for part in _slices(tokens, width - t):
                    codes = part[:, :width - t] * vocab + part[:, t:] + offset[k]  # [b, width - t]
                    _add(codes.ravel(), table, distinct)
        rows += tokens.shape[0]
        bar.advance(tokens.shape[0])
    if dense:
        norms, pairs = _dense_norms(table.reshape(k_cells, vocab, vocab), vocab)
        return norms, pairs, rows
    keys, counts = distinct.result()
    norms, pairs = _sparse_norms(keys, counts, vocab, k_cells)
    return norms, pairs, rows


def _add(codes: np.ndarray, table: np.ndarray | None, distinct: _DistinctCounts | None) -> None:
    if table is not None:
        table += np.bincount(codes, minlength=table.size)
    else:
        distinct.add(codes)


def cell_norms(open_batches: Batches, cells: _Cells, vocab: int, *, length: int | None = None,
               dense: bool | None = None, max_entries: int = DEFAULT_MAX_ENTRIES, rows_hint: int | None = None,
               tokens_hint: int | None = None, where: str = "input", total: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """|C| [K] and pairs [K] of every cell, in as few passes over `open_batches()` as memory allows.

    A cell costs v² counters (dense) or at most min(v², its pairs) distinct keys (sparse); each
    pass holds cells worth at most `max_entries` of them. The hints (rows, tokens of the input)
    only bound the pairs of a cell.
    """
    dense = vocab <= DENSE_MAX_VOCAB if dense is None else dense
    if dense:
        cost = vocab * vocab
    else:
        bound = tokens_hint if cells.distance is not None else rows_hint
        cost = min(vocab * vocab, bound) if bound else vocab * vocab
    per_pass = max(1, max_entries // max(cost, 1))
    n_passes = -(-len(cells) // per_pass)
    norms, pairs, rows = [], [], 0
    with progress(None if total is None else total * n_passes, "correlate") as bar:
        for lo in range(0, len(cells), per_pass):
            part = cells.part(lo, lo + per_pass)
            nrm, prs, rows = _count_pass(open_batches(), part, vocab, dense, length, where, bar)
            if rows == 0:
                raise InputError(f"{where}: no sequences")
            norms.append(nrm)
            pairs.append(prs)
    return np.concatenate(norms), np.concatenate(pairs), rows


# ---- the measurement ----------------------------------------------------------------------------

def scan(batches: Iterable[np.ndarray]) -> tuple[int, int, int, int]:
    """(rows, tokens, longest length, largest token id) of the input, in one pass."""
    rows = tokens = longest = 0
    top = -1
    for b in batches:
        rows += b.shape[0]
        tokens += b.size
        longest = max(longest, b.shape[1] if b.ndim == 2 else 0)
        if b.size:
            top = max(top, int(b.max()))
    return rows, tokens, longest, top


def correlate(open_batches: Batches, *, vocab: int, mode: str = "positional", length: int | None = None,
              max_distance: int | None = None, grammar: Grammar | None = None, where: str = "input",
              total: int | None = None, tokens_hint: int | None = None, dense: bool | None = None,
              max_entries: int = DEFAULT_MAX_ENTRIES) -> CorrelationResult:
    """Measure C(t) (positional, pooled) or C per LCA level (tree) of the token batches.

    `open_batches()` yields int arrays [B, len]; it is called once per pass. `length` is the fixed
    sequence length d (positional and tree; pooled takes every batch's own length and needs it only
    as the default largest distance). With a `grammar`, positional and tree rows carry the App. A
    prediction (:func:`pair_magnitude`, averaged over the row's pairs). `total` (rows) sizes the
    progress bar and, with `tokens_hint`, bounds the distinct pairs of a cell.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "tree" and grammar is None:
        raise InputError("--by-tree-distance needs the grammar")
    if mode == "tree" and length is not None and length != grammar.length:
        raise InputError(f"{where}: sequences have length {length}, the grammar needs d = {grammar.length}")
    if mode == "tree":
        length = grammar.length
    if length is None:
        raise ValueError("the sequence length must be given")
    if length < 2:
        raise InputError(f"{where}: sequences of length {length} have no pairs of tokens")
    limit = grammar.depth if mode == "tree" else length - 1
    top = limit if max_distance is None else min(max_distance, limit)
    if top < 1:
        raise InputError(f"--max-distance must be at least 1, got {max_distance}")
    fixed = None if mode == "pooled" else length
    hints = dict(length=fixed, dense=dense, max_entries=max_entries, rows_hint=total, tokens_hint=tokens_hint,
                 where=where, total=total)
    theory = finite = None
    if mode == "pooled":
        distance = np.arange(1, top + 1, dtype=np.int64)
        norms, pairs, n = cell_norms(open_batches, _Cells(distance=distance), vocab, **hints)
        keep = pairs > 0  # distances longer than every sequence of the input
        distance, norms, pairs = distance[keep], norms[keep], pairs[keep]
        rows_norm, rows_pairs = norms.tolist(), pairs.tolist()
    else:
        if mode == "tree":
            first, second, group = _tree_pairs(grammar, top)
            distance = np.arange(1, top + 1, dtype=np.int64)
        else:
            first, second = _position_pairs(length, top)
            group = second - first
            distance = np.arange(1, top + 1, dtype=np.int64)
        norms, pairs, n = cell_norms(open_batches, _Cells(first=first, second=second), vocab, **hints)
        rows_norm = [float(norms[group == t].mean()) for t in distance]
        rows_pairs = [n] * len(distance)
        if grammar is not None:
            levels = lca_levels(first, second, grammar.branching)
            theory, finite = _theory_rows(grammar, [levels[group == t] for t in distance])
    return CorrelationResult(mode=mode, vocab=vocab, n=n, distance=distance.tolist(), correlation=rows_norm,
                             pairs=[int(p) for p in rows_pairs],
                             noise_floor=[noise_floor(vocab, int(p)) for p in rows_pairs],
                             theory=theory, theory_finite_v=finite)


# ---- exact (infinitely many sentences) -----------------------------------------------------------

@dataclass(frozen=True)
class TreeLaw:
    """The RHM's law as a Markov process on the tree (root uniform over n_classes).

    * transition[l][j] [symbols_l, v]: M_j^(l)[a, b] = (1/m) #{productions of a whose j-th child is b};
    * marginal[l] [s^(L-l), symbols_l]: the law of every level-l node;
    * down[r] [s^r, v, v]: down[r][u][a, b] = P(leaf u of a level-r subtree = b | its root = a),
      the product of the r transition matrices along the path (down[0] = identity).
    """

    grammar: Grammar
    transition: dict[int, list[np.ndarray]]
    marginal: dict[int, np.ndarray]
    down: dict[int, np.ndarray]

    @classmethod
    def of(cls, g: Grammar) -> "TreeLaw":
        s, v, m, L = g.branching, g.vocab, g.synonyms, g.depth
        transition = {}
        for level in range(1, L + 1):
            rules = g.rules[level - 1]  # [symbols, m, s]
            sym = np.repeat(np.arange(rules.shape[0]), m)  # [symbols·m]
            transition[level] = [np.bincount(sym * v + rules[:, :, j].ravel(), minlength=rules.shape[0] * v)
                                 .reshape(rules.shape[0], v) / m for j in range(s)]
        marginal = {L: np.full((1, g.n_classes), 1.0 / g.n_classes)}
        for level in range(L, 0, -1):
            children = np.stack([marginal[level] @ t for t in transition[level]], axis=1)  # [w, s, v]
            marginal[level - 1] = children.reshape(-1, v)
        down = {0: np.eye(v)[None]}
        for r in range(1, L):
            # leaf u of a level-r subtree: child u // s^(r-1) of the root, then leaf u mod s^(r-1) below it
            u = np.arange(s**r)
            down[r] = np.stack([transition[r][x // s ** (r - 1)] @ down[r - 1][x % s ** (r - 1)] for x in u])
        return cls(g, transition, marginal, down)

    def joint(self, i: int, j: int) -> np.ndarray:
        """P(x_i = a, x_j = b) [v, v] of two distinct leaves.

        Given their LCA (level k, node c) the two children on the paths are drawn together by one
        production; below them the branches are independent Markov chains.
        """
        g, s, v, m = self.grammar, self.grammar.branching, self.grammar.vocab, self.grammar.synonyms
        k = int(lca_levels(np.array([i]), np.array([j]), s)[0])
        node = i // s**k
        ci, cj = (i // s ** (k - 1)) % s, (j // s ** (k - 1)) % s
        rules = g.rules[k - 1]  # [symbols_k, m, s]
        weight = np.repeat(self.marginal[k][node] / m, m)  # [symbols_k·m]
        children = np.bincount(rules[:, :, ci].ravel() * v + rules[:, :, cj].ravel(), weights=weight,
                               minlength=v * v).reshape(v, v)  # joint law of the two children
        below = s ** (k - 1)
        return self.down[k - 1][i % below].T @ children @ self.down[k - 1][j % below]


def exact_correlation(grammar: Grammar, mode: str = "positional", max_distance: int | None = None) -> CorrelationResult:
    """The population value of :func:`correlate`'s measures for the RHM `grammar` (no sampling).

    Every pair's joint law comes from :class:`TreeLaw`; then |C_ij| = ||P_ij - p_i p_j^T||_F / v,
    averaged over i (positional, mode "exact") or over the pairs of each LCA level ("exact-tree");
    "exact-pooled" averages the joint laws and the marginals over i before taking the norm.
    Rows carry the App. A prediction, except for pooled.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    g, v, d = grammar, grammar.vocab, grammar.length
    law = TreeLaw.of(g)
    leaf = law.marginal[0]  # [d, v]
    limit = g.depth if mode == "tree" else d - 1
    top = limit if max_distance is None else min(max_distance, limit)
    if top < 1:
        raise InputError(f"--max-distance must be at least 1, got {max_distance}")
    distance = list(range(1, top + 1))
    theory = finite = None
    if mode == "pooled":
        rows = []
        for t in distance:
            joint = sum(law.joint(i, i + t) for i in range(d - t)) / (d - t)  # [v, v], pooled over i
            cov = joint - np.outer(leaf[: d - t].mean(0), leaf[t:].mean(0))
            rows.append(float(np.linalg.norm(cov) / v))
    else:
        if mode == "tree":
            first, second, group = _tree_pairs(g, top)
        else:
            first, second = _position_pairs(d, top)
            group = second - first
        norms = np.array([np.linalg.norm(law.joint(i, j) - np.outer(leaf[i], leaf[j])) / v
                          for i, j in zip(first.tolist(), second.tolist())])  # [K]
        rows = [float(norms[group == t].mean()) for t in distance]
        levels = lca_levels(first, second, g.branching)
        theory, finite = _theory_rows(g, [levels[group == t] for t in distance])
    nothing = [None] * len(distance)
    return CorrelationResult(mode=EXACT_MODE[mode], vocab=v, n=None, distance=distance, correlation=rows,
                             pairs=nothing, noise_floor=list(nothing), theory=theory, theory_finite_v=finite)


def sequence_set(batches: Iterable[Iterable[np.ndarray]], length: int) -> set[bytes]:
    """The distinct rows of every batch of every stream (int arrays [B, length]) as bytes keys,
    for :func:`without_rows`."""
    keys: set[bytes] = set()
    for stream in batches:
        for batch in stream:
            rows = np.ascontiguousarray(batch, dtype=np.int64).reshape(-1, length)
            keys.update(r.tobytes() for r in rows)
    return keys


def without_rows(batches: Iterable[np.ndarray], keys: set[bytes]) -> Iterator[np.ndarray]:
    """The batches with every row whose int64 bytes are in `keys` removed (empty batches skipped)."""
    for batch in batches:
        rows = np.ascontiguousarray(batch, dtype=np.int64)
        keep = np.fromiter((r.tobytes() not in keys for r in rows), dtype=bool, count=len(rows))
        if keep.any():
            yield batch[keep]
