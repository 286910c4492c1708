"""The `cgtools` JSON metadata every output carries: schema name, grammar and provenance."""

from __future__ import annotations

import json
import sys
from typing import Any

import cgtools
from cgtools.errors import SchemaError
from cgtools.formats.files import InputFile

METADATA_KEY = "cgtools"
SEQUENCES_SCHEMA = "sequences/1"
GRAMMAR_SCHEMA = "grammar/1"


def provenance(command: str, seed: int | None = None, inputs: list[InputFile] | None = None,
               **extra: Any) -> dict:
    """Who made a file: tool version, command line, seed and the sha256 of every input."""
    out = {
        "tool": f"cgtools {command}",
        "version": cgtools.__version__,
        "argv": list(sys.argv),
        "seed": seed,
        "inputs": {f.display(): f.sha256() for f in inputs or []},
    }
    out.update(extra)
    return out


def encode(schema: str, **fields: Any) -> bytes:
    return json.dumps({"schema": schema, **fields}, separators=(",", ":")).encode()


def decode(raw: bytes | str | None, where: str) -> dict:
    """Parse the cgtools metadata blob; SchemaError if missing or not JSON."""
    if raw is None:
        raise SchemaError(f"{where}: no cgtools metadata (not written by cgtools?)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise SchemaError(f"{where}: cgtools metadata is not valid JSON") from None
    if not isinstance(meta, dict) or "schema" not in meta:
        raise SchemaError(f"{where}: cgtools metadata has no schema")
    return meta
