"""The diffusion pipelines (pipelines/fig1a, fig1b, fig1c, fig6 over pipelines/diffusion.mk) end to end.

`make -C pipelines/<fig> tiny OUT=<tmp>` runs the whole chain on a width-16 network for 40 steps:
rhm-gen, cgtools sweep, sample, measure-accuracy, correlate (and --exact), sensitivity, the online
run, the figures and the summary. The four figure Makefiles share one OUT, so the test runs them
one after another on one directory: the later ones reuse the trained runs (a dry run then shows
nothing left to do), and a lost table is rebuilt alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="the pipelines need GNU make")
FIGURES = ("fig1a", "fig1b", "fig1c", "fig6")
SIZES, LEVELS = (32, 128), (1, 2, 3)


def make(fig: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-C", str(ROOT / "pipelines" / fig), *args, "tiny", f"OUT={out}"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diffusion") / "out"
    for fig in FIGURES:
        proc = make(fig, out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_every_figure_is_a_real_png(out):
    for fig in FIGURES + ("fig1c_novel",):
        image = imread(out / f"{fig}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.01, f"{fig}.png is blank"


def test_one_tagged_accuracy_table_per_run_with_every_level(out):
    for p in SIZES:
        table = rows(out / "tables" / f"acc_P{p}_s0.parquet")
        assert sorted(r["level"] for r in table) == list(LEVELS)
        assert all(r["P"] == p and r["seed"] == 0 and r["m"] == 2 and r["L"] == 3 for r in table)
        assert all(0 <= r["accuracy"] <= 1 and r["n"] == 64 for r in table)
        # A_l is the fraction whose rules hold at every level up to l: it cannot grow with l
        acc = [r["accuracy"] for r in sorted(table, key=lambda r: r["level"])]
        assert acc == sorted(acc, reverse=True)


def test_the_runs_are_the_sweeps_and_trained_to_the_end(out):
    manifest = (out / "runs.csv").read_text().splitlines()
    assert manifest[0] == "data,val,out,seed" and len(manifest) == 1 + len(SIZES)
    for p in SIZES:
        metrics = rows(out / "runs" / f"P{p}_s0" / "metrics.parquet")
        assert max(r["step"] for r in metrics) == 40
    online = rows(out / "online" / "metrics.parquet")
    assert max(r["step"] for r in online) == 40


def test_the_training_sets_have_their_sizes_and_miss_the_validation_set(out):
    val = {tuple(r["tokens"]) for r in rows(out / "data" / "val.parquet")}
    for p in SIZES:
        train = [tuple(r["tokens"]) for r in rows(out / "data" / f"train_P{p}_s0.parquet")]
        assert len(train) == len(set(train)) == p and not val & set(train)


def test_correlation_and_sensitivity_tables(out):
    exact = rows(out / "tables" / "corr_exact.parquet")
    assert [r["distance"] for r in exact] == list(range(1, 8))
    for p in SIZES:
        corr = rows(out / "tables" / f"corr_P{p}_s0.parquet")
        assert all(r["P"] == p for r in corr) and len(corr) == 7
        novel = rows(out / "tables" / f"novelcorr_P{p}_s0.parquet")
        samples = {tuple(r["tokens"]) for r in rows(out / "samples" / f"P{p}_s0.parquet")}
        train = {tuple(r["tokens"]) for r in rows(out / "data" / f"train_P{p}_s0.parquet")}
        copies = sum(tuple(r["tokens"]) in train for r in rows(out / "samples" / f"P{p}_s0.parquet"))
        assert all(r["P"] == p and r["n"] == 64 - copies for r in novel) and len(novel) == 7, (copies, len(samples))
        sens = rows(out / "tables" / f"sens_P{p}_s0.parquet")
        assert {r["level"] for r in sens} == set(LEVELS) and all(r["P"] == p for r in sens)


def test_summary_matches_the_tables(out):
    summary = json.loads((out / "summary.json").read_text())
    assert [r["P"] for r in summary["rows"]] == list(SIZES)
    for r in summary["rows"]:
        table = {t["level"]: t["accuracy"] for t in rows(out / "tables" / f"acc_P{r['P']}_s0.parquet")}
        assert all(abs(r[f"A{l}"] - table[l]) < 1e-12 for l in LEVELS)
    assert [p["theory"] for p in summary["p_star"]] == pytest.approx([128 / 3, 256 / 3, 512 / 3])
    assert "P_l*" in (out / "summary.txt").read_text()


def test_reruns_do_nothing_and_a_lost_table_is_rebuilt_alone(out):
    for fig in FIGURES:
        plan = make(fig, out, "-n").stdout
        assert "cgtools" not in plan and "diffusion.py" not in plan, plan
    lost = out / "tables" / "corr_P128_s0.parquet"
    lost.unlink()
    plan = make("fig1c", out, "-n").stdout
    commands = [line for line in plan.splitlines() if "/cgtools " in line]
    assert len(commands) == 2 and "correlate" in commands[0] and "plot correlation" in commands[1], plan
    assert make("fig1c", out).returncode == 0 and lost.exists()
