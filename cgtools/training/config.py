"""How to train: the optimiser, schedule, validation and checkpoint settings of one run.

The model and the noise process have their own configs; every default lives in the presets
(cgtools.training.presets).
"""

from __future__ import annotations

import dataclasses
import math
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
    `decay_start` of the run. warmup: linear warm-up steps. grad_clip: clip the global gradient
    norm (over every parameter) to this value after the backward pass, before the step (None =
    off). ema: weight-average decay (0 = off;
    the average is what is evaluated and saved as the model). eval_every: steps between
    validations. early_evals: also validate at this many log-spaced steps per decade below
    eval_every (0 = off), so that the best-validation model of a run whose validation loss bottoms
    out early (a small training set memorised within the first eval_every steps) is kept.
    patience: stop after this many validations without a new best validation loss
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
    grad_clip: float | None = None
    ema: float = 0.0
    eval_every: int = 500
    early_evals: int = 0
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
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad-clip must be positive, got {self.grad_clip}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.sample_check < 0 or self.warmup < 0 or self.seed < 0 or self.early_evals < 0:
            raise ConfigError("sample-check, warmup, early-evals and seed must be >= 0")

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
                factor *= 0.5 * (1 + math.cos(math.pi * frac))
        return factor
