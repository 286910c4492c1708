"""Independent reference implementations and constants for the tests."""

from __future__ import annotations

import itertools

# False-alarm rate of every statistical test: a correct implementation fails one such check with
# this probability (seeds are fixed, so a given run is deterministic).
TEST_FAILURE_RATE = 1e-4


def brute_force_sentences(grammar):
    """Every sentence of a tiny grammar by explicit recursion, as a set of token tuples."""
    def expand(level, symbol):
        if level == 0:
            return [(symbol,)]
        out = []
        for rule in grammar.rules[level - 1][symbol].tolist():
            for parts in itertools.product(*(expand(level - 1, c) for c in rule)):
                out.append(tuple(itertools.chain.from_iterable(parts)))
        return out
    return [s for c in range(grammar.n_classes) for s in expand(grammar.depth, c)]


def brute_force_valid_levels(grammar, tokens):
    """Nested validity of one sentence by Python dict lookups: list of bool for levels 1..L."""
    inverse = [{tuple(rule): (a, k) for a, rules in enumerate(r.tolist()) for k, rule in enumerate(rules)}
               for r in grammar.rules]
    seq, out, ok = list(tokens), [], True
    for level in range(1, grammar.depth + 1):
        s = grammar.branching
        parents = []
        for i in range(0, len(seq), s):
            hit = inverse[level - 1].get(tuple(seq[i:i + s])) if ok else None
            parents.append(None if hit is None else hit[0])
        ok = ok and all(p is not None for p in parents)
        out.append(ok)
        seq = [p if p is not None else -1 for p in parents]
    return out


def noise_process(name, vocab):
    """The registered noise process `name` over `vocab` symbols, with default settings."""
    from cgtools.diffusion.registry import make_config, make_process

    return make_process(make_config(name), vocab)


def brute_force_trees(grammar):
    """Every derivation tree of a tiny grammar by explicit recursion: a list of trees, each a list
    over levels 0..L of the tuple of node symbols (level 0 = tokens, level L = (root,)). Every
    derivation has the same probability 1 / (n_classes m^(#internal nodes)) under the RHM."""
    def expand(level, symbol):
        # -> list of trees of the subtree rooted at (level, symbol): lists over levels 0..level
        if level == 0:
            return [[(symbol,)]]
        out = []
        for rule in grammar.rules[level - 1][symbol].tolist():
            for parts in itertools.product(*(expand(level - 1, c) for c in rule)):
                tree = [tuple(itertools.chain.from_iterable(p[k] for p in parts)) for k in range(level)]
                out.append(tree + [(symbol,)])
        return out
    return [t for c in range(grammar.n_classes) for t in expand(grammar.depth, c)]


def _first_child_matrix(rules, vocab):
    """[parents, v]: probability that a uniformly chosen production of each parent has child b first."""
    import numpy as np

    parents, m, _ = rules.shape
    out = np.zeros((parents, vocab))
    np.add.at(out, (np.repeat(np.arange(parents), m), rules[:, :, 0].reshape(-1)), 1.0 / m)
    return out


def exact_tuple_correlation(grammar, level):
    """Exact population token-latent-tuple correlation of one grammar (paper Eq. 2/7):

        C(mu, nu) = P[x_1 = mu, h^(level-2)_{s+1:2s} = nu] - P[x_1 = mu] P[h^(level-2)_{s+1:2s} = nu]

    for the first token x_1 and the s level-(level-2) nodes below the second level-(level-1) node
    (their lowest common ancestor is at `level`, 2 <= level <= L). Computed by the tree's
    transition matrices: the prior of the leftmost level-`level` node (root prior pushed down the
    first-child path), one production of it, the first child pushed down to x_1, and one of the m
    productions of the second child. Only tuples nu that are productions at level-1 can have
    P[nu] > 0 (all others have C = 0). Returns (C [v, n_nu], the sorted codes of those n_nu = v m
    tuples, first element most significant as in cgtools.grammar.rhm.tuple_codes)."""
    import numpy as np

    g, l = grammar, level
    L, s, v, m = g.depth, g.branching, g.vocab, g.synonyms
    if not 2 <= l <= L:
        raise ValueError("the lowest common ancestor must sit at a level in 2..L")
    prior = np.full(g.n_classes, 1.0 / g.n_classes)
    for k in range(L, l, -1):  # leftmost node of level k-1 from the leftmost node of level k
        prior = prior @ _first_child_matrix(g.rules[k - 1], v)
    down = np.eye(v)  # [level-(l-1) symbol, token]: first child, l-1 times
    for k in range(l - 1, 0, -1):
        down = down @ _first_child_matrix(g.rules[k - 1], v)
    top = g.rules[l - 1]  # [symbols_l, m, s]
    pair = np.zeros((v, v))  # P[first child, second child] of the leftmost level-l node
    np.add.at(pair, (top[:, :, 0].reshape(-1), top[:, :, 1].reshape(-1)), np.repeat(prior / m, m))
    below = g.rules[l - 2]  # productions of the second child: [v, m, s] level-(l-2) symbols
    codes = np.zeros(below.shape[:2], dtype=np.int64)
    for j in range(s):
        codes = codes * v + below[:, :, j]
    codes = codes.reshape(-1)  # distinct (unambiguous rules); tuple k*m.. of parent k
    order = np.argsort(codes)
    parent = np.repeat(np.arange(v), m)[order]
    token_parent = down.T @ pair  # [mu, second child]: P[x_1 = mu, second child]
    joint = token_parent[:, parent] / m  # [mu, nu]: the parent picks nu w.p. 1/m
    corr = joint - np.outer(joint.sum(1), joint.sum(0))
    return corr, codes[order]


def assert_stacked_matches_single_runs(members) -> None:
    """`cgtools sweep`'s vmapped stack of `members` (SweepMember) makes the same two steps as one
    Trainer per member: the same losses (rel 1e-5, then 1e-4) and the same weights afterwards."""
    import pytest
    import torch

    from cgtools.training.sweep import StackedRun, _trainer

    singles = [_trainer(m, "cpu", False) for m in members]
    expected = [s._train_step() for s in singles]
    stacked = StackedRun([_trainer(m, "cpu", False) for m in members])
    losses, finite = stacked._step()
    assert all(finite) and expected[0] != expected[1]
    assert losses == pytest.approx(expected, rel=1e-5)
    for tr in stacked.trainers:
        tr.step += 1
    assert stacked._step()[0] == pytest.approx([s._train_step() for s in singles], rel=1e-4)
    for pos, single in enumerate(singles):  # and the weights after two steps
        for name, p in single.model.network.named_parameters():
            assert torch.allclose(stacked.params[name][pos], p, rtol=1e-4, atol=1e-6), name


def assert_one_line_error(res, *needles, command: str | None = None, code: int = 1) -> None:
    """A CLI result (typer CliRunner) that failed as the contract says: exit `code`, one line on
    stderr, no traceback, "cgtools COMMAND: error: ..." holding every needle."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    prefix = f"cgtools {command}: error: " if command else "cgtools "
    assert lines[0].startswith(prefix) and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
