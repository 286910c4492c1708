"""Every default of a run, in one place: the named presets (`--preset`), and how explicit
settings override them.

A preset holds defaults for the noise process (one section per process name), the network (one
section per architecture name) and the training loop. `cgtools train` and `cgtools sample`
(exact BP without a checkpoint) read their defaults here and nowhere else. Presets:

* ``cpu`` (default): what reached the acceptance point fastest on 2 CPU cores in our probes
  (docs/training.md): uniform D3PM, T = 100, linear-ᾱ, λ = 0.01, Adam at 0.3 μP units with a
  cosine decay to 0 over the second half of 6000 steps, batch 64, width 256, time embedding,
  additive skips. Masked diffusion keeps its own defaults (continuous time, linear schedule).
* ``paper``: the paper's text (Sec. 3.1, App. C): T = 1000, linear schedule (linear β, DDPM's
  1e-4 → 0.02), loss = the variational bound (λ = 0), SGD lr 1 in μP units, momentum 0.9,
  batch 32, width 8192.
* ``reference-code``: the conventions of the authors' public code (reference/peers.md §6):
  T = 200, linear β 1e-3 → 0.1, Adam 1e-4 on every parameter (no μP learning rates), LayerNorm in
  blocks, no time embedding, the standardised leaf message as input (with the authors' moments),
  concatenated skips, GeLU after the embedding, batch 64, width 1024.
* ``text``: MD4's text recipe (reference/diffusion.md §2.4) at CPU scale, for tokenised text:
  masked diffusion (continuous time, linear schedule, no time input) and the ``transformer``
  architecture (both chosen unless --process / --arch say otherwise), width 128, 4 layers, 4
  heads, SwiGLU; Adam at 1e-3 on every parameter (lr_scheme "global": the transformer has no μP
  classes), 500 linear warm-up steps then a cosine decay to 0 over the run, gradient norm clipped
  to 1, weight average 0.999, batch 32, 10000 steps.

* ``image``: Improved DDPM (reference/diffusion.md §3) for small images at CPU scale: Gaussian
  diffusion (T = 1000, cosine schedule, learned-range variance, hybrid loss λ = 0.001) and the
  ``unet2d`` architecture (both chosen unless --process / --arch say otherwise) at its own
  defaults; Adam at 5e-4 on every parameter (iDDPM: 1e-4 at batch 128 for 5·10^5 steps; a
  higher rate for runs of 10^4 steps), 200 warm-up steps then a cosine decay to 0, gradient norm
  clipped to 1, weight average 0.999, batch 64, 10000 steps, no sample checks (no grammar).

A preset may name the process and architecture a run uses when --process / --arch are not given
(``"choose"``); otherwise they are uniform and unet.

Explicit settings (flags) are routed by name to the section they belong to — the training loop
(TrainConfig), the chosen process's config, or the chosen architecture — and a setting that
none of them has is refused naming the process and architecture ("--beta-min does not apply to
masked diffusion with the unet architecture").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from cgtools.diffusion.base import Process, ProcessConfig
from cgtools.diffusion.registry import make_config, make_process, process_class
from cgtools.errors import ConfigError
from cgtools.models.registry import Architecture, DataSpec, architecture
from cgtools.training.config import TrainConfig

DEFAULT_PRESET = "cpu"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "process": {"uniform": {"T": 100, "schedule": "linear-alpha", "lambda_ce": 0.01},
                    "masked": {}},
        "model": {"unet": {"width": 256}},
        "train": {"optimizer": "adam", "lr": 0.3, "lr_schedule": "cosine", "decay_start": 0.5,
                  "batch_size": 64, "steps": 6000},
    },
    "paper": {
        "process": {"uniform": {"T": 1000, "schedule": "linear-beta", "beta_min": 1e-4,
                                "beta_max": 0.02, "lambda_ce": 0.0},
                    "masked": {}},
        "model": {"unet": {"width": 8192}},
        "train": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.9, "batch_size": 32},
    },
    "reference-code": {
        "process": {"uniform": {"T": 200, "schedule": "linear-beta", "beta_min": 1e-3,
                                "beta_max": 0.1, "lambda_ce": 0.0},
                    "masked": {}},
        "model": {"unet": {"width": 1024, "norm": "layernorm", "time_embedding": False,
                           "input_mode": "leaf_message", "leaf_standardisation": "reference",
                           "skip": "concat", "embed_gelu": True, "bias": False,
                           "deconv_fan_in": "cin_k"}},
        "train": {"optimizer": "adam", "lr": 1e-4, "lr_scheme": "global", "batch_size": 64},
    },
    "text": {
        "choose": {"process": "masked", "arch": "transformer"},
        "process": {"masked": {}},
        "model": {"transformer": {"width": 128, "layers": 4, "heads": 4, "mlp": "swiglu"}},
        "train": {"optimizer": "adam", "lr": 1e-3, "lr_scheme": "global", "lr_schedule": "cosine",
                  "decay_start": 0.0, "warmup": 500, "grad_clip": 1.0, "ema": 0.999, "batch_size": 32,
                  "steps": 10000},
    },
    "image": {
        "choose": {"process": "gaussian", "arch": "unet2d"},
        "process": {"gaussian": {}},
        "model": {"unet2d": {}},
        "train": {"optimizer": "adam", "lr": 5e-4, "lr_scheme": "global", "lr_schedule": "cosine",
                  "decay_start": 0.0, "warmup": 200, "grad_clip": 1.0, "ema": 0.999, "batch_size": 64,
                  "steps": 10000, "sample_check": 0, "val_repeats": 4},
    },
}

#: --process and --arch when neither the flags nor the preset's "choose" name them
DEFAULT_CHOICE = {"process": "uniform", "arch": "unet"}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset(name: str) -> dict[str, Any]:
    """A copy of preset `name`: {"process": {name: {...}}, "model": {arch: {...}}, "train": {...}}
    and optionally "choose": {"process": name, "arch": name}."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_choice(preset_name: str, what: str, given: str | None = None) -> str:
    """`given` (a --process or --arch value), else the preset's choice, else DEFAULT_CHOICE."""
    if given is not None:
        return given
    return preset(preset_name).get("choose", {}).get(what, DEFAULT_CHOICE[what])


def process_defaults(preset_name: str, process: str) -> dict[str, Any]:
    """The preset's settings for process `process` ({} when it has none)."""
    process_class(process)  # ConfigError for an unknown name
    return preset(preset_name)["process"].get(process, {})


def process_config(preset_name: str, process: str, overrides: dict[str, Any] | None = None) -> ProcessConfig:
    """The config of `process` under a preset, with `overrides` (None values ignored) applied."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return make_config(process, {**process_defaults(preset_name, process), **given})


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is built from (saved in its checkpoints)."""

    arch: str
    model: Any  # the architecture's config dataclass
    process: ProcessConfig
    train: TrainConfig


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def resolve_run(preset_name: str, *, process: str | None, arch: str | None, data: DataSpec,
                settings: dict[str, Any]) -> RunConfig:
    """Preset defaults overridden by explicit `settings` (name -> value; None = not given).

    process / arch None: the preset's choice (preset_choice). Each setting goes to the training
    loop, the process or the architecture, whichever knows its name; a name none of them knows is
    a ConfigError that says so.
    """
    base = preset(preset_name)
    process, arch = preset_choice(preset_name, "process", process), preset_choice(preset_name, "arch", arch)
    net: Architecture = architecture(arch)
    proc_cls = process_class(process)
    train_names, proc_names = _fields(TrainConfig), _fields(proc_cls.Config)
    given = {k: v for k, v in settings.items() if v is not None}
    train_kw, proc_kw, model_kw = dict(base["train"]), dict(base["process"].get(process, {})), \
        dict(base["model"].get(arch, {}))
    for key, value in given.items():
        if key in train_names:
            train_kw[key] = value
        elif key in proc_names:
            proc_kw[key] = value
        elif key in net.settings:
            model_kw[key] = value
        else:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to {process} diffusion "
                              f"with the {arch} architecture")
    proc_cfg = make_config(process, proc_kw)
    proc: Process = make_process(proc_cfg, data.vocab if data.vocab is not None else 2)
    model_cfg = net.configure(data, proc, model_kw)
    train_cfg = TrainConfig.from_dict(train_kw)
    if not net.mup and train_cfg.lr_scheme != "global":
        made_for = next((name for name, p in PRESETS.items() if p.get("choose", {}).get("arch") == arch), None)
        hint = f" (the {made_for} preset does: --preset {made_for})" if made_for else ""
        raise ConfigError(f"the {arch} architecture has no μP learning rates; train it with --lr-scheme global "
                          f"and a raw --lr{hint}")
    return RunConfig(arch, model_cfg, proc_cfg, train_cfg)
