"""The clustering sample-complexity pipelines (pipelines/fig7, pipelines/fig2) end to end.

`make -C pipelines/<fig> tiny OUT=<tmp>` runs the whole chain (rhm-gen, cluster per P, sample-
complexity, plot cluster and sample-complexity, the summary) on tiny grammars. Both pipelines
run at once (two processes, one per core) to keep the module under half a minute; fig2 also
gets a synthetic diffusion P* table through DIFFUSION=. Then: the kind, tags and rows of every
table, the figures are real PNGs, and a dry run shows that finished targets are not redone and
a missing one is (make's own timestamps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.results import results_table, write_results
from cgtools.grammar.rhm import draw_grammar

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="the pipelines need GNU make")

# What the tiny targets of the Makefiles run (TINY_VARS there).
TINY = {
    "fig7": {"L": 3, "ms": [2, 3], "sizes": [100, 1000], "contexts": ["token"], "algos": ["hier", "oracle"]},
    "fig2": {"L": 2, "ms": [2, 3], "sizes": [25, 250], "contexts": ["token", "tuple"], "algos": ["hier"]},
}


def meta_of(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"cgtools"])


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400, path
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05, f"{path} is blank"
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25  # curves are coloured, empty axes are not
    assert colourful.mean() > 0.002, f"{path} has no curves"


def diffusion_pstar(out: Path, tmp: Path) -> None:
    """A diffusion P* table as the training sweep will give it: `cgtools sample-complexity` on
    'accuracy' tables (A_L rising through 1/2 at P = 2 m^3), tagged P, m, L."""
    paths = []
    for m in (2, 3):
        grammar = draw_grammar(2, 2, 8, m, None, 0).to_json()
        for size in (8, 16, 32, 64, 128):
            a = 1 / (1 + math.exp(-(math.log(size) - math.log(2 * m**3))))
            table = results_table({"level": [1, 2], "accuracy": [min(1.0, 1.5 * a), a], "n": [512, 512],
                                   "memorized": [None, None], "novel_valid": [None, None]},
                                  kind="accuracy", tags={"P": size, "m": m, "L": 2, "seed": 0}, grammar=grammar)
            path = tmp / f"acc_m{m}_P{size}.parquet"
            write_results(table, str(path), force=True)
            paths.append(str(path))
    res = CliRunner().invoke(app, ["sample-complexity", *paths, "-o", str(out)])
    assert res.exit_code == 0, res.output


def make(fig: str, out: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.Popen([MAKE, "-C", str(ROOT / "pipelines" / fig), *args, f"OUT={out}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    diffusion_pstar(base / "diffusion_pstar.parquet", tmp_path_factory.mktemp("acc"))
    procs = {"fig7": make("fig7", base / "fig7", "tiny"),
             "fig2": make("fig2", base / "fig2", "tiny", f"DIFFUSION={base / 'diffusion_pstar.parquet'}")}
    for fig, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"make {fig} tiny failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return base


@pytest.mark.parametrize("fig", list(TINY))
def test_run_tables(outputs, fig):
    """One 'cluster' table per (m, seed, context, algorithm, P), tagged, with one row per level."""
    t = TINY[fig]
    runs = sorted((outputs / fig / "runs").glob("*.parquet"))
    expected = {f"m{m}_seed0_{c}_{a}_P{p}.parquet" for m in t["ms"] for c in t["contexts"] for a in t["algos"]
                for p in t["sizes"]}
    assert {p.name for p in runs} == expected
    assert not list((outputs / fig).rglob("*.tmp*")), "a temporary file was left behind"
    for path in runs:
        meta = meta_of(path)
        m, _, context, algo, size = path.stem.split("_")
        assert meta["kind"] == "cluster"
        assert meta["tags"] == {"P": int(size[1:]), "m": int(m[1:]), "L": t["L"], "seed": 0}
        assert meta["grammar"]["depth"] == t["L"] and meta["grammar"]["synonyms"] == int(m[1:])
        rows = pq.read_table(path).to_pylist()
        levels = list(range(1, t["L"])) if algo == "hier" else [t["L"] - 1]
        assert [r["level"] for r in rows] == levels
        assert all(r["context"] == context and r["oracle"] == (algo == "oracle") for r in rows)
        assert all(r["n"] == int(size[1:]) and r["P"] == int(size[1:]) and -1 <= r["ari"] <= 1 for r in rows)


def test_sample_complexity_tables(outputs):
    """P* per (m, context[, oracle]) of the top level (L - 1, theory exponent L + 1), and level 1."""
    cases = [("fig7", "pstar_level2.parquet", 2, 4, ["m", "L", "context", "oracle"], 2 * 2),
             ("fig7", "pstar_level1.parquet", 1, 3, ["m", "L", "context"], 2),
             ("fig2", "pstar_level1.parquet", 1, 3, ["m", "L", "context"], 2 * 2)]
    for fig, name, level, exponent, by, n_rows in cases:
        path = outputs / fig / name
        meta = meta_of(path)
        assert meta["kind"] == "sample-complexity" and meta["source_kind"] == "cluster" and meta["by"] == by
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == n_rows and {r["m"] for r in rows} == {2, 3}
        assert {r["level"] for r in rows} == {level} and {r["theory_exponent"] for r in rows} == {exponent}
        assert all(r["n_points"] == 2 and r["status"] in ("crossed", "above", "below", "no-crossing") for r in rows)
    assert not (outputs / "fig2" / "pstar_level2.parquet").exists()  # L = 2: level 1 is the top


@pytest.mark.parametrize("fig", list(TINY))
def test_summary(outputs, fig):
    summary = json.loads((outputs / fig / "summary.json").read_text())
    assert summary["figure"] == fig and summary["seeds"] == [0] and summary["synonyms"] == [2, 3]
    top = TINY[fig]["L"] - 1
    assert {f["theory_exponent"] for f in summary["fits"] if f["level"] == top} == {TINY[fig]["L"] + 1}
    cluster = [r for r in summary["p_star"] if r["source"] == "cluster"]
    assert len(cluster) == len(pq.read_table(outputs / fig / f"pstar_level{top}.parquet")) + (
        2 if fig == "fig7" else 0)  # fig7 also summarises level 1 (2 rows)
    diffusion = [r for r in summary["p_star"] if r["source"] == "diffusion"]
    # fig2 gets the synthetic diffusion table (DIFFUSION=): its rows, level 2, m = 2 and 3
    assert sorted(r["m"] for r in diffusion) == ([2, 3] if fig == "fig2" else [])
    assert {r["level"] for r in diffusion} <= {2}
    for f in summary["fits"]:
        if f["exponent"] is not None:
            assert math.isclose(f["relative_deviation"], f["exponent"] / f["theory_exponent"] - 1)
    text = (outputs / fig / "summary.txt").read_text()
    assert text.startswith(fig) and "exponent b" in text and "P*/P_L" in text


@pytest.mark.parametrize("name", ["fig7/fig7_ari.png", "fig7/fig7_pstar.png", "fig7/fig7_pstar_level1.png",
                                  "fig2/fig2_ari.png", "fig2/fig2_pstar.png"])
def test_figures_are_real_pngs(outputs, name):
    assert_real_png(outputs / name)


def dry_run(fig: str, out: Path, *args: str) -> str:
    proc = make(fig, out, "-n", "tiny", *args)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return stdout


def test_reruns_skip_finished_targets_and_resume(outputs):
    """Every table is a target: nothing is redone, a missing run is redone with what depends on it,
    and the diffusion table is a prerequisite of the P* figure (given through DIFFUSION=)."""
    diffusion = f"DIFFUSION={outputs / 'diffusion_pstar.parquet'}"
    assert "cgtools" not in dry_run("fig7", outputs / "fig7")
    assert "cgtools" not in dry_run("fig2", outputs / "fig2", diffusion)
    lost = outputs / "fig7" / "runs" / "m3_seed0_token_oracle_P1000.parquet"
    moved = lost.with_suffix(".kept")
    lost.rename(moved)
    try:
        plan = dry_run("fig7", outputs / "fig7")
    finally:
        moved.rename(lost)
    commands = [line for line in plan.splitlines() if "cgtools" in line]
    assert sum("cgtools cluster" in c for c in commands) == 1 and "--oracle" in plan and "--limit 1000" in plan
    assert "rhm-gen" not in plan
    rebuilt = [c.split(" -o ")[1].split()[0] for c in commands if "sample-complexity" in c and " -o " in c]
    # level 2 depends on the lost oracle run; level 1 (hierarchical runs only) is kept; the summary
    # reads both (its command names pstar_level1 as an input, not as an output)
    assert [Path(r).name for r in rebuilt if r.endswith(".parquet")] == ["pstar_level2.parquet"], plan
    os.utime(outputs / "diffusion_pstar.parquet")  # newer than the figure: only the P* figure is redrawn
    plan = dry_run("fig2", outputs / "fig2", diffusion)
    commands = [line for line in plan.splitlines() if "cgtools" in line]
    assert len(commands) == 1 and "plot sample-complexity" in commands[0]
    assert str(outputs / "diffusion_pstar.parquet") in plan


def test_fig2_diffusion_chain_trains_samples_and_fits_over_m(tmp_path):
    """`make tiny-diffusion`: one diffusion.mk sweep per m (rhm-gen, sweep, sample, measure-accuracy),
    one sample-complexity table over all m from the accuracy tables, drawn and summarised with the
    clustering; a rerun redoes nothing."""
    out = tmp_path / "fig2"
    proc = make("fig2", out, "tiny-diffusion")
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    for m in (2, 3):
        for size in (16, 48):
            acc = out / "diffusion" / f"m{m}" / "tables" / f"acc_P{size}_s0.parquet"
            meta = meta_of(acc)
            assert meta["kind"] == "accuracy" and meta["tags"]["P"] == size and meta["tags"]["m"] == m
            assert meta["grammar"]["synonyms"] == m and meta["grammar"]["depth"] == 2
            rows = pq.read_table(acc).to_pylist()
            assert [r["level"] for r in rows] == [1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
            run = out / "diffusion" / f"m{m}" / "runs" / f"P{size}_s0"
            steps = [r["step"] for r in pq.read_table(run / "metrics.parquet").to_pylist()]
            assert steps == [1, 2, 3, 6, 10, 18, 20, 40]  # --early-evals 4 before --eval-every 20
    pstar = out / "diffusion_pstar.parquet"
    meta = meta_of(pstar)
    assert meta["kind"] == "sample-complexity" and meta["source_kind"] == "accuracy" and meta["by"] == ["m", "L"]
    rows = pq.read_table(pstar).to_pylist()
    assert sorted(r["m"] for r in rows) == [2, 3] and {r["level"] for r in rows} == {2}
    assert all(r["n_points"] == 2 and r["theory_exponent"] == 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    sources = {f.get("source") for f in summary["fits"]}
    assert sources == {"cluster", "diffusion"}
    assert len([r for r in summary["p_star"] if r["source"] == "diffusion"]) == 2
    assert_real_png(out / "fig2_pstar.png")
    stdout, stderr = make("fig2", out, "-n", "tiny-diffusion").communicate(timeout=300)
    assert "cgtools" not in stdout, stdout
