"""Mean-field theory of the forward-backward phase transition on the RHM.

The approximation of the talk (shared/papers/002): at every node, BP's belief in the *correct*
symbol is some p and the rest is spread uniformly over the other symbols; iterate level by level,
averaging each BP message over the random choice of rules. A rule other than the true one is an
s-tuple of independent uniform symbols *conditioned on differing from the true tuple*
(unambiguity), so its average product of s children beliefs is

    c_s(p) = v^-s (1 - p^s) / (1 - v^-s)      (0 when the children are certain, v^-s when p = 1/v).

Upward (subtree) belief, leaves to root. At the leaves p_0 is the *average* BP leaf belief in the
clean token over the noise: with ε = E (v-1)/v the probability that a token is changed,

    uniform: p_0 = (1 - ε)^2 + ε^2/(v - 1)    (the observed token carries belief 1 - ε and is the
                                               clean one with probability 1 - ε)
    masked:  p_0 = 1 - E + E/v                (known, or a uniform belief when masked)

    p_{l+1} = (p_l^s + (m-1) c_s(p_l)) / (p_l^s + (m K_{l+1} - 1) c_s(p_l))

with K_l symbols at level l (v, and n_classes at the root). Outside (downward) belief, root to
leaves, from the parent's outside belief q and the s-1 siblings' upward belief p:

    q_L = 1/n_classes,  q_l = T / (T + (v-1) W),
    T = q p_l^(s-1) + (m - q) c_{s-1}(p_l) / v,  W = (m - q) v^-s

(T and W: the averaged downward messages to the correct and to one wrong child symbol; rules with
the correct child must differ from the true tuple in a sibling). The marginal belief, i.e. the
probability that an exact posterior sample keeps the node, is

    r_l = p_l q_l / (p_l q_l + (1 - p_l)(1 - q_l) / (K_l - 1)),

so the predicted changed fraction at level l is 1 - r_l, and the root is kept with r_L = p_L.

For L → ∞ the upward map p -> F(p) (internal levels, K = v) decides the transition: 1/v and 1 are
fixed points; when there is an unstable one p_u between them, leaf beliefs above p_u flow to 1
(the class is reconstructed) and below it to 1/v (lost). The critical noise E_c solves
p_0(E_c) = p_u. For finite L the root curve is a crossover that sharpens with L;
`transition_noise` locates its midpoint. Large v, s = 2: F(p) ≈ p²/(p² + f(1 - p²)) with
f = m/v, so p_u = f/(1 - f) (a transition needs f < 1/2).

This is an annealed average: it replaces the random leaf messages by their mean, which is
optimistic (real messages are sometimes confidently wrong); compare with the exact BP measurement
(`cgtools forward-backward`, docs/phase_transition.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cgtools.errors import ConfigError
from cgtools.grammar.rhm import check_parameters

if TYPE_CHECKING:  # torch-free at import: `cgtools --help` must stay fast
    from cgtools.diffusion.base import Process


def noise_grid(spec: str) -> list[float]:
    """Parse a noise specification: "0.3", a list "0.1,0.2,0.5" or a range "START:STOP:COUNT"
    (COUNT evenly spaced values, both ends included). Values must lie in [0, 1]."""
    text = spec.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise ValueError
            values = np.linspace(start, stop, count).tolist() if count > 1 else [start]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"bad noise specification {spec!r}: expected E, E1,E2,... or "
                          f"START:STOP:COUNT (e.g. 0:1:21)") from None
    if not values:
        raise ConfigError("give at least one noise level")
    for e in values:
        if not 0.0 <= e <= 1.0 or math.isnan(e):
            raise ConfigError(f"noise levels must lie in [0, 1], got {e}")
    # linspace can overshoot 1 by an ulp; keep the grid inside [0, 1] and tidy its decimals
    return [min(max(round(e, 12), 0.0), 1.0) for e in values]


def _other_tuple(p: float, k: int, vocab: int) -> float:
    """c_k(p): mean product of k children beliefs over a uniform k-tuple that is not the true one."""
    base = vocab ** (-k)
    return base * (1.0 - p**k) / (1.0 - base)


def upward_map(p: float, branching: int, vocab: int, synonyms: int, parents: int) -> float:
    """One level of the upward recursion: belief p of the children -> belief of the parent
    (`parents` symbols at the parent level)."""
    s, m = branching, synonyms
    ps = p**s
    other = _other_tuple(p, s, vocab)
    return (ps + (m - 1) * other) / (ps + (m * parents - 1) * other)


def downward_map(q: float, p: float, branching: int, vocab: int, synonyms: int) -> float:
    """Outside belief of a child from its parent's outside belief q and its siblings' belief p."""
    s, v, m = branching, vocab, synonyms
    t = q * p ** (s - 1) + (m - q) * _other_tuple(p, s - 1, v) / v
    w = (m - q) * v ** (-s)
    return t / (t + (v - 1) * w)


def _combine(p: float, q: float, k: int) -> float:
    if k == 1:
        return 1.0
    num = p * q
    return num / (num + (1 - p) * (1 - q) / (k - 1))


def leaf_belief(noise: float, vocab: int, process: Process) -> float:
    """Average BP belief p_0 in the clean token at noise E (see the module docstring): the noise
    process's own formula (Process.mean_leaf_belief) for v = `vocab` symbols."""
    if getattr(process, "vocab", vocab) != vocab:
        raise ConfigError(f"the noise process has {process.vocab} symbols, the grammar v = {vocab}")
    return process.mean_leaf_belief(noise)


def _noise_for_belief(p: float, vocab: int, process: Process) -> float | None:
    """Inverse of leaf_belief on [0, 1] (decreasing); None when p is out of its range."""
    lo, hi = leaf_belief(1.0, vocab, process), leaf_belief(0.0, vocab, process)
    if not lo <= p <= hi:
        return None
    a, b = 0.0, 1.0
    for _ in range(80):
        c = 0.5 * (a + b)
        if leaf_belief(c, vocab, process) > p:
            a = c
        else:
            b = c
    return 0.5 * (a + b)


def beliefs(noise: float, depth: int, branching: int, vocab: int, synonyms: int,
            n_classes: int | None, process: Process) -> dict:
    """Mean-field beliefs at one noise level: lists over levels l = 0..L of the upward belief p_l,
    outside belief q_l and marginal belief r_l (probability that a posterior sample keeps a node)."""
    n = vocab if n_classes is None else n_classes
    L, s, v, m = depth, branching, vocab, synonyms
    k = [v] * L + [n]  # symbols per level
    up = [leaf_belief(noise, v, process)]
    for level in range(1, L + 1):
        up.append(upward_map(up[-1], s, v, m, k[level]))
    out = [0.0] * (L + 1)
    out[L] = 1.0 / n
    for level in range(L - 1, -1, -1):
        out[level] = downward_map(out[level + 1], up[level], s, v, m)
    kept = [_combine(up[level], out[level], k[level]) for level in range(L + 1)]
    return {"upward": up, "outside": out, "kept": kept}


def fixed_points(branching: int, vocab: int, synonyms: int, resolution: int = 20000) -> list[float]:
    """Fixed points of the internal-level upward map in [1/v, 1], increasing (found on a fine grid
    and refined by bisection). 1/v (nothing known) and 1 (everything known) always are."""
    v = vocab
    lo = 1.0 / v
    grid = np.linspace(lo, 1.0, resolution)
    f = np.array([upward_map(p, branching, v, synonyms, v) - p for p in grid])
    points = [lo]
    for i in range(1, resolution - 2):
        if f[i] == 0.0 or (f[i] > 0) != (f[i + 1] > 0):
            a, b = grid[i], grid[i + 1]
            for _ in range(60):
                c = 0.5 * (a + b)
                if (upward_map(c, branching, v, synonyms, v) - c > 0) == (f[i] > 0):
                    a = c
                else:
                    b = c
            points.append(0.5 * (a + b))
    return points + [1.0]


def critical_noise(branching: int, vocab: int, synonyms: int, process: Process) -> float | None:
    """E_c of the L → ∞ transition: the noise whose leaf belief sits on the unstable fixed point
    between 1/v and 1 (None when there is none: no transition)."""
    points = fixed_points(branching, vocab, synonyms)
    inner = points[1:-1]
    if not inner:
        return None
    return _noise_for_belief(inner[0], vocab, process)


def transition_noise(depth: int, branching: int, vocab: int, synonyms: int,
                     n_classes: int | None = None, level: int | None = None, *,
                     process: Process) -> float:
    """Noise at which the mean-field kept probability of `level` (default: the root) is halfway
    between 1 (E = 0) and its E = 1 value (bisection; the curve decreases with E)."""
    level = depth if level is None else level
    args = (depth, branching, vocab, synonyms, n_classes, process)
    high = beliefs(1.0, *args)["kept"][level]
    target = 0.5 * (1.0 + high)
    a, b = 0.0, 1.0
    for _ in range(60):
        c = 0.5 * (a + b)
        if beliefs(c, *args)["kept"][level] > target:
            a = c
        else:
            b = c
    return 0.5 * (a + b)


def mean_field(depth: int, branching: int, vocab: int, synonyms: int, n_classes: int | None,
               noise: Sequence[float], process: Process) -> dict:
    """The mean-field prediction on a noise grid, JSON-ready.

    Keys: "process", "noise"; per noise level lists over l = 0..L: "changed" (1 - r_l), "kept"
    (r_l), "upward" (p_l), "outside" (q_l); "root_kept" (r_L per noise); "critical_noise" (E_c
    for L → ∞, or None) and "transition_noise" (midpoint of this depth's root crossover).
    """
    n = vocab if n_classes is None else n_classes
    check_parameters(depth, branching, vocab, synonyms, n)
    if vocab < 2:
        raise ConfigError("the mean-field theory needs v >= 2")
    rows = [beliefs(float(e), depth, branching, vocab, synonyms, n, process) for e in noise]
    return {
        "process": process.name,
        "noise": [float(e) for e in noise],
        "changed": [[1.0 - r for r in row["kept"]] for row in rows],
        "kept": [row["kept"] for row in rows],
        "upward": [row["upward"] for row in rows],
        "outside": [row["outside"] for row in rows],
        "root_kept": [row["kept"][-1] for row in rows],
        "critical_noise": critical_noise(branching, vocab, synonyms, process),
        "transition_noise": transition_noise(depth, branching, vocab, synonyms, n, process=process),
    }
