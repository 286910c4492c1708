"""Sample complexity P* from sweeps over P: crossings, seeds, grouping, power-law fits, the CLI."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cgtools.analysis.sample_complexity import crossing, estimate, fit_power_law
from cgtools.analysis.sweep import sweep_table
from cgtools.analysis.theory import theory
from cgtools.cli.main import app
from cgtools.formats.files import open_input
from cgtools.formats.results import read_results, results_table, write_results
from cgtools.grammar.rhm import draw_grammar

runner = CliRunner()
SIZES = np.unique(np.geomspace(10, 1e5, 25).astype(int))


def sigmoid(size, center, width=1.0):
    """A smooth rise in log P through 1/2 at P = center."""
    return 1.0 / (1.0 + np.exp(-(np.log(size) - math.log(center)) / width))


def accuracy_tables(curve, sizes=SIZES, tags=None, seeds=(0,), grammar=None):
    """One 'accuracy' table per (P, seed) with levels 1..L (tag L, default 2): the last level's
    accuracy is curve(P, seed), the lower ones min(1, 1.5 x that)."""
    out = []
    depth = (tags or {}).get("L", 2)
    for seed in seeds:
        for size in sizes:
            value = float(curve(size, seed))
            columns = {"level": list(range(1, depth + 1)), "accuracy": [min(1.0, value * 1.5)] * (depth - 1) + [value],
                       "n": [1000] * depth, "memorized": [None] * depth, "novel_valid": [None] * depth}
            t = results_table(columns, kind="accuracy", tags={"P": int(size), "seed": seed, **(tags or {})},
                              grammar=grammar)
            out.append(t)
    return out


def as_results(tables, tmp_path, prefix="t"):
    paths = []
    for i, t in enumerate(tables):
        path = tmp_path / f"{prefix}{i}.parquet"
        write_results(t, str(path), force=True)
        paths.append(path)
    return paths, [read_results(open_input(p)) for p in paths]


def run_estimate(tables, tmp_path, **kw):
    return estimate(sweep_table(as_results(tables, tmp_path)[1]), **kw)


def test_crossing_is_linear_in_log_p():
    # a curve linear in log P is recovered exactly even between far-apart points; linear
    # interpolation in P would give 1000 + 0.5 * 9000 = 5500 instead of sqrt(1000 * 10000)
    size = np.array([10.0, 100.0, 1000.0, 10000.0])
    value = np.log10(size) / 4  # 0.25, 0.5, 0.75, 1
    assert crossing(size, value, 0.6)[0] == pytest.approx(10 ** 2.4, rel=1e-12)
    assert crossing(size, value, 0.5) == (pytest.approx(100.0), "crossed")
    assert crossing(size, value, 0.1) == (None, "above")
    assert crossing(size, value, 1.1) == (None, "below")
    assert crossing(size, 1 - value, 0.6) == (None, "no-crossing")
    # the first upward crossing wins; with which="last", the one after which the curve stays up
    bumpy = np.array([0.0, 0.6, 0.4, 0.9])
    assert crossing(size, bumpy, 0.5)[0] == pytest.approx(10 ** (1 + 5 / 6))
    assert crossing(size, bumpy, 0.5, "last")[0] == pytest.approx(10 ** (3 + 1 / 5))
    assert crossing(size, value, 0.5, "last") == crossing(size, value, 0.5)  # one crossing: the same


def test_last_crossing_skips_a_memorisation_bump(tmp_path):
    # A_L high just above the smallest P (copies of a memorised training set), then the real rise
    # through 1/2 at P = 731: "first" finds the bump's crossing, "last" the rise, through the CLI too
    bump = lambda p, s: 0.1 if p == SIZES[0] else (0.8 if p < 25 else sigmoid(p, 731.0))  # noqa: E731
    tables = accuracy_tables(bump)
    first = run_estimate(tables, tmp_path).groups[0]
    last = run_estimate(tables, tmp_path, which="last").groups[0]
    assert first.p_star < 25 and last.p_star == pytest.approx(731.0, rel=0.02)
    paths, _ = as_results(tables, tmp_path, prefix="cli")
    res = runner.invoke(app, ["sample-complexity", *map(str, paths), "--crossing", "last", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["groups"][0]["p_star"] == pytest.approx(last.p_star)
    res = runner.invoke(app, ["sample-complexity", *map(str, paths), "--crossing", "middle"])
    assert res.exit_code == 2 and "first, last" in res.output


def test_sigmoid_crossing_recovered(tmp_path):
    # 25 points over 4 decades: interpolation error at most ~1% for this width (stated tolerance 2%)
    result = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, 731.0)), tmp_path)
    (g,) = result.groups
    assert g.status == "crossed" and g.level == 2 and g.size.size == SIZES.size
    assert g.p_star == pytest.approx(731.0, rel=0.02)
    assert g.p_star_lo is None and g.p_star_hi is None  # one seed: no spread to report
    # --level 1 uses the other row (1.5 x the curve crosses 1/2 at a third of the odds)
    g1 = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, 731.0)), tmp_path, level=1).groups[0]
    assert g1.level == 1 and g1.p_star == pytest.approx(731.0 / 2, rel=0.03)


def test_seeds_are_averaged_and_give_an_interval(tmp_path):
    centers = {0: 400.0, 1: 900.0, 2: 600.0}
    result = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, centers[s]), seeds=(0, 1, 2)), tmp_path)
    (g,) = result.groups
    assert g.seeds.tolist() == [3] * SIZES.size
    mean = np.mean([sigmoid(SIZES, c) for c in centers.values()], axis=0)
    assert g.mean == pytest.approx(mean)
    assert g.p_star == pytest.approx(crossing(SIZES.astype(float), mean, 0.5)[0])
    se = np.std([sigmoid(SIZES, c) for c in centers.values()], axis=0, ddof=1) / math.sqrt(3)
    assert g.p_star_lo == pytest.approx(crossing(SIZES.astype(float), mean + se, 0.5)[0])
    assert g.p_star_hi == pytest.approx(crossing(SIZES.astype(float), mean - se, 0.5)[0])
    assert 400 < g.p_star_lo < g.p_star < g.p_star_hi < 900


def test_no_crossing_and_one_sided_cases(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cgtools"):
        below = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, 1e7)), tmp_path).groups[0]
    assert (below.status, below.p_star, below.p_star_lo, below.p_star_hi) == ("below", None, SIZES[-1], None)
    assert "below 0.5 at every P" in caplog.text
    above = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, 1.0)), tmp_path).groups[0]
    assert (above.status, above.p_star, above.p_star_lo, above.p_star_hi) == ("above", None, None, SIZES[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgtools"):
        down = run_estimate(accuracy_tables(lambda p, s: 1 - sigmoid(p, 500.0)), tmp_path).groups[0]
    assert down.status == "no-crossing" and down.p_star is None and "never crosses" in caplog.text


def test_power_law_exponent_recovered_within_its_error(tmp_path):
    rng = np.random.default_rng(7)
    b_true, c = 3.0, 4.0
    ms = (2, 3, 4, 6, 8)
    tables = []
    for m in ms:
        # each seed's curve is shifted by a random factor: P* scatters around c m^b
        shifts = {s: math.exp(rng.normal(0, 0.15)) for s in range(3)}
        tables += accuracy_tables(lambda p, s: sigmoid(p, c * m**b_true * shifts[s]), seeds=(0, 1, 2),
                                  tags={"m": m, "L": 2})
    result = run_estimate(tables, tmp_path)
    assert [g.key for g in result.groups] == [{"m": m, "L": 2} for m in ms]
    (fit,) = result.fits
    assert fit.key == {"L": 2} and fit.theory_exponent == 3 and len(fit.m) == 5
    assert fit.exponent_err is not None and 0 < fit.exponent_err < 0.3
    assert abs(fit.exponent - b_true) < 3 * fit.exponent_err
    assert all(g.fit is fit for g in result.groups)
    # exact power law: exact exponent and prefactor
    b, err, pre = fit_power_law([2, 4, 8], [5 * 2**2.5, 5 * 4**2.5, 5 * 8**2.5])
    assert (b, pre) == (pytest.approx(2.5), pytest.approx(5.0)) and err == pytest.approx(0, abs=1e-9)
    assert fit_power_law([2, 4], [1, 8])[1] is None  # two points: no standard error


def test_grouping_by_tags(tmp_path, caplog):
    tables = []
    for L in (2, 3):
        for m in (2, 3):
            tables += accuracy_tables(lambda p, s: sigmoid(p, 10 * m ** (L + 1)), tags={"m": m, "L": L})
    result = run_estimate(tables, tmp_path)
    assert [tuple(g.key.values()) for g in result.groups] == [(2, 2), (2, 3), (3, 2), (3, 3)]
    for g in result.groups:
        assert g.p_star == pytest.approx(10 * g.key["m"] ** (g.key["L"] + 1), rel=0.02)
    assert [f.key for f in result.fits] == [{"L": 2}, {"L": 3}]
    assert [f.theory_exponent for f in result.fits] == [3, 4]
    assert [f.exponent for f in result.fits] == pytest.approx([3, 4], abs=0.1)
    # grouping by m alone mixes the depths: warned, averaged as replicates
    with caplog.at_level(logging.WARNING, logger="cgtools"):
        mixed = run_estimate(tables, tmp_path, by=["m"])
    assert len(mixed.groups) == 2 and "tag 'L' takes 2 values" in caplog.text


def test_theory_from_the_grammar_metadata(tmp_path):
    g = draw_grammar(3, 2, 8, 2, seed=0)
    p3 = theory(3, 2, 8, 2)["p_star"]
    result = run_estimate(accuracy_tables(lambda p, s: sigmoid(p, p3), grammar=g.to_json()), tmp_path, level=2)
    (group,) = result.groups
    # L, m come from the grammar (no tags); level 2 of an accuracy table is the theory's P_2
    assert group.key == {"m": 2, "L": 3}
    assert group.theory_exponent == 3 and group.theory_p_star == pytest.approx(theory(3, 2, 8, 2)["sample_complexity"][1])


def cluster_table(size, seed, m, context, ari):
    return results_table({"level": [1, 2], "ari": [1.0, ari], "n": [size] * 2, "n_values": [16] * 2,
                          "context": [context] * 2, "method": ["mean"] * 2, "oracle": [False] * 2},
                         kind="cluster", tags={"P": int(size), "seed": seed, "m": m, "L": 3})


def test_cluster_tables_group_by_context_and_use_ari(tmp_path):
    tables = [cluster_table(p, 0, m, ctx, float(sigmoid(p, (5 if ctx == "tuple" else 20) * m**4)))
              for m in (2, 3, 4) for ctx in ("token", "tuple") for p in SIZES]
    result = run_estimate(tables, tmp_path)
    assert result.quantity == "ari" and result.by == ["m", "L", "context"]
    assert len(result.groups) == 6 and {g.level for g in result.groups} == {2}
    # clustering level 2 needs the correlation with LCA at level 3: exponent l + 2 = 4
    assert [f.key for f in result.fits] == [{"L": 3, "context": "token"}, {"L": 3, "context": "tuple"}]
    for f in result.fits:
        assert f.theory_exponent == 4 and f.exponent == pytest.approx(4, abs=0.1)


def test_cli_on_tagged_tables(tmp_path):
    tables = []
    for m in (2, 3, 4):
        tables += accuracy_tables(lambda p, s: sigmoid(p, 3 * m**3 * (1.2 if s else 0.8)), seeds=(0, 1),
                                  tags={"m": m, "L": 2})
    paths, _ = as_results(tables, tmp_path, "acc")
    res = runner.invoke(app, ["sample-complexity", *map(str, paths), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert [g["m"] for g in report["groups"]] == [2, 3, 4]
    assert all(g["status"] == "crossed" and g["n_seeds"] == 2 and g["p_star_lo"] < g["p_star"] < g["p_star_hi"]
               for g in report["groups"])
    assert report["fit"][0]["exponent"] == pytest.approx(3, abs=0.1) and report["fit"][0]["theory_exponent"] == 3
    out = tmp_path / "pstar.parquet"
    res = runner.invoke(app, ["sample-complexity", *map(str, paths), "-o", str(out)])
    assert res.exit_code == 0 and res.stdout == ""
    meta = json.loads(pq.read_schema(out).metadata[b"cgtools"])
    assert meta["kind"] == "sample-complexity" and meta["source_kind"] == "accuracy" and meta["by"] == ["m", "L"]
    rows = pq.read_table(out).to_pylist()
    assert [r["m"] for r in rows] == [2, 3, 4]
    assert {r["exponent"] for r in rows} == {report["fit"][0]["exponent"]} and {r["theory_exponent"] for r in rows} == {3}
    for col in ("p_star", "p_star_lo", "p_star_hi", "n_points", "exponent_err", "status"):
        assert col in rows[0]
    res = runner.invoke(app, ["sample-complexity", *map(str, paths), "-o", str(out)])
    assert res.exit_code == 1 and "--force" in res.stderr
    res = runner.invoke(app, ["sample-complexity", *map(str, paths)])
    assert res.exit_code == 0 and "b = 2.99" in res.stdout and "(theory: 3)" in res.stdout


def one_line_error(res, *needles):
    assert res.exit_code == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_errors(tmp_path):
    paths, _ = as_results(accuracy_tables(lambda p, s: sigmoid(p, 100.0), sizes=[10, 1000]), tmp_path)
    corr = tmp_path / "corr.parquet"
    write_results(results_table({"distance": [1], "correlation": [0.1], "noise_floor": [0.01], "n": [10],
                                 "mode": ["positional"], "theory": [None]}, kind="correlation"), str(corr), True)
    one_line_error(runner.invoke(app, ["sample-complexity", str(paths[0]), str(corr)]),
                   str(corr), "'correlation'", "'accuracy'")
    clus = tmp_path / "cl.parquet"
    write_results(cluster_table(10, 0, 2, "token", 0.3), str(clus), True)
    one_line_error(runner.invoke(app, ["sample-complexity", str(paths[0]), str(clus)]), "one kind")
    untagged = tmp_path / "untagged.parquet"
    write_results(results_table({"level": [1], "accuracy": [0.3], "n": [5], "memorized": [None],
                                 "novel_valid": [None]}, kind="accuracy"), str(untagged), True)
    one_line_error(runner.invoke(app, ["sample-complexity", str(untagged)]), "'P'", "--tag P=")
    one_line_error(runner.invoke(app, ["sample-complexity", *map(str, paths), "--by", "nope"]), "'nope'")
