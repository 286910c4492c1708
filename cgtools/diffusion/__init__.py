"""Noise processes for diffusion: uniform D3PM and masked (MD4-style), behind one interface.

Typical use (training; shapes B × d, K symbols)::

    process = make_process(UniformConfig(T=200, schedule="linear-alpha"), vocab=K)
    t = process.sample_t(B, gen)                  # [B]
    x_t = process.q_sample(x0, t, gen)            # [B, d]
    logits = net(x_t, process.network_time(t))   # [B, d, K]; float32 time in [0, 1]
    terms = process.loss(logits, x0, x_t, t)      # LossTerms of [B] tensors
    terms.loss.mean().backward()                  # log terms.elbo_bits.mean() for validation

and sampling: ``sample(process, network_denoiser(net, process), N, d, gen, steps=...)``.
Processes are registered by name in :mod:`cgtools.diffusion.registry`.
Formulas and every choice made where the paper is silent: docs/diffusion.md.
"""

from __future__ import annotations

from cgtools.diffusion.base import (CategoricalProcess, Denoiser, LossTerms, Process, ProcessConfig,
                                    logits_denoiser, network_denoiser)
from cgtools.diffusion.masked import MaskedConfig, MaskedDiffusion
from cgtools.diffusion.registry import (PROCESSES, config_from_json, make_config, make_process,
                                        process_class, process_from_json, process_names)
from cgtools.diffusion.sampling import denoise, draw_categorical, forward_backward, sample
from cgtools.diffusion.uniform import UniformConfig, UniformDiffusion

__all__ = [
    "CategoricalProcess", "Denoiser", "LossTerms", "MaskedConfig", "MaskedDiffusion", "PROCESSES",
    "Process", "ProcessConfig", "UniformConfig", "UniformDiffusion", "config_from_json", "denoise",
    "draw_categorical", "forward_backward", "logits_denoiser", "make_config", "make_process",
    "network_denoiser", "process_class", "process_from_json", "process_names", "sample",
]
