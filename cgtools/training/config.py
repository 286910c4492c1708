"""Training settings and the named presets (`--preset`).

A preset is a set of defaults for the model, the noise process and the optimiser; explicit flags
override it. Presets:

* ``cpu`` (default): what reached the acceptance point fastest on 2 CPU cores in our probes
  (docs/training.md): uniform D3PM, T = 100, linear-ᾱ, λ = 0.01, Adam at 0.3 μP units with a
  cosine decay to 0 over the second half of 6000 steps, batch 64, width 256, time embedding,
  additive skips.
* ``paper``: the paper's text (Sec. 3.1, App. C): T = 1000, linear schedule (linear β, DDPM's
  1e-4 → 0.02), loss = the variational bound (λ = 0), SGD lr 1 in μP units, momentum 0.9,
  batch 32, width 8192.
* ``reference-code``: the conventions of the authors' public code (reference/peers.md §6):
  T = 200, linear β 1e-3 → 0.1, Adam 1e-4 on every parameter (no μP learning rates), LayerNorm in
  blocks, no time embedding, the standardised leaf message as input, concatenated skips, GeLU
  after the embedding, batch 64, width 1024.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from cgtools.errors import ConfigError

Optimizer = Literal["sgd", "adam"]
LrSchedule = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model and the noise process have their own configs).

    steps: optimiser steps. batch_size: global batch (split over DDP processes). lr: learning rate
    in μP units (see cgtools.models.mup) unless lr_scheme is "global" (raw rate for every
    parameter). lr_schedule/decay_start: constant, or a decay to 0 that starts at fraction
    `decay_start` of the run. warmup: linear warm-up steps. ema: weight-average decay (0 = off;
    the average is what is evaluated and saved as the model). eval_every: steps between
    validations. patience: stop after this many validations without a new best validation loss
    (None = never). val_repeats: noise draws per validation sentence. sample_check: samples drawn
    at each validation to measure accuracy and copies (0 = off). checkpoints_per_decade: density
    of the log-spaced checkpoints.
    """

    steps: int = 10000
    batch_size: int = 64
    optimizer: Optimizer = "sgd"
    lr: float = 2.0
    lr_scheme: Literal["mup", "global"] = "mup"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LrSchedule = "constant"
    decay_start: float = 0.0
    warmup: int = 0
    ema: float = 0.0
    eval_every: int = 500
    patience: int | None = None
    val_repeats: int = 8
    sample_check: int = 128
    sample_steps: int | None = None
    checkpoints_per_decade: int = 4
    online: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "eval_every", "val_repeats", "checkpoints_per_decade")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if not 0 <= self.decay_start < 1:
            raise ConfigError(f"decay-start must be in [0, 1), got {self.decay_start}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.sample_check < 0 or self.warmup < 0 or self.seed < 0:
            raise ConfigError("sample-check, warmup and seed must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**obj)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at `step` (0-based)."""
        factor = 1.0
        if self.warmup and step < self.warmup:
            factor = (step + 1) / self.warmup
        start = int(self.decay_start * self.steps)
        if self.lr_schedule != "constant" and step >= start:
            frac = (step - start) / max(self.steps - start, 1)
            if self.lr_schedule == "linear":
                factor *= 1 - frac
            else:
                import math

                factor *= 0.5 * (1 + math.cos(math.pi * frac))
        return factor


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "process": {"T": 100, "schedule": "linear-alpha", "lambda_ce": 0.01},
        "model": {"width": 256},
        "train": {"optimizer": "adam", "lr": 0.3, "lr_schedule": "cosine", "decay_start": 0.5,
                  "batch_size": 64, "steps": 6000},
    },
    "paper": {
        "process": {"T": 1000, "schedule": "linear-beta", "beta_min": 1e-4, "beta_max": 0.02,
                    "lambda_ce": 0.0},
        "model": {"width": 8192},
        "train": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.9, "batch_size": 32},
    },
    "reference-code": {
        "process": {"T": 200, "schedule": "linear-beta", "beta_min": 1e-3, "beta_max": 0.1,
                    "lambda_ce": 0.0},
        "model": {"width": 1024, "norm": "layernorm", "time_embedding": False,
                  "input_mode": "leaf_message", "skip": "concat", "embed_gelu": True,
                  "bias": False, "deconv_fan_in": "cin_k"},
        "train": {"optimizer": "adam", "lr": 1e-4, "lr_scheme": "global", "batch_size": 64},
    },
}


def preset(name: str) -> dict[str, dict[str, Any]]:
    """Defaults of a preset: {"process": {...}, "model": {...}, "train": {...}}."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))


def resolve_configs(preset_name: str, process: str, vocab: int, depth: int, branching: int,
                    process_flags: dict[str, Any], model_flags: dict[str, Any],
                    train_flags: dict[str, Any]):
    """Preset defaults overridden by explicit flags (None = not given) -> (model, process, train) configs."""
    from cgtools.diffusion import MaskedConfig, UniformConfig
    from cgtools.models.unet import UNetConfig

    base = preset(preset_name)
    given = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    if process == "uniform":
        proc_cfg = UniformConfig(**{**base["process"], **given(process_flags)})
    elif process == "masked":
        flags = given(process_flags)
        allowed = {f.name for f in dataclasses.fields(MaskedConfig)}
        bad = sorted(set(flags) - allowed)
        if bad:
            raise ConfigError(f"{', '.join(b.replace('_', '-') for b in bad)} do not apply to masked diffusion")
        proc_cfg = MaskedConfig(**flags)
    else:
        raise ConfigError(f"process must be 'uniform' or 'masked', got {process!r}")
    model_kw = {**base["model"], **given(model_flags)}
    if process == "masked":
        model_kw.setdefault("time_embedding", proc_cfg.time_conditioning)
        if model_kw.get("input_mode") == "leaf_message":
            model_kw["input_mode"] = "onehot"  # a mask carries no leaf evidence to standardise
    if (preset_name == "reference-code" and model_kw.get("input_mode") == "leaf_message"
            and model_kw.get("leaf_mean") is None):
        model_kw["leaf_mean"], model_kw["leaf_std"] = _reference_leaf_standardisation(vocab)
    model_cfg = UNetConfig(vocab=vocab, input_vocab=vocab + 1 if process == "masked" else vocab,
                           depth=depth, branching=branching, **model_kw)
    train_cfg = TrainConfig(**{**base["train"], **given(train_flags)})
    return model_cfg, proc_cfg, train_cfg


def _reference_leaf_standardisation(vocab: int) -> tuple[float, float]:
    """The input standardisation of the authors' public code: leaf-message moments averaged over
    *its default* schedule table (linear β 1e-4 -> 0.02, T = 1000), not the diffusion's own
    (reference/peers.md §6 and feasibility.md §4.5 describe that quirk; reproduced on purpose)."""
    from cgtools.diffusion.schedules import log_alpha_bar_table
    from cgtools.models.unet import reference_leaf_standardisation

    table = log_alpha_bar_table("linear-beta", 1000, 1e-4, 0.02).exp()
    return reference_leaf_standardisation(table, vocab)
