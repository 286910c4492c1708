"""Reading a grammar from any file that carries one, and writing grammar safetensors files.

`--grammar FILE` accepts a sequences table (grammar in its metadata), a grammar safetensors file
(`rules.1` … `rules.L` plus the JSON) or any cgtools safetensors file whose metadata holds a
grammar (a checkpoint). The kind is recognised from the file's first bytes, not its name.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from cgtools.errors import InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile, atomic_output
from cgtools.grammar.rhm import Grammar

PARQUET_MAGIC = b"PAR1"


def file_kind(source: InputFile) -> str:
    """'parquet', 'safetensors' or 'unknown', from the magic bytes."""
    head = source.head(16)
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 1 << 30 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def read_safetensors_metadata(source: InputFile) -> dict[str, str]:
    """The string metadata of a safetensors file (without loading its tensors)."""
    try:
        raw = source.data if source.data is not None else None
        if raw is None:
            with open(source.name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = f.read(n)
        else:
            (n,) = struct.unpack("<Q", raw[:8])
            header = raw[8:8 + n]
        return json.loads(header).get("__metadata__", {}) or {}
    except (struct.error, ValueError, OSError) as exc:
        raise InputError(f"{source.display()}: not a readable safetensors file ({exc})") from None


def load_grammar(source: InputFile) -> Grammar:
    """The grammar carried by `source`; InputError/SchemaError if it has none."""
    kind = file_kind(source)
    if kind == "parquet":
        from cgtools.formats.sequences import SequencesTable

        table = SequencesTable(source)
        g = table.grammar()
        if g is None:
            raise SchemaError(f"{source.display()}: the table carries no grammar")
        return g
    if kind == "safetensors":
        meta = metadata.decode(read_safetensors_metadata(source).get(metadata.METADATA_KEY),
                               source.display())
        if not meta.get("grammar"):
            raise SchemaError(f"{source.display()}: the file carries no grammar")
        return Grammar.from_json(meta["grammar"])
    raise InputError(f"{source.display()}: neither a Parquet table nor a safetensors file")


def save_grammar(grammar: Grammar, name: str, force: bool, provenance: dict) -> None:
    """Write `rules.1` … `rules.L` [symbols, m, s] int64 with the grammar JSON as metadata."""
    from safetensors.numpy import save

    meta = {metadata.METADATA_KEY: metadata.encode(metadata.GRAMMAR_SCHEMA, grammar=grammar.to_json(),
                                                   provenance=provenance).decode()}
    blob = save({k: v.astype(np.int64) for k, v in grammar.tensors().items()}, metadata=meta)
    with atomic_output(name, force) as f:
        f.write(blob)
