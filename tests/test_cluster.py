"""`cgtools cluster`: exact-context limit, sample complexity, App. B's one-step identity, the
hierarchical procedure against the oracle, and the command line."""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cgtools.analysis.clustering import (ClusterConfig, LevelMap, adjusted_rand, cluster_levels, collect,
                                         gd1_weights, kmeans_labels, mean_contexts)
from cgtools.analysis.theory import theory
from cgtools.cli.main import app
from cgtools.errors import ConfigError
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from tests.helpers import brute_force_sentences

runner = CliRunner()


def _sentences(g, n, seed):
    return np.concatenate([b.tokens for b in generate_sentences(g, n, seed)])


def _all_trees(g):
    """Every derivation of a tiny grammar by recursion: a list of trees, each the list of the
    symbols of levels 0 (tokens) … L. Independent of cgtools' parser and expander."""
    @functools.lru_cache(maxsize=None)
    def expand(level, symbol):
        if level == 0:
            return [((symbol,),)]
        out = []
        for rule in g.rules[level - 1][symbol].tolist():
            for parts in itertools.product(*(expand(level - 1, c) for c in rule)):
                below = tuple(tuple(itertools.chain.from_iterable(p[k] for p in parts)) for k in range(level))
                out.append(below + ((symbol,),))
        return out
    return [t for c in range(g.n_classes) for t in expand(g.depth, c)]


def _exact_contexts(g, trees, level, node=1, position=0, context="token"):
    """E[x | h = ν] over the whole language (every sentence has the same probability):
    sorted tuple values, their vectors [V, C] and their true classes."""
    s = g.branching
    by_value, parent = defaultdict(Counter), {}
    for tree in trees:
        value = tree[level - 1][node * s:(node + 1) * s]
        start = position // s * s
        x = tree[0][position] if context == "token" else tree[0][start:start + s]
        by_value[value][x] += 1
        parent[value] = tree[level][node]
    values = sorted(by_value)
    contexts = sorted({x for c in by_value.values() for x in c})
    vectors = np.array([[by_value[v][x] for x in contexts] for v in values], dtype=float)
    vectors /= vectors.sum(axis=1, keepdims=True)
    return values, vectors, np.array([parent[v] for v in values])


@functools.lru_cache(maxsize=None)
def _language(shape, seed):
    """(grammar, every tree, tokens [N, d]) of a tiny grammar, built once per module."""
    g = draw_grammar(*shape, seed=seed)
    trees = _all_trees(g)
    return g, trees, np.array([t[0] for t in trees])


# Tiny grammars whose language is enumerated; in each, distinct classes have distinct exact contexts
# at every clusterable level (checked below: with v = 4 or m = 2 some seeds merge two classes).
EXACT = [((3, 2, 4, 2), 0), ((3, 2, 8, 3), 1), ((4, 2, 4, 2), 1)]


@pytest.mark.parametrize("shape, seed", EXACT)
@pytest.mark.parametrize("context", ["token", "tuple"])
def test_exact_contexts_separate_synonym_classes_perfectly(shape, seed, context):
    g, trees, tokens = _language(shape, seed)
    assert len(trees) == g.n_sentences
    assert set(map(tuple, tokens.tolist())) == set(brute_force_sentences(g))
    pipeline = cluster_levels(lambda: np.array_split(tokens, 3), g, range(1, g.depth),
                              ClusterConfig(context=context, oracle=True))
    for level in range(1, g.depth):
        values, vectors, truth = _exact_contexts(g, trees, level, context=context)
        classes = np.unique(truth)
        # Synonyms have the same mean context (x is outside their subtree) ...
        centres = np.array([vectors[truth == a][0] for a in classes])
        np.testing.assert_allclose(vectors, centres[np.searchsorted(classes, truth)], rtol=0, atol=1e-12)
        # ... and in these grammars every class has its own (the precondition of ARI = 1).
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(classes), 1)]
        assert gaps.min() > 1e-6
        labels = kmeans_labels(vectors, len(classes), seed=0)
        assert adjusted_rand(labels, truth) == 1.0
        # The streamed counts give the same vectors and the same ARI.
        stats = collect(lambda: [tokens], g, [level], ClusterConfig(context=context, oracle=True))[level]
        codes = [int(np.ravel_multi_index(v, (g.vocab,) * g.branching)) for v in values]
        assert stats.values.tolist() == codes
        np.testing.assert_allclose(mean_contexts(stats.counts), vectors, rtol=0, atol=1e-12)
        assert stats.truth.tolist() == truth.tolist()
        r = pipeline[level - 1]
        assert (r.level, r.ari, r.n, r.n_values, r.classes) == (level, 1.0, len(trees), len(values), len(classes))


@pytest.mark.parametrize("shape, seed", EXACT[:2])
def test_hierarchical_equals_oracle_on_the_whole_language(shape, seed):
    g = draw_grammar(*shape, seed=seed)
    tokens = np.array(brute_force_sentences(g))
    hier = cluster_levels(lambda: [tokens], g, [1, 2], ClusterConfig())
    oracle = cluster_levels(lambda: [tokens], g, [1, 2], ClusterConfig(oracle=True))
    assert hier[0].ari == oracle[0].ari == 1.0  # level 1 is the same computation
    assert hier[1].n_used == len(tokens)  # every level-1 tuple of the subtree got a label
    assert hier[1].ari == oracle[1].ari == 1.0


def test_hierarchical_equals_oracle_when_the_level_below_is_perfect():
    # Finite data, level 1 perfect but level 2 not: the hierarchical tuples are then a relabelling
    # of the true ones, and the clustering must give exactly the oracle's partition.
    g = draw_grammar(3, 2, 16, 4, seed=0)
    tokens = _sentences(g, 30000, seed=0)
    hier = cluster_levels(lambda: np.array_split(tokens, 4), g, [1, 2], ClusterConfig(seed=3))
    oracle = cluster_levels(lambda: [tokens], g, [2], ClusterConfig(oracle=True, seed=3))
    assert hier[0].ari == 1.0 and hier[1].n_used == len(tokens)
    assert 0.3 < oracle[0].ari < 1.0  # a case where the comparison says something
    assert hier[1].ari == pytest.approx(oracle[0].ari, abs=1e-12)
    assert (hier[1].n_values, hier[1].classes) == (oracle[0].n_values, oracle[0].classes)


def test_hierarchical_tuples_are_made_of_the_labels_below():
    g = draw_grammar(3, 2, 8, 2, seed=0)
    tokens = _sentences(g, 400, seed=0)
    codes = np.arange(g.vocab**2)
    lumped = LevelMap(codes, np.zeros_like(codes), base=g.vocab, k=1)  # every tuple -> label 0
    stats = collect(lambda: [tokens], g, [2], ClusterConfig(), maps={1: lumped})[2]
    assert stats.values.tolist() == [0] and stats.n_used == 400
    split = LevelMap(codes[:-1], codes[:-1] % 3, base=g.vocab, k=3)  # the last tuple is unknown
    stats = collect(lambda: [tokens], g, [2], ClusterConfig(), maps={1: split})[2]
    sub = tokens[:, 4:8].reshape(-1, 2, 2) @ np.array([g.vocab, 1])  # level-1 tuple codes [B, 2]
    known = (sub < g.vocab**2 - 1).all(axis=1)
    assert stats.n_used == known.sum()
    expected = np.unique((sub[known] % 3) @ np.array([3, 1]))
    assert stats.values.tolist() == expected.tolist()


@pytest.mark.parametrize("init", ["marginal", "zero"])
def test_one_gradient_step_equals_the_empirical_correlations(init):
    # App. B: from W0 = log P̂(x), one GD step of the linear softmax model gives
    # W = W0 + η Ĉ with Ĉ(c, ν) = P̂(x=c, h=ν) - P̂(x=c) P̂(h=ν); from W0 = 0 the correction is
    # η (P̂(x=c, h=ν) - P̂(h=ν)/C) instead.
    g = draw_grammar(3, 2, 8, 2, seed=1)
    tokens = _sentences(g, 700, seed=2)
    lr = 0.7
    stats = collect(lambda: np.array_split(tokens, 5), g, [1], ClusterConfig())[1]
    w = gd1_weights(stats.counts, lr=lr, init=init)  # [C, V]
    # Independent: one-hot matrices of all sentences.
    value = tokens[:, 2] * g.vocab + tokens[:, 3]  # tuple h_{3:4}
    values, contexts = np.unique(value), np.unique(tokens[:, 0])
    h = (value[:, None] == values[None]).astype(float)  # [P, V]
    x = (tokens[:, [0]] == contexts[None]).astype(float)  # [P, C]
    joint = x.T @ h / len(tokens)
    px, ph = x.mean(axis=0), h.mean(axis=0)
    assert stats.values.tolist() == values.tolist() and stats.contexts.tolist() == contexts.tolist()
    if init == "marginal":
        expected = np.log(px)[:, None] + lr * (joint - np.outer(px, ph))
    else:
        expected = lr * (joint - ph[None] / len(contexts))
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-12)
    # The correction is not trivially small: it is the signal the clustering uses.
    assert np.abs(expected - (np.log(px)[:, None] if init == "marginal" else 0)).max() > 1e-3


def test_gd1_and_mean_agree_in_the_exact_limit():
    g = draw_grammar(3, 2, 8, 3, seed=1)
    tokens = np.array(brute_force_sentences(g))
    r = cluster_levels(lambda: [tokens], g, [1, 2], ClusterConfig(method="gd1", oracle=True))
    assert [x.ari for x in r] == [1.0, 1.0]


# Level 1 pairs h_{3:4} with x_1: their lowest common ancestor is at level 2, so the predicted
# sample complexity is P_2 = v m^3 / (1 - m/v) = 1365 for v = 16, m = 4 (language: 262144).
SHAPE = (3, 2, 16, 4)


def test_level_one_sample_complexity():
    p2 = theory(*SHAPE)["sample_complexity"][1]
    assert p2 == pytest.approx(16 * 4**3 / 0.75)
    above, below = [], []
    for seed in range(3):
        g = draw_grammar(*SHAPE, seed=seed)
        tokens = _sentences(g, int(20 * p2), seed=seed + 10)
        cfg = ClusterConfig(seed=seed)
        above.append(cluster_levels(lambda: [tokens], g, [1], cfg)[0].ari)
        few = tokens[:int(p2 / 10)]
        below.append(cluster_levels(lambda: [few], g, [1], cfg)[0].ari)
    # Measured: ARI 1.0 at 20 P_2 and 0.01-0.12 at P_2/10 over 8 seeds.
    assert min(above) > 0.9
    assert max(below) < 0.2 and np.mean(below) < 0.12


@pytest.mark.slow
@pytest.mark.parametrize("context", ["token", "tuple"])
def test_sample_complexity_sweep_levels_one_and_two(context):
    # The ARI of level l rises around P_{l+1}: near 0 at P_{l+1}/10, above 0.85 at 30 P_{l+1}.
    p = theory(*SHAPE)["sample_complexity"]
    for level in (1, 2):
        pl = p[level]
        for seed in range(3):
            g = draw_grammar(*SHAPE, seed=seed)
            tokens = _sentences(g, int(30 * pl), seed=seed + 20)
            cfg = ClusterConfig(context=context, oracle=True, seed=seed)
            hi = cluster_levels(lambda: [tokens], g, [level], cfg)[0].ari
            lo = cluster_levels(lambda: [tokens[:int(pl / 10)]], g, [level], cfg)[0].ari
            assert hi > 0.85 and lo < 0.2, (level, seed, hi, lo)


def test_config_and_level_errors():
    g = draw_grammar(3, 2, 8, 2, seed=0)
    tokens = _sentences(g, 50, seed=0)
    for levels, message in [([0], "level must be >= 1"), ([3], "root"), ([4], "does not exist")]:
        with pytest.raises(ConfigError, match=message):
            cluster_levels(lambda: [tokens], g, levels, ClusterConfig())
    with pytest.raises(ConfigError, match="inside the subtree"):
        cluster_levels(lambda: [tokens], g, [1], ClusterConfig(position=3))
    # Position 3 is outside level-2 node 1 (positions 4-7) but inside level-1 node 1 (2-3), where
    # the hierarchical procedure learns its level-1 clusters: only the oracle may use it.
    g4 = draw_grammar(4, 2, 4, 2, seed=0)
    tokens4 = _sentences(g4, 200, seed=0)
    assert cluster_levels(lambda: [tokens4], g4, [2], ClusterConfig(position=3, oracle=True))[0].n == 200
    with pytest.raises(ConfigError, match="level-1 node 1"):
        cluster_levels(lambda: [tokens4], g4, [2], ClusterConfig(position=3))
    with pytest.raises(ConfigError, match="context must be"):
        ClusterConfig(context="word")


# ---- command line ----------------------------------------------------------------------------------
GEN = ["rhm-gen", "-L", "3", "-s", "2", "-v", "8", "-m", "2", "--seed", "0"]


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "data.parquet"
    res = run(*GEN, "-n", 500, "-o", path)
    assert res.exit_code == 0, res.stderr
    return path


def _one_line_error(res, fragment):
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools cluster: error: ") and fragment in lines[0], res.stderr


def test_cli_json_one_object_per_level(data):
    res = run("cluster", data, "--level", 1, "--json")
    assert res.exit_code == 0, res.stderr
    obj = json.loads(res.stdout)
    for key in ("ari", "n", "level", "context", "method", "oracle", "n_values", "clusters", "classes"):
        assert key in obj
    assert (obj["n"], obj["level"], obj["context"], obj["method"], obj["oracle"]) == (500, 1, "token", "mean", False)
    assert -1 <= obj["ari"] <= 1 and 1 <= obj["n_values"] <= 16
    g = draw_grammar(3, 2, 8, 2, seed=0)
    tokens = pq.read_table(data)["tokens"].to_numpy(zero_copy_only=False)
    tokens = np.stack(tokens)
    lib = cluster_levels(lambda: [tokens], g, [1], ClusterConfig())[0]
    assert obj == lib.to_json()  # the command is the library
    res = run("cluster", data, "--level", "all", "--json", "--context", "tuple", "--method", "gd1", "--oracle")
    assert res.exit_code == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["level"] for r in rows] == [1, 2]
    assert all((r["context"], r["method"], r["oracle"]) == ("tuple", "gd1", True) for r in rows)
    res = run("cluster", data, "--level", "1,2", "--limit", 100)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["level", "ari", "n"] and len(lines) == 3
    assert lines[1].split()[2] == "100"


def test_cli_results_table_with_tags(data, tmp_path):
    out = tmp_path / "c.parquet"
    res = run("cluster", data, "--level", "all", "--limit", 300, "--tag", "P=300", "--tag", "seed=0", "-o", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [r["level"] for r in rows] == [1, 2]
    assert all(r["P"] == 300 and r["seed"] == 0 and r["n"] == 300 for r in rows)
    types = {f.name: str(f.type) for f in table.schema}
    assert {k: types[k] for k in ("level", "ari", "n", "n_values", "context", "method", "oracle")} == {
        "level": "int64", "ari": "double", "n": "int64", "n_values": "int64", "context": "string",
        "method": "string", "oracle": "bool"}
    meta = json.loads(table.schema.metadata[b"cgtools"])
    assert (meta["schema"], meta["kind"], meta["tags"]) == ("results/1", "cluster", {"P": 300, "seed": 0})
    assert meta["grammar"]["vocab"] == 8 and meta["provenance"]["tool"] == "cgtools cluster"
    before = out.read_bytes()
    res = run("cluster", data, "--level", 1, "-o", out)
    _one_line_error(res, "exists")
    assert out.read_bytes() == before
    assert run("cluster", data, "--level", 1, "-o", out, "--force").exit_code == 0


def test_cli_errors_are_one_line(data, tmp_path):
    _one_line_error(run("cluster", data, "--level", 0), "level must be >= 1")
    _one_line_error(run("cluster", data, "--level", 3), "root")
    _one_line_error(run("cluster", data, "--level", 4), "does not exist")
    _one_line_error(run("cluster", data, "--level", "two"), "--level")
    _one_line_error(run("cluster", data, "--level", 1, "--position", 2), "inside the subtree")
    _one_line_error(run("cluster", data, "--level", 1, "--tag", "ari=1"), "tag 'ari'")
    _one_line_error(run("cluster", data, "--level", 1, "--context", "word"), "context must be")
    # Data without a grammar: an error, unless --grammar gives one.
    from cgtools.formats.files import atomic_output
    from cgtools.formats.sequences import SequencesWriter, sequences_meta

    bare = tmp_path / "bare.parquet"
    tokens = np.stack(pq.read_table(data)["tokens"].to_numpy(zero_copy_only=False))
    with atomic_output(bare, False) as sink:
        writer = SequencesWriter(sink, length=8, vocab=8, meta=sequences_meta(None, {}))
        writer.write(tokens)
        writer.close()
    _one_line_error(run("cluster", bare, "--level", 1), "carries no grammar")
    res = run("cluster", bare, "--level", 1, "--grammar", data, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(run("cluster", data, "--level", 1, "--json").stdout)
