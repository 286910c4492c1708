"""`cgtools sample`: generate sequences from a checkpoint or from the exact BP denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.cli.options import check_device, ForceOpt, GrammarOpt, OutOpt, SeedOpt
from cgtools.errors import ConfigError, InputError

Opt = typer.Option


def sample(
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint (RUN_DIR/model.safetensors); optional with --denoiser bp.", metavar="CKPT")] = None,
    num: Annotated[Optional[int], Opt("--num", "-n", min=0, help="Number of sequences (not with --from).")] = None,
    out: OutOpt = "-",
    seed: SeedOpt = 0,
    steps: Annotated[Optional[int], Opt("--steps", min=1, help="Respaced reverse steps (default: all T levels).")] = None,
    batch_size: Annotated[int, Opt("--batch-size", min=1, help="Sequences per batch.")] = 512,
    final: Annotated[Optional[str], Opt("--final", help="Last step: 'argmax' (uniform default) or 'sample' (masked default).")] = None,
    cache: Annotated[Optional[bool], Opt("--cache/--no-cache", help="Masked: skip the network for rows that did not change (exact without time input; default on then).")] = None,
    denoiser: Annotated[str, Opt("--denoiser", help="'model' (the checkpoint) or 'bp' (exact belief propagation on the grammar).")] = "model",
    bp_output: Annotated[str, Opt("--bp-output", help="BP x0 prediction: 'cavity' (loss-optimal) or 'marginal' (double counts a token's own evidence).")] = "cavity",
    grammar: GrammarOpt = None,
    process: Annotated[Optional[str], Opt("--process", help="With --denoiser bp and no CKPT: 'uniform' or 'masked'.")] = None,
    T: Annotated[Optional[int], Opt("--T", min=1, help="With --denoiser bp and no CKPT: noise levels [default: 200].")] = None,
    schedule: Annotated[Optional[str], Opt("--schedule", help="With --denoiser bp and no CKPT: the noise schedule.")] = None,
    from_data: Annotated[Optional[Path], Opt("--from", help="Forward-backward: corrupt these sentences to --noise and denoise them.", metavar="DATA")] = None,
    noise: Annotated[Optional[float], Opt("--noise", min=0.0, max=1.0, help="Corruption E in [0, 1] for --from.")] = None,
    raw_weights: Annotated[bool, Opt("--raw-weights", help="Use the raw weights even if the checkpoint holds a weight average.")] = False,
    device: Annotated[str, Opt("--device", help="'cpu' or 'cuda'.")] = "cpu",
    force: ForceOpt = False,
) -> None:
    """Generate sequences from a trained model (or the exact BP denoiser) into a sequences table.

    The output carries the checkpoint's grammar, so `measure-accuracy` needs nothing else. With
    --from DATA --noise E every sentence of DATA is corrupted to level E and denoised (a
    forward-backward with the model).

    Examples:

      cgtools sample run/model.safetensors -n 1024 -o samples.parquet

      cgtools sample --denoiser bp --grammar train.parquet -n 1000 | cgtools measure-accuracy -

      cgtools sample run/model.safetensors --from val.parquet --noise 0.5 -o fb.parquet
    """
    from cgtools.diffusion import UniformConfig, MaskedConfig
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.grammar_file import load_grammar
    from cgtools.formats.metadata import provenance
    from cgtools.formats.sequences import SequencesTable
    from cgtools.training.generate import SampleConfig, exact_model, generate, write_samples
    from cgtools.training.trained import load_model

    if (from_data is None) == (num is None):
        raise typer.BadParameter("give either -n/--num or --from DATA", param_hint="--num")
    if from_data is not None and noise is None:
        raise typer.BadParameter("--from needs --noise E", param_hint="--noise")
    if denoiser not in ("model", "bp"):
        raise typer.BadParameter("must be 'model' or 'bp'", param_hint="--denoiser")
    check_device(device)
    check_output(out, force)
    sources = []
    model = None
    if ckpt is not None:
        sources.append(open_input(ckpt))
        model = load_model(str(ckpt), device=device, use_ema=not raw_weights)
    elif denoiser == "model":
        raise typer.BadParameter("a checkpoint is needed unless --denoiser bp", param_hint="CKPT")
    g = model.grammar if model is not None else None
    if grammar is not None:
        src = open_input(grammar)
        sources.append(src)
        g = load_grammar(src)
    if denoiser == "bp":
        if g is None:
            raise InputError("--denoiser bp needs a grammar (--grammar FILE, or a checkpoint with one)")
        if model is not None:
            proc_cfg = model.process.config
        elif (process or "uniform") == "uniform":
            proc_cfg = UniformConfig(T=T or 200, schedule=schedule or "linear-alpha")
        elif process == "masked":
            proc_cfg = MaskedConfig(schedule=schedule or "linear", T=T)
        else:
            raise ConfigError(f"--process must be 'uniform' or 'masked', got {process!r}")
        model = exact_model(g, proc_cfg, kind=bp_output, device=device)
    tokens = None
    if from_data is not None:
        src = open_input(from_data)
        sources.append(src)
        length = g.length if g is not None else model.network.config.length
        tokens = SequencesTable(src).read_column(length=length)
    cfg = SampleConfig(num=num or 0, seed=seed, steps=steps, batch_size=batch_size, final_step=final,
                       cache=cache, noise=noise)
    result = generate(model, cfg, from_tokens=tokens, device=device)
    extra = {"sampler": {"denoiser": denoiser if denoiser == "model" else f"bp-{bp_output}",
                         "steps": steps, "noise": noise, "process": model.process.config.to_dict()}}
    vocab = g.vocab if g is not None else model.network.config.vocab
    write_samples(result, g, vocab, out, force, provenance("sample", seed, sources), **extra)
