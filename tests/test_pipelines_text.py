"""pipelines/text_coherence end to end: `make tiny` (tokenize Shakespeare, train the text
transformer 20 steps, sample two checkpoints, pooled correlations, perplexity under a tiny random
local LM, detokenized texts, both figures, the summary); a rerun does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from tests.test_perplexity import _save_tiny_model
from tests.test_pipelines_clustering import assert_real_png

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="the pipelines need GNU make")


def make(out: Path, lm: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.run([MAKE, "-C", str(ROOT / "pipelines" / "text_coherence"), *args, "tiny", f"OUT={out}",
                           f"TINY_LM={lm}"], env=env, capture_output=True, text=True, timeout=600)


def meta_of(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"cgtools"])


def test_text_coherence_tiny(tmp_path):
    lm = _save_tiny_model(tmp_path / "lm")
    out = tmp_path / "out"
    done = make(out, lm)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    train = meta_of(out / "data" / "train.parquet")
    assert train["grammar"] is None and train["tokenizer"]["kind"] == "chars" and train["vocab"] > 40
    for step in (10, 20):
        samples = out / "samples" / f"step{step}.parquet"
        meta = meta_of(samples)
        assert meta["tokenizer"] == train["tokenizer"] and meta["vocab"] == train["vocab"]
        assert pq.read_table(samples).num_rows == 8
        corr = meta_of(out / "tables" / f"corr_step{step}.parquet")
        assert corr["kind"] == "correlation" and corr["tags"] == {"step": step}
        rows = pq.read_table(out / "tables" / f"corr_step{step}.parquet").to_pylist()
        assert [r["distance"] for r in rows] == list(range(1, 9)) and all(r["mode"] == "pooled" for r in rows)
        ppl = pq.read_table(out / "tables" / f"ppl_step{step}.parquet").to_pylist()
        assert ppl and all(r["perplexity"] > 1 and r["n"] > 0 for r in ppl)
        text = (out / "texts" / f"step{step}.txt").read_text()
        assert text.count("--- sequence") == 3
    assert meta_of(out / "tables" / "ppl_data.parquet")["tags"] == {"reference": "data"}
    assert_real_png(out / "fig_correlation.png")
    # the tiny judge's word-level vocabulary sees random characters as one or two unknown tokens,
    # so the samples' perplexity curves are single points: a real, non-blank image is what is checked
    pixels = imread(out / "fig_perplexity.png")
    assert (out / "fig_perplexity.png").read_bytes()[:4] == b"\x89PNG" and pixels.shape[0] > 300
    assert pixels[..., :3].std() > 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"10", "20", "data"}
    assert summary["stages"]["20"]["tokens"] == 20 * 32 * 32  # steps x batch (text preset) x length
    assert "== data (validation chunks) ==" in (out / "summary.txt").read_text()
    again = make(out, lm, "-n")
    assert again.returncode == 0 and "cgtools" not in again.stdout, again.stdout
