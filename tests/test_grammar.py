"""Grammar drawing: the paper's definition, impossible parameters, and serialisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgtools.errors import ConfigError, SchemaError
from cgtools.formats.files import InputFile
from cgtools.grammar.source import load_grammar, save_grammar
from cgtools.grammar.rhm import Grammar, draw_grammar, tuple_codes


@st.composite
def grammar_shapes(draw):
    s = draw(st.integers(2, 4))
    v = draw(st.integers(2, 9 if s == 2 else 5))
    m = draw(st.integers(1, v ** (s - 1)))
    n = draw(st.integers(1, v**s // m))
    depth = draw(st.integers(1, 4))
    return depth, s, v, m, n


@settings(max_examples=80, deadline=None)
@given(shape=grammar_shapes(), seed=st.integers(0, 2**32))
def test_drawn_grammars_are_unambiguous_and_complete(shape, seed):
    depth, s, v, m, n = shape
    g = draw_grammar(depth, s, v, m, n, seed)
    assert len(g.rules) == depth
    for level, table in enumerate(g.rules, 1):
        n_sym = n if level == depth else v
        assert table.shape == (n_sym, m, s)  # m productions for every symbol
        assert table.min() >= 0 and table.max() < v  # children are level-(l-1) symbols
        codes = tuple_codes(table.reshape(-1, s), v)
        assert np.unique(codes).size == n_sym * m  # no tuple produced twice: unambiguous


def test_same_seed_same_grammar_other_seed_other_grammar():
    a, b, c = (draw_grammar(3, 2, 8, 2, seed=x) for x in (5, 5, 6))
    assert a == b and a != c


def test_tuples_are_drawn_uniformly():
    # Over many seeds every s-tuple must be equally likely to be a level-1 production:
    # each of the v^s tuples is chosen with probability v*m / v^s per grammar.
    from scipy.stats import chisquare

    from tests.helpers import TEST_FAILURE_RATE

    v, s, m, seeds = 4, 2, 2, 3000
    counts = np.zeros(v**s)
    for seed in range(seeds):
        table = draw_grammar(1, s, v, m, n_classes=v, seed=seed).rules[0]
        np.add.at(counts, tuple_codes(table.reshape(-1, s), v), 1)
    assert counts.sum() == seeds * v * m
    assert chisquare(counts).pvalue > TEST_FAILURE_RATE


@pytest.mark.parametrize("args, fragment", [
    ((3, 2, 4, 5, None), "m <= v^(s-1)"),  # m > v^(s-1)
    ((3, 2, 4, 2, 9), "n_classes * m"),  # n*m > v^s
    ((0, 2, 4, 2, None), "depth"),
    ((3, 1, 4, 2, None), "branching"),
    ((3, 2, 0, 1, None), ">= 1"),
])
def test_impossible_parameters_are_clear_errors(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^").replace("*", r"\*")):
        draw_grammar(*args)


def test_json_round_trip_and_validation():
    g = draw_grammar(3, 2, 8, 2, n_classes=3, seed=1)
    assert Grammar.from_json(g.to_json()) == g
    bad = g.to_json()
    bad["rules"][0][1][0] = bad["rules"][0][0][0]  # same tuple for two symbols
    with pytest.raises(SchemaError, match="ambiguous"):
        Grammar.from_json(bad)
    bad = g.to_json()
    bad["rules"][0][0][0] = [0, 99]
    with pytest.raises(SchemaError, match="outside"):
        Grammar.from_json(bad)
    with pytest.raises(SchemaError, match="malformed"):
        Grammar.from_json({"depth": 3})


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import load_file

    g = draw_grammar(2, 3, 5, 4, n_classes=7, seed=3)
    path = tmp_path / "g.safetensors"
    save_grammar(g, str(path), force=False, provenance={"seed": 3})
    assert load_grammar(InputFile(str(path), None)) == g
    tensors = load_file(path)
    assert sorted(tensors) == ["rules.1", "rules.2"]
    assert tensors["rules.2"].shape == (7, 4, 3)
    np.testing.assert_array_equal(tensors["rules.1"], g.rules[0])
