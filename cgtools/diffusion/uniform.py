"""Uniform D3PM (multinomial diffusion) with the x0-parameterisation, in log space.

Time convention: levels t = 0..T, x_0 is the data, ᾱ_0 = 1, training draws t ∈ {1..T} and the
denoiser is called as denoiser(x_t, t) with the level t of x_t. The forward marginal is
q(x_t | x0) = ᾱ_t e_{x0} + (1 - ᾱ_t)/K, i.e. a token is redrawn uniformly (possibly to itself)
with probability E = 1 - ᾱ_t.

For s < t (s = t-1 for the plain chain, any grid point below t for respaced sampling) with
ᾱ_{t|s} = ᾱ_t/ᾱ_s, the reverse kernel of one position holding x_t = k is

    p(x_s = j | x_t) ∝ A_j · B̂_j,   A_j = ᾱ_{t|s}[j = k] + (1 - ᾱ_{t|s})/K,
                                    B̂_j = ᾱ_s p̂_j + (1 - ᾱ_s)/K,

and the true posterior q(x_s | x_t, x0) is the same with p̂ = e_{x0}. Everything is evaluated as
logaddexp of logs, so β_t = 1, ᾱ_T = 0 and s = 0 need no ε (their -inf logs are exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from cgtools.diffusion.base import (CategoricalProcess, Denoiser, DiscreteLevels, LossTerms, ProcessConfig,
                                    inverse_cdf_weights, log_probs_of, noise_vector, randint,
                                    uniforms)
from cgtools.diffusion.schedules import DISCRETE_SCHEDULES, log1mexp, log_alpha_bar_table
from cgtools.errors import ConfigError

Decoder = Literal["x0", "posterior"]


@dataclass(frozen=True)
class UniformConfig(ProcessConfig):
    """Settings of the uniform process (see docs/diffusion.md for why each default).

    T: number of noise levels. schedule: "linear-beta" (default, the paper's "linear"; endpoints
    beta_min/beta_max, default 0.1/T and 20/T), "linear-alpha" or "cosine".
    lambda_ce: weight λ of the auxiliary cross-entropy in loss = L_vb(t) + λ·CE.
    scale_vb_by_T: multiply the L_vb(t) term of the training loss by T (unbiased bound scale).
    decoder: the t = 1 term: "x0" uses p(x0 | x1) = p̂ (D3PM images), "posterior" uses
    p ∝ q(x1 | x0)·p̂ (the general reverse formula at s = 0; D3PM text).
    """

    process = "uniform"

    T: int = 1000
    schedule: str = "linear-beta"
    beta_min: float | None = None
    beta_max: float | None = None
    lambda_ce: float = 0.01
    scale_vb_by_T: bool = False
    decoder: str = "x0"

    def __post_init__(self) -> None:
        if self.schedule not in DISCRETE_SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; "
                              f"choose one of {', '.join(DISCRETE_SCHEDULES)}")
        if self.decoder not in ("x0", "posterior"):
            raise ConfigError(f"decoder must be 'x0' or 'posterior', got {self.decoder!r}")
        if not self.lambda_ce >= 0:
            raise ConfigError(f"lambda_ce must be >= 0, got {self.lambda_ce}")


class UniformDiffusion(DiscreteLevels, CategoricalProcess):
    """Uniform D3PM over K symbols. Tables are float64 on `device`; results follow the input dtype."""

    name = "uniform"
    Config = UniformConfig
    default_final_step = "argmax"

    def __init__(self, config: UniformConfig, vocab: int, device: torch.device | str = "cpu",
                 _table: torch.Tensor | None = None) -> None:
        if vocab < 2:
            raise ConfigError(f"the vocabulary needs at least 2 symbols, got {vocab}")
        self.config = config
        self.vocab = vocab
        self.input_vocab = vocab
        self.T = config.T
        if _table is None:
            _table = log_alpha_bar_table(config.schedule, config.T, config.beta_min, config.beta_max)
        self.log_alpha_bar = _table.to(device)  # [T+1] float64, log ᾱ_t
        self.log_one_minus_alpha_bar = log1mexp(self.log_alpha_bar)  # [T+1], -inf at t = 0
        self.device = self.log_alpha_bar.device
        self._log_k = math.log(vocab)

    def to(self, device: torch.device | str) -> "UniformDiffusion":
        return UniformDiffusion(self.config, self.vocab, device, self.log_alpha_bar)

    # ---- time ----------------------------------------------------------------------------------
    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ U{1..T} independently per example: long [B] on the process device."""
        return randint(self.T, (batch,), generator, self.device) + 1

    def corruption(self, t: torch.Tensor) -> torch.Tensor:
        """E = 1 - ᾱ_t, float64 [B] (t long in 0..T)."""
        return -torch.expm1(self.log_alpha_bar[t.to(self.device)])

    def time_for_corruption(self, e: float) -> int:
        """The level t ∈ 0..T whose 1 - ᾱ_t is closest to e (the smaller t on a tie)."""
        if not 0.0 <= e <= 1.0:
            raise ConfigError(f"the corruption level must lie in [0, 1], got {e}")
        levels = -torch.expm1(self.log_alpha_bar)
        return int(torch.argmin((levels - e).abs()))

    def time_grid(self, steps: int | None = None) -> list[int]:
        """Descending levels [T, ..., t_1] visited by the sampler; the step after t_1 goes to 0.

        steps=None or T: every level. Otherwise K levels t_i = round(i·T/K), i = K..1 (distinct,
        t_K = T, t_1 >= 1); the reverse kernel between grid points is exact for the x0-model.
        """
        k = self.T if steps is None else int(steps)
        if not 1 <= k <= self.T:
            raise ConfigError(f"steps must lie in 1..T = {self.T}, got {k}")
        return [(2 * i * self.T + k) // (2 * k) for i in range(k, 0, -1)]

    # ---- forward process -----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_t ~ q(x_t | x0): keep each token with probability ᾱ_t, else redraw it uniformly.

        x0 [B, d] long, t [B] long in 0..T -> [B, d] long. Draws 2·B·d numbers whatever t is.
        """
        keep_p = torch.exp(self.log_alpha_bar[t.to(self.device)]).to(x0.device)  # [B] float64
        return self._redraw(x0, keep_p, generator)

    def corrupt(self, x0: torch.Tensor, noise: float | torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """Each token of x0 [B, d] redrawn uniformly (possibly to itself) with probability exactly
        E = `noise` (float or [B]); the same draws as q_sample at a level with 1 - ᾱ_t = E."""
        self.check_clean(x0)
        keep_p = (1 - noise_vector(noise, x0.shape[0])).to(x0.device)  # [B] float64
        return self._redraw(x0, keep_p, generator)

    def _redraw(self, x0: torch.Tensor, keep_p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = uniforms(x0.shape, generator, x0.device)  # [B, d]
        fresh = randint(self.vocab, x0.shape, generator, x0.device)
        return torch.where(u < keep_p[:, None], x0, fresh)

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """x_T ~ U(V)^shape (exactly q(x_T) when ᾱ_T = 0, e.g. linear-alpha)."""
        return randint(self.vocab, shape, generator, device if device is not None else self.device)

    def log_forward(self, x0: torch.Tensor, t: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log q(x_t = j | x0) [B, d, K] (t long [B])."""
        la = self.log_alpha_bar[t.to(self.device)].to(x0.device, dtype)[:, None, None]
        l1a = self.log_one_minus_alpha_bar[t.to(self.device)].to(x0.device, dtype)[:, None, None]
        return self._log_mix(la, l1a, x0, dtype)

    # ---- reverse kernels -------------------------------------------------------------------------
    def _coefficients(self, t: torch.Tensor, s: torch.Tensor, device, dtype) -> dict[str, torch.Tensor]:
        """Logs of ᾱ_{t|s}, 1 - ᾱ_{t|s}, ᾱ_s, 1 - ᾱ_s, ᾱ_t, 1 - ᾱ_t, each [B, 1, 1] in `dtype`."""
        t, s = t.to(self.device), s.to(self.device)
        if bool((s >= t).any()) or bool((s < 0).any()):
            raise ConfigError("reverse steps need 0 <= s < t")
        la_s, la_t = self.log_alpha_bar[s], self.log_alpha_bar[t]
        # ᾱ_s > 0 for s < T (checked when the table is built), so this is never -inf - -inf.
        la_ts = la_t - la_s
        out = dict(la_ts=la_ts, l1a_ts=log1mexp(la_ts), la_s=la_s, l1a_s=self.log_one_minus_alpha_bar[s],
                   la_t=la_t, l1a_t=self.log_one_minus_alpha_bar[t])
        return {name: c.to(device, dtype)[:, None, None] for name, c in out.items()}

    def _log_mix(self, log_keep, log_redraw, x, dtype):
        """log(keep·[j = x] + redraw/K) over j: [B, d, K], from [B,1,1] logs and x [B, d]."""
        off = log_redraw - self._log_k  # [B, 1, 1]
        on = torch.logaddexp(log_keep, off)  # [B, 1, 1]
        hit = torch.nn.functional.one_hot(x, self.vocab).bool()  # [B, d, K]
        return torch.where(hit, on, off)

    def _log_kernel(self, log_b: torch.Tensor, x_t: torch.Tensor, c: dict[str, torch.Tensor],
                    log_x0_at_xt: torch.Tensor) -> torch.Tensor:
        """log A + log B - log Z over j, [B, d, K]; log_x0_at_xt [B, d, 1] = log p̂(x_t) or log e_{x0}(x_t).

        Closed-form normaliser Z = Σ_j A_j B_j = ᾱ_t p̂_{x_t} + (1 - ᾱ_t)/K (needs Σ p̂ = 1); cheaper
        than a logsumexp over K and exact at the ends (ᾱ_T = 0 gives Z = 1/K).
        """
        log_a = self._log_mix(c["la_ts"], c["l1a_ts"], x_t, log_b.dtype)  # [B, d, K]
        log_z = torch.logaddexp(c["la_t"] + log_x0_at_xt, c["l1a_t"] - self._log_k)  # [B, d, 1]
        return log_a + log_b - log_z

    def _default_s(self, t: torch.Tensor, s: torch.Tensor | int | None) -> torch.Tensor:
        if s is None:
            return t - 1
        if isinstance(s, int):
            return torch.full_like(t, s)
        return s

    def log_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      s: torch.Tensor | int | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log q(x_s = j | x_t, x0) [B, d, K]; x0, x_t [B, d] long; t [B] long; s defaults to t-1."""
        s = self._default_s(t, s)
        c = self._coefficients(t, s, x_t.device, dtype)
        log_b = self._log_mix(c["la_s"], c["l1a_s"], x0, dtype)  # [B, d, K], log q(x_s | x0)
        same = (x_t == x0)[..., None]  # [B, d, 1]
        log_x0_at_xt = torch.where(same, torch.zeros((), dtype=dtype, device=x_t.device),
                                   torch.full((), -math.inf, dtype=dtype, device=x_t.device))
        return self._log_kernel(log_b, x_t, c, log_x0_at_xt)

    def log_reverse(self, log_p_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    s: torch.Tensor | int | None = None) -> torch.Tensor:
        """log p_θ(x_s = j | x_t) [B, d, K] from normalised log p̂(x0 | x_t) [B, d, K] (same dtype out).

        B̂_j = ᾱ_s p̂_j + (1 - ᾱ_s)/K is p̂ pushed through Q̄_s; at s = 0 it is p̂ itself.
        """
        s = self._default_s(t, s)
        c = self._coefficients(t, s, x_t.device, log_p_hat.dtype)
        log_b = torch.logaddexp(c["la_s"] + log_p_hat, c["l1a_s"] - self._log_k)  # [B, d, K]
        return self._log_kernel(log_b, x_t, c, log_p_hat.gather(-1, x_t[..., None]))

    def log_decoder(self, log_p_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_θ(x0 | x_t) [B, d, K] of the last reverse step (t = 1, or t_1 when respaced)."""
        if self.config.decoder == "x0":
            return log_p_hat
        return self.log_reverse(log_p_hat, x_t, t, 0)

    def reverse_weights(self, log_p_hat: torch.Tensor, x_t: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """Unnormalised p_θ(x_s = j | x_t) in float64 [B, d, K], one level pair (t, s) for the batch.

        The sampler's fast path: A_j·B̂_j in probability space (one float64 step, every factor
        > 0 for s >= 1, so no underflow), no normaliser (the inverse-CDF draw rescales). At s = 0
        it is the "posterior" decoder q(x_t | x0 = j)·p̂_j.
        """
        if not 0 <= s < t <= self.T:
            raise ConfigError(f"reverse steps need 0 <= s < t <= T, got s={s}, t={t}")
        la_t, la_s = float(self.log_alpha_bar[t]), float(self.log_alpha_bar[s])
        a_ts = math.exp(la_t - la_s)  # ᾱ_{t|s}; la_s is finite because s < T
        p_hat = torch.exp(log_p_hat.to(torch.float64))  # [B, d, K]
        b = p_hat if s == 0 else p_hat * math.exp(la_s) + (-math.expm1(la_s)) / self.vocab
        w = b * (-math.expm1(la_t - la_s) / self.vocab)  # the (1 - ᾱ_{t|s})/K part of A_j
        idx = x_t[..., None]  # [B, d, 1]
        return w.scatter_add_(-1, idx, a_ts * b.gather(-1, idx))  # + ᾱ_{t|s} at j = x_t

    def decoder_weights(self, log_p_hat: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Unnormalised p_θ(x0 | x_t) in float64 [B, d, K] for the last step (see log_decoder)."""
        if self.config.decoder == "x0":
            return torch.exp(log_p_hat.to(torch.float64))
        return self.reverse_weights(log_p_hat, x_t, t, 0)

    # ---- the sampler -----------------------------------------------------------------------------
    def reverse(self, denoiser: Denoiser, x: torch.Tensor, grid: list[int], generator: torch.Generator,
                *, final_step: str, cache: bool | None = None, bar=None) -> torch.Tensor:
        """Ancestral sampling on the levels `grid` (descending) to 0; one uniform per position and
        step, drawn even for an argmax last step, so respaced and plain runs share a draw plan."""
        if cache:
            raise ConfigError("the cached sampler is exact only for masked diffusion without time input")
        b = x.shape[0]
        for i, level in enumerate(grid):
            log_p_hat = denoiser(x, self.full_time(level, b, x.device))  # [B, d, K]
            u = uniforms(x.shape, generator, x.device)
            if i + 1 < len(grid):
                x = inverse_cdf_weights(self.reverse_weights(log_p_hat, x, level, grid[i + 1]), u)
            else:
                weights = self.decoder_weights(log_p_hat, x, level)  # [B, d, K] float64
                x = weights.argmax(-1) if final_step == "argmax" else inverse_cdf_weights(weights, u)
            if bar is not None:
                bar.advance()
        return x

    # ---- exact inference -------------------------------------------------------------------------
    def leaf_evidence(self, x_t: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype = torch.float32,
                      *, symbols_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """λ_i(a) = (1 - E)[a = x_t_i] + E/K [B, d, K] (a token redrawn with probability E may
        keep its value), and a zero constant [B]. symbols_first: return λ as [K, d, B] instead
        (BP's message layout, built directly: no transpose)."""
        self.check_observation(x_t)
        e = noise_vector(noise, x_t.shape[0]).to(x_t.device)
        floor = (e / self.vocab).to(dtype)  # [B]
        keep = (1 - e).to(dtype) + floor  # [B], the likelihood of the observed symbol
        symbols = torch.arange(self.vocab, device=x_t.device)
        if symbols_first:
            hit = x_t.T.unsqueeze(0) == symbols.view(-1, 1, 1)  # [K, d, B]
            lik = torch.where(hit, keep, floor)
        else:
            hit = x_t.unsqueeze(-1) == symbols  # [B, d, K]
            lik = torch.where(hit, keep.view(-1, 1, 1), floor.view(-1, 1, 1))
        return lik, torch.zeros(x_t.shape[0], dtype=torch.float64, device=x_t.device)

    def mean_leaf_belief(self, noise: float) -> float:
        """p_0 = (1 - ε)^2 + ε^2/(K - 1) with ε = E (K-1)/K the probability a token changed: the
        observed token carries belief 1 - ε and is the clean one with probability 1 - ε."""
        eps = noise * (self.vocab - 1) / self.vocab
        return (1.0 - eps) ** 2 + eps**2 / (self.vocab - 1)

    # ---- bound terms -----------------------------------------------------------------------------
    def prior_kl(self) -> float:
        """KL(q(x_T | x0) ‖ U(V)) per position in nats (the same for every x0; 0 when ᾱ_T = 0)."""
        a = float(torch.exp(self.log_alpha_bar[-1]))
        k = self.vocab
        return (a + (1 - a) / k) * math.log1p((k - 1) * a) + (k - 1) * (1 - a) / k * math.log1p(-a)

    @staticmethod
    def kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Σ_j q_j (log q_j - log p_j) over the last axis; entries with q_j = 0 contribute 0."""
        q = torch.exp(log_q)
        # where() keeps -inf - -inf (q_j = p_j = 0) out of the result and out of the gradient.
        terms = torch.where(log_q > -math.inf, q * (log_q - log_p), torch.zeros_like(log_q))
        return terms.sum(-1)

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> LossTerms:
        """Hybrid loss per example: (c·L_vb(t) + λ·CE)/d nats, c = T if scale_vb_by_T else 1.

        logits: [B, d, K] logits or log p̂ (log_softmax is applied, in float32 unless float64);
        x0, x_t: [B, d] long; t: [B] long in 1..T, the level x_t was drawn at.
        L_vb(t) = Σ_n KL(q(x_{t-1} | x_t, x0) ‖ p_θ(x_{t-1} | x_t)) for t >= 2, the decoder NLL
        -Σ_n log p_θ(x0 | x_1) for t = 1. elbo_bits = (T·L_vb(t) + L_T)/(d ln 2).
        """
        log_p_hat = log_probs_of(logits)  # [B, d, K]
        d = x0.shape[1]
        t = t.to(x0.device)
        # Both branches are computed for the whole batch; the KL one at max(t, 2) so that a t = 1
        # example never evaluates the KL at s = 0 (one-hot posterior) whose unused gradient could be NaN.
        t_kl = torch.clamp(t, min=2)
        log_q = self.log_posterior(x0, x_t, t_kl, dtype=log_p_hat.dtype)
        kl = self.kl(log_q, self.log_reverse(log_p_hat, x_t, t_kl)).sum(-1)  # [B]
        log_dec = self.log_decoder(log_p_hat, x_t, torch.ones_like(t))
        nll0 = -log_dec.gather(-1, x0[..., None]).squeeze(-1).sum(-1)  # [B]
        vb = torch.where(t == 1, nll0, kl)  # [B] nats per sequence
        ce = -log_p_hat.gather(-1, x0[..., None]).squeeze(-1).sum(-1)  # [B]
        scale = float(self.T) if self.config.scale_vb_by_T else 1.0
        loss = (scale * vb + self.config.lambda_ce * ce) / d
        elbo = (self.T * vb.detach().double() + d * self.prior_kl()) / (d * math.log(2))
        return LossTerms(loss=loss, vb=vb / d, ce=ce / d, elbo_bits=elbo)

    def bound_terms(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
                    steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prior [B], diffusion [B, G-1], decoder [B]) nats per sequence on the grid of `steps`.

        One x_t ~ q(x_t | x0) draw per grid level t_i (G = len(grid) network calls); the diffusion
        term at t_i is the KL to the step t_i -> t_{i-1}, the decoder term is at t_1 -> 0.
        Each term is an unbiased estimate; their sum bounds -log p_θ(x0) of the respaced sampler.
        """
        grid = self.time_grid(steps)
        b, d = x0.shape
        prior = torch.full((b,), d * self.prior_kl(), dtype=torch.float64, device=x0.device)
        terms = []
        decoder = None
        for i, level in enumerate(grid):
            t = torch.full((b,), level, dtype=torch.long, device=x0.device)
            x_t = self.q_sample(x0, t, generator)
            log_p_hat = denoiser(x_t, t)
            if i + 1 < len(grid):
                s = torch.full_like(t, grid[i + 1])
                log_q = self.log_posterior(x0, x_t, t, s, dtype=log_p_hat.dtype)
                terms.append(self.kl(log_q, self.log_reverse(log_p_hat, x_t, t, s)).sum(-1))
            else:
                log_dec = self.log_decoder(log_p_hat, x_t, t)
                decoder = -log_dec.gather(-1, x0[..., None]).squeeze(-1).sum(-1)
        diffusion = torch.stack(terms[::-1], 1) if terms else x0.new_zeros((b, 0), dtype=torch.float64)
        return prior, diffusion, decoder

    def bound(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
              steps: int | None = None) -> torch.Tensor:
        """L_T + Σ L_{t-1} + L_0 with one draw per term: [B] nats per sequence (see bound_terms)."""
        prior, diffusion, decoder = self.bound_terms(denoiser, x0, generator, steps)
        return prior + diffusion.to(prior.dtype).sum(1) + decoder.to(prior.dtype)
