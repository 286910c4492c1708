"""`cgtools train`: train a diffusion model on a sequences table (RHM sentences, or any tokens)."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from cgtools.cli.options import (DeviceOpt, ForceOpt, OptionalSeedOpt, PresetOpt, ProcessOpt, SamplingStepsOpt,
                                 ScheduleOpt, ThreadsOpt, TOpt, check_device, deprecated, use_threads)

Opt = typer.Option


def train(
    data: Annotated[Path, typer.Argument(help="Training sequences table (its grammar, if any, is used for checks, sample checks and --online), or an image table (cgtools images).", metavar="DATA", show_default=False)],
    val: Annotated[Path, Opt("--val", help="Validation table of the same kind (disjoint from DATA).", metavar="FILE")],
    out: Annotated[str, Opt("--out", "-o", help="Run directory: model.safetensors, checkpoints/, metrics.parquet.", metavar="RUN_DIR")],
    preset: PresetOpt = "cpu",
    process: ProcessOpt = None,
    arch: Annotated[Optional[str], Opt("--arch", help="Network (cgtools.models.registry): 'unet' (the paper's 1-D U-Net), 'transformer' (bidirectional, MD4-style, for text) or 'unet2d' (images) [default: the preset's; unet].")] = None,
    width: Annotated[Optional[int], Opt("--width", min=1, help="Channels per layer (unet; paper: 8192), model width d_model (transformer) or base channels (unet2d).")] = None,
    layers: Annotated[Optional[int], Opt("--layers", min=1, help="Transformer blocks [preset text: 4].")] = None,
    heads: Annotated[Optional[int], Opt("--heads", min=1, help="Attention heads: transformer (width/heads must be even) [preset text: 4], unet2d [default: 4].")] = None,
    mlp: Annotated[Optional[str], Opt("--mlp", help="Transformer MLP: 'swiglu' (default) or 'gelu'.")] = None,
    steps: Annotated[Optional[int], Opt("--steps", min=1, help="Optimiser steps [preset cpu: 6000; paper, reference-code: 10000].")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", min=1, help="Global batch size.")] = None,
    optimizer: Annotated[Optional[str], Opt("--optimizer", help="'sgd' (momentum) or 'adam' [preset cpu: adam; paper: sgd].")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Learning rate in μP units, width-independent [preset cpu: 0.3 (Adam); paper: 1 (SGD)].")] = None,
    lr_scheme: Annotated[Optional[str], Opt("--lr-scheme", help="'mup' (per-layer μP rates, the default), 'global' (--lr for every parameter) or 'standard'.")] = None,
    momentum: Annotated[Optional[float], Opt("--momentum", help="SGD momentum.")] = None,
    weight_decay: Annotated[Optional[float], Opt("--weight-decay", help="Weight decay.")] = None,
    lr_schedule: Annotated[Optional[str], Opt("--lr-schedule", help="'constant', 'cosine' or 'linear' decay to 0 [preset cpu: cosine from half the run].")] = None,
    decay_start: Annotated[Optional[float], Opt("--decay-start", help="Fraction of the run after which the decay starts.")] = None,
    warmup: Annotated[Optional[int], Opt("--warmup", min=0, help="Linear warm-up steps.")] = None,
    ema: Annotated[Optional[float], Opt("--ema", help="Weight-average decay, e.g. 0.999 (0 = off).")] = None,
    grad_clip: Annotated[Optional[float], Opt("--grad-clip", help="Clip the global gradient norm to NORM before each step [preset text: 1; default: off].", metavar="NORM")] = None,
    T: TOpt = None,
    schedule: ScheduleOpt = None,
    beta_min: Annotated[Optional[float], Opt("--beta-min", help="First β of the linear-beta schedule.")] = None,
    beta_max: Annotated[Optional[float], Opt("--beta-max", help="Last β of the linear-beta schedule.")] = None,
    lambda_ce: Annotated[Optional[float], Opt("--lambda-ce", help="Weight λ of the auxiliary cross-entropy (hybrid loss).")] = None,
    time_conditioning: Annotated[Optional[bool], Opt("--time-conditioning/--no-time-conditioning", help="Masked: let the network see t.")] = None,
    time_embedding: Annotated[Optional[bool], Opt("--time-embedding/--no-time-embedding", help="Sinusoidal time embedding (unet: per-block biases; transformer: adaLN) [default: masked --time-conditioning, uniform on].")] = None,
    skip: Annotated[Optional[str], Opt("--skip", help="Skip connections: 'add' or 'concat'.")] = None,
    norm: Annotated[Optional[str], Opt("--norm", help="'none' or 'layernorm' in every block.")] = None,
    input_mode: Annotated[Optional[str], Opt("--input-mode", help="'onehot' or 'leaf_message' (standardised BP leaf message).")] = None,
    learn_sigma: Annotated[Optional[bool], Opt("--learn-sigma/--no-learn-sigma", help="Gaussian: learn the reverse variance (iDDPM's learned range; the network predicts 2C channels) [default: on].")] = None,
    loss: Annotated[Optional[str], Opt("--loss", help="Gaussian: 'hybrid' (MSE + λ·VB, learned variance), 'simple' (MSE, fixed variance) or 'vlb' (the bound alone) [default: hybrid].", metavar="KIND")] = None,
    lambda_vlb: Annotated[Optional[float], Opt("--lambda-vlb", help="Gaussian: weight λ of the VB term of the hybrid loss [default: 0.001].")] = None,
    importance_sampling: Annotated[Optional[bool], Opt("--importance-sampling/--no-importance-sampling", help="Gaussian --loss vlb: draw t with probability ∝ sqrt(E[L_t²]) over the last 10 losses of each t (iDDPM) [default: off].")] = None,
    channel_mult: Annotated[Optional[str], Opt("--channel-mult", help="unet2d: channels of each resolution level as multiples of --width, e.g. 1,2,2 (the resolution halves between levels).", metavar="M,M,...")] = None,
    num_res_blocks: Annotated[Optional[int], Opt("--num-res-blocks", min=1, help="unet2d: residual blocks per resolution level [default: 2].")] = None,
    attention_resolutions: Annotated[Optional[str], Opt("--attention-resolutions", help="unet2d: feature-map heights with self-attention, e.g. 8,4 [default: every level below full resolution].", metavar="R,R,...")] = None,
    dropout: Annotated[Optional[float], Opt("--dropout", min=0.0, max=0.99, help="unet2d: dropout in the residual blocks [default: 0].")] = None,
    online: Annotated[bool, Opt("--online", help="Fresh sentences from DATA's grammar every step (never one of --val).")] = False,
    eval_every: Annotated[Optional[int], Opt("--eval-every", min=1, help="Steps between validations [default: 500].")] = None,
    early_evals: Annotated[Optional[int], Opt("--early-evals", min=0, help="Also validate at this many log-spaced steps per decade before the first --eval-every (keeps the best model of a small training set memorised early) [default: 0].")] = None,
    patience: Annotated[Optional[int], Opt("--patience", min=1, help="Early stopping: validations without improvement.")] = None,
    sample_check: Annotated[Optional[int], Opt("--sample-check", min=0, help="Samples drawn at each validation to log accuracy and copies [default: 128].")] = None,
    sampling_steps: SamplingStepsOpt = None,
    sample_steps: Annotated[Optional[int], Opt("--sample-steps", min=1, hidden=True)] = None,
    seed: OptionalSeedOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    allow_overlap: Annotated[bool, Opt("--allow-overlap", help="Accept validation sentences that also occur in DATA.")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in RUN_DIR from its last checkpoint.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train a diffusion model on RHM sentences (offline on DATA, or --online), on tokenised text,
    or on images (an image table: Gaussian diffusion with the 2-D U-Net, --preset image).

    The seed (--seed) draws the weights, the data order and the noise; --sampling-steps respaces
    the reverse process of the sample checks (--sample-check) at each validation.

    RUN_DIR receives model.safetensors (best validation loss), last.safetensors (for --resume),
    checkpoints/step_*.safetensors (log-spaced) and metrics.parquet (step, losses, bound in
    bits/token, and the accuracy / copies of a small batch of samples at each validation).
    Runs under torchrun for several processes (DDP; gloo on CPU, NCCL on GPU).

    Examples:

      cgtools train train.parquet --val val.parquet -o run

      cgtools train train.parquet --val val.parquet -o run --preset paper --width 256

      cgtools train text_train.parquet --val text_val.parquet -o run --preset text --layers 4

      cgtools train digits_train.parquet --val digits_test.parquet -o run --preset image --width 32

      torchrun --nproc-per-node 2 -m cgtools train train.parquet --val val.parquet -o run
    """
    options = dict(locals())  # the flags' values, before anything else is defined here
    import torch

    from cgtools.formats.files import open_input
    from cgtools.formats.metadata import provenance
    from cgtools.models.registry import architecture_names
    from cgtools.training.loop import train as run_training
    from cgtools.training.presets import resolve_run
    from cgtools.training.source import load_training_data

    if arch is not None and arch not in architecture_names():
        raise typer.BadParameter(f"must be one of {', '.join(architecture_names())}", param_hint="--arch")
    check_device(device)
    use_threads(threads)
    sources = [open_input(data), open_input(val)]
    data_set = load_training_data(*sources, online=online, allow_overlap=allow_overlap)
    settings = run_settings(options)
    run = resolve_run(preset, process=process, arch=arch, data=data_set.spec, settings=settings)
    run_training(run, out, train_tokens=data_set.train, val_tokens=data_set.val,
                 grammar=data_set.grammar, provenance=provenance("train", run.train.seed, sources),
                 device=device, resume=resume, force=force, data_meta=data_set.meta)


# ---- the flags, shared with `cgtools sweep` ---------------------------------------------------------
#: Options of `train` that are not run settings; every other option of `train` is one (routed by
#: its name to the training loop, the process or the architecture by presets.resolve_run).
COMMAND_OPTIONS = frozenset({"data", "val", "out", "preset", "process", "arch", "device", "threads",
                             "allow_overlap", "resume", "force"})


def setting_names() -> tuple[str, ...]:
    """The names of train's setting flags, in --help order."""
    return tuple(n for n in inspect.signature(train).parameters if n not in COMMAND_OPTIONS)


#: flags spelled differently from the config field they set (new spelling -> field, old spelling)
RENAMED = {"sampling_steps": ("sample_steps", "--sample-steps")}


def run_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings among option values (None = not given; --online off counts as not given)."""
    settings = {name: options.get(name) for name in setting_names() if name not in RENAMED}
    for flag, (field, old) in RENAMED.items():
        new = options.get(flag)
        settings[field] = new if new is not None else deprecated(old, "--" + flag.replace("_", "-"),
                                                                 options.get(field))
    if "online" in settings:
        settings["online"] = settings["online"] or None
    return settings


def train_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """train's parameters (flags with their help and defaults) as keyword-only parameters with
    evaluated annotations, for another command's signature (`cgtools sweep` takes them all)."""
    hints = typing.get_type_hints(train, include_extras=True)
    return [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default,
                              annotation=hints[p.name])
            for p in inspect.signature(train).parameters.values() if p.name not in exclude]
