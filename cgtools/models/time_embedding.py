"""The sinusoidal embedding of the diffusion time that both networks condition on."""

from __future__ import annotations

import torch
from torch import Tensor

#: Times t in [0, 1] are embedded as 1000·t: the range of DDPM's integer steps, for which the
#: frequencies 10000^(-k/(half-1)) were chosen.
TIME_SCALE = 1000.0


def sinusoid(t: Tensor, dim: int) -> Tensor:
    """t [B] in [0, 1] -> [B, dim]: sin and cos of 1000·t at dim/2 log-spaced frequencies
    (10000^(-k/(dim/2 - 1)), k = 0 … dim/2 - 1), in t's dtype."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / (half - 1)).to(t)
    arg = TIME_SCALE * t[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
