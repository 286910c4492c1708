"""Accuracy A_l against an independent per-sentence check, and memorisation / novelty."""

from __future__ import annotations

import numpy as np
import pytest

from cgtools.analysis.accuracy import measure_accuracy
from cgtools.errors import InputError
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from tests.helpers import brute_force_valid_levels


def _sentences(g, n, seed):
    return np.concatenate([b.tokens for b in generate_sentences(g, n, seed)])


@pytest.mark.parametrize("shape, dense", [((3, 2, 8, 2, 8), True), ((4, 2, 6, 3, 4), True),
                                          ((2, 3, 5, 4, 3), True), ((3, 2, 8, 2, 8), False)])
def test_accuracy_on_corrupted_sentences_equals_brute_force(shape, dense, monkeypatch):
    if not dense:  # exercise the sorted-table lookup used for very large v^s
        monkeypatch.setattr("cgtools.grammar.parse._DENSE_LIMIT", 0)
    g = draw_grammar(*shape, seed=3)
    rng = np.random.default_rng(0)
    tokens = _sentences(g, min(600, g.n_sentences), seed=1)
    # corrupt each token with probability 0.05: errors at every level, many sentences still valid
    noisy = np.where(rng.random(tokens.shape) < 0.05, rng.integers(0, g.vocab, tokens.shape), tokens)
    report = measure_accuracy(np.array_split(noisy, 7), g)
    expected = np.array([brute_force_valid_levels(g, row) for row in noisy.tolist()]).mean(axis=0)
    np.testing.assert_allclose(report.accuracy, expected, rtol=0, atol=1e-12)
    assert 0 < report.accuracy[-1] < report.accuracy[0] < 1  # the corruption hit something
    assert all(a >= b for a, b in zip(report.accuracy, report.accuracy[1:]))  # nested


def test_random_strings_match_the_expected_valid_fraction():
    # A uniformly random s-tuple is a level-1 production with probability v*m/v^s.
    g = draw_grammar(3, 2, 16, 4, seed=0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 16, (40000, g.length))
    report = measure_accuracy([tokens], g)
    p = (16 * 4 / 256) ** (g.length // 2)
    assert abs(report.accuracy[0] - p) < 5 * np.sqrt(p * (1 - p) / 40000)


def test_memorized_novel_and_distinct():
    g = draw_grammar(3, 2, 8, 2, seed=0)
    train = _sentences(g, 100, seed=0)
    other = _sentences(g, 1024, seed=1)
    train_set = set(map(tuple, train.tolist()))
    novel = np.array([r for r in other.tolist() if tuple(r) not in train_set][:50])
    invalid = novel.copy()
    invalid[:, 0] = (invalid[:, 0] + 1) % g.vocab
    invalid = invalid[[not brute_force_valid_levels(g, r)[-1] for r in invalid.tolist()]][:20]
    samples = np.concatenate([train[:30], train[:10], novel, novel[:5], invalid])
    report = measure_accuracy([samples], g, train=train)
    n = len(samples)
    assert report.n == n
    assert report.memorized == pytest.approx(40 / n)
    assert report.novel_valid == pytest.approx(55 / n)
    assert report.distinct_novel_valid == 50
    assert report.distinct == pytest.approx((30 + 50 + len(np.unique(invalid, axis=0))) / n)
    assert report.accuracy[-1] == pytest.approx(95 / n)


@pytest.mark.parametrize("bad, message", [
    (np.full((2, 8), 8), "outside the vocabulary"),
    (np.full((2, 8), -1), "outside the vocabulary"),
    (np.zeros((2, 4), dtype=int), "length 4"),
])
def test_bad_tokens_are_clear_errors(bad, message):
    g = draw_grammar(3, 2, 8, 2, seed=0)
    with pytest.raises(InputError, match=message):
        measure_accuracy([bad], g)
