"""A trained diffusion model as one object: noise process + network + grammar, built from configs.

`DiffusionModel.denoiser()` is the callable the samplers take (log p̂(x0 | x_t)); the time a
network sees is `process.network_time(t)` and, for the reference-code input, keep_prob = 1 - E(t).
`load_model(path)` rebuilds everything from a checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cgtools.diffusion import Denoiser, config_from_json, make_process
from cgtools.errors import SchemaError
from cgtools.formats.files import open_input
from cgtools.grammar.rhm import Grammar
from cgtools.models.unet import UNet, UNetConfig
from cgtools.training.checkpoint import Checkpoint


@dataclass
class DiffusionModel:
    process: object  # UniformDiffusion | MaskedDiffusion
    network: UNet
    grammar: Grammar | None
    meta: dict

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network logits [B, d, K] for x_t [B, d] at process times t [B]."""
        keep = None
        if self.network.config.input_mode == "leaf_message":
            keep = (1 - self.process.corruption(t)).float()
        return self.network(x_t, self.process.network_time(t), keep_prob=keep)

    def denoiser(self) -> Denoiser:
        """log p̂(x0 | x_t) in float32, in inference mode."""

        @torch.inference_mode()
        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.logits(x_t, t).float(), dim=-1)

        return denoise


def build_model(model_cfg: UNetConfig, process_cfg, seed: int, device: str = "cpu",
                grammar: Grammar | None = None, meta: dict | None = None) -> DiffusionModel:
    """A freshly initialised model (weights from `seed`)."""
    process = make_process(process_cfg, model_cfg.vocab, device)
    network = UNet(model_cfg, seed=seed).to(device)
    return DiffusionModel(process, network, grammar, meta or {})


def load_model(path: str, device: str = "cpu", use_ema: bool = True) -> DiffusionModel:
    """Rebuild a model from a checkpoint written by `cgtools train` (nothing else is needed)."""
    ckpt = Checkpoint(open_input(path))
    meta = ckpt.meta
    try:
        model_cfg = UNetConfig.from_json(meta["model"])
        process_cfg = config_from_json(meta["process"])
    except KeyError as exc:
        raise SchemaError(f"{path}: checkpoint lacks the {exc} config") from None
    grammar = Grammar.from_json(meta["grammar"]) if meta.get("grammar") else None
    model = build_model(model_cfg, process_cfg, seed=0, device=device, grammar=grammar, meta=meta)
    state = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    missing, unexpected = model.network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SchemaError(f"{path}: weights do not match the model config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.network.eval()
    return model
