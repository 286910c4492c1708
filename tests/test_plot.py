"""`cgtools plot`: every figure kind from synthetic tables, formats, errors, no overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.metrics import write_metrics
from cgtools.formats.results import results_table, write_results
from cgtools.grammar.rhm import draw_grammar
from tests.helpers import assert_one_line_error

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
GRAMMAR = draw_grammar(3, 2, 8, 2, seed=0)
SIZES = (32, 128, 512, 2048)


def rise(size, center):
    return float(1 / (1 + (center / size) ** 2))


def write(path, columns, kind, tags=None, grammar=None):
    write_results(results_table(columns, kind=kind, tags=tags, grammar=grammar), str(path), force=True)
    return path


def accuracy_tables(tmp_path):
    paths = []
    for size in SIZES:
        for seed in (0, 1):
            acc = [rise(size, 40 * 2**level) * (0.97 + 0.02 * seed) for level in (1, 2, 3)]
            paths.append(write(tmp_path / f"acc_P{size}_s{seed}.parquet",
                               {"level": [1, 2, 3], "accuracy": acc, "n": [500] * 3, "memorized": [0.1] * 3,
                                "novel_valid": [0.6] * 3}, "accuracy", {"P": size, "seed": seed}, GRAMMAR.to_json()))
    return paths


def correlation_tables(tmp_path):
    d = np.arange(1, 8)
    paths = []
    for size in SIZES:
        floor = 1 / (8 * np.sqrt(size))
        corr = 0.1 * d**-1.0 * (1 - np.exp(-size / 200 / d)) + floor
        paths.append(write(tmp_path / f"corr_P{size}.parquet",
                           {"distance": d.tolist(), "correlation": corr.tolist(), "noise_floor": [floor] * 7,
                            "n": [size] * 7, "mode": ["positional"] * 7, "theory": (0.1 / d).tolist()},
                           "correlation", {"P": size}))
    paths.append(write(tmp_path / "corr_exact.parquet",
                       {"distance": d.tolist(), "correlation": (0.09 / d).tolist(), "noise_floor": [None] * 7,
                        "n": [0] * 7, "mode": ["exact"] * 7, "theory": [None] * 7}, "correlation"))
    return paths


def cluster_tables(tmp_path):
    paths = []
    for m in (2, 3):
        for context in ("token", "tuple"):
            for size in SIZES:
                ari = [rise(size, 8 * m**2), rise(size, 8 * m**3 * (2 if context == "token" else 1))]
                paths.append(write(tmp_path / f"cl_m{m}_{context}_P{size}.parquet",
                                   {"level": [1, 2], "ari": ari, "n": [size] * 2, "n_values": [16] * 2,
                                    "context": [context] * 2, "method": ["mean"] * 2, "oracle": [False] * 2},
                                   "cluster", {"P": size, "seed": 0, "m": m, "L": 3}))
    return paths


def sensitivity_tables(tmp_path):
    blocks = ["encoder 1", "encoder 2", "decoder 2", "decoder 1"]
    paths = []
    for size in SIZES:
        rows = {"block": [], "block_index": [], "level": [], "sensitivity": [], "n": []}
        for k, block in enumerate(blocks):
            for level in (1, 2, 3):
                rows["block"].append(block)
                rows["block_index"].append(k)
                rows["level"].append(level)
                rows["sensitivity"].append(1 - rise(size, 30 * level * (k + 1)))
                rows["n"].append(64)
        paths.append(write(tmp_path / f"sens_P{size}.parquet", rows, "sensitivity", {"P": size}))
    return paths


def sample_complexity_tables(tmp_path):
    ms = [2, 3, 4, 6]
    p = [5.0 * m**3 for m in ms]
    columns = {"m": ms, "L": [2] * 4, "level": [2] * 4, "p_star": p[:3] + [None],
               "p_star_lo": [0.8 * x for x in p[:3]] + [400.0], "p_star_hi": [1.2 * x for x in p[:3]] + [None],
               "status": ["crossed"] * 3 + ["below"], "n_points": [6] * 4, "n_seeds": [2] * 4,
               "exponent": [3.0] * 4, "exponent_err": [0.05] * 4, "prefactor": [5.0] * 4,
               "theory_exponent": [3] * 4, "theory_p_star": [None] * 4}
    path = tmp_path / "pstar.parquet"
    table = results_table(columns, kind="sample-complexity", source_kind="accuracy", by=["m", "L"])
    write_results(table, str(path), force=True)
    return [path]


def metrics_tables(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i * 10, "examples": i * 320, "sample_accuracy": [rise(i * 320 + 1, 300 * 4**lv) for lv in (1, 2, 3)]}
            for i in range(0, 30)]
    write_metrics(run / "metrics.parquet", rows, {"tool": "test"})
    return [run / "metrics.parquet"]


def forward_backward_tables(tmp_path):
    paths = []
    for depth in (2, 3):
        g = draw_grammar(depth, 2, 8, 2, seed=0)
        noise = np.linspace(0, 1, 11)
        changed = [[min(1.0, e * (1 + level / depth)) * 0.9 for level in range(depth + 1)] for e in noise]
        cols = {"noise": noise.tolist(), "process": ["uniform"] * 11, "n": [100] * 11, "changed": changed,
                "changed_expected": changed, "root_kept": [1 - c[-1] for c in changed],
                "root_kept_expected": [1 - c[-1] for c in changed], "grammatical": [1.0] * 11,
                "susceptibility": (noise * (1 - noise)).tolist(), "distance": [[0, 1]] * 11,
                "correlation": [[0.1, 0.05]] * 11}
        for level in range(depth + 1):
            cols[f"changed_{level}"] = [c[level] for c in changed]
        paths.append(write(tmp_path / f"fb_L{depth}.parquet", cols, "forward-backward", grammar=g.to_json()))
    return paths


def perplexity_tables(tmp_path):
    """Perplexity falling with T, faster for later training steps, and a reference table."""
    t = [1, 2, 4, 8, 16, 32]
    paths = []
    for step in (100, 1000, 10000):
        nll = [5.0 - np.log10(step) * 0.4 * np.log2(c) / 5 for c in t]
        paths.append(write(tmp_path / f"ppl_{step}.parquet",
                           {"context_length": t, "nll": nll, "nll_se": [0.05] * 6, "perplexity": np.exp(nll).tolist(),
                            "n": [64] * 6}, "perplexity", {"step": step}))
    nll = [5.0 - 0.8 * np.log2(c) / 5 for c in t]
    paths.append(write(tmp_path / "ppl_ref.parquet",
                       {"context_length": t, "nll": nll, "nll_se": [0.05] * 6, "perplexity": np.exp(nll).tolist(),
                        "n": [64] * 6}, "perplexity", {"reference": "data"}))
    return paths


KINDS = {
    "accuracy": (accuracy_tables, []),
    "perplexity": (perplexity_tables, []),
    "accuracy-online": (metrics_tables, []),
    "correlation": (correlation_tables, []),
    "sample-complexity": (sample_complexity_tables, []),
    "cluster": (cluster_tables, ["--group", "m"]),
    "sensitivity": (sensitivity_tables, []),
    "phase-transition": (forward_backward_tables, ["--mean-field"]),
}


def plot(*args):
    return runner.invoke(app, ["plot", *map(str, args)])


def assert_real_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400  # readable default size
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not blank
    # curves are coloured: empty axes (black, white, grey only) have no saturated pixels
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    assert colourful.mean() > 0.002


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_draws_a_png(kind, tmp_path):
    make, extra = KINDS[kind]
    out = tmp_path / f"{kind}.png"
    res = plot(kind, *make(tmp_path), *extra, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert_real_png(out)
    assert res.stdout == ""
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_more_options_draw(tmp_path):
    acc = accuracy_tables(tmp_path)
    res = plot("accuracy", *acc, "--group", "seed", "--title", "Two seeds", "-o", tmp_path / "a.png")
    assert res.exit_code == 0, res.stderr
    assert_real_png(tmp_path / "a.png")
    res = plot("sensitivity", *sensitivity_tables(tmp_path), *acc, "-o", tmp_path / "s.png")
    assert res.exit_code == 0, res.stderr
    res = plot("accuracy-online", *metrics_tables(tmp_path), "--x", "step", "-o", tmp_path / "o.png")
    assert res.exit_code == 0, res.stderr
    res = plot("phase-transition", forward_backward_tables(tmp_path)[1], "-o", tmp_path / "p.png")
    assert res.exit_code == 0, res.stderr
    assert_real_png(tmp_path / "p.png")


def test_svg_and_pdf_by_suffix(tmp_path):
    acc = accuracy_tables(tmp_path)
    assert plot("accuracy", *acc, "-o", tmp_path / "f.svg").exit_code == 0
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:2000]
    assert plot("accuracy", *acc, "-o", tmp_path / "f.PDF").exit_code == 0
    assert (tmp_path / "f.PDF").read_bytes()[:5] == b"%PDF-"


def one_line_error(res, *needles):
    assert_one_line_error(res, *needles, command="plot")


def test_bad_suffix_wrong_kind_and_unknown_kind(tmp_path):
    acc = accuracy_tables(tmp_path)
    one_line_error(plot("accuracy", *acc, "-o", tmp_path / "f.jpg"), "f.jpg", ".png")
    one_line_error(plot("accuracy", *acc, "-o", "-"), ".png")
    assert not (tmp_path / "f.jpg").exists()
    corr = correlation_tables(tmp_path)[0]
    one_line_error(plot("accuracy", acc[0], corr, "-o", tmp_path / "f.png"), str(corr), "'correlation'", "'accuracy'")
    one_line_error(plot("accuracy-online", acc[0], "-o", tmp_path / "f.png"), str(acc[0]), "'accuracy'", "metrics/1")
    one_line_error(plot("accuracy", *acc, "--x", "nope", "-o", tmp_path / "f.png"), "'nope'")
    one_line_error(plot("accuracy", *acc, "--mean-field", "-o", tmp_path / "f.png"), "--mean-field")
    assert not (tmp_path / "f.png").exists()
    assert plot("bogus", *acc, "-o", tmp_path / "f.png").exit_code == 2


def test_no_overwrite_without_force(tmp_path):
    acc = accuracy_tables(tmp_path)
    out = tmp_path / "fig.png"
    out.write_bytes(b"precious")
    one_line_error(plot("accuracy", *acc, "-o", out), "--force")
    assert out.read_bytes() == b"precious"
    assert plot("accuracy", *acc, "-o", out, "--force").exit_code == 0
    assert_real_png(out)


def test_figures_do_not_touch_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for _ in range(2):
        assert plot("correlation", *correlation_tables(tmp_path), "-o", tmp_path / "c.png", "--force").exit_code == 0
    assert plt.get_fignums() == before


def test_phase_transition_pipeline_script_uses_the_library(tmp_path):
    """pipelines/phase_transition/plot.py draws with cgtools.plots and still writes its summary."""
    from cgtools.analysis.theory import theory
    from tests.helpers import noise_process

    for path, depth in zip(forward_backward_tables(tmp_path), (2, 3)):
        path.rename(tmp_path / f"fb_uniform_L{depth}.parquet")
        # what `cgtools theory --noise-grid 0:1:21 --json` writes, computed in this process
        mf = theory(depth, 2, 8, 2, noise_grid=list(np.linspace(0, 1, 21)), process=noise_process("uniform", 8))
        (tmp_path / f"mf_uniform_L{depth}.json").write_text(json.dumps(mf))
    script = ROOT / "pipelines" / "phase_transition" / "plot.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--main-depth", "3", "--depths", "2", "3",
                           "--processes", "uniform", "-o", str(tmp_path / "pt.png"), "--summary",
                           str(tmp_path / "summary.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_real_png(tmp_path / "pt.png")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["uniform"]) == {"2", "3"} and summary["uniform"]["3"]["sentences"] == 100
    assert "matplotlib" not in script.read_text()  # no drawing code of its own
