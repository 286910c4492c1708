"""Sample complexity P*: the training-set size at which a measured curve crosses a threshold.

Input: the results tables of a sweep over the training-set size P, concatenated into one tidy
table (cgtools.analysis.sweep.sweep_table, which adds L, s, v, m from the tables' grammar):
'accuracy' tables (quantity `accuracy`, e.g. A_L of the last level) or 'cluster' tables (quantity
`ari`). The tag `P` gives the training-set size of each run. Rows are grouped by tags (`by`,
default m and L when present; for cluster tables also the settings context, method, oracle,
weighted, node and position when they vary); within a group, rows at the same P (several seeds)
are replicates.

Per group, at every P: the mean of the replicates and its standard error (std / sqrt(k), ddof 1;
a P measured once contributes no spread). P* is the first upward crossing of the threshold by the
mean curve (or, `which="last"`, the last one: the curve stays above after it), interpolated linearly in log P between the two bracketing points (the paper's
P* = where A_L surpasses A* = 1/2). Its interval [p_star_lo, p_star_hi] is where the mean + SE
and mean - SE curves cross (null on a side where that curve does not cross inside the measured
range; both null when no P has two replicates). A curve that never crosses gives p_star = null
and a warning; when every point lies on one side, the interval is the one-sided bracket: status
"above" (P* <= smallest P: hi = P_min) or "below" (P* > largest P: lo = P_max); "no-crossing"
when the curve lies on both sides but never goes up through the threshold.

Across groups that differ only in m: an ordinary least-squares fit log P* = a + b log m over the
groups that crossed, with the standard error of b (from the residuals, n - 2 degrees of freedom;
null for two points), compared with the theory's exponent. The theory (cgtools.analysis.theory,
Eq. 6): the rules of level l need P_l = v m^(l+1) / (1 - m/v^(s-1)) sentences, so A_l crosses at
P_l (exponent l + 1: L + 1 for the last level); clustering level l uses a correlation whose lowest
common ancestor is at level l + 1 (cgtools.analysis.clustering), so its ARI crosses at P_{l+1}
(exponent l + 2: L + 1 for the last clusterable level, L - 1). With L, s and v known (tags or
the grammar in the tables' metadata), each group also gets that predicted P* (theory_p_star).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from cgtools.analysis.sweep import Sweep
from cgtools.analysis.theory import theory
from cgtools.errors import ConfigError, InputError, SchemaError

log = logging.getLogger(__name__)

SAMPLE_COMPLEXITY_KIND = "sample-complexity"
QUANTITY = {"accuracy": "accuracy", "cluster": "ari"}  # input kind -> the column measured
# input kind -> l' - l, where level l of the table crosses at the theory's P_l' (module docstring)
THEORY_LEVEL_SHIFT = {"accuracy": 0, "cluster": 1}
SIZE_TAG = "P"
SEED_TAG = "seed"
DEFAULT_BY = ("m", "L")
CLUSTER_BY = ("context", "method", "oracle", "weighted", "node", "position")  # cluster settings
UNCERTAINTY = "crossings of the mean +/- standard error (over seeds) curves"


CROSSINGS = ("first", "last")


def crossing(size: np.ndarray, value: np.ndarray, threshold: float,
             which: str = "first") -> tuple[float | None, str]:
    """The first (or last) upward crossing of `threshold` by value(size), linear in log size.

    size: [n] increasing, > 0; value: [n]. "last" is the crossing after which the curve stays
    above the threshold: the onset of generalisation when a memorised small training set (whose
    copies are grammatical) lifts the curve above the threshold at the smallest P. Returns
    (P*, "crossed") or (None, status) with status "above" (every value >= threshold), "below"
    (every value < threshold) or "no-crossing".
    """
    if which not in CROSSINGS:
        raise ConfigError(f"crossing must be one of {', '.join(CROSSINGS)}, got {which!r}")
    above = value >= threshold
    up = np.flatnonzero(~above[:-1] & above[1:])
    if up.size:
        i = int(up[0] if which == "first" else up[-1])
        frac = (threshold - value[i]) / (value[i + 1] - value[i])
        log_p = math.log(size[i]) + frac * (math.log(size[i + 1]) - math.log(size[i]))
        return float(math.exp(log_p)), "crossed"
    if above.all():
        return None, "above"
    if not above.any():
        return None, "below"
    return None, "no-crossing"


@dataclass
class GroupEstimate:
    """P* of one group. size/mean/se/seeds: [n_points] curve after averaging the replicates."""

    key: dict[str, Any]
    level: int | None
    size: np.ndarray
    mean: np.ndarray
    se: np.ndarray  # 0 where a P was measured once
    seeds: np.ndarray  # replicates per P
    p_star: float | None = None
    p_star_lo: float | None = None
    p_star_hi: float | None = None
    status: str = "crossed"
    theory_p_star: float | None = None
    theory_exponent: int | None = None  # l' + 1 for the theory's P_l' (module docstring)
    fit: "PowerLawFit | None" = None

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items()) or "all rows"

    def to_json(self) -> dict:
        out = dict(self.key)
        out.update(level=self.level, p_star=self.p_star, p_star_lo=self.p_star_lo,
                   p_star_hi=self.p_star_hi, status=self.status, n_points=int(self.size.size),
                   n_seeds=int(self.seeds.max(initial=0)), theory_exponent=self.theory_exponent,
                   theory_p_star=self.theory_p_star,
                   curve={SIZE_TAG: self.size.tolist(), "mean": self.mean.tolist(),
                          "se": self.se.tolist(), "seeds": self.seeds.tolist()})
        return out


@dataclass
class PowerLawFit:
    """log P* = log(prefactor) + exponent * log m over the groups of one fit key (natural logs)."""

    key: dict[str, Any]
    m: list[float]
    p_star: list[float]
    exponent: float | None
    exponent_err: float | None
    prefactor: float | None
    theory_exponent: int | None

    def to_json(self) -> dict:
        return {**self.key, "m": self.m, "p_star": self.p_star, "n_groups": len(self.m),
                "exponent": self.exponent, "exponent_err": self.exponent_err,
                "prefactor": self.prefactor, "theory_exponent": self.theory_exponent}


@dataclass
class SampleComplexity:
    quantity: str
    threshold: float
    by: list[str]
    groups: list[GroupEstimate]
    fits: list[PowerLawFit] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"quantity": self.quantity, "threshold": self.threshold, "by": self.by,
                "uncertainty": UNCERTAINTY, "groups": [g.to_json() for g in self.groups],
                "fit": [f.to_json() for f in self.fits]}

    def columns(self) -> dict[str, pa.Array]:
        """Columns of the 'sample-complexity' results table: one row per group."""
        cols: dict[str, pa.Array] = {}
        for name in self.by:
            cols[name] = pa.array([g.key[name] for g in self.groups])
        fits = [g.fit for g in self.groups]
        cols.update({
            "level": pa.array([g.level for g in self.groups], pa.int64()),
            "p_star": pa.array([g.p_star for g in self.groups], pa.float64()),
            "p_star_lo": pa.array([g.p_star_lo for g in self.groups], pa.float64()),
            "p_star_hi": pa.array([g.p_star_hi for g in self.groups], pa.float64()),
            "status": pa.array([g.status for g in self.groups], pa.string()),
            "n_points": pa.array([int(g.size.size) for g in self.groups], pa.int64()),
            "n_seeds": pa.array([int(g.seeds.max(initial=0)) for g in self.groups], pa.int64()),
            "exponent": pa.array([f.exponent if f else None for f in fits], pa.float64()),
            "exponent_err": pa.array([f.exponent_err if f else None for f in fits], pa.float64()),
            "prefactor": pa.array([f.prefactor if f else None for f in fits], pa.float64()),
            "theory_exponent": pa.array([g.theory_exponent for g in self.groups], pa.int64()),
            "theory_p_star": pa.array([g.theory_p_star for g in self.groups], pa.float64()),
        })
        return cols


def fit_power_law(m: Sequence[float], p_star: Sequence[float]) -> tuple[float, float | None, float]:
    """Least squares log P* = a + b log m: (b, standard error of b or None for 2 points, e^a)."""
    x, y = np.log(np.asarray(m, float)), np.log(np.asarray(p_star, float))
    dx = x - x.mean()
    b = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    a = float(y.mean() - b * x.mean())
    err = None
    if x.size > 2:
        residual = y - (a + b * x)
        err = float(math.sqrt((residual**2).sum() / (x.size - 2) / (dx * dx).sum()))
    return b, err, math.exp(a)


def default_by(sweep: Sweep) -> list[str]:
    """m and L when present; for cluster tables also the CLUSTER_BY settings that vary."""
    names = sweep.table.column_names
    by = [c for c in DEFAULT_BY if c in names]
    if sweep.kind == "cluster":
        by += [c for c in CLUSTER_BY if c in names and len(set(sweep.table.column(c).to_pylist())) > 1]
    return by


def _sort_key(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)


def _unique(rows: list[dict], name: str) -> Any:
    values = {r.get(name) for r in rows}
    return values.pop() if len(values) == 1 else None


def estimate(sweep: Sweep, threshold: float = 0.5, level: int | None = None,
             by: Sequence[str] | None = None, which: str = "first") -> SampleComplexity:
    """P* per group of `sweep` and the power-law fits in m (see the module docstring).

    level: the `level` rows to use (default: the largest level of each group). which: "first"
    or "last" upward crossing (`crossing`); the interval uses the same one.
    """
    if not math.isfinite(threshold):
        raise ConfigError(f"--threshold must be finite, got {threshold}")
    quantity = QUANTITY.get(sweep.kind)
    if quantity is None:
        raise InputError(f"cannot measure a sample complexity from {sweep.kind!r} results; "
                         f"give {' or '.join(repr(k) for k in QUANTITY)} tables")
    names = sweep.table.column_names
    for needed in (SIZE_TAG, quantity):
        if needed not in names:
            hint = " (tag each run with --tag P=<training-set size>)" if needed == SIZE_TAG else ""
            raise SchemaError(f"the {sweep.kind} tables have no {needed!r} column{hint}")
    by = list(default_by(sweep) if by is None else by)
    for name in by:
        if name not in names:
            raise InputError(f"no column {name!r} to group by (columns: {', '.join(names)})")
        if name in (SIZE_TAG, quantity):
            raise ConfigError(f"cannot group by {name!r}: it is the curve itself")
    rows = [r for r in sweep.table.to_pylist() if r[SIZE_TAG] is not None and r[quantity] is not None
            and math.isfinite(r[quantity])]
    if any(not isinstance(r[SIZE_TAG], (int, float)) or r[SIZE_TAG] <= 0 for r in rows):
        raise SchemaError(f"tag {SIZE_TAG!r} must be a positive number (the training-set size)")
    grouped: dict[tuple, list[dict]] = {}
    for r in rows:
        grouped.setdefault(tuple(r.get(name) for name in by), []).append(r)
    if not grouped:
        raise InputError(f"the tables hold no {quantity!r} values")
    groups = []
    for key in sorted(grouped, key=lambda k: tuple(_sort_key(v) for v in k)):
        group = _estimate_group(dict(zip(by, key)), grouped[key], quantity, threshold, level,
                                [t for t in sweep.tags if t not in by and t not in (SIZE_TAG, SEED_TAG)],
                                THEORY_LEVEL_SHIFT[sweep.kind], which)
        if group is not None:
            groups.append(group)
    if not groups:
        raise InputError(f"no group has level {level}")
    result = SampleComplexity(quantity, threshold, by, groups)
    if "m" in by:
        result.fits = _fits(groups, [name for name in by if name != "m"])
    return result


def _estimate_group(key: dict, rows: list[dict], quantity: str, threshold: float,
                    level: int | None, other_tags: list[str], shift: int,
                    which: str = "first") -> GroupEstimate | None:
    label = ", ".join(f"{k}={v}" for k, v in key.items()) or "all rows"
    for tag in other_tags:  # a varying tag outside `by` mixes runs that may not be replicates
        values = {r.get(tag) for r in rows}
        if len(values) > 1:
            log.warning("%s: tag %r takes %d values; its runs are averaged as replicates "
                        "(add it to --by to separate them)", label, tag, len(values))
    if "level" in rows[0]:
        levels = sorted({r["level"] for r in rows if r.get("level") is not None})
        use = level if level is not None else (levels[-1] if levels else None)
        if use not in levels:
            log.warning("%s: no level %s (levels: %s); skipped", label, use, levels)
            return None
        rows = [r for r in rows if r.get("level") == use]
    else:
        use = None
    per_size: dict[float, list[float]] = {}
    for r in rows:
        per_size.setdefault(r[SIZE_TAG], []).append(float(r[quantity]))
    size = np.array(sorted(per_size), float)
    values = [np.array(per_size[p]) for p in sorted(per_size)]
    mean = np.array([v.mean() for v in values])
    se = np.array([v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0 for v in values])
    seeds = np.array([v.size for v in values])
    g = GroupEstimate(key, use, size, mean, se, seeds)
    g.p_star, g.status = crossing(size, mean, threshold, which)
    if g.status == "crossed":
        if (seeds > 1).any():
            lo, _ = crossing(size, mean + se, threshold, which)
            hi, _ = crossing(size, mean - se, threshold, which)
            g.p_star_lo = min(lo, g.p_star) if lo is not None else None
            g.p_star_hi = max(hi, g.p_star) if hi is not None else None
        if mean[0] >= threshold and which == "first":
            log.warning("%s: the curve starts above %g at P = %g, dips and crosses again at "
                        "P* = %.4g (memorisation at small P?)", label, threshold, size[0], g.p_star)
    elif g.status == "above":
        g.p_star_hi = float(size[0])
        log.warning("%s: above %g at every P; P* <= %g (measure smaller P)", label, threshold, size[0])
    elif g.status == "below":
        g.p_star_lo = float(size[-1])
        log.warning("%s: below %g at every P; P* > %g (measure larger P)", label, threshold, size[-1])
    else:
        log.warning("%s: never crosses %g upwards; P* undefined", label, threshold)
    depth = key.get("L", _unique(rows, "L"))
    depth = depth if _integer(depth) else None
    theory_level = use + shift if use is not None else depth
    if theory_level is not None:
        g.theory_exponent = theory_level + 1
        g.theory_p_star = _theory_p_star(theory_level, depth, _unique(rows, "s"), _unique(rows, "v"),
                                         key.get("m", _unique(rows, "m")))
    return g


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _theory_p_star(level: int, depth: Any, s: Any, v: Any, m: Any) -> float | None:
    """The theory's P_level when L, s, v and m are all known and form a valid RHM."""
    if not all(_integer(x) for x in (depth, s, v, m)) or not 1 <= level <= depth:
        return None
    try:
        return theory(depth, s, v, m)["sample_complexity"][level - 1]
    except ConfigError:
        return None


def _fits(groups: list[GroupEstimate], fixed: list[str]) -> list[PowerLawFit]:
    """One fit per value of the `fixed` tags, over its groups' m."""
    families: dict[tuple, list[GroupEstimate]] = {}
    for g in groups:
        families.setdefault(tuple(g.key[name] for name in fixed), []).append(g)
    fits = []
    for key, members in families.items():
        crossed = [g for g in members if g.p_star is not None and isinstance(g.key["m"], (int, float))
                   and g.key["m"] > 0]
        exponents = {g.theory_exponent for g in members}
        fit = PowerLawFit(dict(zip(fixed, key)), [g.key["m"] for g in crossed],
                          [g.p_star for g in crossed], None, None, None,
                          exponents.pop() if len(exponents) == 1 else None)
        label = ", ".join(f"{k}={v}" for k, v in fit.key.items()) or "all groups"
        if len({g.key["m"] for g in crossed}) >= 2:
            fit.exponent, fit.exponent_err, fit.prefactor = fit_power_law(fit.m, fit.p_star)
        else:
            log.warning("%s: fewer than two values of m with a P*; no power-law fit", label)
        for g in members:
            g.fit = fit
        fits.append(fit)
    return fits
