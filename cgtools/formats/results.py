"""Results tables: what every analysis writes, what `plot` and `sample-complexity` read.

A results table is Parquet with one row per measured point (a noise level, a distance, a level
of the grammar...) and the metadata key `cgtools`:

    {"schema": "results/1", "kind": "forward-backward", "tags": {"P": 512, "seed": 0},
     "grammar": {...} | null, "provenance": {...}, ...}

`kind` names the analysis that wrote it (forward-backward, correlate, cluster, accuracy,
sensitivity, sample-complexity, ...); readers check it. `tags` are the labels of the run the
table belongs to in a sweep (training set size P, seed, m, L, checkpoint step...): scalars
(int, float, str, bool) given with `--tag KEY=VALUE`. Every tag is also written as a constant
column of the same name, so that tables of a sweep concatenate into one tidy table
(:func:`concat_results`) that can be grouped by any tag. A tag may not reuse the name of a data
column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.errors import ConfigError, InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile, atomic_output

RESULTS_SCHEMA = "results/1"
TagValue = int | float | str | bool


def parse_tag(text: str) -> tuple[str, TagValue]:
    """'KEY=VALUE' -> (key, value), the value read as int, then float, then bool, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not key.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"a tag must look like KEY=VALUE (letters, digits, _ or - in KEY), got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    return key, raw


def parse_tags(items: Iterable[str] | None) -> dict[str, TagValue]:
    """Tags from repeated --tag KEY=VALUE options (a later KEY wins)."""
    return dict(parse_tag(t) for t in items or [])


def _tag_type(value: TagValue) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def results_table(columns: dict[str, Any] | pa.Table, *, kind: str, tags: dict[str, TagValue] | None = None,
                  provenance: dict | None = None, grammar: dict | None = None, **extra: Any) -> pa.Table:
    """A results table from columns (name -> list or Arrow array, or a pa.Table) and metadata.

    Tags become constant columns appended after the data columns. `extra` keys (JSON) are stored
    in the metadata beside kind, tags, grammar and provenance.
    """
    table = columns if isinstance(columns, pa.Table) else pa.table(
        {k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v) for k, v in columns.items()})
    tags = dict(tags or {})
    for key, value in tags.items():
        if key in table.column_names:
            raise ConfigError(f"tag {key!r} has the name of a {kind} result column; choose another")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"tag {key!r} must be finite, got {value}")
        table = table.append_column(pa.field(key, _tag_type(value)),
                                    pa.array([value] * table.num_rows, _tag_type(value)))
    blob = metadata.encode(RESULTS_SCHEMA, kind=kind, tags=tags, grammar=grammar,
                           provenance=provenance or {}, **extra)
    return table.replace_schema_metadata({metadata.METADATA_KEY: blob})


def write_results(table: pa.Table, out: str, force: bool) -> None:
    """Write a table from :func:`results_table` atomically ('-' = stdout)."""
    with atomic_output(out, force) as sink:
        pq.write_table(table, sink, compression="zstd")


@dataclass
class Results:
    """A results table read back: the Arrow table and its metadata."""

    table: pa.Table
    meta: dict
    where: str

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "")

    @property
    def tags(self) -> dict[str, TagValue]:
        return dict(self.meta.get("tags") or {})

    def rows(self) -> list[dict]:
        return self.table.to_pylist()

    def column(self, name: str) -> list:
        if name not in self.table.column_names:
            raise SchemaError(f"{self.where}: no {name!r} column (columns: {', '.join(self.table.column_names)})")
        return self.table.column(name).to_pylist()


def read_results(source: InputFile, kind: str | Iterable[str] | None = None) -> Results:
    """Read a results table; SchemaError if it is not one (or not of `kind`, when given)."""
    try:
        handle = pa.BufferReader(source.data) if source.data is not None else source.name
        table = pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source.display()}: not a readable Parquet file ({first})") from None
    raw = (table.schema.metadata or {}).get(metadata.METADATA_KEY.encode())
    meta = metadata.decode(raw, source.display())
    if meta.get("schema") != RESULTS_SCHEMA:
        raise SchemaError(f"{source.display()}: expected a results table ({RESULTS_SCHEMA}), "
                          f"got {meta.get('schema')!r}")
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if meta.get("kind") not in kinds:
            raise SchemaError(f"{source.display()}: holds {meta.get('kind')!r} results, expected "
                              f"{' or '.join(repr(k) for k in kinds)}")
    return Results(table.replace_schema_metadata(None), meta, source.display())


def concat_results(results: list[Results]) -> pa.Table:
    """One tidy table from the tables of a sweep (columns missing in some tables become null)."""
    if not results:
        raise InputError("no results tables given")
    return pa.concat_tables([r.table for r in results], promote_options="permissive")
