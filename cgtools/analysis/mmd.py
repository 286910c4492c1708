"""Maximum mean discrepancy between two image sets in CNN features at several depths (paper
Sec. 5.2, Fig. 5b).

For features X = {x_1..x_n} (generated) and Y = {y_1..y_m} (reference) of one depth, the
unbiased estimator of MMD² (Gretton et al. 2012, Eq. 3) is

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (n(n-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / (nm)

with two kernels:

* Gaussian, k(x, y) = exp(-|x - y|² / (2σ²)), σ the median of the pairwise Euclidean distances
  of the pooled set X ∪ Y (distinct pairs; a seeded random subset of MEDIAN_MAX_POINTS points
  when the pool is larger). As σ is a symmetric function of the pool, MMD²_u still has mean 0
  when X and Y come from one distribution;
* polynomial, k(x, y) = (x·y / dim + 1)³: MMD²_u with it is the KID (Bińkowski et al. 2018), here
  on the whole sets rather than averaged over subsets.

Error bars: B bootstrap replicates resample X and Y with replacement (seeded, the same resamples
at every depth) and recompute both estimators with σ fixed; the error is their standard deviation.
A replicate of counts w (w_i copies of x_i) uses Σ_{a≠b} k = wᵀKw - Σ_i w_i k(x_i, x_i), so
duplicates count as distinct points. Kernel sums are accumulated in float64 block by block,
memory O(block² + B (n + m)), time O(B (n + m)² dim / block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cgtools.errors import InputError
from cgtools.seeding import generator

MEDIAN_MAX_POINTS = 2048  # pooled points for the median heuristic (2 M distances)
BLOCK = 1024  # rows of a kernel block
DEFAULT_BOOTSTRAP = 100


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_i - b_j|² for a [n, d], b [m, d] -> [n, m] float64 (clipped at 0 against rounding)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray, seed: int = 0, max_points: int = MEDIAN_MAX_POINTS) -> float:
    """σ of the Gaussian kernel: the median Euclidean distance between distinct points of the
    pooled set (a random subset of `max_points` of it when larger, stream "mmd-median" of the
    seed). Falls back to the median of the non-zero distances, and to 1 if all are 0."""
    pool = np.concatenate([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    if len(pool) > max_points:
        pool = pool[generator(seed, "mmd-median").choice(len(pool), max_points, replace=False)]
    iu = np.triu_indices(len(pool), k=1)
    dist = np.sqrt(pairwise_sq_distances(pool, pool)[iu])
    if not dist.size:
        return 1.0
    sigma = float(np.median(dist))
    if sigma <= 0.0:
        positive = dist[dist > 0]
        sigma = float(np.median(positive)) if positive.size else 1.0
    return sigma


def gaussian_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    """exp(-|a_i - b_j|² / (2σ²)) -> [n, m] float64."""
    return np.exp(-pairwise_sq_distances(a, b) / (2.0 * bandwidth * bandwidth))


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a_i · b_j / dim + 1)³ -> [n, m] float64 (KID's kernel)."""
    a = np.asarray(a, dtype=np.float64)
    return (a @ np.asarray(b, dtype=np.float64).T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, kernel: str = "gaussian", bandwidth: float | None = None) -> float:
    """MMD²_u of x [n, d] and y [m, d] (n, m >= 2) with the 'gaussian' kernel (σ = `bandwidth`,
    default the median heuristic) or the 'polynomial' one."""
    if kernel not in ("gaussian", "polynomial"):
        raise ValueError(f"unknown kernel {kernel!r}")
    x, y = _check(x, "x"), _check(y, "y")
    sigma = bandwidth if bandwidth is not None else (median_bandwidth(x, y) if kernel == "gaussian" else 1.0)
    est = _estimates(x, y, sigma, 0, 0)
    return float(est["mmd2" if kernel == "gaussian" else "kid"][0])


def _check(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise InputError(f"MMD needs at least 2 feature vectors per set, got {what} of shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"MMD: the {what} features are not all finite")
    return a


def _weighted_sums(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, bandwidth: float,
                   same: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ_ij wa[r, i] k(a_i, b_j) wb[r, j] for every replicate r, Gaussian and polynomial: ([R], [R])."""
    dim = a.shape[1]
    na, nb = (a * a).sum(1), (b * b).sum(1)
    gauss = np.zeros(len(wa))
    poly = np.zeros(len(wa))
    for i0 in range(0, len(a), block):
        ai = a[i0:i0 + block]
        for j0 in range(0, len(b), block):
            dot = ai @ b[j0:j0 + block].T
            d2 = np.maximum(na[i0:i0 + block, None] + nb[None, j0:j0 + block] - 2.0 * dot, 0.0)
            if same and i0 == j0:
                np.fill_diagonal(d2, 0.0)  # exactly k(x, x) = 1, whatever the rounding
            kg = np.exp(-d2 / (2.0 * bandwidth * bandwidth))
            kp = (dot / dim + 1.0) ** 3
            left, right = wa[:, i0:i0 + block], wb[:, j0:j0 + block]
            gauss += ((left @ kg) * right).sum(1)
            poly += ((left @ kp) * right).sum(1)
    return gauss, poly


def bootstrap_counts(n: int, m: int, bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy counts float64 [1 + B, n] and [1 + B, m]: row 0 all ones (the data), row r the counts
    of a resample with replacement of n (m) points (stream "mmd-bootstrap" of the seed, drawn in
    a fixed order, so every depth of one comparison gets the same resamples)."""
    rng = generator(seed, "mmd-bootstrap")
    wx = np.ones((1 + bootstrap, n))
    wy = np.ones((1 + bootstrap, m))
    for r in range(1, 1 + bootstrap):
        wx[r] = np.bincount(rng.integers(0, n, n), minlength=n)
        wy[r] = np.bincount(rng.integers(0, m, m), minlength=m)
    return wx, wy


def _estimates(x: np.ndarray, y: np.ndarray, bandwidth: float, bootstrap: int, seed: int,
               block: int = BLOCK) -> dict[str, np.ndarray]:
    """MMD²_u (Gaussian) and KID for the data (index 0) and `bootstrap` resamples (1..B)."""
    n, m = len(x), len(y)
    wx, wy = bootstrap_counts(n, m, bootstrap, seed)
    gxx, pxx = _weighted_sums(x, x, wx, wx, bandwidth, True, block)
    gyy, pyy = _weighted_sums(y, y, wy, wy, bandwidth, True, block)
    gxy, pxy = _weighted_sums(x, y, wx, wy, bandwidth, False, block)
    # Remove the i = j terms (one per copy): Gaussian k(x, x) = 1, polynomial (|x|²/dim + 1)³.
    dx = ((x * x).sum(1) / x.shape[1] + 1.0) ** 3
    dy = ((y * y).sum(1) / y.shape[1] + 1.0) ** 3
    gauss = (gxx - wx.sum(1)) / (n * (n - 1)) + (gyy - wy.sum(1)) / (m * (m - 1)) - 2.0 * gxy / (n * m)
    poly = (pxx - wx @ dx) / (n * (n - 1)) + (pyy - wy @ dy) / (m * (m - 1)) - 2.0 * pxy / (n * m)
    return {"mmd2": gauss, "kid": poly}


@dataclass
class DepthMMD:
    """The estimators at one depth, with bootstrap errors (None without bootstrap)."""

    mmd2: float
    mmd2_err: float | None
    kid: float
    kid_err: float | None
    bandwidth: float


def mmd_statistics(x: np.ndarray, y: np.ndarray, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                   bandwidth: float | None = None, block: int = BLOCK) -> DepthMMD:
    """MMD²_u (Gaussian, median heuristic unless `bandwidth`) and KID of x [n, d] vs y [m, d],
    with errors from `bootstrap` resamples (0: no errors)."""
    x, y = _check(x, "generated"), _check(y, "reference")
    if x.shape[1] != y.shape[1]:
        raise InputError(f"MMD: feature dimensions differ ({x.shape[1]} and {y.shape[1]})")
    if bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {bootstrap}")
    sigma = median_bandwidth(x, y, seed) if bandwidth is None else float(bandwidth)
    est = _estimates(x, y, sigma, bootstrap, seed, block)

    def err(values: np.ndarray) -> float | None:
        return float(np.std(values[1:], ddof=1)) if bootstrap >= 2 else None

    return DepthMMD(float(est["mmd2"][0]), err(est["mmd2"]), float(est["kid"][0]), err(est["kid"]), sigma)


@dataclass
class MMDResult:
    """One row per depth; lists are aligned with `layers`."""

    backbone: str
    layers: list[str]
    dims: list[int]
    mmd2: list[float]
    mmd2_err: list[float | None]
    kid: list[float]
    kid_err: list[float | None]
    bandwidth: list[float]
    n_gen: int
    n_ref: int
    bootstrap: int
    resolution: int | None = None
    weights: str | None = None

    def columns(self) -> dict[str, list]:
        rows = len(self.layers)
        return {"depth": list(range(rows)), "layer": self.layers, "dim": self.dims, "mmd2": self.mmd2,
                "mmd2_err": self.mmd2_err, "kid": self.kid, "kid_err": self.kid_err, "bandwidth": self.bandwidth,
                "n_gen": [self.n_gen] * rows, "n_ref": [self.n_ref] * rows}

    def to_json(self) -> dict:
        return {"backbone": self.backbone, "depth": self.layers, "depth_index": list(range(len(self.layers))),
                "dim": self.dims, "mmd2": self.mmd2, "mmd2_err": self.mmd2_err, "kid": self.kid,
                "kid_err": self.kid_err, "bandwidth": self.bandwidth, "n_gen": self.n_gen, "n_ref": self.n_ref,
                "bootstrap": self.bootstrap, "resolution": self.resolution}


COLUMN_TYPES = {"depth": "int64", "layer": "string", "dim": "int64", "mmd2": "float64", "mmd2_err": "float64",
                "kid": "float64", "kid_err": "float64", "bandwidth": "float64", "n_gen": "int64", "n_ref": "int64"}


def results_columns(result: MMDResult) -> dict:
    """Typed Arrow columns of the `mmd` results table (cgtools.formats.results)."""
    import pyarrow as pa

    return {name: pa.array(values, type=getattr(pa, COLUMN_TYPES[name])())
            for name, values in result.columns().items()}


def compare_features(gen: Sequence[np.ndarray], ref: Sequence[np.ndarray], layers: Sequence[str],
                     bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, backbone: str = "") -> MMDResult:
    """:func:`mmd_statistics` at every depth: gen[k] [n, C_k] against ref[k] [m, C_k]."""
    if not (len(gen) == len(ref) == len(layers)):
        raise InputError(f"{len(gen)} and {len(ref)} feature sets for {len(layers)} layers")
    rows = [mmd_statistics(g, r, bootstrap, seed) for g, r in zip(gen, ref)]
    return MMDResult(backbone=backbone, layers=list(layers), dims=[int(g.shape[1]) for g in gen],
                     mmd2=[r.mmd2 for r in rows], mmd2_err=[r.mmd2_err for r in rows], kid=[r.kid for r in rows],
                     kid_err=[r.kid_err for r in rows], bandwidth=[r.bandwidth for r in rows],
                     n_gen=len(gen[0]), n_ref=len(ref[0]), bootstrap=bootstrap)


def mmd_between_tables(gen, ref, backbone, *, limit: int | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                       seed: int = 0, batch_size: int = 16) -> MMDResult:
    """MMD per depth between two image tables (cgtools.formats.images.ImagesTable) in the
    features of `backbone` (cgtools.images.features.Backbone), the first `limit` images of each."""
    from cgtools.images.features import extract_features

    feats = []
    for table, what in ((gen, "generated"), (ref, "reference")):
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        if n < 2:
            raise InputError(f"{table.display()}: MMD needs at least 2 images, the table has {table.num_rows}")
        feats.append(extract_features(backbone, table.iter_batches(batch_size, limit=n), total=n,
                                      description=f"{backbone.name} {what}"))
    result = compare_features(feats[0], feats[1], backbone.layers, bootstrap, seed, backbone.name)
    result.resolution = backbone.resolution
    result.weights = backbone.weights
    return result

