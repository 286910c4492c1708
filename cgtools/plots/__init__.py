"""The paper's figures drawn from results tables: one module per figure kind.

Every kind module defines INPUTS (the results kinds it reads; None for training metrics tables)
and figure(tables, options) -> matplotlib Figure. :func:`plot` reads the files, draws and writes
the figure (format from the output's suffix: PNG, SVG or PDF).

| kind | module | reads | paper |
|---|---|---|---|
| accuracy | accuracy | accuracy | Fig. 1a: A_l per level vs P |
| accuracy-online | accuracy_online | metrics/1 | Fig. 1b: A_l vs examples seen |
| correlation | correlation | correlation | Fig. 1c: correlation vs distance |
| sample-complexity | sample_complexity | sample-complexity | Fig. 2, 7: P* vs m |
| cluster | cluster | cluster | Fig. 7 style: ARI per level vs P |
| sensitivity | sensitivity | sensitivity (+ accuracy) | Fig. 6: S_{k,l} vs P per block |
| phase-transition | phase_transition | forward-backward | companion paper: changed per level vs noise |
| perplexity | perplexity | perplexity | Fig. 8: conditional perplexity vs context length |
| mmd | mmd | mmd | Fig. 5b: MMD² per feature depth vs training step |
| grid | grid | an image table (images/1, or `datasets` Parquet) | a look at images or samples |
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Sequence

from cgtools.errors import ConfigError

KINDS = {
    "accuracy": "accuracy",
    "accuracy-online": "accuracy_online",
    "correlation": "correlation",
    "sample-complexity": "sample_complexity",
    "cluster": "cluster",
    "sensitivity": "sensitivity",
    "phase-transition": "phase_transition",
    "perplexity": "perplexity",
    "mmd": "mmd",
    "grid": "grid",
}


@dataclass
class PlotOptions:
    """What the user may choose. x: the tag or column on the x axis (None: the kind's default);
    group: the tag whose values make separate panels or curves; title: the figure's title;
    mean_field: phase-transition only, overlay the mean-field theory; rows, cols, limit, labels:
    grid only, the cells and number of images drawn and whether labels go under them."""

    x: str | None = None
    group: str | None = None
    title: str | None = None
    mean_field: bool = False
    rows: int | None = None
    cols: int | None = None
    limit: int | None = None
    labels: bool = False


def kind_module(kind: str):
    """The module drawing `kind` (ConfigError for an unknown kind)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown figure kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"cgtools.plots.{KINDS[kind]}")


def draw(kind: str, paths: Sequence[str | os.PathLike], options: PlotOptions | None = None):
    """Read the tables at `paths` and draw the figure of `kind` (a matplotlib Figure)."""
    from cgtools.plots.tables import IMAGES, read_image_tables, read_metrics_tables, read_tables

    module = kind_module(kind)
    options = options or PlotOptions()
    if options.mean_field and kind != "phase-transition":
        raise ConfigError("--mean-field is for phase-transition figures only")
    if module.INPUTS != IMAGES:
        given = [flag for flag, value in (("--rows", options.rows), ("--cols", options.cols),
                                          ("--limit", options.limit), ("--labels", options.labels)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: for grid figures only")
    if module.INPUTS is None:
        tables = read_metrics_tables(paths)
    elif module.INPUTS == IMAGES:
        tables = read_image_tables(paths)
    else:
        tables = read_tables(paths, module.INPUTS)
    return module.figure(tables, options)


def plot(kind: str, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
         options: PlotOptions | None = None, force: bool = False) -> None:
    """Draw the figure of `kind` from the tables at `paths` and write it to `out`."""
    from cgtools.formats.files import check_output
    from cgtools.plots.style import figure_format, save_figure

    figure_format(out)
    check_output(out, force)  # before reading and drawing
    save_figure(draw(kind, paths, options), out, force)
