"""Writing results on stdout: JSON for machines, aligned tables for people."""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(obj: dict) -> None:
    """One JSON object and a newline on stdout (non-finite floats become null)."""
    sys.stdout.write(json.dumps(_clean(obj)) + "\n")
    sys.stdout.flush()


def fmt(value: Any, digits: int = 4) -> str:
    """Human formatting: fixed decimals for ordinary floats, scientific for huge or tiny ones."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def emit_table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    """Plain aligned columns on stdout (greppable, no colour codes)."""
    all_rows = ([header] if header else []) + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    for r in all_rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    sys.stdout.flush()
