"""Sentence sampling: grammaticality, distinctness, exclusion, uniformity, perturbation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from cgtools.errors import ConfigError
from cgtools.grammar.derivations import KeyLayout, expand, index_to_keys, keys_to_index
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences, perturb_digits, sample_distinct_keys
from tests.helpers import TEST_FAILURE_RATE, brute_force_sentences


def _collect(g, n, seed, **kw):
    batches = list(generate_sentences(g, n, seed, **kw))
    tokens = np.concatenate([b.tokens for b in batches]) if batches else np.empty((0, g.length))
    return batches, tokens


@pytest.mark.parametrize("shape", [(3, 2, 8, 2, 8), (2, 3, 4, 3, 2), (4, 2, 8, 4, 8), (1, 2, 5, 3, 4)])
def test_sampled_sentences_parse_and_are_distinct(shape):
    g = draw_grammar(*shape, seed=0)
    n = min(500, g.n_sentences)
    _, tokens = _collect(g, n, seed=1)
    assert tokens.shape == (n, g.length)
    assert Parser(g).parse(tokens).grammatical.all()
    assert np.unique(tokens, axis=0).shape[0] == n


def test_the_whole_language_is_the_brute_force_language():
    g = draw_grammar(2, 2, 4, 2, n_classes=3, seed=7)
    everything = set(brute_force_sentences(g))
    assert len(everything) == g.n_sentences == 3 * 2**3
    _, tokens = _collect(g, g.n_sentences, seed=0)
    assert set(map(tuple, tokens.tolist())) == everything


def test_asking_for_more_than_exist_is_an_error():
    g = draw_grammar(3, 2, 8, 2, seed=0)  # 1024 sentences
    with pytest.raises(ConfigError, match="only 1024"):
        sample_distinct_keys(g, 1025, seed=0)
    parser = Parser(g)
    _, first = _collect(g, 1000, seed=0)
    keys = parser.keys(parser.parse(first))
    with pytest.raises(ConfigError, match="1000 excluded"):
        sample_distinct_keys(g, 25, seed=1, exclude=keys)


@pytest.mark.parametrize("n_first, n_second", [(1000, 24), (300, 600), (10, 50)])
def test_exclusion_gives_disjoint_splits(n_first, n_second):
    g = draw_grammar(3, 2, 8, 2, seed=0)
    parser = Parser(g)
    _, first = _collect(g, n_first, seed=0)
    exclude = parser.keys(parser.parse(first))
    _, second = _collect(g, n_second, seed=1, exclude=exclude)
    a, b = set(map(tuple, first.tolist())), set(map(tuple, second.tolist()))
    assert len(b) == n_second and not a & b


def test_exclusion_leaves_exactly_the_rest_when_asked_for_all():
    g = draw_grammar(3, 2, 8, 2, seed=0)
    parser = Parser(g)
    _, first = _collect(g, 700, seed=3)
    _, rest = _collect(g, 324, seed=4, exclude=parser.keys(parser.parse(first)))
    assert len(set(map(tuple, np.concatenate([first, rest]).tolist()))) == 1024


def test_latents_equal_the_parse():
    g = draw_grammar(4, 2, 6, 3, n_classes=4, seed=2)
    batches, tokens = _collect(g, 300, seed=5, latents=True, batch_size=64)
    parse = Parser(g).parse(tokens)
    for level in range(1, g.depth + 1):
        latents = np.concatenate([b.latents[level] for b in batches])
        assert latents.shape == (300, g.width(level))
        np.testing.assert_array_equal(latents, parse.symbols[level])


def test_sentences_are_uniform_over_the_language():
    # Many small draws from a 24-sentence language: each sentence must appear equally often.
    g = draw_grammar(2, 2, 4, 2, n_classes=3, seed=7)
    index = {s: i for i, s in enumerate(brute_force_sentences(g))}
    counts = np.zeros(len(index))
    for seed in range(600):
        _, tokens = _collect(g, 5, seed=seed)
        for row in map(tuple, tokens.tolist()):
            counts[index[row]] += 1
    assert chisquare(counts).pvalue > TEST_FAILURE_RATE


def test_roots_and_production_choices_are_uniform_in_large_languages():
    # Rejection path (language far larger than the sample): roots uniform over n classes and each
    # node's production uniform over m, at every level.
    g = draw_grammar(4, 2, 8, 4, n_classes=5, seed=1)
    _, tokens = _collect(g, 20000, seed=9)
    parse = Parser(g).parse(tokens)
    roots = np.bincount(parse.symbols[g.depth][:, 0], minlength=g.n_classes)
    assert chisquare(roots).pvalue > TEST_FAILURE_RATE
    for level in range(1, g.depth + 1):
        choices = np.bincount(parse.choices[level].ravel(), minlength=g.synonyms)
        assert chisquare(choices).pvalue > TEST_FAILURE_RATE


def test_order_of_output_is_random_not_sorted():
    g = draw_grammar(4, 2, 8, 4, seed=1)
    keys = sample_distinct_keys(g, 1000, seed=0)[:, 0]
    assert not (np.all(np.diff(keys) > 0) or np.all(np.diff(keys) < 0))


@pytest.mark.parametrize("latents, perturb", [(False, None), (True, 2)])
def test_output_does_not_depend_on_batch_size(latents, perturb):
    g = draw_grammar(4, 2, 8, 4, seed=1)
    runs = []
    for bs in (7, 100, 5000):
        batches = list(generate_sentences(g, 1234, 3, batch_size=bs, latents=latents, perturb_level=perturb))
        cols = [np.concatenate([b.tokens for b in batches])]
        if perturb:
            cols.append(np.concatenate([b.perturbed for b in batches]))
        if latents:
            cols += [np.concatenate([b.latents[lv] for b in batches]) for lv in range(1, g.depth + 1)]
        runs.append(cols)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_more_sentences_than_int64_can_count():
    g = draw_grammar(6, 2, 16, 8, seed=0)  # 16 * 8^63 sentences, about 2^193
    assert g.n_sentences > 2**190
    layout = KeyLayout.for_grammar(g)
    assert layout.words > 1
    _, tokens = _collect(g, 2000, seed=0, batch_size=300)
    assert Parser(g).parse(tokens).grammatical.all()
    assert np.unique(tokens, axis=0).shape[0] == 2000


@pytest.mark.parametrize("shape", [(3, 2, 8, 2, 8), (6, 2, 16, 8, 16), (3, 3, 5, 7, 2)])
def test_keys_are_exact_mixed_radix_indices(shape):
    g = draw_grammar(*shape, seed=0)
    layout = KeyLayout.for_grammar(g)
    rng = np.random.default_rng(0)
    classes = rng.integers(0, g.n_classes, 50)
    digits = rng.integers(0, g.synonyms, (50, g.n_internal))
    keys = layout.encode(classes, digits)
    c2, d2 = layout.decode(keys)
    np.testing.assert_array_equal(classes, c2)
    np.testing.assert_array_equal(digits, d2)
    # The index is class * m^K + digits read in base m, most significant first.
    expected = [int(c) * g.synonyms**g.n_internal + int("".join(map(str, d)), g.synonyms)
                if g.synonyms <= 10 else None for c, d in zip(classes, digits)]
    if g.synonyms <= 10:
        assert keys_to_index(layout, keys) == expected
    np.testing.assert_array_equal(index_to_keys(layout, keys_to_index(layout, keys)), keys)


@pytest.mark.parametrize("mode", ["synonym", "resample"])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_perturbation_keeps_upper_latents_and_changes_lower_ones(level, mode):
    g = draw_grammar(4, 2, 8, 4, n_classes=6, seed=4)
    rng = np.random.default_rng(0)
    n = 4000
    classes = rng.integers(0, g.n_classes, n)
    digits = rng.integers(0, g.synonyms, (n, g.n_internal))
    new = perturb_digits(g, digits, level, seed=0, start=0, mode=mode)
    before, after = expand(g, classes, digits), expand(g, classes, new)
    parse = Parser(g).parse(after[0])
    assert parse.grammatical.all()
    for lv in range(level, g.depth + 1):  # latents at levels >= l are kept
        np.testing.assert_array_equal(after[lv], before[lv])
    below = g.width(level)
    top_old, top_new = digits[:, -sum(g.width(k) for k in range(1, level + 1)):][:, :below], \
        new[:, -sum(g.width(k) for k in range(1, level + 1)):][:, :below]
    if mode == "synonym":
        # every level-l node switched to another production: its tuple of children changed
        assert (top_old != top_new).all()
        assert (after[level - 1].reshape(n, below, -1) != before[level - 1].reshape(n, below, -1)).any(-1).all()
    else:
        # uniform redraw: the same production comes back with probability 1/m
        same = (top_old == top_new).mean()
        assert abs(same - 1 / g.synonyms) < 4 * np.sqrt(0.25 * 0.75 / top_old.size)
    # digits above the level are untouched
    n_kept = new.shape[1] - sum(g.width(k) for k in range(1, level + 1))
    np.testing.assert_array_equal(new[:, :n_kept], digits[:, :n_kept])
    # redrawn lower choices are uniform
    lower = new[:, n_kept + below:]
    if lower.size:
        assert chisquare(np.bincount(lower.ravel(), minlength=g.synonyms)).pvalue > TEST_FAILURE_RATE


def test_synonym_perturbation_needs_synonyms():
    g = draw_grammar(2, 2, 4, 1, seed=0)
    with pytest.raises(ConfigError, match="m >= 2"):
        perturb_digits(g, np.zeros((3, g.n_internal), dtype=np.int64), 1, 0, 0)
