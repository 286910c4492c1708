"""Option aliases shared by the commands, so every command spells a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Rows per batch (memory vs speed).")]
