"""The paper's closed-form predictions."""

from __future__ import annotations

import math

import pytest

from cgtools.analysis.theory import noise_floor, theory


def test_sample_complexities_follow_eq6():
    t = theory(3, 2, 8, 2)
    f = 2 / 8
    assert t["f"] == pytest.approx(f)
    assert t["sample_complexity"] == pytest.approx([8 * 2 ** (l + 1) / (1 - f) for l in (1, 2, 3)])
    assert t["p_star"] == t["sample_complexity"][-1]
    assert t["n_sentences"] == 8 * 2**7 and t["length"] == 8


def test_sentence_count_is_exact_beyond_int64():
    t = theory(6, 2, 16, 8)
    assert t["n_sentences"] == 16 * 8**63
    assert t["log10_n_sentences"] == pytest.approx(math.log10(16 * 8**63))


def test_correlations_eq5_and_noise_floor_give_back_p_l():
    v, m, s, L = 16, 4, 2, 4
    t = theory(L, s, v, m)
    f = m / v ** (s - 1)
    for level, c in zip(t["correlation_levels"], t["correlation"]):
        assert c == pytest.approx(math.sqrt((1 - f) / (v**3 * m ** (level + 2))))
        # equating C^(l) with the sampling noise (v^2 m P)^(-1/2) gives P_l (Sec. 4.2)
        p = 1 / (v**2 * m * c**2)
        assert p == pytest.approx(t["sample_complexity"][level - 1])
        assert noise_floor(v, m, p) == pytest.approx(c)
    # Eq. (18): each level up multiplies the squared correlation by v^(s-1)(v-1)/(m(v^s-1))
    ratio = v ** (s - 1) * (v - 1) / (m * (v**s - 1))
    fin = t["correlation_finite_v"]
    assert fin[0] == pytest.approx(t["correlation"][0])
    for a, b in zip(fin, fin[1:]):
        assert (b / a) ** 2 == pytest.approx(ratio)


def test_all_tuples_productions_has_no_finite_sample_complexity():
    t = theory(2, 2, 3, 3)  # m = v^(s-1): f = 1
    assert t["p_star"] is None and t["correlation"] == [0.0]
