"""The sequences table (DESIGN.md §3): Parquet with a `tokens` list column and cgtools metadata.

Columns: `tokens` (fixed-size list of ints, length d), optional `latent_1` … `latent_L`
(level-l symbols, length s^(L-l); `latent_L` is the root) and optional `perturbed` (R_l x).
Written in row groups as batches arrive, so memory stays bounded.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.errors import InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile

TOKENS = "tokens"
PERTURBED = "perturbed"


def latent_column(level: int) -> str:
    return f"latent_{level}"


def int_type(n_values: int) -> pa.DataType:
    """Smallest signed type holding 0..n_values-1 (int16 covers every practical RHM vocabulary)."""
    if n_values <= 1 << 15:
        return pa.int16()
    if n_values <= 1 << 31:
        return pa.int32()
    return pa.int64()


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """[B, k] ints -> fixed-size list array of length-k lists."""
    b, k = values.shape
    flat = np.ascontiguousarray(values, dtype=dtype.to_pandas_dtype()).reshape(-1)
    # Zero-copy wrap: pa.array() takes a slow element-wise path for typed input and for views.
    arr = pa.Array.from_buffers(dtype, flat.size, [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(arr, k)


class SequencesWriter:
    """Streams batches of sequences into a Parquet file-like object.

    `latent_widths[l-1]` is the number of level-l nodes (l = 1..L) when latent columns are written.
    """

    def __init__(self, sink: BinaryIO, *, length: int, vocab: int, meta: dict,
                 latent_widths: list[int] | None = None, n_classes: int | None = None,
                 perturbed: bool = False, compression: str = "zstd") -> None:
        self.length, self.vocab = length, vocab
        tok = int_type(vocab)
        fields = [pa.field(TOKENS, pa.list_(tok, length), nullable=False)]
        self.latent_types = []
        for level, width in enumerate(latent_widths or [], 1):
            top = level == len(latent_widths)
            t = int_type(max(vocab, n_classes or vocab) if top else vocab)
            self.latent_types.append(t)
            fields.append(pa.field(latent_column(level), pa.list_(t, width), nullable=False))
        if perturbed:
            fields.append(pa.field(PERTURBED, pa.list_(tok, length), nullable=False))
        self.schema = pa.schema(fields, metadata={metadata.METADATA_KEY: metadata.encode(**meta)})
        self._tok = tok
        self._writer = pq.ParquetWriter(sink, self.schema, compression=compression)
        self.rows = 0

    def write(self, tokens: np.ndarray, latents: list[np.ndarray] | None = None,
              perturbed: np.ndarray | None = None) -> None:
        """tokens [B, d]; latents[l] [B, s^(L-l)] for l = 1..L (index 0 ignored); perturbed [B, d]."""
        arrays = [_fixed_list(tokens, self._tok)]
        for level, t in enumerate(self.latent_types, 1):
            arrays.append(_fixed_list(latents[level], t))
        if PERTURBED in self.schema.names:
            arrays.append(_fixed_list(perturbed, self._tok))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self._writer.write_batch(batch, row_group_size=max(len(tokens), 1))
        self.rows += len(tokens)

    def close(self) -> None:
        self._writer.close()


def sequences_meta(grammar: dict | None, provenance: dict, **extra) -> dict:
    """Metadata fields of a sequences table: `grammar` is the grammar's JSON object (None for
    data without one, e.g. text)."""
    return {"schema": metadata.SEQUENCES_SCHEMA,
            "grammar": grammar,
            "provenance": provenance, **extra}


class SequencesTable:
    """Read access to a sequences table, batch by batch."""

    def __init__(self, source: InputFile) -> None:
        self.source = source
        try:
            handle = pa.BufferReader(source.data) if source.data is not None else source.name
            self._file = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{source.display()}: not a readable Parquet file ({_first_line(exc)})") from None
        schema = self._file.schema_arrow
        raw = (schema.metadata or {}).get(metadata.METADATA_KEY.encode())
        self.meta = metadata.decode(raw, source.display()) if raw is not None else {}
        if TOKENS not in schema.names:
            raise SchemaError(f"{source.display()}: no '{TOKENS}' column (columns: {', '.join(schema.names)})")
        t = schema.field(TOKENS).type
        if not (pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)) \
                or not pa.types.is_integer(t.value_type):
            raise SchemaError(f"{source.display()}: column '{TOKENS}' must be a list of integers, got {t}")
        self.fixed_length = t.list_size if pa.types.is_fixed_size_list(t) else None

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    @property
    def columns(self) -> list[str]:
        return list(self._file.schema_arrow.names)

    def grammar_json(self) -> dict | None:
        """The grammar object stored in the metadata (DESIGN.md §3), or None.

        cgtools.grammar.source turns it into a Grammar; formats/ never builds one."""
        return self.meta.get("grammar") or None

    def display(self) -> str:
        return self.source.display()

    def iter_column(self, column: str = TOKENS, batch_size: int = 65536,
                    length: int | None = None, limit: int | None = None) -> Iterator[np.ndarray]:
        """Yield int64 arrays [B, k] of a list column; every row must have length k (= `length` if
        given). `limit`: stop after the first `limit` rows (--limit)."""
        if column not in self.columns:
            raise SchemaError(f"{self.source.display()}: no '{column}' column")
        left = limit
        for batch in self._batches(batch_size, column):
            if left is not None:
                if left <= 0:
                    return
                batch = batch.slice(0, left)
                left -= batch.num_rows
            yield _list_to_matrix(batch.column(0), length, f"{self.source.display()}: column '{column}'")

    def rows(self, limit: int | None = None) -> int:
        """Rows the command will read: all, or the first `limit`."""
        return self.num_rows if limit is None else min(limit, self.num_rows)

    def _batches(self, batch_size: int, column: str):
        """pyarrow's batches; a damaged data page is an InputError naming the file."""
        it = self._file.iter_batches(batch_size=batch_size, columns=[column])
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{self.source.display()}: damaged table, cannot read its data "
                                 f"({_first_line(exc)})") from None
            yield batch

    def read_column(self, column: str = TOKENS, length: int | None = None) -> np.ndarray:
        parts = list(self.iter_column(column, length=length))
        if not parts:
            return np.empty((0, length or self.fixed_length or 0), dtype=np.int64)
        return np.concatenate(parts)


def _list_to_matrix(col: pa.Array, length: int | None, where: str) -> np.ndarray:
    if col.null_count:
        raise SchemaError(f"{where} has missing values")
    if pa.types.is_fixed_size_list(col.type):
        k = col.type.list_size
        values = col.flatten()
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        k = int(lengths[0]) if len(lengths) else (length or 0)
        if len(lengths) and not (lengths == k).all():
            bad = int(np.flatnonzero(lengths != k)[0])
            raise SchemaError(f"{where}: sequences have different lengths ({k} and {int(lengths[bad])})")
        values = col.flatten()
    if length is not None and k != length:
        raise SchemaError(f"{where}: sequences have length {k}, expected {length}")
    if values.null_count:
        raise SchemaError(f"{where} has missing tokens")
    return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False).reshape(-1, k)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
