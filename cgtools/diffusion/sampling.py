"""The samplers every process shares: fresh samples, forward-backward, and one batch of denoising.

Entry points (shapes: N samples of length d):

* :func:`sample` — N fresh samples [N, d] from the prior, in batches, with a progress bar.
* :func:`forward_backward` — corrupt given data [N, d] to exactly E, then denoise it back. Both
  `cgtools sample --from` and the forward-backward experiment (`cgtools forward-backward
  --denoiser CKPT`) run through it.
* :func:`denoise` — one batch from x_t at a given start time down to x_0 (what both use); the
  steps themselves are the process's :meth:`~cgtools.diffusion.base.Process.reverse`.
* :func:`draw_categorical` — float64 inverse-CDF draws from log-probabilities.
* :func:`top_p_denoiser` — the denoiser restricted to its nucleus (top-p sampling, MD4 `topp`).
* :class:`CountingDenoiser` — counts the network evaluations a sampler makes (what the masked
  process's cache saves).

Every random number comes from the explicit `generator`; results depend on (generator state,
batch_size).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from cgtools.diffusion.base import Denoiser, Process, inverse_cdf, inverse_cdf_weights, uniforms
from cgtools.errors import ConfigError
from cgtools.logs import progress

# Older names, still imported by tests and benchmarks.
_inverse_cdf = inverse_cdf
_inverse_cdf_weights = inverse_cdf_weights


def draw_categorical(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One float64 categorical draw per row of log_probs [..., K] -> long [...]."""
    u = uniforms(log_probs.shape[:-1], generator, log_probs.device)
    return inverse_cdf(log_probs, u)


def nucleus(log_probs: torch.Tensor, p: float) -> torch.Tensor:
    """log_probs [..., K] with every symbol outside the nucleus set to -inf.

    The nucleus of a row is the smallest set of most probable symbols whose probability reaches
    p (the top symbol always belongs to it); p >= 1 keeps every symbol. The masked sampler's
    inverse-CDF draw renormalises, and never draws a zero-weight (-inf) symbol.
    """
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"top-p must lie in (0, 1], got {p}")
    if p >= 1.0:
        return log_probs
    probs = torch.softmax(log_probs.to(torch.float64), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep a symbol while the mass before it is below p: the smallest prefix reaching p
    keep_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return log_probs.masked_fill(~keep, float("-inf"))


def top_p_denoiser(denoiser: Denoiser, p: float) -> Denoiser:
    """`denoiser` with its categorical over x0 cut to the nucleus of mass p (the denoiser itself
    when p = 1, so top-p 1 is the plain sampler draw for draw)."""
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"top-p must lie in (0, 1], got {p}")
    if p >= 1.0:
        return denoiser
    return lambda x_t, t: nucleus(denoiser(x_t, t), p)


class CountingDenoiser:
    """A denoiser that counts its calls and the rows [B] it was evaluated on."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.calls, self.rows = denoiser, 0, 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += int(x_t.shape[0])
        return self.denoiser(x_t, t)


def start_grid(process: Process, start, steps: int | None) -> list:
    """Reverse times from `start` down: start, then the grid points of `steps` below it."""
    return [start] + [t for t in process.time_grid(steps) if t < start]


@torch.inference_mode()
def denoise(process: Process, denoiser: Denoiser, x_t: torch.Tensor, start, generator: torch.Generator,
            *, steps: int | None = None, final_step: str | None = None,
            cache: bool | None = None, bar=None) -> torch.Tensor:
    """Run the reverse process on one batch x_t from time `start` to 0.

    start: a time of the process (a level 1..T for uniform, a time in (0, 1] for masked); the
    grid is `start` followed by the points of process.time_grid(steps) below it. final_step: what
    the last step (to 0) does with its distribution, "argmax" or "sample" (default: the
    process's). cache: see the process's reverse(). bar: a progress bar advanced once per step.
    """
    final = process.check_final_step(final_step)
    return process.reverse(denoiser, x_t, start_grid(process, start, steps), generator,
                           final_step=final, cache=cache, bar=bar)


def _batches(total: int, batch_size: int):
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, total, batch_size):
        yield start, min(batch_size, total - start)


def sample(process: Process, denoiser: Denoiser, num: int, length: int | tuple[int, ...],
           generator: torch.Generator, *, steps: int | None = None, batch_size: int = 512,
           final_step: str | None = None, cache: bool | None = None,
           device: torch.device | str | None = None, description: str = "sampling") -> torch.Tensor:
    """`num` examples from the model: sequences of `length` tokens [num, length], or, with a
    shape tuple (e.g. (C, H, W) for images), [num, *shape], on `device`.

    Each batch starts from the prior at the top of the grid and runs :func:`denoise`; steps
    respaces the reverse process. Shows one progress bar over batches × steps.
    """
    shape = (length,) if isinstance(length, int) else tuple(length)
    if num < 0 or min(shape, default=0) < 1:
        raise ConfigError(f"need num >= 0 and a positive example shape, got {num} and {shape}")
    process.check_final_step(final_step)
    device = process.device if device is None else torch.device(device)
    start = process.time_grid(steps)[0]
    n_steps = len(process.time_grid(steps))
    out = None
    with progress(math.ceil(num / batch_size) * n_steps if num else 0, description) as bar:
        for lo, size in _batches(num, batch_size):
            x = process.prior_sample((size, *shape), generator, device)
            y = denoise(process, denoiser, x, start, generator, steps=steps, final_step=final_step,
                        cache=cache, bar=bar)
            if out is None:
                out = y.new_empty((num, *y.shape[1:]))
            out[lo:lo + size] = y
    if out is None:
        out = process.prior_sample((0, *shape), generator, device)
    return out


def forward_backward(process: Process, denoiser: Denoiser, x0: torch.Tensor, noise: float,
                     generator: torch.Generator, *, steps: int | None = None, batch_size: int = 512,
                     final_step: str | None = None, cache: bool | None = None,
                     bar=None, description: str = "forward-backward") -> torch.Tensor:
    """Corrupt x0 [N, d] to exactly E = `noise`, then denoise with the model: [N, d].

    The corruption is exact (process.corrupt); the reverse pass starts at
    process.time_for_corruption(E) (uniform: the level t whose 1 - ᾱ_t is closest to E; masked:
    the t with 1 - α(t) = E) and continues on the grid of `steps` below it. When that time is 0
    (E = 0, or E closer to 0 than to the first level) x_t is returned as it is. `bar`: advance an
    existing progress bar once per step instead of opening one.
    """
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"the corruption level must lie in [0, 1], got {noise}")
    process.check_final_step(final_step)
    start = process.time_for_corruption(noise)
    n_steps = len(start_grid(process, start, steps)) if start else 0
    out = torch.empty_like(x0)
    total = math.ceil(len(x0) / batch_size) * n_steps if len(x0) else 0
    with progress(total, description) if bar is None else nullcontext(bar) as bar:
        for lo, size in _batches(len(x0), batch_size):
            x_t = process.corrupt(x0[lo:lo + size], noise, generator)
            if start == 0:
                out[lo:lo + size] = x_t
                continue
            out[lo:lo + size] = denoise(process, denoiser, x_t, start, generator, steps=steps,
                                        final_step=final_step, cache=cache, bar=bar)
    return out


__all__ = ["CountingDenoiser", "denoise", "draw_categorical", "forward_backward", "nucleus", "sample",
           "start_grid", "top_p_denoiser"]
