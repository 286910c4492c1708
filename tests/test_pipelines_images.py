"""pipelines/image_mmd end to end: `make tiny` (digits split, train the image DDPM 20 steps, sample
two checkpoints, MMD per depth against the held-out digits and the real-vs-real reference, the
figure, image grids, the summary); a rerun does nothing; a lost table is rebuilt alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from tests.test_pipelines_clustering import assert_real_png

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="the pipelines need GNU make")
LAYERS = [f"stage{k}" for k in range(1, 8)]


def make(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.run([MAKE, "-C", str(ROOT / "pipelines" / "image_mmd"), *args, "tiny", f"OUT={out}"],
                          env=env, capture_output=True, text=True, timeout=900)


def meta_of(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"cgtools"])


def test_image_mmd_tiny(tmp_path):
    out = tmp_path / "out"
    done = make(out)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert meta_of(out / "data" / "train.parquet")["count"] + meta_of(out / "data" / "test.parquet")["count"] == 1797
    for step in (10, 20):
        samples = out / "samples" / f"step{step}.parquet"
        meta = meta_of(samples)
        assert meta["schema"] == "images/1" and (meta["height"], meta["width"], meta["channels"]) == (8, 8, 1)
        assert pq.read_table(samples).num_rows == 16
        table = out / "tables" / f"mmd_step{step}.parquet"
        assert meta_of(table)["kind"] == "mmd" and meta_of(table)["tags"] == {"step": step}
        rows = pq.read_table(table).to_pylist()
        assert [r["layer"] for r in rows] == LAYERS and all(r["n_gen"] == 16 and r["n_ref"] == 64 for r in rows)
        # 20 steps of training make noise, not digits: clearly apart from the real images at every depth
        assert all(r["mmd2"] > 5 * r["mmd2_err"] for r in rows), rows
    ref = pq.read_table(out / "tables" / "mmd_data.parquet").to_pylist()
    assert meta_of(out / "tables" / "mmd_data.parquet")["tags"] == {"reference": "train"}
    assert all(abs(r["mmd2"]) < 4 * r["mmd2_err"] for r in ref), ref  # real vs real: 0 within its noise
    assert_real_png(out / "fig_mmd.png")
    for name in ("step10", "step20", "data"):
        grid = imread(out / "grids" / f"{name}.png")
        assert grid.shape[0] > 100 and grid[..., :3].std() > 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [10, 20] and summary["layers"] == LAYERS
    assert summary["mmd2"]["20"] == pytest.approx([r["mmd2"] for r in
                                                   pq.read_table(out / "tables" / "mmd_step20.parquet").to_pylist()])
    assert "convergence step" in (out / "summary.txt").read_text()

    again = make(out, "-n")
    assert again.returncode == 0 and "cgtools" not in again.stdout, again.stdout
    (out / "tables" / "mmd_step20.parquet").unlink()
    redo = make(out, "-n")
    commands = [line for line in redo.stdout.splitlines() if "cgtools " in line and "/cgtools " in line]
    assert redo.returncode == 0 and any("mmd" in c and "step20" in c for c in commands), redo.stdout
    assert not any(" train " in c or " sample " in c for c in commands), redo.stdout
