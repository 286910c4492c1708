"""Correlation-based hierarchical clustering of synonyms, the "hierarchical word2vec" (Sec. 4.3).

At level l (1 … L-1) the objects are the values ν of one s-tuple h of level-(l-1) symbols: the
children of the level-l node `node` (default 1, the second level-l node). Each observed value gets
a context vector, k-means groups the vectors, and the adjusted Rand index (ARI) compares the
groups with the true synonym classes (the level-l symbol that produces the tuple).

Pairing (the paper's, Sec. 4.2-4.3 and Fig. 3b): the context is the visible token x_1 (`position`
0) and the tuple is h^(l-1)_{s+1:2s}, whose lowest common ancestor with x_1 is the level-(l+1)
node 0. Their correlation has magnitude C^(l+1) (Eq. 5), so clustering level l needs about
P_{l+1} = v m^(l+2) / (1 - m/v^(s-1)) sentences (Eq. 6: P_2 ~ v m^3 for the visible tuples of
Fig. 2, P_3 ~ v m^4 for the level-1 tuples of Fig. 7). The root level L has no context outside its
tuple, so it cannot be clustered this way.

* context "token": one-hot of the visible token at `position` (v categories; "first token",
  black points of Fig. 2 and 7); "tuple": one categorical of the v^s values of the aligned
  visible s-tuple that holds `position` ("first visible tuple", red points).
* method "mean": v_ν = E[x | h = ν], the empirical mean context (Sec. 4.3); "gd1": the columns of
  the weights of the linear softmax model of App. B after one gradient step on the empirical
  cross-entropy of predicting the context from the one-hot tuple, W = W0 + η Ĉ with
  Ĉ(c, ν) = P̂(x = c, h = ν) - P̂(x = c) P̂(h = ν) for the App. B start W0 = log P̂(x = c).
* oracle: the level-(l-1) tuple holds the true latents (parse of the sentence, Fig. 7);
  hierarchical (default): it holds the cluster labels found at the levels below, applied to every
  tuple of the node's subtree with one map per level shared by all positions (the rules are the
  same at every position), so errors propagate (App. D.2). A tuple value never seen at the level
  below has no label; sentences whose tuple holds one are left out (`n_used` counts the rest).
* k-means: scikit-learn KMeans, k-means++ starts, best of `n_init` (10) restarts, random_state
  derived from the seed and the level. k defaults to the number of true classes among the
  observed values: a symbol that never occurs at this node (probability ~e^-m per symbol) would
  otherwise force k = v to split a class and cap the ARI below 1 even with exact contexts. Every
  observed value counts once (the paper clusters "these vectors"); `weighted` gives each value
  its number of occurrences instead. Rows are put in a canonical order first, so the result does
  not depend on how values are numbered.
* ARI: over the distinct observed values that have a true class (majority of the parsed level-l
  symbol over the sentences holding that value; exact for true tuples).

Counts are accumulated batch by batch (sparse pairs of codes), never as one-hot tensors of all
sentences; each level of the hierarchical procedure is one pass over the data.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

from cgtools.analysis.accuracy import check_tokens
from cgtools.errors import ConfigError, InputError
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import Grammar, tuple_codes
from cgtools.logs import progress
from cgtools.seeding import derived_seed

log = logging.getLogger(__name__)

CONTEXTS = ("token", "tuple")
METHODS = ("mean", "gd1")
GD_INITS = ("marginal", "zero")
RESULTS_KIND = "cluster"
# Columns of a `cluster` results table, one row per level (tags are appended after them).
RESULT_COLUMNS = ("level", "ari", "n", "n_used", "n_values", "n_scored", "classes", "clusters",
                  "node", "position", "context", "method", "oracle", "weighted")
# Dense context matrices above this many entries would not fit comfortably in memory.
_MAX_MATRIX = 50_000_000

Batches = Callable[[], Iterable[np.ndarray]]  # returns a fresh iterator of token batches [B, d]


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster one level (see the module docstring)."""

    context: str = "token"  # "token" | "tuple"
    method: str = "mean"  # "mean" | "gd1"
    oracle: bool = False  # true level-(l-1) latents instead of the clusters found below
    node: int = 1  # the level-l node whose children form the clustered tuple
    position: int = 0  # visible position of the context token (or inside the context tuple)
    clusters: int | None = None  # k of k-means; None: the number of true classes observed
    weighted: bool = False  # k-means weights each value by its number of occurrences
    n_init: int = 10  # k-means restarts (the best inertia is kept)
    gd_init: str = "marginal"  # gd1 start: log of the context marginal (App. B) or zero
    lr: float = 1.0  # gd1 learning rate η (a uniform scale: k-means does not depend on it)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ConfigError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.gd_init not in GD_INITS:
            raise ConfigError(f"gd1 init must be one of {', '.join(GD_INITS)}, got {self.gd_init!r}")
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError(f"the number of clusters must be >= 1, got {self.clusters}")
        if self.n_init < 1:
            raise ConfigError(f"k-means needs n_init >= 1, got {self.n_init}")
        if self.node < 0 or self.position < 0:
            raise ConfigError("node and position must be >= 0")


@dataclass
class LevelResult:
    """Clustering of one level: ARI and the counts behind it."""

    level: int
    ari: float
    n: int  # sentences read
    n_used: int  # sentences whose tuple entered the clustering (all of them with --oracle)
    n_values: int  # distinct tuple values clustered
    n_scored: int  # values with a true class (a tuple that parses), over which the ARI runs
    classes: int  # distinct true classes among the scored values
    clusters: int  # k of k-means
    context: str
    method: str
    oracle: bool
    weighted: bool
    node: int
    position: int

    def to_json(self) -> dict:
        return asdict(self)


# ---- geometry -----------------------------------------------------------------------------------
def check_level(grammar: Grammar, level: int, node: int, position: int) -> None:
    """ConfigError unless `level` can be clustered with this tuple node and context position."""
    L, s = grammar.depth, grammar.branching
    if level < 1:
        raise ConfigError(f"level must be >= 1 (level 0 holds the visible tokens), got {level}")
    if level >= L:
        raise ConfigError(
            f"level {level} cannot be clustered: the grammar has L = {L} levels and level {L} is the "
            f"root, whose tuple spans the whole sentence and has no context outside it "
            f"(levels 1 … {L - 1} can be clustered)" if level == L else
            f"level {level} does not exist: the grammar has L = {L} levels (levels 1 … {L - 1} can be clustered)")
    width = grammar.width(level)
    if node >= width:
        raise ConfigError(f"level {level} has {width} nodes: tuple node {node} does not exist")
    if position >= grammar.length:
        raise ConfigError(f"context position {position} is outside the sentence (d = {grammar.length})")
    span = s**level
    if node * span <= position < (node + 1) * span:
        raise ConfigError(f"context position {position} lies inside the subtree of level-{level} node "
                          f"{node} (positions {node * span} … {(node + 1) * span - 1}); choose a token outside it")


def context_codes(tokens: np.ndarray, grammar: Grammar, position: int, context: str) -> np.ndarray:
    """The context category of every sentence: [B, d] -> [B] int64 (a token, or a tuple's base-v code)."""
    if context == "token":
        return tokens[:, position].astype(np.int64)
    s = grammar.branching
    start = position // s * s
    return tuple_codes(tokens[:, start:start + s], grammar.vocab)


# ---- sparse counts ------------------------------------------------------------------------------
class PairCounts:
    """Counts of integer pairs (a, b), merged batch by batch: memory ~ number of distinct pairs."""

    def __init__(self) -> None:
        self.keys = np.empty((0, 2), dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)

    def add(self, a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> None:
        """a, b: [B] int64 codes (weight [B], default ones)."""
        pairs = np.concatenate([self.keys, np.stack([a, b], axis=1).astype(np.int64)])
        w = np.concatenate([self.counts, np.ones(a.size, np.int64) if weight is None else weight])
        if pairs.size == 0:
            return
        if pairs.max() < 1 << 31 and pairs.min() >= 0:
            # Both codes fit 31 bits: one int64 key per pair, much faster to sort than rows.
            keys, inverse = np.unique(pairs[:, 0] << 32 | pairs[:, 1], return_inverse=True)
            self.keys = np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1)
        else:
            self.keys, inverse = np.unique(pairs, axis=0, return_inverse=True)
        self.counts = np.bincount(inverse.reshape(-1), weights=w, minlength=len(self.keys)).astype(np.int64)


@dataclass
class LevelStatistics:
    """What one pass gathers for one level.

    values:   [V] int64, sorted codes of the observed tuple values (base `base`).
    contexts: [C] int64, sorted observed context codes.
    counts:   [V, C] int64, joint counts N(h = values[i], x = contexts[j]).
    truth:    [V] int64, the true level-l symbol of each value (majority over its sentences; -1 if
              its tuple never parses).
    """

    values: np.ndarray
    contexts: np.ndarray
    counts: np.ndarray
    truth: np.ndarray
    base: int
    n: int
    n_used: int


class _LevelAccumulator:
    def __init__(self, base: int) -> None:
        self.base = base
        self.joint, self.true = PairCounts(), PairCounts()
        self.n = self.n_used = 0

    def add(self, values: np.ndarray, contexts: np.ndarray, truth: np.ndarray) -> None:
        """values [B] (-1 = no value), contexts [B], truth [B] (-1 = does not parse)."""
        self.n += values.size
        keep = values >= 0
        self.n_used += int(keep.sum())
        self.joint.add(values[keep], contexts[keep])
        ok = keep & (truth >= 0)
        self.true.add(values[ok], truth[ok])

    def result(self, where: str, level: int) -> LevelStatistics:
        if self.n_used == 0:
            raise InputError(f"{where}: no sentence has a usable level-{level - 1} tuple to cluster")
        values, vi = np.unique(self.joint.keys[:, 0], return_inverse=True)
        contexts, ci = np.unique(self.joint.keys[:, 1], return_inverse=True)
        if values.size * contexts.size > _MAX_MATRIX:
            raise ConfigError(f"{values.size} tuple values × {contexts.size} contexts is too large a "
                              f"matrix; use --context token or fewer sentences")
        counts = np.zeros((values.size, contexts.size), dtype=np.int64)
        np.add.at(counts, (vi.reshape(-1), ci.reshape(-1)), self.joint.counts)
        truth = np.full(values.size, -1, dtype=np.int64)
        if self.true.counts.size:
            # Majority class per value: sort by (value, -count, class) and take each value's first.
            k, c = self.true.keys, self.true.counts
            order = np.lexsort((k[:, 1], -c, k[:, 0]))
            first = np.r_[True, k[order[1:], 0] != k[order[:-1], 0]]
            best = order[first]
            truth[np.searchsorted(values, k[best, 0])] = k[best, 1]
        return LevelStatistics(values, contexts, counts, truth, self.base, self.n, self.n_used)


# ---- the hierarchical map -----------------------------------------------------------------------
@dataclass(frozen=True)
class LevelMap:
    """Cluster label of each observed tuple value of one level (codes base `base`, labels 0..k-1)."""

    codes: np.ndarray  # [V] sorted
    labels: np.ndarray  # [V]
    base: int
    k: int

    def apply(self, symbols: np.ndarray, s: int) -> np.ndarray:
        """[B, w] labels of level l-1 (-1 = unknown) -> [B, w/s] labels of level l (-1 = unknown)."""
        b = symbols.shape[0]
        children = symbols.reshape(b, -1, s)
        codes = tuple_codes(np.maximum(children, 0), self.base)
        pos = np.minimum(np.searchsorted(self.codes, codes), self.codes.size - 1)
        hit = (self.codes[pos] == codes) & (children >= 0).all(axis=-1)
        return np.where(hit, self.labels[pos], -1)


def _tuple_values(tokens: np.ndarray, parse, grammar: Grammar, level: int, node: int,
                  maps: dict[int, LevelMap], oracle: bool) -> tuple[np.ndarray, int]:
    """Codes [B] of the clustered tuple (-1 = unknown) and their base."""
    s = grammar.branching
    if oracle or level == 1:
        h = parse.symbols[level - 1][:, node * s:(node + 1) * s]  # true level-(l-1) symbols [B, s]
        codes = tuple_codes(np.maximum(h, 0), grammar.vocab)
        return np.where((h >= 0).all(axis=1), codes, -1), grammar.vocab
    span = s**level
    h = tokens[:, node * span:(node + 1) * span]  # the node's subtree, [B, s^l]
    for k in range(1, level):
        h = maps[k].apply(h, s)  # [B, s^(l-k)]
    top = maps[level - 1]
    codes = tuple_codes(np.maximum(h, 0), top.k)
    return np.where((h >= 0).all(axis=1), codes, -1), top.k


def collect(batches: Batches, grammar: Grammar, levels: list[int], config: ClusterConfig,
            maps: dict[int, LevelMap] | None = None, where: str = "input", bar=None) -> dict[int, LevelStatistics]:
    """One pass over the data: the statistics of every level in `levels`.

    Hierarchical levels l >= 2 need `maps[1 … l-1]` (from :func:`cluster_statistics`).
    """
    parser = Parser(grammar)
    acc: dict[int, _LevelAccumulator] = {}
    offset = 0
    for tokens in batches():
        tokens = np.asarray(tokens)
        check_tokens(tokens, grammar, where, offset)
        offset += tokens.shape[0]
        parse = parser.parse(tokens)
        ctx = context_codes(tokens, grammar, config.position, config.context)
        for level in levels:
            values, base = _tuple_values(tokens, parse, grammar, level, config.node, maps or {}, config.oracle)
            if level not in acc:
                acc[level] = _LevelAccumulator(base)
            acc[level].add(values, ctx, parse.symbols[level][:, config.node])
        if bar is not None:
            bar.advance(tokens.shape[0])
    if offset == 0:
        raise InputError(f"{where}: no sequences")
    return {level: acc[level].result(where, level) for level in levels}


# ---- context vectors and k-means ----------------------------------------------------------------
def mean_contexts(counts: np.ndarray) -> np.ndarray:
    """Empirical E[x | h = ν]: counts [V, C] -> [V, C], each row a distribution over contexts."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def gd1_weights(counts: np.ndarray, lr: float = 1.0, init: str = "marginal") -> np.ndarray:
    """Weights [C, V] of the linear softmax model of App. B after one gradient-descent step.

    The model predicts the context c from the one-hot tuple ν: p(c | ν) = softmax_c W[:, ν]. The
    loss is the empirical cross-entropy over the sentences; N(ν, c) = counts[ν, c] groups equal
    samples, which leaves the loss unchanged. The gradient comes from autograd, not from the
    closed form, so tests can check App. B's identity W = W0 + η Ĉ independently.
    """
    import torch

    n = torch.as_tensor(np.asarray(counts, dtype=np.float64)).T  # [C, V]
    total = n.sum()
    if init == "marginal":  # App. B assumption ii): start at the log of the context marginal
        w0 = torch.log(n.sum(dim=1) / total)[:, None].expand_as(n).clone()
    elif init == "zero":
        w0 = torch.zeros_like(n)
    else:
        raise ConfigError(f"gd1 init must be one of {', '.join(GD_INITS)}, got {init!r}")
    w = w0.clone().requires_grad_(True)
    loss = -(n * torch.log_softmax(w, dim=0)).sum() / total  # Eq. (21)
    loss.backward()
    return (w0 - lr * w.grad).detach().numpy()


def kmeans_labels(vectors: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None,
                  n_init: int = 10) -> np.ndarray:
    """k-means (scikit-learn, k-means++ starts, best of n_init) of vectors [V, D] -> labels [V].

    Rows are put in a canonical order (lexicographic in their coordinates) before k-means, so the
    labels do not depend on how the values are numbered: relabelled but equal inputs (e.g. the
    hierarchical and the oracle tuples when the level below is clustered perfectly) give the same
    partition.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    vectors = np.asarray(vectors, dtype=np.float64)
    k = min(k, vectors.shape[0])
    order = np.lexsort(vectors.T[::-1]) if vectors.shape[1] else np.arange(vectors.shape[0])
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed % (1 << 32))
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[order]
    labels = np.empty(vectors.shape[0], dtype=np.int64)
    with warnings.catch_warnings():
        # Fewer distinct points than k (classes the context cannot tell apart) is a result, not an
        # error: k-means then leaves clusters empty and the ARI says so.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels[order] = km.fit_predict(vectors[order], sample_weight=w)
    return labels


def adjusted_rand(labels: np.ndarray, truth: np.ndarray) -> float:
    """ARI between found clusters and true classes over the values with a class (truth >= 0)."""
    from sklearn.metrics import adjusted_rand_score

    ok = truth >= 0
    return float(adjusted_rand_score(truth[ok], labels[ok]))


def cluster_statistics(stats: LevelStatistics, level: int, config: ClusterConfig) -> tuple[LevelResult, LevelMap]:
    """k-means of the context vectors of one level and its ARI; the map feeds the level above."""
    scored = stats.truth >= 0
    classes = int(np.unique(stats.truth[scored]).size)
    if classes == 0:
        raise InputError(f"no level-{level - 1} tuple of node {config.node} parses under the grammar: "
                         f"nothing to score")
    k = config.clusters if config.clusters is not None else classes
    if k > stats.values.size:
        log.warning("level %d: %d clusters asked for %d values; using %d", level, k, stats.values.size,
                    stats.values.size)
        k = int(stats.values.size)
    if config.method == "mean":
        vectors = mean_contexts(stats.counts)
    else:
        vectors = gd1_weights(stats.counts, config.lr, config.gd_init).T  # one row per value
    weights = stats.counts.sum(axis=1) if config.weighted else None
    labels = kmeans_labels(vectors, k, derived_seed(config.seed, "cluster", level), weights, config.n_init)
    result = LevelResult(
        level=level, ari=adjusted_rand(labels, stats.truth), n=stats.n, n_used=stats.n_used,
        n_values=int(stats.values.size), n_scored=int(scored.sum()), classes=classes, clusters=k,
        context=config.context, method=config.method, oracle=config.oracle, weighted=config.weighted,
        node=config.node, position=config.position)
    return result, LevelMap(stats.values, labels, stats.base, k)


def cluster_levels(batches: Batches, grammar: Grammar, levels: Iterable[int], config: ClusterConfig,
                   where: str = "input", total: int | None = None) -> list[LevelResult]:
    """Cluster every level in `levels` (sorted, each in 1 … L-1) and score it against the truth.

    `batches()` must return a fresh iterator over the same token batches [B, d] on every call:
    oracle mode reads the data once, the hierarchical mode once per level up to the highest
    asked for (level l needs the clusters of levels 1 … l-1). `total` (rows) sizes the bar.
    """
    wanted = sorted(set(levels))
    if not wanted:
        raise ConfigError("no level to cluster")
    # Hierarchical: the maps of the levels below are learnt at the same node index of their own
    # level (the rules are shared by all positions), so those levels must be clusterable too.
    stages = [wanted] if config.oracle else [[lv] for lv in range(1, wanted[-1] + 1)]
    for level in wanted + sorted(set().union(*stages) - set(wanted)):  # errors name asked levels first
        check_level(grammar, level, config.node, config.position)
    results: dict[int, LevelResult] = {}
    maps: dict[int, LevelMap] = {}
    with progress(None if total is None else total * len(stages), "cluster") as bar:
        for stage in stages:
            stats = collect(batches, grammar, stage, config, maps, where, bar)
            for level in stage:
                results[level], maps[level] = cluster_statistics(stats[level], level, config)
    return [results[level] for level in wanted]


def parse_levels(spec: str, depth: int) -> list[int]:
    """'2', '1,2,3' or 'all' (= 1 … L-1) -> sorted levels (bounds checked by :func:`check_level`)."""
    text = spec.strip().lower()
    if text == "all":
        if depth < 2:
            raise ConfigError(f"a grammar with L = {depth} has no level to cluster (the root has no context)")
        return list(range(1, depth))
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--level must be a level, a list like 1,2 or 'all', got {spec!r}") from None
    if not levels:
        raise ConfigError(f"--level must be a level, a list like 1,2 or 'all', got {spec!r}")
    return levels


def results_columns(results: list[LevelResult]) -> dict:
    """The columns of a `cluster` results table (RESULT_COLUMNS, one row per level)."""
    import pyarrow as pa

    types = {"ari": pa.float64(), "context": pa.string(), "method": pa.string(), "oracle": pa.bool_(),
             "weighted": pa.bool_()}
    return {name: pa.array([getattr(r, name) for r in results], types.get(name, pa.int64()))
            for name in RESULT_COLUMNS}
