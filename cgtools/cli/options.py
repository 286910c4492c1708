"""Option aliases shared by the commands, so every command spells a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output file ('-' = stdout).", metavar="FILE")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
_SEED = typer.Option("--seed", min=0, help="Random seed (non-negative): every random draw of the command "
                     "follows from it.", metavar="SEED")
SeedOpt = Annotated[int, _SEED]
OptionalSeedOpt = Annotated[Optional[int], _SEED]  # default from a preset
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
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Sequences processed at once (memory vs speed; "
                                      "results do not depend on it unless the help says so).", metavar="B")]
# The grammar's shape, for the commands that draw or describe a grammar.
DepthOpt = Annotated[Optional[int], typer.Option("--depth", "-L", min=1, help="Depth L: levels of rules (d = s^L tokens).", metavar="L")]
BranchingOpt = Annotated[Optional[int], typer.Option("--branching", "-s", min=2, help="Branching s: symbols per production (tuple size).", metavar="S")]
VocabOpt = Annotated[Optional[int], typer.Option("--vocab", "-v", min=1, help="Vocabulary size v of every level.", metavar="V")]
SynonymsOpt = Annotated[Optional[int], typer.Option("--synonyms", "-m", min=1, help="Synonyms m: productions per symbol.", metavar="M")]
NClassesOpt = Annotated[Optional[int], typer.Option("--n-classes", min=1, help="Root symbols (default v).", metavar="N")]
ProcessOpt = Annotated[
    Optional[str],
    typer.Option("--process", help="Noise process: 'uniform' (tokens redrawn uniformly, D3PM), 'masked' "
                 "(tokens masked, MD4) or 'gaussian' (images, Improved DDPM).", metavar="PROCESS"),
]
PresetOpt = Annotated[str, typer.Option("--preset", help="Defaults (cgtools.training.presets): 'cpu' (fast on CPU), "
                                        "'paper' (the paper's text), 'reference-code' (the authors' public code) or 'text' (MD4-style "
                                        "masked diffusion with the transformer, for tokenised text); "
                                        "explicit flags override them.", metavar="NAME")]
TOpt = Annotated[Optional[int], typer.Option("--T", min=1, help="Noise levels of the uniform and gaussian processes "
                                             "(masked: steps of a discrete-time bound) [default: the preset's].",
                                             metavar="T")]
ScheduleOpt = Annotated[Optional[str], typer.Option("--schedule", help="Noise schedule: uniform linear-beta, linear-alpha "
                                                    "or cosine; masked linear or cosine; gaussian cosine or linear [default: the "
                                                    "preset's].",
                                                    metavar="NAME")]
NoiseOpt = Annotated[
    Optional[str],
    typer.Option("--noise", "-e", help="Corruption E in [0, 1]: the probability that a token was redrawn (uniform) "
                 "or masked; commands that sweep take a list 0.1,0.2 or a range START:STOP:COUNT.", metavar="E"),
]
DenoiserOpt = Annotated[
    Optional[str],
    typer.Option("--denoiser", help="The model that denoises: 'bp' (exact belief propagation on the grammar) "
                 "or a checkpoint written by `cgtools train` (RUN_DIR/model.safetensors).", metavar="bp|CKPT"),
]
SamplingStepsOpt = Annotated[
    Optional[int],
    typer.Option("--sampling-steps", min=1, help="Reverse-diffusion steps, respaced (uniform: K of the T "
                 "levels; masked: N grid points) [default: every level].", metavar="K"),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice; 1 is often faster "
                 "when other jobs share the cores).", metavar="N"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="'cpu' or 'cuda' (random numbers are drawn on the CPU "
                                        "either way).", metavar="DEVICE")]
LimitOpt = Annotated[
    Optional[int],
    typer.Option("--limit", min=1, help="Use only the first N rows of the input (sequences, or images of an image table).", metavar="N"),
]
# Old spellings, kept for one release: hidden from --help, a deprecation line on stderr when used.
OldStepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, hidden=True)]
OldNumOpt = Annotated[Optional[int], typer.Option("--num", "-n", min=1, hidden=True)]


def deprecated(old: str, new: str, value):
    """Warn once on stderr that `old` is spelled `new` now, and pass the value on."""
    import logging

    if value is not None:
        logging.getLogger("cgtools.cli").warning("%s is deprecated and will be removed; use %s", old, new)
    return value


def single_noise(spec: str | None) -> float | None:
    """One corruption level from --noise (a command that does not sweep); BadParameter otherwise."""
    if spec is None:
        return None
    from cgtools.analysis.mean_field import noise_grid

    values = noise_grid(spec)
    if len(values) != 1:
        raise typer.BadParameter("this command takes one noise level", param_hint="--noise")
    return values[0]


def use_threads(threads: int | None) -> None:
    """Apply --threads (torch's intra-op thread count); imports torch only when given."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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
