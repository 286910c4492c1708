"""`cgtools plot grid`: a grid of an image table's first images (cgtools.plots.grid)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.images import write_images
from cgtools.plots.grid import CELL, LABEL_HEIGHT, TITLE_HEIGHT, grid_shape, upscale
from tests.helpers import assert_one_line_error

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


def one_line_error(res, *needles):
    assert_one_line_error(res, *needles, command="plot")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "digits.parquet"
    assert run("images", "digits", "--split", "test", "--limit", "40", "-o", path).exit_code == 0
    return path


def write(path, images, labels=None, names=None):
    with open(path, "wb") as f:
        write_images(f, np.asarray(images, dtype=np.uint8), {}, labels=labels, label_names=names)
    return path


def png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)[..., :3]


def test_grid_shape_and_upscale():
    assert grid_shape(100, None, None, None) == (64, 8, 8)  # DEFAULT_LIMIT, square
    assert grid_shape(10, None, None, None) == (10, 3, 4)
    assert grid_shape(100, None, 4, 8) == (32, 4, 8)
    assert grid_shape(100, 10, 4, 8) == (10, 4, 8)
    assert grid_shape(100, 50, 4, 8) == (32, 4, 8)  # no more than the cells
    assert grid_shape(100, 10, 2, None) == (10, 2, 5)
    assert grid_shape(100, 10, None, 3) == (10, 4, 3)
    assert grid_shape(5, None, 4, 8) == (5, 4, 8)
    a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    big = upscale(a, 64)
    assert big.shape == (44, 66, 1)  # factor 22 = ceil(64 / 3)
    np.testing.assert_array_equal(big[::22, ::22], a)
    assert (big[:22, :22] == 0).all() and (big[22:, 44:] == 5).all()
    assert upscale(np.zeros((100, 80, 3), np.uint8)).shape == (100, 80, 3)


def test_digits_grid_with_labels(digits, tmp_path):
    out = tmp_path / "grid.png"
    res = run("plot", "grid", digits, "--rows", 4, "--cols", 8, "--labels", "-o", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    pixels = png(out)
    # the figure is sized by the grid: 8 cells wide, 4 cells (each with a label line) and a title high
    want = (8 * CELL) / (4 * (CELL + LABEL_HEIGHT) + TITLE_HEIGHT)
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(want, rel=0.02)
    assert pixels.shape[1] >= 8 * 64  # every 8x8 digit gets at least 64 screen pixels a side
    grey = pixels.mean(axis=2)
    assert grey.std() > 0.2  # black digits' backgrounds on white paper: far from uniform
    assert (grey < 0.05).mean() > 0.2 and (grey > 0.95).mean() > 0.2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_colours_land_in_their_cells(tmp_path):
    """Four solid 8x8 RGB images in one row: each colour fills a large block of the figure, in
    reading order from left to right."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [np.broadcast_to(np.array(c, np.uint8), (8, 8, 3)) for c in colours]
    table = write(tmp_path / "c.parquet", images)
    out = tmp_path / "c.png"
    res = run("plot", "grid", table, "--cols", 4, "--title", "Four colours", "-o", out)
    assert res.exit_code == 0, res.stderr
    pixels = png(out)
    centres = []
    for c in colours:
        hit = np.all(np.abs(pixels - np.array(c) / 255) < 0.02, axis=2)
        assert hit.sum() > 0.5 * (pixels.shape[1] / 4) ** 2 * 0.7, c  # most of a cell
        centres.append(np.nonzero(hit)[1].mean())
    assert centres == sorted(centres)


def test_unlabelled_table_and_limit(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 6, 1), dtype=np.uint8)
    table = write(tmp_path / "n.parquet", images)
    out = tmp_path / "n.png"
    res = run("plot", "grid", table, "--labels", "--limit", 3, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert "no label column" in res.stderr  # a warning, and a grid without labels
    pixels = png(out)
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx((2 * CELL) / (2 * CELL + TITLE_HEIGHT), rel=0.03)
    assert pixels.std() > 0.1


def test_errors_and_no_overwrite(digits, tmp_path):
    results = tmp_path / "r.parquet"
    from cgtools.formats.results import results_table, write_results

    write_results(results_table({"x": [1, 2]}, kind="accuracy"), str(results), force=True)
    one_line_error(run("plot", "grid", results, "-o", tmp_path / "a.png"), "r.parquet", "not an image table")
    one_line_error(run("plot", "grid", digits, digits, "-o", tmp_path / "a.png"), "one image table")
    one_line_error(run("plot", "grid", tmp_path / "none.parquet", "-o", tmp_path / "a.png"), "no such file")
    one_line_error(run("plot", "accuracy", digits, "-o", tmp_path / "a.png"), "images/1")
    one_line_error(run("plot", "accuracy", results, "--rows", 2, "-o", tmp_path / "a.png"), "--rows", "grid")
    one_line_error(run("plot", "grid", digits, "-o", tmp_path / "a.jpg"), ".png")
    one_line_error(run("plot", "grid", digits, "--group", "P", "-o", tmp_path / "a.png"), "--group")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.jpg").exists()
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    one_line_error(run("plot", "grid", digits, "-o", out), "--force")
    assert out.read_bytes() == b"precious"
    assert run("plot", "grid", digits, "-o", out, "--force").exit_code == 0
    assert png(out).std() > 0.1
    svg = tmp_path / "g.svg"
    assert run("plot", "grid", digits, "--limit", 4, "-o", svg).exit_code == 0
    assert b"<svg" in svg.read_bytes()[:2000]
