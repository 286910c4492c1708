"""Grammar safetensors files, and finding the grammar object any cgtools file carries.

`--grammar FILE` accepts a sequences table (grammar in its metadata), a grammar safetensors file
(`rules.1` … `rules.L` plus the JSON) or any cgtools safetensors file whose metadata holds a
grammar (a checkpoint). The kind is recognised from the file's first bytes, not its name.
This module handles the grammar's JSON object only; cgtools.grammar.source builds the Grammar.
"""

from __future__ import annotations

import numpy as np

from cgtools.errors import InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile, atomic_output, file_kind, read_safetensors_metadata

__all__ = ["grammar_json_of", "write_grammar_file", "file_kind", "read_safetensors_metadata"]


def grammar_json_of(source: InputFile) -> dict:
    """The grammar object carried by `source`; InputError/SchemaError if it has none."""
    kind = file_kind(source)
    if kind == "parquet":
        from cgtools.formats.sequences import SequencesTable

        g = SequencesTable(source).grammar_json()
        if g is None:
            raise SchemaError(f"{source.display()}: the table carries no grammar")
        return g
    if kind == "safetensors":
        meta = metadata.decode(read_safetensors_metadata(source).get(metadata.METADATA_KEY),
                               source.display())
        if not meta.get("grammar"):
            raise SchemaError(f"{source.display()}: the file carries no grammar")
        return meta["grammar"]
    raise InputError(f"{source.display()}: neither a Parquet table nor a safetensors file")


def write_grammar_file(rules: dict[str, np.ndarray], grammar: dict, name: str, force: bool,
                       provenance: dict) -> None:
    """Write tensors `rules.1` … `rules.L` [symbols, m, s] int64 with the grammar JSON as metadata."""
    from safetensors.numpy import save

    meta = {metadata.METADATA_KEY: metadata.encode(metadata.GRAMMAR_SCHEMA, grammar=grammar,
                                                   provenance=provenance).decode()}
    blob = save({k: np.asarray(v, dtype=np.int64) for k, v in rules.items()}, metadata=meta)
    with atomic_output(name, force) as f:
        f.write(blob)
