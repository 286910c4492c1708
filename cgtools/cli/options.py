"""Option aliases shared by the commands, so every command spells a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output file ('-' = stdout).", metavar="FILE")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Random seed (non-negative).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
GrammarOpt = Annotated[
    Optional[Path],
    typer.Option("--grammar", "-g", help="Grammar source: a sequences table or a grammar/checkpoint "
                 "safetensors file (default: the grammar in the input's metadata).", metavar="FILE"),
]
TagOpt = Annotated[
    Optional[List[str]],
    typer.Option("--tag", help="Label the results table with KEY=VALUE (repeatable), e.g. --tag P=512 --tag seed=0; "
                 "tags become columns, so the tables of a sweep concatenate.", metavar="KEY=VALUE"),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Rows per batch (memory vs speed).")]


def check_device(device: str) -> None:
    """Refuse a device this machine lacks: usage error (exit 2) for an unknown name, InputError
    (exit 1, one line) for CUDA without a GPU. Imports torch only for CUDA names."""
    from cgtools.errors import InputError

    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise typer.BadParameter("must be 'cpu' or 'cuda'", param_hint="--device")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here")
