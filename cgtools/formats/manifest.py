"""Sweep manifests (`cgtools sweep MANIFEST`): one entry per training run, as JSON or CSV.

JSON: a list of objects, or an object {"runs": [...]}. CSV: a header row, then one row per run
(an empty cell means "not given"). Every run names `data` (training table), `val` (validation
table) and `out` (its run directory); any other key is a per-run setting (`seed`, `width`,
`batch_size` or `batch-size`, ...), checked by the command that reads the manifest. A JSON null is
"not given" too. Relative paths are relative to the manifest's folder (the current folder for a
manifest on stdin). The format is chosen by the file name (.json / .csv), or, on stdin, by the
first character ('[' or '{' is JSON).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cgtools.errors import SchemaError
from cgtools.formats.files import InputFile

REQUIRED = ("data", "val", "out")
PATH_KEYS = REQUIRED


def read_manifest(source: InputFile) -> list[dict[str, Any]]:
    """The runs of a manifest, keys normalised (leading dashes dropped, '-' -> '_'), paths resolved,
    not-given values left out. SchemaError (one line) for anything malformed."""
    where = source.display()
    raw = source.data if source.data is not None else Path(source.name).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SchemaError(f"{where}: a manifest is JSON or CSV text, not binary data") from None
    suffix = Path(source.name).suffix.lower() if source.data is None else ""
    is_json = suffix == ".json" or (suffix != ".csv" and text.lstrip()[:1] in ("[", "{"))
    rows = _json_rows(text, where) if is_json else _csv_rows(text, where)
    if not rows:
        raise SchemaError(f"{where}: the manifest lists no runs")
    base = Path(source.name).parent if source.data is None else Path(".")
    out = []
    for n, row in enumerate(rows, 1):
        entry: dict[str, Any] = {}
        for key, value in row.items():
            name = str(key).strip().lstrip("-").replace("-", "_")
            if not name:
                raise SchemaError(f"{where}: run {n} has an empty key")
            if name in entry:
                raise SchemaError(f"{where}: run {n} gives {name!r} twice")
            if isinstance(value, (dict, list)):
                raise SchemaError(f"{where}: run {n}: {name} must be a single value, not {type(value).__name__}")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            entry[name] = value.strip() if isinstance(value, str) else value
        for key in REQUIRED:
            if key not in entry:
                raise SchemaError(f"{where}: run {n} has no {key!r} (every run needs data, val and out)")
        for key in PATH_KEYS:
            if not isinstance(entry[key], str):
                raise SchemaError(f"{where}: run {n}: {key} must be a path, got {entry[key]!r}")
            path = Path(entry[key])
            entry[key] = entry[key] if entry[key] == "-" or path.is_absolute() else str(base / path)
        out.append(entry)
    return out


def _json_rows(text: str, where: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(obj, dict):
        if set(obj) != {"runs"}:
            raise SchemaError(f"{where}: a JSON manifest is a list of runs or {{\"runs\": [...]}}")
        obj = obj["runs"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise SchemaError(f"{where}: a JSON manifest is a list of objects, one per run")
    return obj


def _csv_rows(text: str, where: str) -> list[dict]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
    except csv.Error as exc:
        raise SchemaError(f"{where}: not a valid CSV manifest ({exc})") from None
    header = reader.fieldnames or []
    if not header:
        raise SchemaError(f"{where}: empty manifest (a CSV manifest starts with a header row: data,val,out,...)")
    for n, row in enumerate(rows, 1):
        if None in row:  # more cells than header names
            raise SchemaError(f"{where}: run {n} has more cells than the header has names")
    return rows
