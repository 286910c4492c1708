"""Mean-field theory of the forward-backward transition: limits, closed forms and the CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cgtools.analysis.mean_field import (beliefs, critical_noise, downward_map, fixed_points, leaf_belief,
                                         mean_field, noise_grid, transition_noise, upward_map)
from cgtools.analysis.theory import theory
from cgtools.cli.main import app
from cgtools.errors import ConfigError
from tests.helpers import noise_process


def test_noise_grid_forms():
    assert noise_grid("0.3") == [0.3]
    assert noise_grid("0.1, 0.2,0.5") == [0.1, 0.2, 0.5]
    assert noise_grid("0:1:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert noise_grid("0.2:0.2:1") == [0.2]
    assert noise_grid("0:1:21")[-1] == 1.0 and len(noise_grid("0:1:21")) == 21
    for bad in ("", "1.2", "-0.1", "0:1", "0:1:0", "a,b", "nan"):
        with pytest.raises(ConfigError):
            noise_grid(bad)


def test_maps_fix_the_trivial_and_the_perfect_beliefs():
    for s, v, m in [(2, 8, 2), (3, 5, 4), (2, 16, 4)]:
        assert upward_map(1.0, s, v, m, v) == pytest.approx(1.0)
        assert upward_map(1 / v, s, v, m, v) == pytest.approx(1 / v)
        assert upward_map(1 / v, s, v, m, 3) == pytest.approx(1 / 3)  # root with 3 classes
        assert downward_map(1.0, 1.0, s, v, m) < 1.0  # siblings + parent known: synonyms remain


def test_limits_of_the_noise():
    L, s, v, m, n = 4, 2, 8, 2, 3
    U = noise_process("uniform", v)
    clean = beliefs(0.0, L, s, v, m, n, U)
    assert clean["kept"] == pytest.approx([1.0] * (L + 1))
    noisy = beliefs(1.0, L, s, v, m, n, U)
    assert noisy["upward"] == pytest.approx([1 / v] * L + [1 / n])
    assert noisy["kept"][L] == pytest.approx(1 / n)
    # Below the root, the averaged prior probability of the true symbol: for a child of the root
    # E[sum_b P(b)^2] over random rules is (v + nm - 1) / (v n m).
    assert noisy["kept"][L - 1] == pytest.approx((v + n * m - 1) / (v * n * m))


def test_changed_fraction_grows_with_noise_at_every_level():
    mf = mean_field(5, 2, 16, 4, None, np.linspace(0, 1, 41), noise_process("uniform", 16))
    changed = np.array(mf["changed"])  # [noise, level]
    assert (np.diff(changed, axis=0) >= -1e-12).all()
    assert mf["root_kept"][0] == pytest.approx(1.0) and mf["root_kept"][-1] == pytest.approx(1 / 16)


def test_leaf_beliefs_average_the_noise():
    v = 8
    for process in ("uniform", "masked"):
        assert leaf_belief(0.0, v, noise_process(process, v)) == 1.0
        assert leaf_belief(1.0, v, noise_process(process, v)) == pytest.approx(1 / v)
    # uniform: the observed token is right w.p. 1 - ε and then carries belief 1 - ε
    eps = 0.5 * (v - 1) / v
    assert leaf_belief(0.5, v, noise_process("uniform", v)) == pytest.approx((1 - eps) ** 2 + eps * eps / (v - 1))
    assert leaf_belief(0.5, v, noise_process("masked", v)) == pytest.approx(1 - eps)


def test_fixed_points_and_critical_noise_match_the_large_v_closed_form():
    # Large v, s = 2: F(p) ≈ p²/(p² + f(1 - p²)) with f = m/v, unstable fixed point f/(1 - f);
    # masked leaves have p_0 ≈ 1 - E, uniform ones p_0 ≈ (1 - E)².
    f = 1 / 8
    points = fixed_points(2, 2048, 256)
    assert points[0] == pytest.approx(1 / 2048) and points[-1] == 1.0
    p_u = f / (1 - f)
    assert points[1] == pytest.approx(p_u, rel=1e-2)  # O(1/v) corrections
    assert critical_noise(2, 2048, 256, noise_process("masked", 2048)) == pytest.approx(1 - p_u, rel=1e-2)
    assert critical_noise(2, 2048, 256, noise_process("uniform", 2048)) == pytest.approx(1 - p_u**0.5, rel=1e-2)
    # every tuple a production (m = v^(s-1)): nothing to reconstruct, no transition
    assert critical_noise(2, 4, 4, noise_process("uniform", 4)) is None


def test_the_root_crossover_moves_up_and_sharpens_towards_the_critical_noise():
    s, v, m = 2, 32, 4
    U = noise_process("uniform", v)
    e_c = critical_noise(s, v, m, U)
    mids = [transition_noise(L, s, v, m, process=U) for L in (2, 4, 8, 16)]
    assert all(a < b < e_c for a, b in zip(mids, mids[1:]))
    width = []
    for L in (2, 8):
        grid = np.linspace(0, 1, 2001)
        kept = np.array(mean_field(L, s, v, m, None, grid, U)["root_kept"])
        width.append(grid[np.argmax(kept < 0.25)] - grid[np.argmax(kept < 0.75)])
    assert width[1] < width[0]


def test_theory_gains_a_mean_field_entry_only_on_request():
    plain = theory(3, 2, 8, 2)
    assert "mean_field" not in plain
    both = theory(3, 2, 8, 2, noise_grid=[0.0, 0.5, 1.0], process=noise_process("uniform", 8))
    assert {k: v for k, v in both.items() if k != "mean_field"} == plain
    mf = both["mean_field"]
    assert mf["noise"] == [0.0, 0.5, 1.0] and len(mf["changed"][0]) == 4


def test_theory_cli_noise_grid():
    res = CliRunner().invoke(app, ["theory", "-L", "3", "-s", "2", "-v", "8", "-m", "2",
                                   "--noise-grid", "0:1:3", "--json"])
    assert res.exit_code == 0, res.stderr
    mf = json.loads(res.stdout)["mean_field"]
    assert mf["noise"] == [0.0, 0.5, 1.0] and mf["critical_noise"] > 0
    res = CliRunner().invoke(app, ["theory", "-L", "3", "-s", "2", "-v", "8", "-m", "2", "--noise-grid", "0:2:3"])
    assert res.exit_code == 1
