"""Ancestral samplers for both processes, respacing, the cached masked sampler, forward-backward.

Entry points (shapes: N samples of length d, K symbols):

* :func:`sample` — N fresh sequences [N, d] from the prior, in batches, with a progress bar.
* :func:`forward_backward` — noise given data [N, d] to corruption E, then denoise it back.
* :func:`denoise` — one batch from x_t at a given start time down to x_0 (what both use).
* :func:`draw_categorical` — float64 inverse-CDF draws from log-probabilities.

Every random number comes from the explicit `generator`, and every step draws the same numbers
whether or not the network is evaluated, so the cached masked sampler reproduces the uncached
one draw for draw. Results depend on (generator state, batch_size).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from cgtools.diffusion.base import Denoiser, Process, check_tokens, uniforms
from cgtools.diffusion.masked import MaskedDiffusion
from cgtools.diffusion.uniform import UniformDiffusion
from cgtools.errors import ConfigError
from cgtools.logs import progress

FinalStep = Literal["argmax", "sample"]


def _inverse_cdf_weights(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Category of each row at uniform u: weights [..., K] float64 >= 0 (unnormalised), u [...] -> long.

    Category j owns [c_{j-1}, c_j) of the cumulative sums c scaled by u·c_K, so zero-weight
    symbols are never drawn. Everything in float64: low-probability symbols keep their float64
    frequency (float32 Gumbel tricks truncate them: Zheng et al. 2024).
    """
    cdf = torch.cumsum(weights, dim=-1)  # [..., K]
    target = (u * cdf[..., -1]).unsqueeze(-1)  # [..., 1]
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)  # only reachable by rounding at u ≈ 1


def _inverse_cdf(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """As _inverse_cdf_weights for log-probabilities (any scale; renormalised in float64)."""
    return _inverse_cdf_weights(torch.softmax(log_probs.to(torch.float64), dim=-1), u)


def draw_categorical(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One float64 categorical draw per row of log_probs [..., K] -> long [...]."""
    u = uniforms(log_probs.shape[:-1], generator, log_probs.device)
    return _inverse_cdf(log_probs, u)


def _start_grid(process: Process, start, steps: int | None) -> list:
    """Reverse times from `start` down: start, then the grid points of `steps` below it."""
    return [start] + [t for t in process.time_grid(steps) if t < start]


def resolve_final_step(process: Process, final_step: FinalStep | None) -> FinalStep:
    """The last step's rule: `final_step`, or the process's default (uniform argmax, masked sample)."""
    if final_step is None:
        return "argmax" if process.kind == "uniform" else "sample"
    if final_step not in ("argmax", "sample"):
        raise ConfigError(f"final_step must be 'argmax' or 'sample', got {final_step!r}")
    return final_step


@torch.inference_mode()
def denoise(process: Process, denoiser: Denoiser, x_t: torch.Tensor, start, generator: torch.Generator,
            *, steps: int | None = None, final_step: FinalStep | None = None,
            cache: bool | None = None, bar=None) -> torch.Tensor:
    """Run the reverse process on one batch x_t [B, d] from time `start` to 0: long [B, d].

    start: a level 1..T (uniform) or a time in (0, 1] (masked); the grid is `start` followed by
    the points of process.time_grid(steps) below it. final_step: what the last step (to 0) does
    with its distribution — "argmax" (uniform default) or "sample" (masked default).
    cache (masked only; default: not config.time_conditioning): evaluate the denoiser only on rows
    that changed since their last evaluation; exact when the denoiser ignores t and treats rows
    independently. bar: a cgtools.logs progress bar advanced once per step.
    """
    final = resolve_final_step(process, final_step)
    grid = _start_grid(process, start, steps)
    if isinstance(process, UniformDiffusion):
        if cache:
            raise ConfigError("the cached sampler is exact only for masked diffusion without time input")
        return _denoise_uniform(process, denoiser, x_t, grid, generator, final, bar)
    if isinstance(process, MaskedDiffusion):
        use_cache = (not process.config.time_conditioning) if cache is None else bool(cache)
        return _denoise_masked(process, denoiser, x_t, grid, generator, final, use_cache, bar)
    raise ConfigError(f"no sampler for process {getattr(process, 'kind', process)!r}")


def _denoise_uniform(process: UniformDiffusion, denoiser: Denoiser, x: torch.Tensor, grid: list[int],
                     generator: torch.Generator, final: FinalStep, bar) -> torch.Tensor:
    b = x.shape[0]
    for i, level in enumerate(grid):
        t = torch.full((b,), level, dtype=torch.long, device=x.device)
        log_p_hat = denoiser(x, t)  # [B, d, K]
        # One uniform per position and step, drawn even for an argmax last step.
        u = uniforms(x.shape, generator, x.device)
        if i + 1 < len(grid):
            x = _inverse_cdf_weights(process.reverse_weights(log_p_hat, x, level, grid[i + 1]), u)
        else:
            weights = process.decoder_weights(log_p_hat, x, level)  # [B, d, K] float64
            x = weights.argmax(-1) if final == "argmax" else _inverse_cdf_weights(weights, u)
        if bar is not None:
            bar.advance()
    return x


def _denoise_masked(process: MaskedDiffusion, denoiser: Denoiser, x: torch.Tensor, grid: list[float],
                    generator: torch.Generator, final: FinalStep, use_cache: bool, bar) -> torch.Tensor:
    b = x.shape[0]
    mask = process.mask_id
    x = x.clone()
    cached: torch.Tensor | None = None  # [B, d, K] last denoiser output per row
    stale = torch.ones(b, dtype=torch.bool, device=x.device)  # row changed since its last evaluation
    for i, level in enumerate(grid):
        s_level = grid[i + 1] if i + 1 < len(grid) else 0.0
        masked = x == mask  # [B, d]
        t = torch.full((b,), level, dtype=torch.float64, device=x.device)
        if not use_cache:
            log_p_hat = denoiser(x, t)
        else:
            rows = torch.nonzero(stale & masked.any(-1)).squeeze(-1)  # rows needing a fresh output
            if rows.numel():
                out = denoiser(x[rows], t[rows])
                if cached is None:
                    cached = out.new_zeros((b, *out.shape[1:]))
                cached[rows] = out
                stale[rows] = False
            log_p_hat = cached
        # ρ in float64; exactly 1 at s = 0, so every masked position is revealed by the last step.
        rho = float(process.unmask_probability(level, s_level))
        u = uniforms(x.shape, generator, x.device)  # one uniform per position and step
        reveal = masked & (u < rho)  # [B, d]
        if log_p_hat is not None and bool(reveal.any()):
            pos = reveal.nonzero(as_tuple=True)
            chosen = log_p_hat[pos]  # [R, K], only the positions being revealed
            if s_level == 0.0 and final == "argmax":
                symbols = chosen.argmax(-1)
            else:
                # Conditional on u < ρ, u/ρ is uniform on [0, 1): reuse it to pick the symbol.
                v = torch.clamp(u[pos] / rho, max=math.nextafter(1.0, 0.0))
                symbols = _inverse_cdf(chosen, v)
            x[pos] = symbols
            stale |= reveal.any(-1)
        if bar is not None:
            bar.advance()
    return x


def _batches(total: int, batch_size: int):
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, total, batch_size):
        yield start, min(batch_size, total - start)


def sample(process: Process, denoiser: Denoiser, num: int, length: int, generator: torch.Generator,
           *, steps: int | None = None, batch_size: int = 512, final_step: FinalStep | None = None,
           cache: bool | None = None, device: torch.device | str | None = None,
           description: str = "sampling") -> torch.Tensor:
    """`num` sequences of `length` tokens from the model: long [num, length] on `device`.

    Each batch starts from the prior (uniform tokens / all-mask) at the top of the grid and runs
    :func:`denoise`; steps respaces the reverse process (uniform: K of T levels; masked: N grid
    points). Shows one progress bar over batches × steps.
    """
    if num < 0 or length < 1:
        raise ConfigError(f"need num >= 0 and length >= 1, got {num} and {length}")
    device = process.device if device is None else torch.device(device)
    start = process.time_grid(steps)[0]
    n_steps = len(process.time_grid(steps))
    out = torch.empty((num, length), dtype=torch.long, device=device)
    with progress(math.ceil(num / batch_size) * n_steps if num else 0, description) as bar:
        for lo, size in _batches(num, batch_size):
            x = process.prior_sample((size, length), generator, device)
            out[lo:lo + size] = denoise(process, denoiser, x, start, generator, steps=steps,
                                        final_step=final_step, cache=cache, bar=bar)
    return out


def forward_backward(process: Process, denoiser: Denoiser, x0: torch.Tensor, noise: float,
                     generator: torch.Generator, *, steps: int | None = None, batch_size: int = 512,
                     final_step: FinalStep | None = None, cache: bool | None = None,
                     description: str = "forward-backward") -> torch.Tensor:
    """Corrupt x0 [N, d] to level E = `noise`, then denoise with the model: long [N, d].

    Uniform: the level t whose 1 - ᾱ_t is closest to E (E = 0 returns x0 unchanged); masked: the
    t with 1 - α(t) = E exactly. The reverse pass starts at that t and continues on the grid of
    `steps` below it.
    """
    check_tokens(x0, process.vocab, "x0")
    start = process.time_for_corruption(noise)
    if start == 0:
        return x0.clone()
    n_steps = len(_start_grid(process, start, steps))
    out = torch.empty_like(x0)
    with progress(math.ceil(len(x0) / batch_size) * n_steps if len(x0) else 0, description) as bar:
        for lo, size in _batches(len(x0), batch_size):
            chunk = x0[lo:lo + size]
            t = torch.full((size,), start, device=chunk.device,
                           dtype=torch.long if process.kind == "uniform" else torch.float64)
            x_t = process.q_sample(chunk, t, generator)
            out[lo:lo + size] = denoise(process, denoiser, x_t, start, generator, steps=steps,
                                        final_step=final_step, cache=cache, bar=bar)
    return out


__all__ = ["FinalStep", "denoise", "draw_categorical", "forward_backward", "resolve_final_step", "sample"]
