"""`measure-accuracy -o`: the 'accuracy' results table, its tags, and a sweep read back."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cgtools.analysis.sample_complexity import estimate
from cgtools.analysis.sweep import sweep_table
from cgtools.cli.main import app
from cgtools.formats.files import open_input
from cgtools.formats.results import read_results

runner = CliRunner()
GEN = ["rhm-gen", "-L", "3", "-s", "2", "-v", "8", "-m", "2"]


def run(*args, input=None):
    return runner.invoke(app, list(map(str, args)), input=input)


@pytest.fixture
def data(tmp_path):
    train, samples = tmp_path / "train.parquet", tmp_path / "s.parquet"
    assert run(*GEN, "-n", 200, "-o", train).exit_code == 0
    assert run(*GEN, "-n", 300, "--seed", 0, "-o", samples).exit_code == 0
    return train, samples


def test_table_matches_the_json_report(data, tmp_path):
    train, samples = data
    report = json.loads(run("measure-accuracy", samples, "--train", train, "--json").stdout)
    out = tmp_path / "acc.parquet"
    res = run("measure-accuracy", samples, "--train", train, "-o", out, "--tag", "P=200", "--tag", "seed=1")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""  # -o without --json: stdout stays free
    result = read_results(open_input(out), kind="accuracy")
    assert result.tags == {"P": 200, "seed": 1}
    assert result.meta["grammar"]["depth"] == 3 and result.meta["provenance"]["tool"] == "cgtools measure-accuracy"
    assert set(result.meta["provenance"]["inputs"]) == {str(samples), str(train)}
    rows = result.rows()
    assert [r["level"] for r in rows] == [1, 2, 3]
    assert [r["accuracy"] for r in rows] == report["accuracy"]
    assert {r["n"] for r in rows} == {300} and {r["memorized"] for r in rows} == {report["memorized"]}
    assert {r["novel_valid"] for r in rows} == {report["novel_valid"]}
    assert {(r["P"], r["seed"]) for r in rows} == {(200, 1)}
    # --json and -o together: both
    res = run("measure-accuracy", samples, "-o", tmp_path / "b.parquet", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["accuracy"] == report["accuracy"]
    nulls = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert {r["memorized"] for r in nulls} == {None} and {r["novel_valid"] for r in nulls} == {None}


def test_output_checked_before_measuring_and_force(data, tmp_path):
    _, samples = data
    out = tmp_path / "acc.parquet"
    out.write_bytes(b"precious")
    res = run("measure-accuracy", samples, "-o", out)
    assert res.exit_code == 1 and "--force" in res.stderr and out.read_bytes() == b"precious"
    missing = tmp_path / "nope" / "acc.parquet"
    res = run("measure-accuracy", tmp_path / "missing.parquet", "-o", missing)
    assert res.exit_code == 1 and "no such directory" in res.stderr  # the output fails first
    assert run("measure-accuracy", samples, "-o", out, "--force").exit_code == 0
    assert pq.read_table(out).num_rows == 3
    assert run("measure-accuracy", samples, "-o", "-", "--json").exit_code == 2
    res = run("measure-accuracy", samples, "-o", tmp_path / "c.parquet", "--tag", "level=3")
    assert res.exit_code == 2 and not (tmp_path / "c.parquet").exists()
    assert run("measure-accuracy", samples, "-o", tmp_path / "c.parquet", "--tag", "junk").exit_code == 1


def test_tagged_runs_concatenate_into_a_sweep(data, tmp_path):
    """Tables written by several tagged runs feed sample-complexity as one sweep."""
    train, samples = data
    paths = []
    for size in (10, 50, 200):
        subset = tmp_path / f"train{size}.parquet"
        assert run(*GEN, "-n", size, "-o", subset).exit_code == 0
        path = tmp_path / f"acc_P{size}.parquet"
        assert run("measure-accuracy", samples, "--train", subset, "-o", path, "--tag", f"P={size}",
                   "--tag", "seed=0").exit_code == 0
        paths.append(path)
    sweep = sweep_table([read_results(open_input(p)) for p in paths])
    assert sweep.table.num_rows == 9 and sweep.tags[:2] == ["P", "seed"]
    assert set(sweep.table.column("m").to_pylist()) == {2}  # from the grammar metadata
    result = estimate(sweep)
    (group,) = result.groups
    # every sample is grammatical: the curve is above 1/2 at every P
    assert group.key == {"m": 2, "L": 3} and group.status == "above" and group.p_star_hi == 10
