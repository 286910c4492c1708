"""`cgtools forward-backward`: noise clean sentences, denoise them (exact BP or a trained model),
compare the trees."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.cli.options import (DenoiserOpt, DeviceOpt, ForceOpt, GrammarOpt, JsonOpt, LimitOpt, NoiseOpt, OldNumOpt,
                                 ProcessOpt,
                                 OldStepsOpt, SamplingStepsOpt, SeedOpt, TagOpt, ThreadsOpt, check_device,
                                 deprecated, use_threads)
from cgtools.cli.output import emit_json, emit_table, fmt
from cgtools.formats.files import open_input
from cgtools.formats.results import parse_tags


def forward_backward(
    data: Annotated[str, typer.Argument(help="Clean sentences: a sequences table ('-' = stdin).", metavar="DATA")] = "-",
    noise: NoiseOpt = "0.5",
    process: ProcessOpt = None,
    denoiser: DenoiserOpt = None,
    sampling_steps: SamplingStepsOpt = None,
    steps: OldStepsOpt = None,
    device: DeviceOpt = "cpu",
    grammar: GrammarOpt = None,
    limit: LimitOpt = None,
    num: OldNumOpt = None,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1, help="Independent noise draws per sentence and level.")] = 1,
    correlation: Annotated[str, typer.Option("--correlation", help="Token-change correlation C(r): 'covariance' (connected), 'pearson' (normalised) or 'none'.")] = "covariance",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write one row per noise level to this Parquet table ('-' = stdout).", metavar="FILE")] = None,
    tag: TagOpt = None,
    force: ForceOpt = False,
) -> None:
    """Forward-backward experiment: noise each clean sentence to level E, draw a clean sentence
    back from the posterior (exact BP, or a trained model), and compare the two trees level by
    level.

    Reports `changed` (for levels 0 = tokens … L = root, the fraction of nodes whose symbol
    differs), `root_kept`, `changed_expected` (BP only: 1 - mean posterior probability of the
    clean symbol, the same expectation with less noise), `grammatical` (fraction of denoised
    sentences that parse), and the dynamical correlation C(r) of token changes with its sum
    `susceptibility` χ = Σ_{r≥1} C(r). With a list or range of noise levels every level is run;
    --json then prints one JSON object per level (JSON lines) and -o writes a Parquet table with
    one row per level. Latents of the clean sentences come from parsing DATA with its grammar (or
    --grammar).

    With --denoiser CKPT the model's reverse process starts from the noisy sentence: uniform at
    the level t whose corruption 1 - ᾱ_t is closest to E (t = 0, i.e. E < (1 - ᾱ_1)/2, returns
    x_t unchanged), masked at the time with 1 - α(t) = E; the tokens are corrupted at exactly E,
    by the same library function as `sample --from`. The process is the checkpoint's (--process
    may only repeat it); its training grammar must be DATA's unless --grammar is given. The latents of an
    ungrammatical denoised sentence count as changed. The table records the checkpoint (path and
    sha256).

    Examples:

      cgtools forward-backward data.parquet --noise 0.3 --json

      cgtools forward-backward data.parquet --noise 0:1:21 -o sweep.parquet

      cgtools forward-backward data.parquet --noise 0:1:21 --denoiser run/model.safetensors -o fb.parquet
    """
    from cgtools.analysis.mean_field import noise_grid
    from cgtools.diffusion.registry import make_process, process_names
    from cgtools.formats.metadata import provenance
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import resolve_grammar
    from cgtools.inference.forward_backward import (CORRELATION_MODES, forward_backward as run,
                                                    results_table_write)
    from cgtools.training.presets import DEFAULT_PRESET, process_config

    if process is not None and process not in process_names():
        raise typer.BadParameter(f"must be one of {', '.join(process_names())}", param_hint="--process")
    if correlation not in CORRELATION_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(CORRELATION_MODES)}", param_hint="--correlation")
    steps = sampling_steps if sampling_steps is not None else deprecated("--steps", "--sampling-steps", steps)
    num = limit if limit is not None else deprecated("-n/--num", "--limit", num)
    denoiser = denoiser or "bp"
    use_model = denoiser != "bp"
    if not use_model:
        if steps is not None:
            raise typer.BadParameter("only for a model denoiser (--denoiser CKPT)", param_hint="--sampling-steps")
        if device != "cpu":
            raise typer.BadParameter("only for a model denoiser (--denoiser CKPT); BP runs on the CPU",
                                     param_hint="--device")
    elif denoiser == "-":
        raise typer.BadParameter("give the checkpoint as a file, not '-'", param_hint="--denoiser")
    noises = noise_grid(noise)
    check_device(device)
    use_threads(threads)
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    if out is not None:
        from cgtools.formats.files import check_output

        check_output(out, force)
    source = open_input(data)
    table = SequencesTable(source)
    gsource = open_input(grammar) if grammar is not None else None
    g = resolve_grammar(gsource, table)
    sources = [source] + ([gsource] if gsource else [])
    sampler = None
    meta: dict = {"denoiser": "bp"}
    if use_model:
        from cgtools.inference.forward_backward import check_model, model_sampler
        from cgtools.training.trained import load_model

        csource = open_input(denoiser)
        sources.append(csource)
        model = load_model(denoiser, device=device)
        check_model(model, g, process, where=csource.display(), data=source.display(),
                    same_grammar=gsource is None)
        noise_process = model.process
        sampler = model_sampler(model, g, steps=steps, device=device)
        meta = {"denoiser": csource.display(), "model": sampler.info()}
    else:
        noise_process = make_process(process_config(DEFAULT_PRESET, process or "uniform"), g.vocab)
    batches = table.iter_column(length=g.length, limit=num)
    total = table.rows(num)
    results = run(g, batches, noises, noise_process, seed=seed, repeats=repeats, correlation=correlation,
                  sampler=sampler, total=total, where=source.display())  # type: ignore[arg-type]
    if out is not None:
        prov = provenance("forward-backward", seed, sources)
        results_table_write(results, g, out, force, prov, tags=parse_tags(tag), repeats=repeats, **meta)
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
