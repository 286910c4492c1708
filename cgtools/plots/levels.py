"""Per-level curves vs a sweep tag (accuracy, ARI, sensitivity): one colour per grammar level,
replicates (seeds) averaged with standard-error bars."""

from __future__ import annotations

from typing import Sequence

from matplotlib.axes import Axes

from cgtools.plots.style import errorbar, level_colors
from cgtools.plots.tables import mean_curve, split


def levels_of(rows: Sequence[dict]) -> list[int]:
    return sorted({r["level"] for r in rows if r.get("level") is not None})


def draw_levels(ax: Axes, rows: Sequence[dict], x: str, y: str, colors: dict[int, tuple],
                depth: int | None = None, label: bool = True, **style) -> None:
    """One curve y(x) per level in rows; `depth` (L) names the top level 'root'/'L'."""
    for level, level_rows in split(rows, "level").items():
        if level is None:
            continue
        xs, mean, se, _ = mean_curve(level_rows, x, y)
        if not xs.size:
            continue
        name = f"level {level}" + (" = L" if depth is not None and level == depth else "")
        errorbar(ax, xs, mean, se, color=colors.get(level), label=name if label else None, **style)


def colors_for(rows: Sequence[dict]) -> dict[int, tuple]:
    return level_colors(levels_of(rows))


def depth_of(rows: Sequence[dict]) -> int | None:
    """L when every row agrees on it."""
    values = {r.get("L") for r in rows}
    value = values.pop() if len(values) == 1 else None
    return value if isinstance(value, int) else None
