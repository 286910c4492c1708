"""A trained diffusion model as one object: noise process + network + grammar, built from configs.

`DiffusionModel.denoiser()` is the callable the samplers take (log p̂(x0 | x_t)); the network
sees `process.network_time(t)`. `load_model(path)` rebuilds everything from a checkpoint alone:
the architecture by its registered name, the process from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cgtools.diffusion.base import Denoiser, Process
from cgtools.diffusion.registry import config_from_json, make_process
from cgtools.errors import ConfigError, SchemaError
from cgtools.formats.checkpoint import Checkpoint
from cgtools.formats.files import open_input
from cgtools.grammar.rhm import Grammar
from cgtools.grammar.source import grammar_from_json
from cgtools.models.registry import architecture


@dataclass
class DiffusionModel:
    """process: the noise process; network: forward(x_t, t) -> prediction; arch: its registry
    name; grammar: the training grammar (None for data without one); meta: checkpoint metadata."""

    process: Process
    network: nn.Module
    grammar: Grammar | None
    meta: dict
    arch: str = "unet"

    @property
    def length(self) -> int | None:
        """Sequence length the network denoises (None when it has no fixed length)."""
        return getattr(self.network.config, "length", None)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one generated example: (d,) for tokens, (C, H, W) for images (from the
        training data's "images" metadata that checkpoints carry)."""
        image = self.meta.get("images")
        if image:
            return (int(image["channels"]), int(image["height"]), int(image["width"]))
        if self.length is None:
            raise ConfigError("this model has no fixed sequence length to sample")
        return (self.length,)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network output (logits [B, d, K] for tokens x_t [B, d]) at process times t [B]."""
        return self.network(x_t, self.process.network_time(t))

    def denoiser(self) -> Denoiser:
        """The process's denoiser value (log p̂(x0 | x_t) in float32 for tokens), in inference mode."""

        @torch.inference_mode()
        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.process.denoiser_output(self.logits(x_t, t))

        return denoise


def build_model(arch: str, model_cfg, process_cfg, seed: int, device: str = "cpu",
                grammar: Grammar | None = None, meta: dict | None = None) -> DiffusionModel:
    """A freshly initialised model (weights from `seed`) of a registered architecture."""
    net_arch = architecture(arch)
    process = make_process(process_cfg, getattr(model_cfg, "vocab", None), device)
    network = net_arch.build(model_cfg, process, seed).to(device)
    return DiffusionModel(process, network, grammar, meta or {}, arch)


def model_from_checkpoint(ckpt: Checkpoint, device: str = "cpu", use_ema: bool = True) -> DiffusionModel:
    """Rebuild the model a loaded checkpoint describes, with its (averaged) weights."""
    meta, where = ckpt.meta, ckpt.source.display()
    try:
        net_arch = architecture(meta["arch"])
        model_cfg = net_arch.config_from_json(meta["model"])
        process_cfg = config_from_json(meta["process"])
    except KeyError as exc:
        raise SchemaError(f"{where}: checkpoint lacks the {exc} config") from None
    except ConfigError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    grammar = grammar_from_json(meta["grammar"], where) if meta.get("grammar") else None
    model = build_model(net_arch.name, model_cfg, process_cfg, seed=0, device=device, grammar=grammar,
                        meta=meta)
    state = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    missing, unexpected = model.network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SchemaError(f"{where}: weights do not match the model config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.network.eval()
    return model


def load_model(path: str, device: str = "cpu", use_ema: bool = True) -> DiffusionModel:
    """Rebuild a model from a checkpoint written by `cgtools train` (nothing else is needed)."""
    return model_from_checkpoint(Checkpoint(open_input(path)), device, use_ema)
