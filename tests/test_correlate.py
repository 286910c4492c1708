"""`cgtools correlate`: counts-based covariance norms against dense one-hot computations, the noise
floor, tree-distance grouping and the exact law against enumeration, memory at v = 50,257, the CLI."""

from __future__ import annotations

import json
import math
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from typer.testing import CliRunner

from cgtools.analysis.correlation import (correlate, exact_correlation, lca_levels, noise_floor,
                                          pair_magnitude)
from cgtools.analysis.theory import theory
from cgtools.cli.main import app
from cgtools.grammar.derivations import expand
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.seeding import generator
from tests.helpers import TEST_FAILURE_RATE, brute_force_sentences

runner = CliRunner()
GEN = ["rhm-gen", "-L", "3", "-s", "2", "-v", "8", "-m", "2"]


# ---- independent references --------------------------------------------------------------------

def dense_norm(first: np.ndarray, second: np.ndarray, vocab: int, weights: np.ndarray | None = None) -> float:
    """||C||_F / v from one-hot tensors: first, second [N] token ids of the two members."""
    a, b = np.eye(vocab)[first], np.eye(vocab)[second]  # [N, v] one-hot
    w = np.full(len(first), 1 / len(first)) if weights is None else weights
    joint = (a * w[:, None]).T @ b  # [v, v]
    cov = joint - np.outer(w @ a, w @ b)
    return float(np.linalg.norm(cov) / vocab)


def dense_positional(x: np.ndarray, vocab: int, weights=None) -> list[float]:
    d = x.shape[1]
    return [float(np.mean([dense_norm(x[:, i], x[:, i + t], vocab, weights) for i in range(d - t)]))
            for t in range(1, d)]


def dense_pooled(x: np.ndarray, vocab: int, weights=None) -> list[float]:
    d, out = x.shape[1], []
    for t in range(1, d):
        w = None if weights is None else np.repeat(weights[:, None], d - t, axis=1).ravel() / (d - t)
        out.append(dense_norm(x[:, :d - t].ravel(), x[:, t:].ravel(), vocab, w))
    return out


def brute_lca(i: int, j: int, s: int, depth: int) -> int:
    """LCA level from the base-s digits (root digit first): depth minus the common prefix."""
    di = np.base_repr(i, s).zfill(depth)
    dj = np.base_repr(j, s).zfill(depth)
    common = next(k for k in range(depth + 1) if k == depth or di[k] != dj[k])
    return depth - common


def dense_tree(x: np.ndarray, g, weights=None) -> list[float]:
    groups: dict[int, list[float]] = {}
    for i in range(g.length):
        for j in range(i + 1, g.length):
            groups.setdefault(brute_lca(i, j, g.branching, g.depth), []).append(
                dense_norm(x[:, i], x[:, j], g.vocab, weights))
    return [float(np.mean(groups[k])) for k in sorted(groups)]


def iid_sentences(g, n: int, seed: int) -> np.ndarray:
    """n sentences drawn independently from the RHM law (repeats allowed): [n, d]."""
    rng = generator(seed, "test-correlate-iid")
    classes = rng.integers(0, g.n_classes, n)
    digits = rng.integers(0, g.synonyms, (n, g.n_internal))
    return expand(g, classes, digits)[0]


def batches_of(x: np.ndarray, *sizes: int):
    """A batch factory cutting x at uneven places (results must not depend on batching)."""
    cuts = np.cumsum(sizes)
    return lambda: iter(np.split(x, cuts[cuts < len(x)]))


# ---- counts equal dense one-hot ------------------------------------------------------------------

@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("source", ["random", "rhm"])
def test_positional_and_pooled_equal_dense_one_hot(source, dense):
    if source == "random":
        rng = np.random.default_rng(5)
        vocab, x = 7, rng.integers(0, 7, (900, 6))
        x[:, 3] = (x[:, 1] + rng.integers(0, 2, 900)) % 7  # some real correlation
    else:
        g = draw_grammar(3, 2, 8, 2, seed=2)
        vocab, x = 8, np.concatenate([b.tokens for b in generate_sentences(g, 700, seed=1)])
    for mode, reference in (("positional", dense_positional), ("pooled", dense_pooled)):
        res = correlate(batches_of(x, 100, 333, 17), vocab=vocab, mode=mode, length=x.shape[1], dense=dense)
        expected = reference(x, vocab)
        np.testing.assert_allclose(res.correlation, expected, rtol=1e-6, atol=0)
        assert res.distance == list(range(1, x.shape[1]))
        assert res.n == len(x)
        assert res.frobenius == pytest.approx([vocab * c for c in expected], rel=1e-6)


def test_many_cells_split_into_passes_give_the_same_numbers():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (300, 9))
    one = correlate(batches_of(x, 64), vocab=5, mode="positional", length=9)
    for dense in (True, False):
        split = correlate(batches_of(x, 64), vocab=5, mode="positional", length=9, dense=dense, max_entries=30)
        np.testing.assert_allclose(split.correlation, one.correlation, rtol=1e-12)
    short = correlate(batches_of(x, 64), vocab=5, mode="positional", length=9, max_distance=3)
    assert short.distance == [1, 2, 3] and short.correlation == pytest.approx(one.correlation[:3], rel=1e-12)


def test_pooled_takes_sequences_of_different_lengths_between_batches():
    rng = np.random.default_rng(1)
    long, short = rng.integers(0, 6, (200, 10)), rng.integers(0, 6, (150, 4))
    res = correlate(lambda: iter([long, short]), vocab=6, mode="pooled", length=10)
    for t, c, p in zip(res.distance, res.correlation, res.pairs):
        first = np.concatenate([long[:, :10 - t].ravel(), short[:, :max(4 - t, 0)].ravel()])
        second = np.concatenate([long[:, t:].ravel(), short[:, t:].ravel() if t < 4 else []]).astype(int)
        assert p == first.size
        assert c == pytest.approx(dense_norm(first, second, 6), rel=1e-9)


# ---- noise floor -------------------------------------------------------------------------------

def test_noise_floor_formula_and_rows():
    assert noise_floor(8, 400) == 1 / 160
    assert noise_floor(50257, 2**19) == pytest.approx(1 / (50257 * 724.0773), rel=1e-6)
    x = np.random.default_rng(2).integers(0, 4, (100, 5))
    pos = correlate(batches_of(x, 30), vocab=4, mode="positional", length=5)
    assert pos.pairs == [100] * 4 and pos.noise_floor == [1 / 40] * 4
    pooled = correlate(batches_of(x, 30), vocab=4, mode="pooled", length=5)
    assert pooled.pairs == [400, 300, 200, 100]
    assert pooled.noise_floor == pytest.approx([1 / (4 * math.sqrt(p)) for p in pooled.pairs])


@pytest.mark.statistical
@pytest.mark.parametrize("mode", ["positional", "pooled"])
def test_iid_uniform_tokens_sit_at_the_noise_floor(mode):
    """For independent uniform tokens, N v² |Ĉ|² is Pearson's X² of independence (up to the
    p̂ ≈ 1/v approximation, a few % at N = 20000), ~ χ² with (v-1)² degrees of freedom. So
    |Ĉ|/floor = sqrt(X²)/v for every pair; the bounds hold for all pairs at once (union bound) with
    probability 1 - TEST_FAILURE_RATE, 10 % widened for the approximation. The mean over positions
    of a row lies between them too."""
    v, n, d = 8, 20000, 8
    x = np.random.default_rng(3).integers(0, v, (n, d))
    res = correlate(batches_of(x, 4096), vocab=v, mode=mode, length=d)
    k, alpha = (v - 1) ** 2, TEST_FAILURE_RATE / (d * (d - 1) / 2)
    low = 0.9 * math.sqrt(stats.chi2.ppf(alpha / 2, k)) / v
    high = 1.1 * math.sqrt(stats.chi2.ppf(1 - alpha / 2, k)) / v
    ratio = np.array(res.correlation) / np.array(res.noise_floor)
    assert ((low < ratio) & (ratio < high)).all(), (ratio, low, high)
    assert high < 1.5  # the unnormalised norm (v times larger) would fail this


@pytest.mark.statistical
def test_pooled_and_positional_agree_on_a_stationary_markov_chain():
    """A Markov chain started in its stationary law π has the same joint law at every i:
    C(t) = ||diag(π) P^t - π π^T||_F / v exactly, for both estimators. Each estimate differs from
    it by at most ||Ĉ - C||, whose RMS is below the noise floor and whose spread is a fraction of
    it (a sum of v² squared errors): 4 floors is far outside that."""
    v, n, d = 4, 20000, 10
    P = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6], [0.3, 0.3, 0.3, 0.1]])
    w, vec = np.linalg.eig(P.T)
    pi = np.real(vec[:, np.argmin(abs(w - 1))])
    pi /= pi.sum()
    rng = np.random.default_rng(4)
    x = np.empty((n, d), dtype=np.int64)
    x[:, 0] = rng.choice(v, n, p=pi)
    cum = P.cumsum(1)
    for i in range(1, d):
        x[:, i] = (rng.random(n)[:, None] > cum[x[:, i - 1]]).sum(1)
    exact = [np.linalg.norm(np.diag(pi) @ np.linalg.matrix_power(P, t) - np.outer(pi, pi)) / v for t in range(1, d)]
    pos = correlate(batches_of(x, 5000), vocab=v, mode="positional", length=d)
    pooled = correlate(batches_of(x, 5000), vocab=v, mode="pooled", length=d)
    floor = np.array(pos.noise_floor)
    assert np.all(np.abs(np.array(pos.correlation) - exact) < 4 * floor)
    assert np.all(np.abs(np.array(pooled.correlation) - exact) < 4 * np.array(pooled.noise_floor))
    assert np.all(np.abs(np.array(pooled.correlation) - pos.correlation) < 4 * floor)
    assert exact[0] > 20 * floor[0]  # the signal is resolved: the comparison has teeth


# ---- tree distance -------------------------------------------------------------------------------

def test_lca_levels_against_digits():
    for s, depth in ((2, 4), (3, 3)):
        d = s**depth
        i, j = np.triu_indices(d, k=1)
        expected = [brute_lca(a, b, s, depth) for a, b in zip(i.tolist(), j.tolist())]
        assert lca_levels(i, j, s).tolist() == expected


@pytest.mark.parametrize("shape", [(3, 2, 6, 2, 6), (2, 3, 4, 3, 3)])
def test_tree_grouping_equals_brute_force(shape):
    g = draw_grammar(*shape, seed=1)
    x = iid_sentences(g, 3000, seed=2)
    res = correlate(batches_of(x, 1000), vocab=g.vocab, mode="tree", grammar=g, length=g.length)
    assert res.distance == list(range(1, g.depth + 1)) and res.mode == "tree"
    np.testing.assert_allclose(res.correlation, dense_tree(x, g), rtol=1e-6)
    assert res.theory == pytest.approx([pair_magnitude(g.vocab, g.synonyms, g.branching, k)
                                        for k in res.distance])


# ---- exact law ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 2, 4, 2, 4), (2, 3, 3, 2, 2), (2, 2, 5, 3, 3), (4, 2, 3, 2, 2)])
def test_exact_equals_enumeration_of_every_sentence(shape):
    """Every sentence has probability n_classes^-1 m^-(internal nodes): the uniform law over the
    enumerated list (derivations are distinct sentences)."""
    g = draw_grammar(*shape, seed=3)
    x = np.array(brute_force_sentences(g))
    assert len(x) == g.n_sentences
    weights = np.full(len(x), 1 / len(x))
    for mode, reference in (("positional", dense_positional(x, g.vocab, weights)),
                            ("pooled", dense_pooled(x, g.vocab, weights)),
                            ("tree", dense_tree(x, g, weights))):
        res = exact_correlation(g, mode)
        np.testing.assert_allclose(res.correlation, reference, rtol=0, atol=1e-10)
        assert res.n is None and res.noise_floor == [None] * len(res.distance)
    assert max(reference) > 1e-3  # not a degenerate grammar without correlations


def _exact_vs_sample(n: int):
    g = draw_grammar(3, 2, 8, 2, seed=0)
    x = iid_sentences(g, n, seed=7)
    for mode in ("positional", "tree"):
        exact = exact_correlation(g, mode)
        sample = correlate(batches_of(x, 65536), vocab=8, mode=mode, length=g.length, grammar=g)
        diff = np.abs(np.array(sample.correlation) - exact.correlation)
        assert np.all(diff < 3 * np.array(sample.noise_floor)), (mode, diff / np.array(sample.noise_floor))
        assert min(exact.correlation) > 10 * sample.noise_floor[0]  # resolved: a wrong law would show


@pytest.mark.statistical
def test_exact_equals_sample_estimate_within_its_noise():
    """|Ĉ_ij| - |C_ij| <= ||Ĉ_ij - C_ij|| / v, concentrated below the noise floor (see above)."""
    _exact_vs_sample(200_000)


@pytest.mark.slow
@pytest.mark.statistical
def test_exact_equals_sample_estimate_at_a_million_sentences():
    _exact_vs_sample(1_000_000)


def test_pair_magnitude_is_app_a_law_and_matches_exact_grammars():
    """The token-token law (1-f)/(v³ m^(2l-1)) is theory's C^(l') at l' = 2l-3 (levels 2..L of
    cgtools.analysis.theory), its finite-v step is Eq. 18's factor; and averaged over grammar
    draws it matches the exact RMS entry per LCA level (v = 32, m = 8: within 20 %), unlike
    C^(l) at the LCA level itself (off by m^(3/2) for siblings)."""
    v, m, s, L = 32, 8, 2, 3
    t = theory(5, s, v, m)  # levels 2..5
    assert pair_magnitude(v, m, s, 3) == pytest.approx(t["correlation"][3 - 2])  # l' = 3
    assert pair_magnitude(v, m, s, 4) == pytest.approx(t["correlation"][5 - 2])  # l' = 5
    step = (t["correlation_finite_v"][1] / t["correlation_finite_v"][0]) ** 2  # Eq. 18 per level
    assert pair_magnitude(v, m, s, 3, True) / pair_magnitude(v, m, s, 2, True) == pytest.approx(step)
    ms = []
    for seed in range(3):
        g = draw_grammar(L, s, v, m, seed=seed)
        ms.append(np.array(exact_correlation(g, "tree").correlation) ** 2)
    rms = np.sqrt(np.mean(ms, axis=0))
    predicted = [pair_magnitude(v, m, s, k, True) for k in range(1, L + 1)]
    np.testing.assert_allclose(rms, predicted, rtol=0.2)
    assert rms[0] > 5 * t["correlation"][0]  # C^(l) read at l = LCA level would be far off


# ---- memory at a large vocabulary -----------------------------------------------------------------

def _zipf_tokens(rows: int, length: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.2, size=(rows, length)) - 1) % vocab


def _compact_dense_pooled(x: np.ndarray, t: int, vocab: int) -> float:
    """Pooled |C| with the ids that occur renumbered 0..k-1: unseen ids have zero rows and columns,
    so the dense k×k norm is the full v×v norm."""
    first, second = x[:, :-t].ravel(), x[:, t:].ravel()
    _, both = np.unique(np.concatenate([first, second]), return_inverse=True)
    k = both.max() + 1
    a, b = both[:first.size], both[first.size:]
    joint = np.bincount(a * k + b, minlength=k * k).reshape(k, k) / a.size
    cov = joint - np.outer(joint.sum(1), joint.sum(0))
    return float(np.linalg.norm(cov) / vocab)


def _peak_bytes(fn) -> tuple[int, float]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1], time.perf_counter() - start
    finally:
        tracemalloc.stop()


def test_large_vocabulary_counts_distinct_pairs_only():
    vocab = 50257
    x = _zipf_tokens(512, 64, vocab, seed=0)
    few = x[:64, :32]  # a small slice, so that the compact dense reference stays small
    res = correlate(batches_of(few, 20), vocab=vocab, mode="pooled", length=32, max_distance=4)
    expected = [_compact_dense_pooled(few, t, vocab) for t in range(1, 5)]
    np.testing.assert_allclose(res.correlation, expected, rtol=1e-6)
    peak, _ = _peak_bytes(lambda: correlate(batches_of(x, 128), vocab=vocab, mode="pooled", length=64,
                                            max_distance=8, total=len(x), tokens_hint=x.size))
    dense_bytes = vocab * vocab * 8
    assert peak < 64 * 2**20 and peak < dense_bytes / 300, peak  # 2^15 tokens: tens of MB at most


@pytest.mark.slow
def test_a_million_tokens_at_gpt2_vocabulary_in_bounded_memory():
    vocab = 50257
    x = _zipf_tokens(4096, 256, vocab, seed=1)  # 1,048,576 tokens
    peak, seconds = _peak_bytes(lambda: correlate(batches_of(x, 512), vocab=vocab, mode="pooled", length=256,
                                                  max_distance=16, total=len(x), tokens_hint=x.size))
    print(f"10^6 tokens, v = {vocab}, 16 distances: peak {peak / 2**20:.0f} MiB, {seconds:.1f} s")
    assert peak < 512 * 2**20  # a dense v×v float64 matrix alone is 20 GB


# ---- command line --------------------------------------------------------------------------------

def run(*args, input=None):
    return runner.invoke(app, list(map(str, args)), input=input)


def _one_line_error(res, fragment):
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools correlate: error:") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture
def rhm(tmp_path):
    path = tmp_path / "f.parquet"
    assert run(*GEN, "-n", 500, "--seed", 0, "-o", path).exit_code == 0
    return path


def test_cli_json_keys_and_values(rhm):
    res = run("correlate", rhm, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"distance", "correlation", "noise_floor", "n", "mode"} <= set(out)
    assert out["mode"] == "positional" and out["n"] == 500 and out["distance"] == list(range(1, 8))
    assert out["noise_floor"] == pytest.approx([1 / (8 * math.sqrt(500))] * 7)
    x = pq.read_table(rhm).column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    assert out["correlation"] == pytest.approx(dense_positional(x.astype(int), 8), rel=1e-6)
    assert len(out["theory"]) == 7
    tree = json.loads(run("correlate", rhm, "--by-tree-distance", "--json", "--max-distance", 2).stdout)
    assert tree["mode"] == "tree" and tree["distance"] == [1, 2]
    pooled = json.loads(run("correlate", "-", "--pooled", "--json", input=rhm.read_bytes()).stdout)
    assert pooled["mode"] == "pooled" and pooled["pairs"] == [500 * (8 - t) for t in range(1, 8)]


def test_cli_exact_needs_no_sequences(rhm):
    res = run("correlate", "--exact", "--grammar", rhm, "--json")  # stdin is empty: must not be read
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["mode"] == "exact" and out["n"] is None and out["noise_floor"] == [None] * 7
    res = run("correlate", rhm, "--exact", "--by-tree-distance")
    assert res.exit_code == 0 and res.stdout.startswith("lca_level")


def test_cli_results_table_with_tags_and_metadata(rhm, tmp_path):
    out = tmp_path / "corr.parquet"
    res = run("correlate", rhm, "-o", out, "--tag", "P=500", "--tag", "run=a")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"cgtools"])
    assert meta["schema"] == "results/1" and meta["kind"] == "correlation"
    assert meta["tags"] == {"P": 500, "run": "a"} and meta["grammar"]["vocab"] == 8
    assert meta["provenance"]["tool"] == "cgtools correlate" and str(rhm) in meta["provenance"]["inputs"]
    assert table.num_rows == 7
    assert table.column("P").to_pylist() == [500] * 7
    schema = table.schema
    for name, typ in (("distance", pa.int64()), ("correlation", pa.float64()), ("noise_floor", pa.float64()),
                      ("n", pa.int64()), ("mode", pa.string()), ("theory", pa.float64())):
        assert schema.field(name).type == typ, name
    exact = tmp_path / "exact.parquet"
    res = run("correlate", "--exact", "-g", rhm, "-o", exact, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["mode"] == "exact"
    t = pq.read_table(exact)
    assert t.column("noise_floor").null_count == 7 and t.schema.field("noise_floor").type == pa.float64()
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"tokens": [[1, 5, 9, 2]] * 3 + [[0, 0, 3, 1]]}), text)
    res = run("correlate", text, "--pooled", "-o", tmp_path / "t.parquet")
    assert res.exit_code == 0, res.stderr
    t = pq.read_table(tmp_path / "t.parquet")
    assert t.column("theory").null_count == 3 and t.schema.field("theory").type == pa.float64()
    assert json.loads(t.schema.metadata[b"cgtools"])["vocab"] == 10  # max id + 1 without metadata


def test_cli_errors_are_one_line(rhm, tmp_path):
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"tokens": [[1, 5, 9, 2]] * 4}), text)
    _one_line_error(run("correlate", text, "--by-tree-distance"), "carries no grammar")
    _one_line_error(run("correlate", text, "--vocab", 6), "outside the vocabulary [0, 6)")
    _one_line_error(run("correlate", "--exact", "-g", text), "carries no grammar")
    single = tmp_path / "single.parquet"
    pq.write_table(pa.table({"tokens": [[3]] * 4}), single)
    _one_line_error(run("correlate", single), "no pairs")
    _one_line_error(run("correlate", text, "--by-tree-distance", "-g", rhm), "length")
    _one_line_error(run("correlate", tmp_path / "missing.parquet"), "no such file")
    out = tmp_path / "corr.parquet"
    out.write_text("keep")
    _one_line_error(run("correlate", rhm, "-o", out), "exists")
    assert out.read_text() == "keep"
    assert run("correlate", rhm, "-o", out, "--force").exit_code == 0
    _one_line_error(run("correlate", rhm, "--tag", "bad"), "KEY=VALUE")
    usage = run("correlate", rhm, "--pooled", "--by-tree-distance")
    assert usage.exit_code == 2


def test_cli_exclude_measures_only_the_rows_not_in_the_file(rhm, tmp_path):
    """--exclude FILE: the result equals correlating the remaining rows alone (n, values, floor)."""
    x = pq.read_table(rhm).column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    part = tmp_path / "part.parquet"  # 200 of the 500 sentences, the way a training set would be
    assert run(*GEN, "-n", 200, "--seed", 0, "-o", part).exit_code == 0
    drop = pq.read_table(part).column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    dropped = {r.tobytes() for r in drop.astype(np.int64)}
    kept = np.array([r for r in x.astype(np.int64) if r.tobytes() not in dropped])
    assert 0 < len(kept) < 500
    res = run("correlate", rhm, "--exclude", part, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n"] == len(kept)
    assert out["correlation"] == pytest.approx(dense_positional(kept, 8), rel=1e-6)
    assert out["noise_floor"] == pytest.approx([1 / (8 * math.sqrt(len(kept)))] * 7)
    res = run("correlate", rhm, "--exclude", part, "--pooled")
    assert res.exit_code == 2 and "--exclude" in res.stderr
