"""cgtools.analysis.mmd: the unbiased MMD² estimators against direct double loops, the bootstrap
weighting identity, the median bandwidth against scipy's pdist, zero expectation under the null,
and block-size invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import pdist

from cgtools.analysis.mmd import (_estimates, bootstrap_counts, median_bandwidth, mmd2_unbiased,
                                  mmd_statistics)
from cgtools.errors import InputError
from tests.helpers import TEST_FAILURE_RATE


def gaussian(sigma):
    return lambda a, b: math.exp(-float(np.sum((a - b) ** 2)) / (2.0 * sigma * sigma))


def polynomial(dim):
    return lambda a, b: (float(np.dot(a, b)) / dim + 1.0) ** 3


def direct_mmd2(x, y, k):
    """Gretton et al. (2012), Eq. 3, by explicit loops over the points (each row a point, so
    duplicated rows are distinct points)."""
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2.0 * xy


def sets(seed, n=7, m=9, d=3, shift=0.4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_estimator_equals_double_loop(seed):
    x, y = sets(seed)
    for sigma in (0.3, 1.3, 7.0):
        want = direct_mmd2(x, y, gaussian(sigma))
        assert mmd2_unbiased(x, y, "gaussian", bandwidth=sigma) == pytest.approx(want, rel=1e-10, abs=1e-13)
        assert mmd_statistics(x, y, bootstrap=0, bandwidth=sigma).mmd2 == pytest.approx(want, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polynomial_estimator_equals_double_loop(seed):
    x, y = sets(seed, d=4)
    want = direct_mmd2(x, y, polynomial(4))
    assert mmd2_unbiased(x, y, "polynomial") == pytest.approx(want, rel=1e-10)
    assert mmd_statistics(x, y, bootstrap=0).kid == pytest.approx(want, rel=1e-10)


def test_default_bandwidth_is_the_median_heuristic():
    x, y = sets(3)
    sigma = float(np.median(pdist(np.concatenate([x, y]))))
    assert mmd2_unbiased(x, y) == pytest.approx(direct_mmd2(x, y, gaussian(sigma)), rel=1e-10)
    assert mmd_statistics(x, y, bootstrap=0).bandwidth == pytest.approx(sigma, rel=1e-12)


def test_bootstrap_replicate_is_the_estimator_on_the_resampled_sets():
    """A replicate's estimate = the direct estimator on the explicitly resampled sets, duplicates
    counted as distinct points (the weighting identity Σ_{a≠b} k = wᵀKw - Σ w_i k(x_i, x_i))."""
    x, y = sets(4, n=6, m=8, d=3)
    sigma, replicates, seed = 0.9, 6, 11
    est = _estimates(x, y, sigma, replicates, seed)
    wx, wy = bootstrap_counts(len(x), len(y), replicates, seed)
    assert np.all(wx[0] == 1) and np.all(wy[0] == 1)
    assert (wx[1:].sum(1) == len(x)).all() and (wy[1:].sum(1) == len(y)).all()
    assert wx[1:].max() >= 2 and wy[1:].max() >= 2  # the resamples do hold duplicates
    for r in range(1 + replicates):
        xs = np.repeat(x, wx[r].astype(int), axis=0)  # the resampled set, copies as rows
        ys = np.repeat(y, wy[r].astype(int), axis=0)
        assert est["mmd2"][r] == pytest.approx(direct_mmd2(xs, ys, gaussian(sigma)), rel=1e-10, abs=1e-13)
        assert est["kid"][r] == pytest.approx(direct_mmd2(xs, ys, polynomial(3)), rel=1e-10, abs=1e-12)
    stats_ = mmd_statistics(x, y, bootstrap=replicates, seed=seed, bandwidth=sigma)
    assert stats_.mmd2 == pytest.approx(est["mmd2"][0])
    assert stats_.mmd2_err == pytest.approx(np.std(est["mmd2"][1:], ddof=1), rel=1e-12)
    assert stats_.kid_err == pytest.approx(np.std(est["kid"][1:], ddof=1), rel=1e-12)
    assert mmd_statistics(x, y, bootstrap=1).mmd2_err is None  # one replicate: no spread
    assert mmd_statistics(x, y, bootstrap=0).kid_err is None


def test_bootstrap_is_seeded():
    x, y = sets(5, n=20, m=20)
    a = mmd_statistics(x, y, bootstrap=10, seed=1)
    assert a == mmd_statistics(x, y, bootstrap=10, seed=1)
    assert a.mmd2_err != mmd_statistics(x, y, bootstrap=10, seed=2).mmd2_err


@pytest.mark.parametrize("n,m", [(5, 6), (10, 7), (1, 2)])
def test_median_bandwidth_matches_pdist(n, m):
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.normal(size=(n, 4)) * 3, rng.normal(size=(m, 4))
    assert median_bandwidth(x, y) == pytest.approx(float(np.median(pdist(np.concatenate([x, y])))), rel=1e-12)


def test_median_bandwidth_falls_back_to_nonzero_distances():
    # 6 identical points and 2 others: 15 + 1 of the 28 distances are 0, so the median is 0.
    x = np.zeros((6, 2))
    y = np.array([[3.0, 4.0], [0.0, 1.0]])
    d = pdist(np.concatenate([x, y]))
    assert np.median(d) == 0.0
    assert median_bandwidth(x, y) == pytest.approx(float(np.median(d[d > 0])))
    assert median_bandwidth(np.zeros((3, 2)), np.zeros((2, 2))) == 1.0


def test_median_bandwidth_subsamples_large_pools():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), rng.normal(size=(300, 5))
    full = float(np.median(pdist(np.concatenate([x, y]))))
    sub = median_bandwidth(x, y, seed=0, max_points=200)
    assert sub != full and sub == pytest.approx(full, rel=0.05)  # 19,900 of 179,700 distances
    assert median_bandwidth(x, y, seed=0, max_points=200) == sub  # seeded


def _t_statistic(values):
    values = np.asarray(values)
    return values.mean() / (values.std(ddof=1) / math.sqrt(len(values)))


def test_expectation_zero_under_the_null_and_positive_under_a_shift():
    """R independent draws of X, Y (n = m = 16, 4-d normal). Under the null MMD²_u is unbiased
    (the median bandwidth is a symmetric function of the pooled set, so averaging over the split of
    the pool gives exactly 0): the mean over draws passes a two-sided one-sample t-test at
    false-alarm rate TEST_FAILURE_RATE. With Y shifted by 1 in every coordinate the t statistic
    exceeds the same critical value, for both kernels."""
    draws, n, d = 400, 16, 4
    critical = stats.t.ppf(1 - TEST_FAILURE_RATE / 2, draws - 1)  # about 3.9
    rng = np.random.default_rng(2024)
    null = {"mmd2": [], "kid": []}
    shifted = {"mmd2": [], "kid": []}
    for _ in range(draws):
        x, y, z = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 1.0
        for out, other in ((null, y), (shifted, z)):
            r = mmd_statistics(x, other, bootstrap=0)
            out["mmd2"].append(r.mmd2)
            out["kid"].append(r.kid)
    for kernel in ("mmd2", "kid"):
        assert abs(_t_statistic(null[kernel])) < critical, (kernel, np.mean(null[kernel]))
        assert _t_statistic(shifted[kernel]) > critical, (kernel, np.mean(shifted[kernel]))
    # the Gaussian MMD² under the shift is large against its null spread, not just significant
    assert np.mean(shifted["mmd2"]) > 5 * np.std(null["mmd2"])


def test_block_size_does_not_change_the_result():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(11, 6)), rng.normal(size=(13, 6)) + 0.2
    small = mmd_statistics(x, y, bootstrap=5, seed=3, block=3)
    large = mmd_statistics(x, y, bootstrap=5, seed=3, block=1024)
    for field in ("mmd2", "mmd2_err", "kid", "kid_err", "bandwidth"):
        assert getattr(small, field) == pytest.approx(getattr(large, field), rel=1e-12, abs=1e-15), field
    a = _estimates(x, y, 1.1, 5, 3, block=3)
    b = _estimates(x, y, 1.1, 5, 3, block=1024)
    np.testing.assert_allclose(a["mmd2"], b["mmd2"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a["kid"], b["kid"], rtol=1e-12, atol=1e-15)


def test_bad_feature_sets_are_input_errors():
    x = np.zeros((4, 3))
    with pytest.raises(InputError, match="at least 2"):
        mmd_statistics(x[:1], x)
    with pytest.raises(InputError, match="dimensions differ"):
        mmd_statistics(x, np.zeros((4, 2)))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="finite"):
        mmd_statistics(x, bad)
    with pytest.raises(ValueError):
        mmd2_unbiased(x, x, kernel="laplace")
