"""RUN_DIR/metrics.parquet: one row per validation, rewritten atomically after each one.

Columns: step, examples (seen so far, all processes), tokens (examples × sequence length),
train_loss (mean training objective since
the previous row, nats/token), val_loss (same objective on the validation set), val_elbo_bits
(unbiased bound estimate, bits/token), lr (the μP-unit learning rate at that step), seconds
(wall time of training so far), and the sample checks: sample_accuracy (list A_1..A_L of a small
batch of samples), sample_memorized (fraction copying a training sentence), sample_novel_valid
(grammatical and new). Metadata `cgtools` = {"schema": "metrics/1", "provenance": ...}.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.errors import InputError
from cgtools.formats import metadata
from cgtools.formats.files import atomic_output

METRICS_SCHEMA = "metrics/1"
COLUMNS = ("step", "examples", "tokens", "train_loss", "val_loss", "val_elbo_bits", "lr", "seconds",
           "sample_accuracy", "sample_memorized", "sample_novel_valid")


def write_metrics(path: str | Path, rows: list[dict], provenance: dict) -> None:
    """Replace `path` with the table of `rows` (dicts keyed by COLUMNS; missing values are null)."""
    data = {c: [r.get(c) for r in rows] for c in COLUMNS}
    types = {"step": pa.int64(), "examples": pa.int64(), "tokens": pa.int64(),
             "sample_accuracy": pa.list_(pa.float64())}
    table = pa.table({c: pa.array(v, type=types.get(c, pa.float64())) for c, v in data.items()})
    table = table.replace_schema_metadata(
        {metadata.METADATA_KEY: metadata.encode(METRICS_SCHEMA, provenance=provenance)})
    with atomic_output(str(path), force=True) as f:
        pq.write_table(table, f)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of an existing metrics table (for resuming); [] when there is none."""
    if not Path(path).exists():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: damaged metrics table ({first})") from None
