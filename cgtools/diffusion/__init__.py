"""Discrete diffusion on token sequences: uniform D3PM and masked (MD4-style) noise processes.

Typical use (training; shapes B × d, K symbols)::

    process = make_process(UniformConfig(T=200, schedule="linear-alpha"), vocab=K)
    t = process.sample_t(B, gen)                  # [B]
    x_t = process.q_sample(x0, t, gen)            # [B, d]
    logits = net(x_t, process.network_time(t))   # [B, d, K]; float32 time in [0, 1]
    terms = process.loss(logits, x0, x_t, t)      # LossTerms of [B] tensors
    terms.loss.mean().backward()                  # log terms.elbo_bits.mean() for validation

and sampling: ``sample(process, network_denoiser(net, process), N, d, gen, steps=...)``.
Formulas and every choice made where the paper is silent: docs/diffusion.md.
"""

from __future__ import annotations

import json
from typing import Any

from cgtools.diffusion.base import Denoiser, LossTerms, Process, logits_denoiser, network_denoiser
from cgtools.diffusion.masked import MaskedConfig, MaskedDiffusion
from cgtools.diffusion.sampling import denoise, draw_categorical, forward_backward, sample
from cgtools.diffusion.uniform import UniformConfig, UniformDiffusion
from cgtools.errors import ConfigError

_CONFIGS = {"uniform": UniformConfig, "masked": MaskedConfig}


def config_from_json(text: str | dict[str, Any]) -> UniformConfig | MaskedConfig:
    """The process config saved by ``config.to_json()``, dispatched on its "process" tag."""
    obj = json.loads(text) if isinstance(text, str) else dict(text)
    kind = obj.get("process")
    if kind not in _CONFIGS:
        raise ConfigError(f"unknown diffusion process {kind!r}; expected one of {', '.join(_CONFIGS)}")
    return _CONFIGS[kind].from_json(obj)


def make_process(config: UniformConfig | MaskedConfig, vocab: int,
                 device: str = "cpu") -> UniformDiffusion | MaskedDiffusion:
    """The process object for a config and a vocabulary of K = `vocab` real symbols."""
    if isinstance(config, UniformConfig):
        return UniformDiffusion(config, vocab, device)
    if isinstance(config, MaskedConfig):
        return MaskedDiffusion(config, vocab, device)
    raise ConfigError(f"not a diffusion config: {type(config).__name__}")


__all__ = [
    "Denoiser", "LossTerms", "MaskedConfig", "MaskedDiffusion", "Process", "UniformConfig",
    "UniformDiffusion", "config_from_json", "denoise", "draw_categorical", "forward_backward",
    "logits_denoiser", "make_process", "network_denoiser", "sample",
]
