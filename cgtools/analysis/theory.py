"""Closed-form predictions of the paper for an RHM: sizes, sample complexities, correlations.

f = m / v^(s-1) is the fraction of s-tuples that are productions of some symbol.
* P_l = v m^(l+1) / (1 - f), l = 1..L: training-set size needed to learn level-l rules (Eq. 6);
  the predicted sample complexity P* of the full grammar is P_L.
* C^(l) ≈ sqrt((1 - f) / (v^3 m^(l+2))): magnitude of the correlation between a visible token and a
  tuple of level-(l-2) latents whose lowest common ancestor is at level l (Eq. 3, 5, 19), for
  l = 2..L. Also given: the finite-v value of the recursion Eq. (18) started from Eq. (11).
* Sampling noise of an empirical correlation from P sentences: (v^2 m P)^(-1/2); equating it with
  C^(l) gives back P_l.
* Optionally, the mean-field theory of the forward-backward phase transition on a noise grid
  (cgtools.analysis.mean_field).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from cgtools.analysis.mean_field import mean_field
from cgtools.errors import ConfigError
from cgtools.grammar.rhm import check_parameters

if TYPE_CHECKING:  # torch-free at import: `cgtools --help` must stay fast
    from cgtools.diffusion.base import Process


EXACT_COUNT_DIGITS = 300  # sentence counts with more digits are given as log10 only


def theory(depth: int, branching: int, vocab: int, synonyms: int, n_classes: int | None = None,
           noise_grid: Sequence[float] | None = None, process: Process | None = None) -> dict:
    """All predictions as a JSON-ready dict (None where a quantity is infinite or undefined).

    With `noise_grid`, the entry "mean_field" holds the mean-field prediction of the
    forward-backward experiment on those noise levels for the noise `process` (a token Process
    over v symbols; cgtools.analysis.mean_field.mean_field).
    """
    L, s, v, m = depth, branching, vocab, synonyms
    n = v if n_classes is None else n_classes
    check_parameters(L, s, v, m, n)
    d = s**L
    n_internal = (d - 1) // (s - 1)
    log10_sentences = math.log10(n) + n_internal * math.log10(m)
    # The exact count is an integer of log10 digits: exact while that is cheap, else None (the
    # log10 is reported either way). m**n_internal at L = 40, s = 4 would never finish.
    n_sentences = n * m**n_internal if log10_sentences < EXACT_COUNT_DIGITS else None
    f = m / v ** (s - 1)
    levels = list(range(1, L + 1))
    if f < 1:
        p_levels = [v * m ** (l + 1) / (1 - f) for l in levels]
    else:
        p_levels = [None for _ in levels]  # every tuple is a production: no correlations to learn
    corr_levels = list(range(2, L + 1))
    asymptotic = [math.sqrt((1 - f) / (v**3 * m ** (l + 2))) for l in corr_levels]
    # Eq. (18): <C^(l+1)^2> = v^(s-1)(v-1) / (m (v^s - 1)) <C^(l)^2>, from Eq. (11) at l = 2.
    ratio = v ** (s - 1) * (v - 1) / (m * (v**s - 1)) if v > 1 else 0.0
    finite, c2 = [], (1 - f) / (v**3 * m**4)
    for _ in corr_levels:
        finite.append(math.sqrt(c2))
        c2 *= ratio
    out = {
        "depth": L, "branching": s, "vocab": v, "synonyms": m, "n_classes": n,
        "length": d,
        "n_sentences": n_sentences,
        "log10_n_sentences": log10_sentences,
        "f": f,
        "levels": levels,
        "sample_complexity": p_levels,
        "p_star": p_levels[-1],
        "correlation_levels": corr_levels,
        "correlation": asymptotic,
        "correlation_finite_v": finite,
    }
    if noise_grid is not None:
        if process is None:
            raise ConfigError("the mean-field prediction needs a noise process")
        out["mean_field"] = mean_field(L, s, v, m, n, noise_grid, process)
    return out


def noise_floor(vocab: int, synonyms: int, n: float) -> float:
    """Size of the sampling noise of a token-tuple correlation measured on n sentences."""
    return 1.0 / math.sqrt(vocab**2 * synonyms * n)
