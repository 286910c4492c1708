"""Reading the tables a figure draws, and averaging replicates (seeds) into curves."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.analysis.sweep import with_grammar_columns
from cgtools.errors import InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import open_input
from cgtools.formats.metrics import METRICS_SCHEMA
from cgtools.formats.results import Results, read_results

FILE = "_file"  # the column naming the table a row came from
IMAGES = "images"  # a kind module's INPUTS when it reads image tables (cgtools.formats.images)


def read_tables(paths: Sequence[str | os.PathLike], kinds: Sequence[str]) -> list[Results]:
    """Results tables of one of `kinds` (SchemaError naming the file and both kinds otherwise)."""
    if not paths:
        raise InputError("no tables given")
    return [read_results(open_input(p), kind=tuple(kinds)) for p in paths]


def read_metrics_tables(paths: Sequence[str | os.PathLike]) -> list[Results]:
    """Training metrics tables (metrics/1, RUN_DIR/metrics.parquet) as Results (kind '')."""
    out = []
    for p in paths:
        source = open_input(p)
        try:
            if source.data is not None:
                table = pq.read_table(pa.BufferReader(source.data))
            else:  # one open file: a path may be opened twice and straddle a live run's atomic rewrite
                with open(source.name, "rb") as f:
                    table = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{source.display()}: not a readable Parquet file ({exc})") from None
        meta = metadata.decode((table.schema.metadata or {}).get(metadata.METADATA_KEY.encode()),
                               source.display())
        if meta.get("schema") != METRICS_SCHEMA:
            got = meta.get("kind") if meta.get("schema") == "results/1" else meta.get("schema")
            raise SchemaError(f"{source.display()}: holds {got!r}, expected a training metrics table "
                              f"({METRICS_SCHEMA!r}, RUN_DIR/metrics.parquet)")
        out.append(Results(table.replace_schema_metadata(None), meta, source.display()))
    return out


def read_image_tables(paths: Sequence[str | os.PathLike]) -> list:
    """Image tables (cgtools.formats.images.ImagesTable): SchemaError for a results, sequences or
    other table without an image column, naming the file."""
    from cgtools.formats.images import ImagesTable

    if not paths:
        raise InputError("no tables given")
    return [ImagesTable(open_input(p)) for p in paths]


def tidy_rows(results: Sequence[Results]) -> list[dict]:
    """Every row of every table, with grammar columns (L, s, v, m) and the file it came from."""
    rows = []
    for r in results:
        for row in with_grammar_columns(r).to_pylist():
            row[FILE] = r.where
            rows.append(row)
    return rows


def require(rows: Sequence[dict], name: str, what: str, hint: str = "") -> None:
    """InputError unless every row has a non-null `name` column."""
    missing = [r[FILE] for r in rows if r.get(name) is None]
    if missing:
        names = sorted({k for r in rows for k in r if k != FILE})
        raise InputError(f"{missing[0]}: no {name!r} value for {what}{hint} (columns: {', '.join(names)})")


def split(rows: Iterable[dict], key: str | Sequence[str] | None) -> dict[Any, list[dict]]:
    """Rows by the value of a column (or a tuple of columns), in sorted order of the values."""
    out: dict[Any, list[dict]] = {}
    for r in rows:
        value = (tuple(r.get(k) for k in key) if not isinstance(key, str) else r.get(key)) if key else None
        out.setdefault(value, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(value: Any) -> tuple:
    if isinstance(value, tuple):
        return tuple(_order(v) for v in value)
    return (value is None, isinstance(value, str), value if value is not None else 0)


def mean_curve(rows: Iterable[dict], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replicates at the same x averaged: (x [n] sorted, mean [n], standard error [n] (0 for a
    single replicate), replicates [n]). Null or non-finite y values are skipped."""
    groups: dict[float, list[float]] = {}
    for r in rows:
        xv, yv = r.get(x), r.get(y)
        if xv is None or yv is None or not math.isfinite(yv):
            continue
        groups.setdefault(xv, []).append(float(yv))
    xs = sorted(groups)
    values = [np.array(groups[v]) for v in xs]
    mean = np.array([v.mean() for v in values])
    se = np.array([v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0 for v in values])
    return np.array(xs, float), mean, se, np.array([v.size for v in values])


def describe(value: Any, key: str | Sequence[str] | None) -> str:
    """'P = 512' or 'm = 4, L = 2' for a split value."""
    if key is None:
        return ""
    if isinstance(key, str):
        return f"{key} = {value}"
    return ", ".join(f"{k} = {v}" for k, v in zip(key, value))
