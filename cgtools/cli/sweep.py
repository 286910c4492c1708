"""`cgtools sweep`: train every run of a manifest in one process (cgtools.training.sweep).

The command takes every flag of `cgtools train` except DATA, --val and -o (those come from the
manifest, one run per entry); its signature is built from train's, so a flag added to or renamed
in `train` is a flag of `sweep` too. A manifest entry may override any setting flag for its run.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cgtools.cli.train import run_settings, setting_names, train_parameters

#: Per-run keys a manifest may hold besides data, val and out: every setting flag, and these.
ROW_OPTIONS = ("preset", "process", "arch", "allow_overlap", "label")


def sweep(**options: Any) -> None:
    """Train many models in one process: every run of MANIFEST, stacked where they share a shape.

    MANIFEST (JSON: a list of objects, or CSV with a header) lists one run per entry: `data`
    (training table), `val` (validation table) and `out` (its run directory, which receives exactly
    what `cgtools train` writes), plus any per-run setting: `seed`, `width`, `batch_size`, `lr`, ...
    (the names of train's flags), `preset`, `process`, `arch`, `allow_overlap`, `label`. Flags give
    the settings of every run; a manifest entry overrides them for its run. Relative paths are
    relative to the manifest's folder.

    Runs that differ only in data (even grammars of the same shape), seed and evaluation settings
    (--patience, --eval-every, --sample-check) train as one stacked network: each keeps its own
    batches, noise, early stopping and files, and ends where its single `cgtools train` would up
    to float rounding; a run that shares its shape with no other trains alone, exactly as
    `cgtools train` would. Stacks train side by side, one per core by default (--jobs), each
    running its tensor operations on one thread. A run that diverges does not stop the others;
    the command then exits 1 naming it.

    Examples:

      cgtools sweep runs.json --steps 2000

      cgtools sweep runs.csv --patience 3 --resume     # runs.csv: data,val,out,seed (header) + one row per run
    """
    import torch

    from cgtools.cli.options import check_device
    from cgtools.errors import ConfigError
    from cgtools.formats.files import open_input
    from cgtools.formats.manifest import read_manifest
    from cgtools.training.sweep import member_from_files, train_sweep

    manifest = options["manifest"]
    check_device(options["device"])
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    rows = read_manifest(open_input(manifest))
    ctx = options["ctx"]
    flags = {p.name: p for p in ctx.command.params}
    allowed = set(setting_names()) | set(ROW_OPTIONS)
    defaults = run_settings(options)
    members = []
    for n, row in enumerate(rows, 1):
        where = f"{manifest}: run {n}"
        given = {k: v for k, v in row.items() if k not in ("data", "val", "out")}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a run gives data, val, out and "
                              f"train's settings, e.g. seed, width, lr, patience)")
        values = {k: _convert(flags, k, v, ctx, where) for k, v in given.items() if k != "label"}
        settings = {**defaults, **{k: v for k, v in run_settings(values).items() if v is not None}}
        members.append(member_from_files(
            row["data"], row["val"], row["out"], preset=values.get("preset", options["preset"]),
            process=values.get("process", options["process"]), arch=values.get("arch", options["arch"]),
            settings=settings, allow_overlap=values.get("allow_overlap", options["allow_overlap"]),
            label=str(given.get("label", row["out"]))))
    cores = options["threads"] or torch.get_num_threads()
    jobs = options["jobs"] or cores
    train_sweep(members, device=options["device"], resume=options["resume"], force=options["force"],
                max_stack=options["max_stack"], jobs=jobs, threads=max(1, cores // jobs))


def _convert(flags: dict, key: str, value: Any, ctx: typer.Context, where: str) -> Any:
    """A manifest value checked and converted exactly as its flag would be ('64' -> 64, 'no' -> False)."""
    from cgtools.errors import ConfigError

    param = flags[key]
    try:
        return param.process_value(ctx, value)
    except typer.BadParameter as exc:
        raise ConfigError(f"{where}: {key}: {exc.message}") from None


_CTX = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
_MANIFEST = inspect.Parameter(
    "manifest", inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[Path, typer.Argument(metavar="MANIFEST", help="Runs to train: JSON or CSV with data, val, out and per-run settings ('-' = stdin).")])
_MAX_STACK = inspect.Parameter(
    "max_stack", inspect.Parameter.KEYWORD_ONLY, default=8,  # training.sweep.DEFAULT_MAX_STACK
    annotation=Annotated[int, typer.Option("--max-stack", min=1, help="Most runs trained as one stacked network (1 = one at a time, as separate `train` runs would).")])

_JOBS = inspect.Parameter(
    "jobs", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="Stacks trained side by side, each on --threads / JOBS cores [default: --threads, or torch's thread count: one stack per core].")])

# Every flag of `train` but the three the manifest gives per run; typer reads this signature.
sweep.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_CTX, _MANIFEST, *train_parameters(exclude=("data", "val", "out")), _MAX_STACK, _JOBS])
