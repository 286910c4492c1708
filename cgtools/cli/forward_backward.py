"""`cgtools forward-backward`: noise clean sentences, denoise them exactly, compare the trees."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.cli.options import ForceOpt, GrammarOpt, JsonOpt, SeedOpt
from cgtools.cli.output import emit_json, emit_table, fmt
from cgtools.errors import ConfigError, InputError
from cgtools.formats.files import open_input

# Trained-model denoisers plug in through cgtools.inference.forward_backward.tokens_sampler.
TRAINED_MODELS_UNAVAILABLE = ("trained-model denoisers need `cgtools train`, not available yet; "
                              "use --denoiser bp")


def forward_backward(
    data: Annotated[str, typer.Argument(help="Clean sentences: a sequences table ('-' = stdin).", metavar="DATA")] = "-",
    noise: Annotated[str, typer.Option("--noise", "-e", help="Noise E in [0,1]: one value, a list 0.1,0.2 or a range START:STOP:COUNT (sweep).", metavar="SPEC")] = "0.5",
    process: Annotated[str, typer.Option("--process", help="'uniform': tokens redrawn uniformly with probability E; 'masked': masked with probability E.")] = "uniform",
    denoiser: Annotated[str, typer.Option("--denoiser", help="'bp' (exact belief propagation) or a checkpoint.", metavar="bp|CKPT")] = "bp",
    grammar: GrammarOpt = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", min=1, help="Use only the first N sentences of DATA.")] = None,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1, help="Independent noise draws per sentence and level.")] = 1,
    correlation: Annotated[str, typer.Option("--correlation", help="Token-change correlation C(r): 'covariance' (connected), 'pearson' (normalised) or 'none'.")] = "covariance",
    seed: SeedOpt = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch intra-op threads (default: torch's choice; 1 is often faster when other jobs share the cores).")] = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write one row per noise level to this Parquet table ('-' = stdout).", metavar="FILE")] = None,
    force: ForceOpt = False,
) -> None:
    """Forward-backward experiment: noise each clean sentence to level E, draw a clean sentence
    back from the exact posterior, and compare the two trees level by level.

    Reports `changed` (for levels 0 = tokens … L = root, the fraction of nodes whose symbol
    differs), `root_kept`, `changed_expected` (1 - mean posterior probability of the clean symbol,
    the same expectation with less noise), and the dynamical correlation C(r) of token changes with
    its sum `susceptibility` χ = Σ_{r≥1} C(r). With a list or range of noise levels every level is
    run; --json then prints one JSON object per level (JSON lines) and -o writes a Parquet table
    with one row per level. Latents of the clean sentences come from parsing DATA with its grammar
    (or --grammar).

    Examples:

      cgtools forward-backward data.parquet --noise 0.3 --json

      cgtools forward-backward data.parquet --noise 0:1:21 -o sweep.parquet
    """
    from cgtools.analysis.mean_field import noise_grid
    from cgtools.formats.grammar_file import load_grammar
    from cgtools.formats.metadata import provenance
    from cgtools.formats.sequences import SequencesTable
    from cgtools.inference.forward_backward import (CORRELATION_MODES, forward_backward as run,
                                                    results_table_write)
    from cgtools.inference.bp import PROCESSES

    if process not in PROCESSES:
        raise typer.BadParameter(f"must be one of {', '.join(PROCESSES)}", param_hint="--process")
    if correlation not in CORRELATION_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(CORRELATION_MODES)}", param_hint="--correlation")
    if denoiser != "bp":
        raise ConfigError(TRAINED_MODELS_UNAVAILABLE)
    noises = noise_grid(noise)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    if out is not None:
        from cgtools.formats.files import check_output

        check_output(out, force)
    source = open_input(data)
    table = SequencesTable(source)
    gsource = open_input(grammar) if grammar is not None else None
    g = load_grammar(gsource) if gsource is not None else table.grammar()
    if g is None:
        raise InputError(f"{source.display()} carries no grammar; give --grammar FILE")
    batches = _limited(table.iter_column(length=g.length), num)
    total = table.num_rows if num is None else min(num, table.num_rows)
    results = run(g, batches, noises, process, seed=seed, repeats=repeats, correlation=correlation,
                  total=total, where=source.display())  # type: ignore[arg-type]
    if out is not None:
        prov = provenance("forward-backward", seed, [source] + ([gsource] if gsource else []))
        results_table_write(results, g, out, force, prov, denoiser="bp", repeats=repeats)
    if json_out:
        for r in results:
            emit_json(r.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    levels = list(range(g.depth + 1))
    header = ("noise",) + tuple(f"changed_{lv}" for lv in levels) + ("root_kept", "chi")
    rows = [(fmt(r.noise, 3),) + tuple(fmt(c, 4) for c in r.changed) + (fmt(r.root_kept, 4), fmt(r.susceptibility, 4))
            for r in results]
    emit_table(rows, header)


def _limited(batches, num):
    if num is None:
        yield from batches
        return
    left = num
    for b in batches:
        if left <= 0:
            return
        yield b[:left]
        left -= b.shape[0]
