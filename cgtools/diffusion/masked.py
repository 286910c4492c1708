"""Masked (absorbing-state) diffusion as in MD4, with an exact bound and no α clipping.

Time is continuous, t ∈ [0, 1]; a token is masked (id K) independently with probability
E = 1 - α(t), where α(0) = 1 and α(1) = 0 exactly (schedules.MaskSchedule). From t to s < t a
masked position is revealed with probability ρ = (α(s) - α(t))/(1 - α(t)), drawing its symbol from
the model's μ_θ(z_t) (the denoiser's p̂, never the mask); revealed positions stay fixed.

Bound (per sequence, nats). Continuous mode (default): the reverse process is continuous on
[t_min, 1] plus one discrete last step t_min -> 0 (ρ = 1):

    -log p(x) <= ∫_{t_min}^1 w(t) E[Σ_{masked n} -log μ_{n, x_n}(z_t)] dt
                 + E[Σ_{masked n} -log μ_{n, x_n}(z_{t_min})],

with w = -α'/(1 - α). One draw estimates it without bias: t ~ U[0, 1] (stratified per batch),
clamped up to t_min, with weight w(t) for t > t_min and 1/t_min on the atom t = t_min (which
carries probability t_min). For the linear schedule this is just w(max(t, t_min)). There is no
prior term (α(1) = 0, so z_1 is all-mask) and no ε-clipped α as in MD4 (whose α̃(1) = ε > 0 leaves
a prior term that MD4 drops).

Discrete mode (``T`` set): t = i/T, i ~ U{1..T} (stratified), weight T·ρ_i with s = (i-1)/T; this
is the exact T-step bound (ρ_1 = 1), looser than the continuous one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from cgtools.diffusion.base import (CategoricalProcess, Denoiser, LossTerms, ProcessConfig, inverse_cdf,
                                    log_probs_of, noise_vector, uniforms)
from cgtools.diffusion.schedules import MASK_SCHEDULES, MaskSchedule
from cgtools.errors import ConfigError


@dataclass(frozen=True)
class MaskedConfig(ProcessConfig):
    """Settings of the masked process (see docs/diffusion.md).

    schedule: "linear" (α = 1 - t, MD4 default) or "cosine" (α = 1 - sin(πt/2)).
    t_min: continuous mode only; times below it are clamped to it (the last step is t_min -> 0).
    T: None for the continuous-time bound, or the number of steps of the discrete-time bound.
    time_conditioning: whether the network should see t. Off by default: the optimal denoiser of
    masked diffusion does not depend on t, and without it the cached sampler is exact.
    """

    process = "masked"

    schedule: str = "linear"
    t_min: float = 1e-3
    T: int | None = None
    time_conditioning: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in MASK_SCHEDULES:
            raise ConfigError(f"unknown masked schedule {self.schedule!r}; "
                              f"choose one of {', '.join(MASK_SCHEDULES)}")
        if not 0.0 < self.t_min < 1.0:
            raise ConfigError(f"t_min must lie in (0, 1), got {self.t_min}")
        if self.T is not None and self.T < 1:
            raise ConfigError(f"T must be >= 1 or None, got {self.T}")


class MaskedDiffusion(CategoricalProcess):
    """Absorbing-state diffusion over K symbols; inputs use K + 1 ids (mask id = K)."""

    name = "masked"
    Config = MaskedConfig
    default_final_step = "sample"

    def __init__(self, config: MaskedConfig, vocab: int, device: torch.device | str = "cpu") -> None:
        if vocab < 1:
            raise ConfigError(f"the vocabulary needs at least 1 symbol, got {vocab}")
        self.config = config
        self.vocab = vocab
        self.input_vocab = vocab + 1
        self.mask_id = vocab
        self.schedule = MaskSchedule(config.schedule)
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> "MaskedDiffusion":
        return MaskedDiffusion(self.config, self.vocab, device)

    # ---- time ----------------------------------------------------------------------------------
    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Stratified training times, float64 [B]: t_b = (u + b/B) mod 1 with one u per batch.

        Continuous mode: clamped up to t_min. Discrete mode: snapped to i/T, i = ⌊t·T⌋ + 1.
        """
        u = uniforms((1,), generator, self.device)
        t = torch.remainder(u + torch.arange(batch, dtype=torch.float64, device=self.device) / batch, 1.0)
        if self.config.T is not None:
            T = self.config.T
            return (torch.clamp(torch.floor(t * T), max=T - 1) + 1) / T
        return torch.clamp(t, min=self.config.t_min)

    def corruption(self, t: torch.Tensor) -> torch.Tensor:
        """E = 1 - α(t): masking probability, float64 [B]."""
        return self.schedule.one_minus_alpha(torch.as_tensor(t).to(torch.float64))

    def time_for_corruption(self, e: float) -> float:
        """The t ∈ [0, 1] with 1 - α(t) = e exactly."""
        return self.schedule.time_for_masking(e)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """t as float32 [B] (feed it to a time embedding only if config.time_conditioning)."""
        return t.to(torch.float32)

    def corruption_at_network_time(self, tau: torch.Tensor) -> torch.Tensor:
        """1 - α(τ), float64 [B] (the network sees t itself)."""
        return self.corruption(torch.as_tensor(tau, dtype=torch.float64))

    def full_time(self, value, batch: int, device: torch.device | str) -> torch.Tensor:
        """Time `value` for every row: float64 [B]."""
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)

    def time_grid(self, steps: int | None = None) -> list[float]:
        """Descending times [1, (N-1)/N, ..., 1/N] (N = steps, default T or 1000); the end 0 is implicit."""
        n = (self.config.T or 1000) if steps is None else int(steps)
        if n < 1:
            raise ConfigError(f"steps must be >= 1, got {n}")
        return [i / n for i in range(n, 0, -1)]

    def unmask_probability(self, t: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        """ρ = (α(s) - α(t))/(1 - α(t)) for 0 <= s < t, float64 (1 exactly at s = 0)."""
        m_t = self.schedule.one_minus_alpha(torch.as_tensor(t, dtype=torch.float64))
        m_s = self.schedule.one_minus_alpha(torch.as_tensor(s, dtype=torch.float64))
        return (m_t - m_s) / m_t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weight of Σ_masked CE in the one-draw bound estimator, float64 [B].

        Continuous: w(t) for t > t_min, 1/t_min at t = t_min (the last-step atom). Discrete: T·ρ_i.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.config.T is not None:
            T = self.config.T
            i = torch.round(t * T)
            return T * self.unmask_probability(i / T, (i - 1) / T)
        t_min = self.config.t_min
        # w is evaluated at max(t, t_min) so the unused branch never holds w(0) = inf.
        return torch.where(t <= t_min, torch.full_like(t, 1 / t_min),
                           self.schedule.weight(torch.clamp(t, min=t_min)))

    # ---- forward process -----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z_t: each token of x0 [B, d] masked (id K) with probability 1 - α(t), t [B]."""
        return self._mask(x0, self.corruption(t).to(x0.device), generator)

    def corrupt(self, x0: torch.Tensor, noise: float | torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """Each token of x0 [B, d] masked with probability exactly E = `noise` (float or [B])."""
        self.check_clean(x0)
        return self._mask(x0, noise_vector(noise, x0.shape[0]).to(x0.device), generator)

    def _mask(self, x0: torch.Tensor, mask_p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = uniforms(x0.shape, generator, x0.device)  # [B, d]
        return torch.where(u < mask_p[:, None], torch.full_like(x0, self.mask_id), x0)

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """All-mask [shape] long (exactly q(z_1), since α(1) = 0)."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long,
                          device=device if device is not None else self.device)

    # ---- the sampler -----------------------------------------------------------------------------
    def reverse(self, denoiser: Denoiser, x: torch.Tensor, grid: list[float], generator: torch.Generator,
                *, final_step: str, cache: bool | None = None, bar=None) -> torch.Tensor:
        """Ancestral unmasking on the times `grid` (descending) to 0.

        cache (default: not config.time_conditioning): evaluate the denoiser only on rows that
        changed since their last evaluation; exact when the denoiser ignores t and treats rows
        independently. Every step draws one uniform per position whether or not the denoiser
        runs, so the cached sampler reproduces the uncached one draw for draw.
        """
        use_cache = (not self.config.time_conditioning) if cache is None else bool(cache)
        b = x.shape[0]
        mask = self.mask_id
        x = x.clone()
        cached: torch.Tensor | None = None  # [B, d, K] last denoiser output per row
        stale = torch.ones(b, dtype=torch.bool, device=x.device)  # row changed since its last evaluation
        for i, level in enumerate(grid):
            s_level = grid[i + 1] if i + 1 < len(grid) else 0.0
            masked = x == mask  # [B, d]
            t = self.full_time(level, b, x.device)
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
            rho = float(self.unmask_probability(level, s_level))
            u = uniforms(x.shape, generator, x.device)  # one uniform per position and step
            reveal = masked & (u < rho)  # [B, d]
            if log_p_hat is not None and bool(reveal.any()):
                pos = reveal.nonzero(as_tuple=True)
                chosen = log_p_hat[pos]  # [R, K], only the positions being revealed
                if s_level == 0.0 and final_step == "argmax":
                    symbols = chosen.argmax(-1)
                else:
                    # Conditional on u < ρ, u/ρ is uniform on [0, 1): reuse it to pick the symbol.
                    v = torch.clamp(u[pos] / rho, max=math.nextafter(1.0, 0.0))
                    symbols = inverse_cdf(chosen, v)
                x[pos] = symbols
                stale |= reveal.any(-1)
            if bar is not None:
                bar.advance()
        return x

    # ---- exact inference -------------------------------------------------------------------------
    def leaf_evidence(self, x_t: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype = torch.float32,
                      *, symbols_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """λ = 1 for every symbol at a masked leaf, [a = x_t_i] at a kept one ([B, d, K], or
        [K, d, B] with symbols_first), and the constant n_masked log E + n_kept log(1 - E) [B]
        (0 log 0 = 0), so log P(x_t) is exact."""
        self.check_observation(x_t)
        e = noise_vector(noise, x_t.shape[0]).to(x_t.device)
        masked = x_t == self.mask_id  # [B, d]
        symbols = torch.arange(self.vocab, device=x_t.device)
        if symbols_first:
            lik = ((x_t.T.unsqueeze(0) == symbols.view(-1, 1, 1)) | masked.T.unsqueeze(0)).to(dtype)  # [K, d, B]
        else:
            lik = ((x_t.unsqueeze(-1) == symbols) | masked.unsqueeze(-1)).to(dtype)  # [B, d, K]
        n_masked = masked.sum(1).to(torch.float64)
        return lik, torch.xlogy(n_masked, e) + torch.xlogy(x_t.shape[1] - n_masked, 1 - e)

    def mean_leaf_belief(self, noise: float) -> float:
        """p_0 = 1 - E + E/K: the clean token is known, or the belief is uniform when masked."""
        return 1.0 - noise * (self.vocab - 1) / self.vocab

    # ---- losses --------------------------------------------------------------------------------
    def masked_ce(self, log_p_hat: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Σ over masked positions of -log p̂(x0_n | z_t): [B] nats (unmasked positions: copied, loss 0)."""
        if log_p_hat.shape[-1] != self.vocab:
            raise ConfigError(f"the denoiser must output {self.vocab} symbols (never the mask), "
                              f"got {log_p_hat.shape[-1]}")
        nll = -log_p_hat.gather(-1, x0[..., None]).squeeze(-1)  # [B, d]
        # where(), not multiplication: a -inf log-prob at an unmasked position must not give NaN.
        return torch.where(x_t == self.mask_id, nll, torch.zeros_like(nll)).sum(-1)

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> LossTerms:
        """Bound estimate per example: weight(t)·Σ_masked CE / d nats (see module docstring).

        logits: [B, d, K] logits or log p̂; x0 [B, d] long; x_t [B, d] long with mask id K;
        t [B] float64 from sample_t.
        """
        log_p_hat = log_probs_of(logits)  # [B, d, K]
        d = x0.shape[1]
        ce = self.masked_ce(log_p_hat, x0, x_t)  # [B]
        w = self.weight(t.to(x0.device)).to(ce.dtype)  # [B]
        vb = w * ce / d
        return LossTerms(loss=vb, vb=vb, ce=ce / d, elbo_bits=vb.detach().double() / math.log(2))

    def bound(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
              steps: int | None = None) -> torch.Tensor:
        """Discrete bound on the sampler grid: Σ_i ρ_i Σ_masked CE(z_{t_i}), one z draw per t_i.

        [B] nats per sequence; N = len(grid) network calls. Exact for the N-step ancestral sampler.
        """
        grid = self.time_grid(steps)
        b = x0.shape[0]
        total = torch.zeros(b, dtype=torch.float64, device=x0.device)
        for i, level in enumerate(grid):
            s = grid[i + 1] if i + 1 < len(grid) else 0.0
            t = torch.full((b,), level, dtype=torch.float64, device=x0.device)
            z = self.q_sample(x0, t, generator)
            ce = self.masked_ce(denoiser(z, t), x0, z).double()
            total += self.unmask_probability(level, s).item() * ce
        return total
