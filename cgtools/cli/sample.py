"""`cgtools sample`: generate sequences from a checkpoint or from the exact BP denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.cli.options import (DenoiserOpt, DeviceOpt, ForceOpt, GrammarOpt, NoiseOpt, OldStepsOpt, OutOpt,
                                 PresetOpt, ProcessOpt, SamplingStepsOpt, ScheduleOpt, SeedOpt, ThreadsOpt, TOpt,
                                 check_device, deprecated, single_noise, use_threads)
from cgtools.errors import ConfigError

Opt = typer.Option


def sample(
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint (RUN_DIR/model.safetensors): the same as --denoiser CKPT.", metavar="CKPT", show_default=False)] = None,
    num: Annotated[Optional[int], Opt("--num", "-n", min=0, help="Number of sequences (not with --from).")] = None,
    out: OutOpt = "-",
    seed: SeedOpt = 0,
    sampling_steps: SamplingStepsOpt = None,
    steps: OldStepsOpt = None,
    batch_size: Annotated[int, Opt("--batch-size", min=1, help="Sequences per batch.")] = 512,
    final: Annotated[Optional[str], Opt("--final", help="Last step: 'argmax' (uniform default) or 'sample' (masked default).")] = None,
    cache: Annotated[Optional[bool], Opt("--cache/--no-cache", help="Masked: skip the network for rows that did not change (exact without time input; default on then).")] = None,
    top_p: Annotated[float, Opt("--top-p", max=1.0, help="Masked: draw each unmasked token from the smallest set of most probable symbols of mass P (nucleus sampling; 1 = off).", metavar="P")] = 1.0,
    denoiser: DenoiserOpt = None,
    bp_output: Annotated[str, Opt("--bp-output", help="BP x0 prediction: 'cavity' (loss-optimal) or 'marginal' (double counts a token's own evidence).")] = "cavity",
    grammar: GrammarOpt = None,
    process: ProcessOpt = None,
    preset: PresetOpt = "cpu",
    T: TOpt = None,
    schedule: ScheduleOpt = None,
    from_data: Annotated[Optional[Path], Opt("--from", help="Forward-backward: corrupt these sentences to --noise and denoise them.", metavar="DATA")] = None,
    noise: NoiseOpt = None,
    raw_weights: Annotated[bool, Opt("--raw-weights", help="Use the raw weights even if the checkpoint holds a weight average.")] = False,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
) -> None:
    """Generate sequences (or images) from a trained model (or the exact BP denoiser) into a table.

    The model is CKPT (or --denoiser CKPT), or --denoiser bp: exact belief propagation on the
    grammar (--grammar, or the checkpoint's), with the checkpoint's noise process or, without one,
    --process, --T and --schedule over the --preset's defaults.

    The output carries the checkpoint's grammar, so `measure-accuracy` needs nothing else, and
    for text the training table's "tokenizer" and "vocab", so `detokenize` can decode it. With
    --from DATA --noise E every sentence of DATA is corrupted to level E and denoised (a
    forward-backward with the model). A model trained on images writes an image table (PNG;
    `--from` then takes an image table of the model's size).

    Examples:

      cgtools sample run/model.safetensors -n 1024 -o samples.parquet

      cgtools sample --denoiser bp --grammar train.parquet -n 1000 | cgtools measure-accuracy -

      cgtools sample run/model.safetensors --from val.parquet --noise 0.5 -o fb.parquet

      cgtools sample text_run/model.safetensors -n 8 --top-p 0.98 -o samples.parquet
    """
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.metadata import provenance
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import check_same_grammar, resolve_grammar
    from cgtools.formats.images import ImagesTable
    from cgtools.training.generate import SampleConfig, exact_model, generate, write_image_samples, write_samples
    from cgtools.training.presets import preset_choice, process_config
    from cgtools.training.source import carried_meta, image_examples
    from cgtools.training.trained import load_model

    noise = single_noise(noise)
    if not top_p > 0:
        raise typer.BadParameter(f"must lie in (0, 1], got {top_p}", param_hint="--top-p")
    if (from_data is None) == (num is None):
        raise typer.BadParameter("give either -n/--num or --from DATA", param_hint="--num")
    if from_data is not None and noise is None:
        raise typer.BadParameter("--from needs --noise E", param_hint="--noise")
    steps = sampling_steps if sampling_steps is not None else deprecated("--steps", "--sampling-steps", steps)
    if denoiser == "model":  # the old spelling: "the checkpoint given as CKPT"
        deprecated("--denoiser model", "CKPT or --denoiser CKPT", denoiser)
        denoiser = None
    if denoiser not in (None, "bp"):
        if ckpt is not None and Path(denoiser) != ckpt:
            raise typer.BadParameter("name the model once: CKPT or --denoiser CKPT", param_hint="--denoiser")
        ckpt, denoiser = Path(denoiser), None
    denoiser = denoiser or "model"
    check_device(device)
    use_threads(threads)
    check_output(out, force)
    sources = []
    model = None
    if ckpt is not None:
        sources.append(open_input(ckpt))
        model = load_model(str(ckpt), device=device, use_ema=not raw_weights)
        if process is not None and process != model.process.name:
            raise ConfigError(f"{ckpt} was trained with {model.process.name} diffusion, not --process {process}")
    elif denoiser == "model":
        raise typer.BadParameter("give the model: CKPT, --denoiser CKPT or --denoiser bp", param_hint="CKPT")
    gsource = open_input(grammar) if grammar is not None else None
    if gsource is not None:
        sources.append(gsource)
    g = resolve_grammar(gsource, model, required=denoiser == "bp")
    if denoiser == "bp":
        if model is not None:
            proc_cfg = model.process.config
        else:
            proc_cfg = process_config(preset, preset_choice(preset, "process", process), {"T": T, "schedule": schedule})
        model = exact_model(g, proc_cfg, kind=bp_output, device=device)
    images = bool(getattr(model, "meta", {}).get("images"))
    tokens = None
    if from_data is not None:
        src = open_input(from_data)
        sources.append(src)
    if from_data is not None and images:
        tokens = image_examples(ImagesTable(src), model.sample_shape)  # float32 [N, C, H, W]
    elif from_data is not None:
        from_table = SequencesTable(src)
        if g is not None and gsource is None:
            check_same_grammar(g, from_table, "was drawn from a different grammar than the model's; "
                                              "give --grammar FILE to denoise it anyway")
        tokens = from_table.read_column(length=model.length)
    cfg = SampleConfig(num=num or 0, seed=seed, steps=steps, batch_size=batch_size, final_step=final,
                       cache=cache, noise=noise, top_p=top_p)
    stats: dict = {}
    result = generate(model, cfg, from_tokens=tokens, device=device, stats=stats)
    extra = {"sampler": {"denoiser": denoiser if denoiser == "model" else f"bp-{bp_output}",
                         "steps": steps, "noise": noise, "top_p": top_p, "process": model.process.describe(),
                         **stats}}
    if images:
        write_image_samples(result, out, force, provenance("sample", seed, sources), **extra)
        return
    write_samples(result, g, model.process.vocab, out, force, provenance("sample", seed, sources),
                  carried=carried_meta(getattr(model, "meta", {})), **extra)
