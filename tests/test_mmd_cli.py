"""`cgtools mmd` as a user runs it: near 0 between disjoint halves of one image set, clearly
positive against other images, at every depth; the JSON and the results table; one-line errors.

Small and fast: 8x8 digits at --resolution 32, at most 240 images a side, 20 bootstrap resamples.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.files import open_input
from cgtools.formats.results import read_results
from tests.helpers import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
LAYERS = [f"stage{k}" for k in range(1, 8)]
FAST = ["--resolution", "32", "--bootstrap", "20", "--limit", "240"]


def run(*args):
    return runner.invoke(app, [*map(str, args)])


def ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Digits split into two random halves (so the first rows of each half come from the same
    writers: --limit takes the first rows), uniform noise, and scikit-image's photos as 8x8 greys."""
    d = tmp_path_factory.mktemp("mmd")
    paths = {name: d / f"{name}.parquet" for name in ("half_a", "half_b", "noise", "photos")}
    ok(run("images", "digits", "--split", "train", "--test-fraction", "0.5", "-o", paths["half_a"]))
    ok(run("images", "digits", "--split", "test", "--test-fraction", "0.5", "-o", paths["half_b"]))
    ok(run("images", "noise", "--size", "8", "-n", "240", "-o", paths["noise"]))
    ok(run("images", "photos", "--size", "8", "--channels", "1", "-o", paths["photos"]))
    return paths


_RUNS: dict = {}


def mmd_json(gen, ref):
    """`cgtools mmd GEN REF --json` with the FAST options (each pair runs once per session)."""
    if (gen, ref) not in _RUNS:
        _RUNS[gen, ref] = ok(run("mmd", gen, ref, *FAST, "--json")).stdout
    out = json.loads(_RUNS[gen, ref])
    assert out["depth"] == LAYERS and len(out["mmd2"]) == len(LAYERS) == len(out["mmd2_err"])
    assert out["backbone"] == "efficientnet-lite0" and out["resolution"] == 32 and out["bootstrap"] == 20
    return np.array(out["mmd2"]), np.array(out["mmd2_err"]), out


def test_disjoint_halves_of_one_set_are_near_zero(tables):
    """Both halves are draws from one distribution: MMD²_u has mean 0, and its bootstrap error is
    a (conservative) scale for its spread, so |mmd2| < 3 errors at each of the 7 depths."""
    mmd2, err, out = mmd_json(tables["half_a"], tables["half_b"])
    assert out["n_gen"] == out["n_ref"] == 240
    assert np.all(err > 0)
    assert np.all(np.abs(mmd2) < 3 * err), (mmd2, err)
    assert np.all(np.abs(mmd2) < 0.02)  # and small on the scale of a Gaussian kernel's MMD² (at most 2)


@pytest.mark.parametrize("other", ["noise", "photos"])
def test_other_images_are_clearly_positive_at_every_depth(tables, other):
    mmd2, err, out = mmd_json(tables["half_a"], tables[other])
    assert np.all(mmd2 > 5 * err), (mmd2, err)
    assert np.all(mmd2 > 0.1)
    same, _, _ = mmd_json(tables["half_a"], tables["half_b"])
    assert np.all(mmd2 > 10 * np.abs(same))


def test_results_table_with_tags(tables, tmp_path):
    out = tmp_path / "mmd.parquet"
    res = ok(run("mmd", tables["half_a"], tables["noise"], *FAST, "-o", out, "--tag", "step=100", "--tag", "seed=0"))
    assert res.stdout == ""
    results = read_results(open_input(out), kind="mmd")
    rows = results.table.to_pylist()
    assert [r["layer"] for r in rows] == LAYERS and [r["depth"] for r in rows] == list(range(7))
    assert [r["dim"] for r in rows] == [16, 24, 40, 80, 112, 192, 320]
    assert all(r["step"] == 100 and r["seed"] == 0 for r in rows)
    assert all(r["n_gen"] == 240 and r["n_ref"] == 240 and r["mmd2"] > 5 * r["mmd2_err"] for r in rows)
    assert results.meta["tags"] == {"step": 100, "seed": 0}
    assert results.meta["backbone"] == "efficientnet-lite0" and results.meta["resolution"] == 32
    # the same comparison printed as JSON gives the same numbers (seeded bootstrap)
    mmd2, err, _ = mmd_json(tables["half_a"], tables["noise"])
    np.testing.assert_allclose([r["mmd2"] for r in rows], mmd2, rtol=1e-12)
    np.testing.assert_allclose([r["mmd2_err"] for r in rows], err, rtol=1e-12)
    # an existing table is kept without --force
    again = run("mmd", tables["half_a"], tables["noise"], *FAST, "-o", out)
    one_line_error(again, "--force")


def test_plain_table_on_stdout(tables):
    res = ok(run("mmd", tables["half_a"], tables["half_b"], "--resolution", "32", "--limit", "20",
                 "--bootstrap", "0"))
    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["depth", "layer", "dim", "mmd2"] and len(lines) == 8
    assert [line.split()[1] for line in lines[1:]] == LAYERS


def one_line_error(res, *needles):
    assert_one_line_error(res, *needles, command="mmd")


def test_errors_are_one_line(tables, tmp_path):
    a = tables["half_a"]
    out = tmp_path / "r.parquet"
    one_line_error(run("mmd", tmp_path / "missing.parquet", a, "-o", out), "missing.parquet", "no such file")
    seq = tmp_path / "seq.parquet"
    ok(run("rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "8", "-o", seq))
    one_line_error(run("mmd", a, seq, "-o", out), "seq.parquet", "not an image table")
    results = tmp_path / "results.parquet"
    ok(run("mmd", a, tables["noise"], *FAST, "--bootstrap", "0", "-o", results))
    one_line_error(run("mmd", results, a, "-o", out), "results.parquet", "not an image table")
    one_line_error(run("mmd", a, tables["noise"], "--backbone", "resnet18", "-o", out), "--weights")
    text = tmp_path / "weights.pth"
    text.write_text("not weights")
    one_line_error(run("mmd", a, tables["noise"], "--backbone", "resnet18", "--weights", text, "-o", out),
                   "weights.pth")
    one_line_error(run("mmd", a, tables["noise"], "--limit", "1", "-o", out), "at least 2")
    assert run("mmd", a, tables["noise"], "--backbone", "vgg", "-o", out).exit_code == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
