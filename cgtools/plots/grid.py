"""A grid of the first images of an image table (cgtools.formats.images): a look at data or samples.

Reads one image table (INPUTS = IMAGES: not a results table). The first N images (--limit,
default rows x cols when both are given, else DEFAULT_LIMIT, at most the table's rows) fill
--rows x --cols cells in reading order (default: as square as possible). Each image is shown at
its own pixels, upscaled by an integer factor (nearest neighbour) to at least MIN_SIDE pixels so
that 8x8 digits stay crisp (images larger than a cell are shrunk with antialiasing): grey
images in a grey map from 0 (black) to 255 (white), RGB as is.
With --labels and a label column, each image's label (its class name when the table has them) is
written under it. The title is --title, or the table's file name and what its provenance says
(source, split, counts, the tool that wrote it).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cgtools.errors import ConfigError, InputError
from cgtools.plots import PlotOptions
from cgtools.plots.tables import IMAGES

INPUTS = IMAGES  # an image table, not a results table
DEFAULT_LIMIT = 64
MIN_SIDE = 64  # pixels: smaller images are repeated up to at least this (8x8 -> 64x64)
CELL = 1.0  # inches per image cell
LABEL_HEIGHT = 0.22  # inches under each cell for its label
TITLE_HEIGHT = 0.45  # inches above the grid for the title
MAX_LABEL = 24  # characters of a label; longer ones are cut
MAX_SIDE_INCHES = 24.0  # cells shrink so that a large grid stays a reasonable file

log = logging.getLogger(__name__)


def grid_shape(n: int, limit: int | None, rows: int | None, cols: int | None) -> tuple[int, int, int]:
    """(images, rows, cols) for a table of n images: the images drawn are `limit` (default rows x
    cols when both are given, else DEFAULT_LIMIT), at most n and at most rows x cols; a free
    dimension is filled as squarely as possible."""
    for name, value in (("--rows", rows), ("--cols", cols), ("--limit", limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    count = limit or (rows * cols if rows and cols else DEFAULT_LIMIT)
    count = min(count, n, rows * cols if rows and cols else count)
    if cols is None:
        cols = math.ceil(count / rows) if rows else math.ceil(math.sqrt(count))
    if rows is None:
        rows = math.ceil(count / cols)
    return count, rows, cols


def upscale(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """uint8 [H, W, C] repeated by the smallest integer factor that makes its longer side at
    least `min_side` (nearest neighbour: every pixel becomes a factor x factor block)."""
    factor = max(1, math.ceil(min_side / max(image.shape[0], image.shape[1])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def default_title(table) -> str:
    """'<file>: <source>, <split> split, <n> of <source count> images (cgtools images)' from the
    table's cgtools metadata; just the file name for a table without it (e.g. written by
    `datasets`)."""
    meta = table.meta or {}
    parts = []
    source = meta.get("source") or {}
    if isinstance(source, dict) and source.get("kind"):
        what = source.get("name") or source.get("path") or source["kind"]
        parts.append(str(what))
    split = meta.get("split") or {}
    if isinstance(split, dict) and split.get("name") not in (None, "all"):
        parts.append(f"{split['name']} split")
    count = meta.get("count", table.num_rows)
    total = split.get("source_count") if isinstance(split, dict) else None
    parts.append(f"{count} of {total} images" if total and total != count else f"{count} images")
    tool = (meta.get("provenance") or {}).get("tool") if isinstance(meta.get("provenance"), dict) else None
    text = f"{table.display()}: {', '.join(parts)}"
    return f"{text} ({tool})" if tool else text


def figure(tables, options: PlotOptions):
    if len(tables) != 1:
        raise InputError(f"a grid draws one image table, got {len(tables)}")
    unused = [flag for flag, value in (("--x", options.x), ("--group", options.group)) if value]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: not used by grid figures")
    table = tables[0]
    count, rows, cols = grid_shape(table.num_rows, options.limit, options.rows, options.cols)
    images = [x for batch in table.iter_batches(256, limit=count) for x in batch]
    labels = None
    if options.labels:
        values = table.labels()
        if values is None:
            log.warning("%s has no label column: the grid has no labels", table.display())
        else:
            names = table.label_names()
            labels = [names[v] if names is not None and 0 <= v < len(names) else str(v)
                      for v in values[:count].tolist()]
    cell = min(CELL, MAX_SIDE_INCHES / cols, MAX_SIDE_INCHES / rows)
    below = LABEL_HEIGHT if labels is not None else 0.0
    pad = 0.06 * cell
    width = cols * cell
    height = rows * (cell + below) + TITLE_HEIGHT
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        left = (c * cell + pad) / width
        bottom = (height - TITLE_HEIGHT - (r + 1) * (cell + below) + below + pad) / height
        ax = fig.add_axes((left, bottom, (cell - 2 * pad) / width, (cell - 2 * pad) / height))
        big = upscale(image)
        # blocks stay sharp; an image larger than its cell is shrunk with antialiasing instead
        interpolation = "nearest" if max(image.shape[:2]) <= 2 * MIN_SIDE else "antialiased"
        if big.shape[2] == 1:
            ax.imshow(big[..., 0], cmap="gray", vmin=0, vmax=255, interpolation=interpolation)
        else:
            ax.imshow(big, interpolation=interpolation)
        ax.set_axis_off()
        if labels is not None:
            text = labels[k] if len(labels[k]) <= MAX_LABEL else labels[k][:MAX_LABEL - 1] + "…"
            # ~0.6 em per character: a long class name shrinks to fit its cell's width
            size = max(4.0, min(8.0, 9.0 * cell, 72.0 * cell / (0.62 * max(len(text), 1))))
            ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=size,
                    clip_on=False)
    fig.suptitle(options.title or default_title(table), y=1.0 - 0.08 / height, va="top",
                 fontsize=max(6.0, min(10.0, 1.6 * width)), wrap=True)
    return fig
