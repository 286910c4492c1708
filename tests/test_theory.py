"""The paper's closed-form predictions, checked against independent computations.

Sentence counts against brute-force enumeration; the correlation magnitudes C^(l) (Eq. 3, 5,
18, 19 and App. A) against a Monte Carlo over many random grammars of each grammar's *exact*
population correlation (tests.helpers.exact_tuple_correlation, itself checked against an
enumeration of every derivation tree); the sampling noise (v^2 m P)^(-1/2) against a simulation;
the sample complexities P_l as the P where the two meet. Every statistical check has false-alarm
rate TEST_FAILURE_RATE (two-sided normal bound Z standard errors; means over >= 80 independent
grammars, so the central limit theorem applies).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import stats

from cgtools.analysis.theory import noise_floor, theory
from cgtools.grammar.rhm import draw_grammar, tuple_codes
from tests.helpers import (TEST_FAILURE_RATE, brute_force_sentences, brute_force_trees,
                           exact_tuple_correlation)

Z = stats.norm.isf(TEST_FAILURE_RATE / 2)


# ---- sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("L, s, v, m, n", [(1, 2, 3, 2, 2), (2, 2, 3, 2, None), (3, 2, 4, 2, 2),
                                           (2, 3, 3, 3, None), (2, 3, 4, 2, 3)])
def test_sentence_count_matches_enumeration(L, s, v, m, n):
    """n_sentences = n_classes m^((d-1)/(s-1)) against the sentences of drawn grammars listed by
    explicit recursion (unambiguous rules: all distinct)."""
    t = theory(L, s, v, m, n)
    for seed in (0, 1):
        sentences = brute_force_sentences(draw_grammar(L, s, v, m, n, seed=seed))
        assert len(set(sentences)) == len(sentences) == t["n_sentences"]
        assert all(len(x) == t["length"] for x in sentences)
    assert t["length"] == s**L
    assert t["log10_n_sentences"] == pytest.approx(math.log10(t["n_sentences"]), rel=1e-12)


def test_sentence_count_is_exact_beyond_int64():
    """Was a re-typing of n m^63; now the count comes from the tree recursion S_0 = 1,
    S_l = m S_(l-1)^s (one production choice per node, s independent subtrees), with total
    n S_L, which the enumeration above validates on tiny grammars."""
    L, s, v, m = 6, 2, 16, 8
    t = theory(L, s, v, m)
    per_symbol = 1
    for _ in range(L):
        per_symbol = m * per_symbol**s
    assert isinstance(t["n_sentences"], int) and t["n_sentences"] == v * per_symbol
    assert t["n_sentences"] > 2**63
    assert t["log10_n_sentences"] == pytest.approx(math.log10(v * per_symbol), rel=1e-12)


def test_f_is_the_fraction_of_tuples_that_are_productions():
    """f = m / v^(s-1) against the drawn rules: the distinct s-tuples any level-1 symbol produces,
    out of the v^s possible."""
    for L, s, v, m in [(3, 2, 8, 2), (2, 3, 5, 4), (2, 2, 16, 4)]:
        g = draw_grammar(L, s, v, m, seed=3)
        produced = np.unique(tuple_codes(g.rules[0].reshape(-1, s), v)).size
        assert theory(L, s, v, m)["f"] == pytest.approx(produced / v**s, rel=1e-12)


# ---- correlations -----------------------------------------------------------------------------------
def mean_square_correlation(L, s, v, m, level, seeds):
    """Per grammar, the mean over tokens mu and productions nu of the exact C(mu, nu)^2 (the nu
    of App. A: tuples that are productions at level-(level-2); their correlations are what the
    sampling noise (v^2 m P)^(-1/2) is compared with). [len(seeds)] array."""
    out = []
    for seed in seeds:
        corr, _ = exact_tuple_correlation(draw_grammar(L, s, v, m, seed=seed), level)
        out.append(float((corr**2).mean()))
    return np.array(out)


@functools.lru_cache(maxsize=None)
def root_lca_monte_carlo(depth, s, v, m, n):
    """mean_square_correlation with the lowest common ancestor at the root (level = depth) over n
    grammars; seeds depend on the depth, so different depths use independent grammars. Cached:
    two tests share the depth-2 samples."""
    return mean_square_correlation(depth, s, v, m, depth, range(10**6 * depth, 10**6 * depth + n))


def mean_and_se(x):
    return x.mean(), x.std(ddof=1) / math.sqrt(len(x))


def exact_mean_square_c2(s, v, m):
    """<C^(2)(mu, nu)^2> at finite v and m, lowest common ancestor the root (uniform over v
    classes), by an exact finite sum (derived here, not in the paper):

    C^(2)(mu, nu) = (1/m) sum_a E_(a,beta) D(mu|a), with beta the level-1 parent of nu,
    E_(a,beta) = P[h1 = a, h2 = beta] - P[h1 = a] P[h2 = beta] from the root rules and
    D(mu|a) = p_1(mu|a) from the level-1 rules (independent of the root rules). sum_a E = 0 and
    Eq. (15)-(16) give <C^2> = (rho / m^2) <E^2>, rho = v^(s-1)(v-1) / (m(v^s-1)). The vm root
    productions are vm distinct tuples drawn uniformly among the v^s, so with N = vm, x the number
    of them with (a, beta) in front, R' (C') those with a first (beta second) but not both:
    E = (x - (x + R')(x + C') / N) / N, and (x, R', C') is multivariate hypergeometric over
    groups of v^(s-2), (v-1)v^(s-2), (v-1)v^(s-2) of the v^s tuples."""
    g, n_tot, big_n = v ** (s - 2), v**s, v * m
    rest = n_tot - (2 * v - 1) * g
    lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)  # noqa: E731
    log_total = lc(n_tot, big_n)
    acc = 0.0
    for x in range(g + 1):
        for r in range((v - 1) * g + 1):
            for c in range((v - 1) * g + 1):
                k = big_n - x - r - c
                if not 0 <= k <= rest:
                    continue
                logp = lc(g, x) + lc((v - 1) * g, r) + lc((v - 1) * g, c) + lc(rest, k) - log_total
                acc += math.exp(logp) * (x - (x + r) * (x + c) / big_n) ** 2
    rho = v ** (s - 1) * (v - 1) / (m * (v**s - 1))
    return rho / m**2 * acc / big_n**2


def test_exact_correlation_helper_matches_enumeration():
    """The reference used below: transition-matrix correlations equal the ones counted over every
    derivation tree (all equally likely), and the tuples with P[nu] > 0 are productions."""
    for args, seed in [((3, 2, 3, 2, None), 2), ((2, 3, 3, 2, None), 0), ((3, 2, 4, 2, 2), 1)]:
        g = draw_grammar(*args[:4], n_classes=args[4], seed=seed)
        trees = brute_force_trees(g)
        s, v = g.branching, g.vocab
        for level in range(2, g.depth + 1):
            joint = np.zeros((v, v**s))
            for tree in trees:
                nu = int(tuple_codes(np.array(tree[level - 2][s:2 * s]), v))
                joint[tree[0][0], nu] += 1 / len(trees)
            counted = joint - np.outer(joint.sum(1), joint.sum(0))
            corr, valid = exact_tuple_correlation(g, level)
            assert np.abs(counted).max() > 1e-3  # not trivially zero
            np.testing.assert_allclose(corr, counted[:, valid], atol=1e-12)
            assert valid.size == v * g.synonyms and set(np.flatnonzero(joint.sum(0))) <= set(valid.tolist())


@pytest.mark.parametrize("s, v, m", [(2, 4, 2), (3, 3, 3)])
def test_eq18_level_ratio_against_monte_carlo(s, v, m):
    """Was: the ratio of consecutive correlation_finite_v re-typed. Now: the Monte Carlo ratio
    <C^(3)^2> / <C^(2)^2> of exact correlations with the lowest common ancestor at the root
    (depth-3 vs depth-2 grammars, 1000 independent grammars each; App. A's set-up) against the
    library's (C^(3) / C^(2))^2. Eq. (18) is exact at finite v (Eq. 15-17 are exact for the
    uniform draw), so the tolerance is purely statistical: Z standard errors of the ratio (delta
    method, independent numerator and denominator). Power: the v >> 1 ratio 1/m is 25 % (v = 4) /
    44 % (v = 3, s = 3) away and is rejected."""
    a, se_a = mean_and_se(root_lca_monte_carlo(2, s, v, m, 1000))
    b, se_b = mean_and_se(root_lca_monte_carlo(3, s, v, m, 1000))
    fin = theory(3, s, v, m)["correlation_finite_v"]
    ratio, predicted = b / a, (fin[1] / fin[0]) ** 2
    tol = Z * ratio * math.hypot(se_a / a, se_b / b)
    assert abs(ratio - predicted) < tol, (ratio, predicted, tol)
    assert abs(ratio - 1 / m) > tol


@pytest.mark.parametrize("s, v, m", [(2, 4, 2), (3, 3, 3)])
def test_exact_base_correlation_against_monte_carlo(s, v, m):
    """The finite-v value of <C^(2)^2> (exact_mean_square_c2) against the Monte Carlo mean over
    1000 grammars of depth 2 (lowest common ancestor the root), Z standard errors. Power: Eq. (11)
    itself is 2x (s = 2) / 3x (s = 3) too large here and is rejected."""
    mean, se = mean_and_se(root_lca_monte_carlo(2, s, v, m, 1000))
    exact = exact_mean_square_c2(s, v, m)
    assert abs(mean - exact) < Z * se, (mean, exact, se)
    assert abs(mean - theory(2, s, v, m)["correlation_finite_v"][0] ** 2) > Z * se


def test_eq11_is_the_large_v_limit_of_the_exact_base_correlation():
    """correlation_finite_v starts from Eq. (11), the v, m -> oo limit: against the exact finite
    value (checked by Monte Carlo above) the relative error must vanish like 1/v. Bound:
    |exact / C^(2)^2 - 1| <= 4/v, decreasing in v (measured: about 3/v for s = 2); a wrong power
    of v or m in Eq. (11) would change the ratio by a factor >= 2 per doubling and fail."""
    for m in (2, 4, 8):
        errors = []
        for v in (16, 32, 64, 128):
            exact = exact_mean_square_c2(2, v, m)
            library = theory(2, 2, v, m)["correlation_finite_v"][0] ** 2
            errors.append(abs(exact / library - 1))
            assert errors[-1] <= 4 / v, (v, m, exact / library)
        assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("depth", [2, 3])
def test_correlation_finite_v_against_monte_carlo_at_large_v(depth):
    """Direct comparison: RMS over 80 grammars (s = 2, v = 64, m = 4) of the exact correlation with
    the lowest common ancestor at the root, level l = L, against correlation_finite_v[L - 2] and
    against the asymptotic `correlation` (Eq. 5). Tolerance: Z standard errors (Monte Carlo) plus
    4/v for the O(1/v) error of Eq. (11) (bound of the test above; Eq. 18 adds none; Eq. 5 adds
    1/v per level above 2). Measured: 0.95 for both depths."""
    s, v, m, n = 2, 64, 4, 80
    mean, se = mean_and_se(mean_square_correlation(depth, s, v, m, depth, range(100 * depth, 100 * depth + n)))
    t = theory(depth, s, v, m)
    for key in ("correlation_finite_v", "correlation"):
        predicted = t[key][depth - 2] ** 2
        # Eq. (5) also replaces Eq. (18)'s ratio v(v-1)/(m(v^2-1)) = (1 - 1/(v+1))/m by 1/m
        tol = Z * se / predicted + 4 / v + (key == "correlation") * (depth - 2) / v
        assert abs(mean / predicted - 1) < tol, (key, mean / predicted, tol)
    assert t["correlation_levels"] == list(range(2, depth + 1))


def test_all_tuples_productions_has_no_finite_sample_complexity():
    """m = v^(s-1): every tuple is a production (f = 1), so the exact correlations of every drawn
    grammar vanish, as does the predicted magnitude, and no training-set size is predicted."""
    t = theory(2, 2, 3, 3)
    assert t["p_star"] is None and t["correlation"] == [0.0] and t["f"] == 1.0
    assert t["sample_complexity"] == [None, None]
    for seed in range(5):
        corr, valid = exact_tuple_correlation(draw_grammar(2, 2, 3, 3, seed=seed), 2)
        assert valid.size == 9 and np.abs(corr).max() < 1e-15


# ---- sampling noise and sample complexities ----------------------------------------------------------
def test_noise_floor_is_the_sampling_noise_of_an_empirical_correlation():
    """(v^2 m P)^(-1/2) against a simulation: draw P i.i.d. (x_1, tuple) pairs from one grammar's
    exact joint law (enumerated), 20 times, and take the RMS over mu and productions nu of the
    error of the empirical correlation p^(mu, nu) - p^(mu) p^(nu). Reference: its delta-method
    variance from the multinomial covariances (exact up to O(1/P)); the simulation must match it
    within Z standard errors of the RMS. Its leading term is P[mu, nu] / P, whose mean over the
    v * vm pairs is exactly 1 / (v^2 m P) = noise_floor^2; the rest comes from the fluctuation of
    p^(mu) (P[mu] ~ 1/v) and p^(nu) (~ 1/(vm)), so noise_floor must be within 2/v of the RMS
    (measured: the RMS is 0.95 noise_floor at v = 16, m = 4; simulation / delta method = 1.002)."""
    g = draw_grammar(2, 2, 16, 4, seed=5)
    v, m, big_p, reps = g.vocab, g.synonyms, 20000, 20
    corr, valid = exact_tuple_correlation(g, 2)
    joint = np.zeros((v, v**2))
    trees = brute_force_trees(g)
    for tree in trees:
        joint[tree[0][0], tree[0][2] * v + tree[0][3]] += 1 / len(trees)
    np.testing.assert_allclose((joint - np.outer(joint.sum(1), joint.sum(0)))[:, valid], corr, atol=1e-12)
    pmn, pm, pn = joint[:, valid], joint.sum(1)[:, None], joint.sum(0)[valid][None, :]
    var = (pmn * (1 - pmn) + pn**2 * pm * (1 - pm) + pm**2 * pn * (1 - pn) - 2 * pn * pmn * (1 - pm)
           - 2 * pm * pmn * (1 - pn) + 2 * pm * pn * (pmn - pm * pn)) / big_p
    rms_delta = math.sqrt(var.mean())
    rng = np.random.default_rng(0)
    sq = []
    for _ in range(reps):
        counts = rng.multinomial(big_p, joint.reshape(-1)).reshape(joint.shape) / big_p
        emp = counts - np.outer(counts.sum(1), counts.sum(0))
        sq.append(((emp[:, valid] - corr) ** 2).reshape(-1))
    sq = np.concatenate(sq)
    rms = math.sqrt(sq.mean())
    rel_se = 0.5 * sq.std() / sq.mean() / math.sqrt(sq.size)  # of the RMS
    assert abs(rms / rms_delta - 1) < Z * rel_se, (rms, rms_delta)
    assert abs(noise_floor(v, m, big_p) / rms_delta - 1) < 2 / v, noise_floor(v, m, big_p) / rms_delta


@pytest.mark.parametrize("L, s, v, m", [(3, 2, 8, 2), (4, 2, 16, 4), (3, 3, 5, 4), (5, 2, 32, 8)])
def test_sample_complexity_is_where_correlation_meets_sampling_noise(L, s, v, m):
    """Was: Eq. (6) and Eq. (5) re-typed. Now a consistency between outputs (Sec. 4.2): for
    l = 2..L, P_l is the P at which the predicted correlation C^(l) equals the sampling noise
    (v^2 m P)^(-1/2) of the paper, found here by bisection in log P, and noise_floor(P_l) = C^(l).
    P* is P_L; P_1 (no correlation to detect: the local rules are memorised) continues the
    sequence, P_1 = P_2 / m, as the module documents."""
    t = theory(L, s, v, m)
    levels, p_l = t["levels"], t["sample_complexity"]
    assert levels == list(range(1, L + 1)) and t["p_star"] == p_l[-1]
    for level, c in zip(t["correlation_levels"], t["correlation"]):
        lo, hi = 0.0, 100.0  # log P
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if (v**2 * m * math.exp(mid)) ** -0.5 > c:  # noise above the signal: need more data
                lo = mid
            else:
                hi = mid
        assert math.exp(0.5 * (lo + hi)) == pytest.approx(p_l[level - 1], rel=1e-9)
        assert noise_floor(v, m, p_l[level - 1]) == pytest.approx(c, rel=1e-12)
    assert p_l[0] == pytest.approx(p_l[1] / m, rel=1e-12)
    assert all(a < b for a, b in zip(p_l, p_l[1:]))
