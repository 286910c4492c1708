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
