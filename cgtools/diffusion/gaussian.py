"""Gaussian diffusion for images: Improved DDPM (Nichol & Dhariwal 2021), ε-prediction with an
optional learned-range variance, hybrid / simple / pure-VLB losses, respaced ancestral sampling.

Shapes: B = batch; x is a float tensor [B, C, *dims] (images: [B, C, H, W]) with values in
[-1, 1]; every axis after the batch is a "dimension" (per-dimension means are over C·H·W). The
network's prediction is [B, 2C, *dims] when `learn_sigma` (ε̂ in the first C channels, v in the
last C) and [B, C, *dims] otherwise (see :meth:`GaussianDiffusion.output_channels`).

Time convention (as the uniform process): levels t = 0..T, x_0 is the data, ᾱ_0 = 1, training
draws t ∈ {1..T}; the denoiser is called as denoiser(x_t, t) with the long level t of x_t, and a
network embeds network_time(t) = t/T (the U-Net multiplies by 1000: iDDPM's rescaled timesteps).
iDDPM's array index i is our level i + 1.

Formulas (reference/diffusion.md §3), for a reverse step from level t to a level s < t (s = t-1
on the full chain; any lower grid point when respaced, where β is recomputed from ᾱ):

    β'      = 1 - ᾱ_t/ᾱ_s                    (= β_t for s = t-1, taken from the schedule)
    q(x_t | x0) = N(√ᾱ_t x0, (1 - ᾱ_t) I)
    μ̃(x0, x_t) = [√ᾱ_s β'/(1 - ᾱ_t)] x0 + [√(1 - β')(1 - ᾱ_s)/(1 - ᾱ_t)] x_t
    β̃       = β'(1 - ᾱ_s)/(1 - ᾱ_t)          (0 at s = 0; its log is clipped to the β̃ of the
                                              step above, i.e. β̃_2 on the full chain)
    x̂0      = x_t/√ᾱ_t - √(1/ᾱ_t - 1) ε̂       (clipped to [-1, 1] when clip_denoised, sampling
                                              and bound only)
    p(x_s | x_t) = N(μ̃(x̂0, x_t), Σ), log Σ = f log β' + (1 - f) log β̃_clipped, f = (v + 1)/2
                 (learned range), or log Σ = log β̃_clipped (fixed "small" variance).

Tables are float64 on the process device; losses follow the prediction's dtype (float32 for a
network, float64 in the tests); the bound is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from cgtools.diffusion.base import (Denoiser, DiscreteLevels, LossTerms, Process, ProcessConfig, inverse_cdf_weights,
                                    noise_vector, randint, uniforms)
from cgtools.errors import ConfigError

SCHEDULES = ("cosine", "linear")
LOSSES = ("hybrid", "simple", "vlb")

_COSINE_S = 0.008  # iDDPM's offset s: keeps β_1 from being vanishingly small
_BETA_MAX = 0.999  # iDDPM's clip of the cosine β (β_T would be 1 otherwise)
_HISTORY = 10  # losses kept per level for importance sampling
_UNIFORM_MIX = 1e-3  # 0.1 % uniform mixed into the importance distribution
_BIN = 1.0 / 255.0  # half the width of one of the 256 pixel bins on [-1, 1]
_EDGE = 0.999  # |x0| beyond this is an edge bin (its bin extends to ±∞)
_MIN_RATIO = 1e-12  # floor on Φ(lo)/Φ(hi)'s complement: keeps a vanishing bin's log finite


@dataclass(frozen=True)
class GaussianConfig(ProcessConfig):
    """Settings of Gaussian diffusion (docs/diffusion.md, "Gaussian diffusion (images)").

    T: training levels (≥ 2; the paper trains with 4000). schedule: "cosine" (f(t) =
    cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β_t = min(1 - ᾱ_t/ᾱ_{t-1}, 0.999)) or "linear"
    (β from 1e-4·1000/T to 0.02·1000/T; needs T > 20 so that β < 1).
    learn_sigma: learned-range variance (network outputs 2C channels); False = fixed β̃_t.
    loss: "hybrid" (L_simple + λ·L_vlb, needs learn_sigma), "simple" (L_simple, needs
    learn_sigma False: nothing would train the variance), "vlb" (pure bound, either variance).
    lambda_vlb: λ of the hybrid loss (> 0). importance_sampling: iDDPM's loss-aware t sampler
    (loss "vlb" only). clip_denoised: clip x̂0 to [-1, 1] in sampling and in `bound`.
    """

    process = "gaussian"

    T: int = 1000
    schedule: str = "cosine"
    learn_sigma: bool = True
    loss: str = "hybrid"
    lambda_vlb: float = 0.001
    importance_sampling: bool = False
    clip_denoised: bool = True

    @property
    def adapts_to_losses(self) -> bool:
        """Importance sampling draws t from the recorded losses."""
        return bool(self.importance_sampling)

    def __post_init__(self) -> None:
        if isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 2:
            raise ConfigError(f"T must be an integer >= 2, got {self.T!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule == "linear" and self.T <= 20:
            raise ConfigError(f"the linear schedule needs T > 20 (β_T = 20/T must stay below 1), "
                              f"got {self.T}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        for name in ("learn_sigma", "importance_sampling", "clip_denoised"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.lambda_vlb, (int, float)) and math.isfinite(self.lambda_vlb)
                and self.lambda_vlb >= 0):
            raise ConfigError(f"lambda_vlb must be a finite number >= 0, got {self.lambda_vlb!r}")
        if self.loss == "simple" and self.learn_sigma:
            raise ConfigError("loss 'simple' cannot train a learned variance; set learn_sigma=false "
                              "or use loss 'hybrid' or 'vlb'")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise ConfigError("loss 'hybrid' needs learn_sigma=true (its VB term trains only the "
                              "variance); use loss 'simple' for a fixed variance")
        if self.loss == "hybrid" and self.lambda_vlb == 0:
            raise ConfigError("loss 'hybrid' needs lambda_vlb > 0 (with 0 the variance never learns)")
        if self.importance_sampling and self.loss != "vlb":
            raise ConfigError(f"importance_sampling applies only to loss 'vlb', not {self.loss!r}")


def beta_schedule(kind: str, T: int) -> torch.Tensor:
    """β_1..β_T, float64 [T] (see GaussianConfig)."""
    if kind == "cosine":
        t = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((t / T + _COSINE_S) / (1 + _COSINE_S) * (math.pi / 2)) ** 2  # [T+1]
        return torch.clamp(1 - f[1:] / f[:-1], max=_BETA_MAX)
    if kind == "linear":
        scale = 1000.0 / T
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise in nats (broadcasting).

    Written as expm1(d) - d with d = logvar1 - logvar2 so equal variances give an exact 0.
    """
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) - Φ(a)) for a < b elementwise, without cancellation in either tail.

    Intervals in the upper tail are reflected (Φ(b) - Φ(a) = Φ(-a) - Φ(-b)), so the larger
    endpoint `hi` satisfies Φ(hi) not close to 1 unless the interval straddles 0; then
    log Φ(hi) + log(1 - Φ(lo)/Φ(hi)) with the ratio formed in log space.
    """
    upper = a > 0
    lo = torch.where(upper, -b, a)
    hi = torch.where(upper, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    ratio = -torch.expm1(torch.special.log_ndtr(lo) - log_hi)  # 1 - Φ(lo)/Φ(hi) in (0, 1]
    return log_hi + torch.log(torch.clamp(ratio, min=_MIN_RATIO))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise in nats for x on the 256-level grid of [-1, 1] (bin width 2/255) under
    N(mean, e^{2·log_scale}); the bins of -1 and 1 extend to -∞ and +∞ (iDDPM's decoder, with the
    exact normal CDF instead of iDDPM's tanh approximation)."""
    inv_std = torch.exp(-log_scale)
    plus = inv_std * (x - mean + _BIN)  # upper bin edge, standardised
    minus = inv_std * (x - mean - _BIN)  # lower bin edge
    return torch.where(x < -_EDGE, torch.special.log_ndtr(plus),
                       torch.where(x > _EDGE, torch.special.log_ndtr(-minus),
                                   _log_normal_interval(minus, plus)))


def _per_dim(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the batch: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


class GaussianDiffusion(DiscreteLevels, Process):
    """Improved DDPM on float data in [-1, 1]. Tables float64 on `device`; `vocab` is ignored."""

    name = "gaussian"
    Config = GaussianConfig
    #: "argmax": the last step (to level 0) returns the model mean x̂0 without noise (iDDPM).
    default_final_step = "argmax"

    def __init__(self, config: GaussianConfig, vocab: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(config, GaussianConfig):
            raise ConfigError(f"not a Gaussian diffusion config: {type(config).__name__}")
        self.config = config
        self.T = config.T
        beta = beta_schedule(config.schedule, config.T)  # [T]
        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([zero, beta]).to(device)  # [T+1], β_0 = 0 is a placeholder
        # log ᾱ_t as a cumulative sum of log(1 - β): exact ᾱ_0 = 1 and no underflow of the product
        self.log_alpha_bar = torch.cat([zero, torch.cumsum(torch.log1p(-beta), 0)]).to(device)  # [T+1]
        self.alpha_bar = torch.exp(self.log_alpha_bar)  # [T+1]
        self.one_minus_alpha_bar = -torch.expm1(self.log_alpha_bar)  # [T+1], no cancellation at small t
        self.device = self.betas.device
        # the kernel of every full-chain step t -> t-1 (row T - t for level t: see full_rows)
        self.chain = self.kernel_table(list(range(config.T, 0, -1)))
        # importance sampling: the last _HISTORY values of L_{t-1} (nats/dim) per level, on the CPU
        self.loss_history = torch.zeros(config.T, _HISTORY, dtype=torch.float64)  # [T, 10]
        self.loss_counts = torch.zeros(config.T, dtype=torch.long)  # [T]

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        out = GaussianDiffusion(self.config, None, device)
        out.loss_history = self.loss_history.clone()
        out.loss_counts = self.loss_counts.clone()
        return out

    def output_channels(self, channels: int) -> int:
        """Channels of the network's prediction for data with `channels` channels (2C or C)."""
        return 2 * channels if self.config.learn_sigma else channels

    # ---- time ----------------------------------------------------------------------------------
    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training levels [B] long in 1..T: uniform, or with importance_sampling (once every level
        has _HISTORY losses) t ~ p_t of :meth:`t_probabilities`."""
        if not (self.config.importance_sampling and self.warmed_up()):
            return randint(self.T, (batch,), generator, self.device) + 1
        u = uniforms((batch,), generator, None)  # [B] float64 on the generator's device
        idx = inverse_cdf_weights(self.t_probabilities().to(u.device), u)  # [B] in 0..T-1
        return (idx + 1).to(self.device)

    def corruption(self, t: torch.Tensor) -> torch.Tensor:
        """E = 1 - ᾱ_t (the fraction of x_t's variance that is noise), float64 [B]."""
        return self.one_minus_alpha_bar[t.to(self.device)]

    def time_for_corruption(self, e: float) -> int:
        """The level t ∈ 0..T whose 1 - ᾱ_t is closest to e (0 for e = 0; the smaller t on a tie)."""
        if not 0.0 <= e <= 1.0:
            raise ConfigError(f"the corruption level must lie in [0, 1], got {e}")
        return int(torch.argmin((self.one_minus_alpha_bar - e).abs()))

    def time_grid(self, steps: int | None = None) -> list[int]:
        """Descending levels visited by the sampler, from T; the step after the last goes to 0.

        steps=None: all T levels. Otherwise K evenly spaced levels including 1 and T, as iDDPM's
        space_timesteps with one section: level 1 + round(c_i), c_i = c_{i-1} + (T-1)/(K-1)
        accumulated in float64 from c_0 = 0, Python's round (so an exact tie i·(T-1)/(K-1) = n + ½
        goes whichever way the accumulated sum lands, as in iDDPM). K = 1 gives [T] (iDDPM would
        keep level 1 only, sampling from the prior at the lowest noise level).
        """
        k = self.T if steps is None else int(steps)
        if not 1 <= k <= self.T:
            raise ConfigError(f"steps must lie in 1..T = {self.T}, got {k}")
        if k == 1:
            return [self.T]
        stride, cur, levels = (self.T - 1) / (k - 1), 0.0, []
        for _ in range(k):
            levels.append(1 + round(cur))
            cur += stride
        return levels[::-1]

    # ---- kernels -------------------------------------------------------------------------------
    def kernel_table(self, grid: Sequence[int]) -> dict[str, torch.Tensor]:
        """Coefficients of the reverse steps of a descending grid of levels, each float64 [G].

        Row i is the step from t = grid[i] to s = grid[i+1] (s = 0 for the last row): "t", "s"
        (long), "beta" (β' = 1 - ᾱ_t/ᾱ_s, the schedule's β_t when s = t-1), "log_beta",
        "post_var" (β̃ = β'(1 - ᾱ_s)/(1 - ᾱ_t)), "log_post_var" (log β̃, the row to 0 clipped
        to the row above it, or to log β' when the grid has one level), "coef_x0", "coef_xt"
        (μ̃ = coef_x0·x0 + coef_xt·x_t), "recip_sqrt_ab" (1/√ᾱ_t), "recipm1_sqrt_ab"
        (√(1/ᾱ_t - 1)).
        """
        levels = [int(v) for v in grid]
        if not levels or any(not 1 <= v <= self.T for v in levels) or any(
                a <= b for a, b in zip(levels, levels[1:])):
            raise ConfigError(f"a reverse grid must be distinct descending levels in 1..{self.T}")
        t = torch.tensor(levels, dtype=torch.long, device=self.device)  # [G]
        s = torch.cat([t[1:], t.new_zeros(1)])  # [G]
        la_t, la_s = self.log_alpha_bar[t], self.log_alpha_bar[s]
        one_t, one_s = self.one_minus_alpha_bar[t], self.one_minus_alpha_bar[s]
        beta = torch.where(t - s == 1, self.betas[t], -torch.expm1(la_t - la_s))  # [G]
        post_var = beta * one_s / one_t  # [G], 0 exactly at s = 0
        # β̃ = 0 at s = 0 has no log: use the step above (iDDPM's clipping), or β' for a lone step
        log_post = torch.log(torch.where(s == 0, post_var[-2] if len(levels) > 1 else beta[-1], post_var))
        return {
            "t": t, "s": s, "beta": beta, "log_beta": torch.log(beta), "post_var": post_var,
            "log_post_var": log_post,
            "coef_x0": torch.exp(0.5 * la_s) * beta / one_t,
            "coef_xt": torch.sqrt(1 - beta) * one_s / one_t,
            "recip_sqrt_ab": torch.exp(-0.5 * la_t),
            "recipm1_sqrt_ab": torch.sqrt(torch.expm1(-la_t)),
        }

    def full_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of `self.chain` (the full chain's kernel table, descending) for levels t [B]."""
        return self.T - t

    @staticmethod
    def _col(table: dict[str, torch.Tensor], key: str, rows: torch.Tensor,
             like: torch.Tensor) -> torch.Tensor:
        """table[key][rows] as [B, 1, ..., 1] in like's dtype and device (broadcasts over dims)."""
        v = table[key][rows.to(table[key].device)].to(like.device, like.dtype)  # [B]
        return v.view(-1, *([1] * (like.ndim - 1)))

    def split_prediction(self, prediction: torch.Tensor,
                         x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε̂ [B, C, ...], v [B, C, ...] or None) from the raw prediction."""
        want = (x.shape[0], self.output_channels(x.shape[1]), *x.shape[2:])
        if tuple(prediction.shape) != want:
            raise ConfigError(f"the network predicts shape {tuple(prediction.shape)}, Gaussian diffusion "
                              f"needs {want} (learn_sigma={self.config.learn_sigma})")
        if not self.config.learn_sigma:
            return prediction, None
        c = x.shape[1]
        return prediction[:, :c], prediction[:, c:]

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    table: dict[str, torch.Tensor] | None = None,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B, ...], clipped log variance [B, 1, ...]) of q(x_s | x_t, x0).

        Default: the full chain (s = t-1, t long [B] in 1..T); or rows of a kernel_table.
        """
        table, rows = (self.chain, self.full_rows(t)) if table is None else (table, rows)
        mean = self._col(table, "coef_x0", rows, x_t) * x0 + self._col(table, "coef_xt", rows, x_t) * x_t
        return mean, self._col(table, "log_post_var", rows, x_t)

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor | None, x_t: torch.Tensor,
                        t: torch.Tensor, *, clip: bool = False,
                        table: dict[str, torch.Tensor] | None = None,
                        rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̂0, mean, log variance) of p(x_s | x_t): x̂0 and mean [B, ...]; log variance [B, ...]
        (learned range) or [B, 1, ...] (fixed β̃). Same table convention as :meth:`q_posterior`."""
        table, rows = (self.chain, self.full_rows(t)) if table is None else (table, rows)
        x0_hat = (self._col(table, "recip_sqrt_ab", rows, x_t) * x_t
                  - self._col(table, "recipm1_sqrt_ab", rows, x_t) * eps)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean = self._col(table, "coef_x0", rows, x_t) * x0_hat + self._col(table, "coef_xt", rows, x_t) * x_t
        log_small = self._col(table, "log_post_var", rows, x_t)
        if v is None:
            return x0_hat, mean, log_small
        f = (v + 1) / 2  # v is not clamped to [-1, 1] (as iDDPM): the network may extrapolate
        return x0_hat, mean, f * self._col(table, "log_beta", rows, x_t) + (1 - f) * log_small

    # ---- forward process -----------------------------------------------------------------------
    def _normal(self, shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype,
                device: torch.device | str | None) -> torch.Tensor:
        """N(0, 1) draws made on the generator's device, then moved (device-independent results)."""
        z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
        return z if device is None else z.to(device)

    @staticmethod
    def _check_data(x0: torch.Tensor) -> None:
        if not x0.is_floating_point() or x0.ndim < 2:
            raise ConfigError(f"Gaussian diffusion needs float data [B, C, ...], got {x0.dtype} "
                              f"of shape {tuple(x0.shape)}")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε: x0 [B, C, ...] float, t [B] long in 0..T -> x0's shape
        and dtype."""
        self._check_data(x0)
        t = t.to(self.device)
        return self._mix(x0, self.alpha_bar[t], self.one_minus_alpha_bar[t], generator)

    def corrupt(self, x0: torch.Tensor, noise: float | torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """x = √(1 - E) x0 + √E ε at exactly E = `noise` (float or [B]); q_sample's draws."""
        self._check_data(x0)
        e = noise_vector(noise, x0.shape[0])  # [B] float64
        return self._mix(x0, 1 - e, e, generator)

    def _mix(self, x0: torch.Tensor, keep: torch.Tensor, var: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """√keep·x0 + √var·ε with keep, var float64 [B]."""
        eps = self._normal(x0.shape, generator, x0.dtype, x0.device)  # [B, C, ...]
        shape = (-1, *([1] * (x0.ndim - 1)))
        a = torch.sqrt(keep).to(x0.device, x0.dtype).view(shape)
        b = torch.sqrt(var).to(x0.device, x0.dtype).view(shape)
        return a * x0 + b * eps

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), float32 of `shape` (q(x_T) up to the prior KL, ᾱ_T ≈ 0)."""
        return self._normal(shape, generator, torch.float32, device if device is not None else self.device)

    # ---- learning ------------------------------------------------------------------------------
    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) ‖ N(0, I)) summed over dimensions: [B] nats, in x0's dtype."""
        a = float(self.alpha_bar[-1])
        var = float(self.one_minus_alpha_bar[-1])
        kl = 0.5 * (-math.log(var) + var - 1 + a * x0 ** 2)  # [B, C, ...]
        return kl.flatten(1).sum(1)

    def _vb(self, eps: torch.Tensor, v: torch.Tensor | None, x0: torch.Tensor, x_t: torch.Tensor,
            t: torch.Tensor, *, clip: bool, table=None, rows=None) -> torch.Tensor:
        """L_{s|t} elementwise in nats [B, ...]: KL(q(x_s | x_t, x0) ‖ p(x_s | x_t)) where s > 0,
        the decoder -log p(x0 | x_t) where s = 0 (both branches computed; the KL's uses the
        clipped posterior variance, so it stays finite where it is discarded)."""
        rows_ = self.full_rows(t) if table is None else rows
        table_ = self.chain if table is None else table
        _, mean, log_var = self.p_mean_variance(eps, v, x_t, t, clip=clip, table=table_, rows=rows_)
        q_mean, q_log_var = self.q_posterior(x0, x_t, t, table_, rows_)
        kl = normal_kl(q_mean, q_log_var, mean, log_var)  # [B, ...]
        # the decoder in float64: the standardised bin edges of a tiny variance need it
        nll = -discretized_gaussian_log_likelihood(x0.double(), mean.double(),
                                                   0.5 * log_var.double()).to(kl.dtype)
        last = (table_["s"][rows_.to(table_["s"].device)] == 0).to(x_t.device)  # [B]
        return torch.where(last.view(-1, *([1] * (x_t.ndim - 1))), nll, kl)

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> LossTerms:
        """Per-example losses [B] (computed in the prediction's dtype; x0, x_t [B, C, ...]; t [B]
        long in 1..T, the level x_t was drawn at).

        ε is recovered in float64 as (x_t - √ᾱ_t x0)/√(1 - ᾱ_t) (the interface passes x_t, not
        the noise; the float32 rounding of x_t itself leaves |Δε| ≲ 1e-5 at t = 1, cosine, T = 1000).
        L_simple = mean over dims of (ε - ε̂)²; L_{t-1} = the KL (t > 1) or decoder NLL (t = 1)
        mean over dims, not clipping x̂0 (as iDDPM's training).

        loss: "hybrid": L_simple + λ·T·L_{t-1}[bits/dim], with ε̂ detached in L_{t-1} (only
        Σ learns from it); at λ = 0.001 this is iDDPM's "vb·T/1000" exactly. "simple": L_simple.
        "vlb": T·L_{t-1}[bits/dim] (iDDPM's rescaled KL; ε̂ not detached), times the importance
        weight 1/(T p_t) when importance_sampling.
        vb: L_{t-1} in nats/dim. ce: L_simple (an MSE here, not a cross-entropy).
        elbo_bits: (T·L_{t-1} + L_T)/ln 2 in bits/dim, float64, unbiased for the full bound only
        when t is uniform.
        """
        self._check_data(x0)
        dtype = prediction.dtype if prediction.dtype == torch.float64 else torch.float32
        prediction, x0, x_t = prediction.to(dtype), x0.to(dtype), x_t.to(dtype)
        t = t.to(x0.device)
        eps_hat, v = self.split_prediction(prediction, x0)
        # ε = (x_t/√ᾱ_t - x0)/√(1/ᾱ_t - 1) in float64: the difference cancels at small t
        x0_64, x_t_64 = x0.detach().double(), x_t.detach().double()
        a = self._col(self.chain, "recip_sqrt_ab", self.full_rows(t), x0_64)  # 1/√ᾱ_t [B, 1, ...]
        b = self._col(self.chain, "recipm1_sqrt_ab", self.full_rows(t), x0_64)  # √(1/ᾱ_t - 1)
        eps = ((a * x_t_64 - x0_64) / b).to(dtype)  # [B, C, ...]
        mse = _per_dim((eps - eps_hat) ** 2)  # [B]
        mean_eps = eps_hat.detach() if self.config.loss == "hybrid" else eps_hat
        vb = _per_dim(self._vb(mean_eps, v, x0, x_t, t, clip=False))  # [B] nats/dim
        bits = vb / math.log(2)
        if self.config.loss == "hybrid":
            total = mse + self.config.lambda_vlb * self.T * bits
        elif self.config.loss == "simple":
            total = mse
        else:
            total = self.T * bits
            if self.config.importance_sampling:
                total = total * self.importance_weights(t).to(total.device, total.dtype)
        dims = x0[0].numel()
        elbo = (self.T * vb.detach().double() + self.prior_kl(x0_64) / dims) / math.log(2)
        return LossTerms(loss=total, vb=vb, ce=mse, elbo_bits=elbo)

    def bound_terms(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
                    steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prior [B], diffusion [B, G-1], decoder [B]) in nats per example (summed over dims),
        float64, on the grid of `steps` (G levels; diffusion column j is the step grid[G-2-j] ->
        grid[G-1-j], i.e. ascending in t).

        Draw plan: one x_t ~ q(x_t | x0) per grid level, descending from T (one randn of x0's
        shape each); the denoiser sees (x_t, t) and x̂0 is clipped when clip_denoised.
        """
        self._check_data(x0)
        grid = self.time_grid(steps)
        table = self.kernel_table(grid)
        x0_64 = x0.double()
        b = x0.shape[0]
        terms = []
        for i, level in enumerate(grid):
            t = self.full_time(level, b, x0.device)
            x_t = self.q_sample(x0, t, generator)
            eps, v = self.split_prediction(denoiser(x_t, t).double(), x0)
            rows = torch.full((b,), i, dtype=torch.long, device=x0.device)
            terms.append(self._vb(eps, v, x0_64, x_t.double(), t, clip=self.config.clip_denoised,
                                  table=table, rows=rows).flatten(1).sum(1))  # [B]
        diffusion = torch.stack(terms[-2::-1], 1) if len(terms) > 1 else x0_64.new_zeros((b, 0))
        return self.prior_kl(x0_64), diffusion, terms[-1]

    def bound(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
              steps: int | None = None) -> torch.Tensor:
        """L_T + Σ L_{s|t} + L_0 with one x_t draw per term: [B] nats per example (float64). On a
        respaced grid this bounds -log p(x0) of the respaced sampler (β' recomputed from ᾱ)."""
        prior, diffusion, decoder = self.bound_terms(denoiser, x0, generator, steps)
        return prior + diffusion.sum(1) + decoder

    # ---- importance sampling of t --------------------------------------------------------------
    def warmed_up(self) -> bool:
        """Every level has _HISTORY recorded losses (until then t is drawn uniformly)."""
        return bool((self.loss_counts == _HISTORY).all())

    def t_probabilities(self) -> torch.Tensor:
        """p_t for t = 1..T, float64 [T] on the CPU: ∝ √(mean of the recorded L²) mixed with 0.1 %
        uniform once warmed up (uniform before, or if every recorded loss is 0)."""
        uniform = torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        if not self.warmed_up():
            return uniform
        w = torch.sqrt((self.loss_history ** 2).mean(1))  # [T]
        if not float(w.sum()) > 0:
            return uniform
        return (1 - _UNIFORM_MIX) * w / w.sum() + _UNIFORM_MIX * uniform

    def importance_weights(self, t: torch.Tensor) -> torch.Tensor:
        """1/(T p_t) per example, float64 [B] (all 1 while t is uniform)."""
        p = self.t_probabilities()  # [T]
        return (1.0 / (self.T * p))[t.cpu() - 1].to(t.device)

    def observe_losses(self, t: torch.Tensor, terms: LossTerms) -> None:
        """Record terms.vb (nats/dim) per level, keeping the last _HISTORY values of each (only with
        importance_sampling; a no-op otherwise)."""
        if not self.config.importance_sampling:
            return
        levels = t.detach().cpu().tolist()
        values = terms.vb.detach().double().cpu().tolist()
        hist, counts = self.loss_history, self.loss_counts
        for level, value in zip(levels, values):  # in batch order: the newest value wins
            row = int(level) - 1
            n = int(counts[row])
            if n == _HISTORY:
                hist[row, :-1] = hist[row, 1:].clone()  # drop the oldest
                hist[row, -1] = value
            else:
                hist[row, n] = value
                counts[row] = n + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"loss_history": float64 [T, 10], "loss_counts": long [T]} with importance_sampling;
        {} otherwise."""
        if not self.config.importance_sampling:
            return {}
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (ignored without importance_sampling)."""
        if not self.config.importance_sampling:
            return
        hist, counts = state.get("loss_history"), state.get("loss_counts")
        if (hist is None or counts is None or tuple(hist.shape) != (self.T, _HISTORY)
                or tuple(counts.shape) != (self.T,)):
            raise ConfigError(f"the importance-sampling state does not match T = {self.T} "
                              f"(need loss_history [{self.T}, {_HISTORY}] and loss_counts [{self.T}])")
        self.loss_history = hist.detach().to("cpu", torch.float64).clone()
        self.loss_counts = counts.detach().to("cpu", torch.long).clone()

    # ---- the sampler -----------------------------------------------------------------------------
    def reverse(self, denoiser: Denoiser, x: torch.Tensor, grid: list[int], generator: torch.Generator,
                *, final_step: str, cache: bool | None = None, bar=None) -> torch.Tensor:
        """Ancestral sampling from x [B, C, ...] at level grid[0] through the descending `grid` to 0.

        Each step t -> s draws x_s = μ + exp(½ log Σ)·z with β' recomputed from ᾱ on the grid and
        x̂0 clipped when clip_denoised. The last step (to 0): "argmax" returns the mean (= x̂0)
        without noise; "sample" draws from the discretised-Gaussian decoder the bound scores
        (mean + σz, rounded to the nearest of the 256 levels of [-1, 1] and clipped). One randn of
        x's shape is drawn every step, the last included, so both rules share a draw plan.
        """
        if cache:
            raise ConfigError("Gaussian diffusion has nothing to cache: every step changes every value")
        final_step = self.check_final_step(final_step)
        table = self.kernel_table(grid)
        b = x.shape[0]
        for i, level in enumerate(grid):
            eps, v = self.split_prediction(denoiser(x, self.full_time(level, b, x.device)).to(x.dtype), x)
            rows = torch.full((b,), i, dtype=torch.long, device=x.device)
            _, mean, log_var = self.p_mean_variance(eps, v, x, table["t"][rows], table=table, rows=rows,
                                                    clip=self.config.clip_denoised)
            z = self._normal(x.shape, generator, x.dtype, x.device)  # [B, C, ...]
            if i + 1 < len(grid):
                x = mean + torch.exp(0.5 * log_var) * z
            elif final_step == "argmax":
                x = mean
            else:
                y = mean + torch.exp(0.5 * log_var) * z
                x = (torch.round((y + 1) / (2 * _BIN)) * (2 * _BIN) - 1).clamp(-1.0, 1.0)
            if bar is not None:
                bar.advance()
        return x
