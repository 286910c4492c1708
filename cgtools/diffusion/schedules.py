"""Noise schedules: discrete ᾱ tables for uniform D3PM, continuous α(t) for masked diffusion.

Discrete (uniform D3PM, t = 0..T with ᾱ_0 = 1): every table is computed in float64 as log ᾱ_t,
so that the ends are exact: ᾱ_T = 0 gives log ᾱ_T = -inf (no clipping), t = 0 gives
log(1 - ᾱ_0) = -inf. Consumers take logs of ratios ᾱ_t/ᾱ_s and of 1 - ᾱ with log1p/expm1.

* ``linear-beta``: β_t = β_min + (t-1)(β_max - β_min)/(T-1). Default endpoints scale with T as
  β_min = 0.1/T, β_max = min(20/T, 1), i.e. DDPM's (1e-4, 0.02) at T = 1000 (Σβ ≈ 10, ᾱ_T ≈ 4.5e-5).
* ``linear-alpha``: ᾱ_t = 1 - t/T exactly (β_t = 1/(T-t+1), β_T = 1, ᾱ_T = 0).
* ``cosine`` (Hoogeboom et al., D3PM uniform): f(τ) = cos((τ+0.008)/1.008 · π/2), not squared;
  β_t = min(1 - f(t/T)/f((t-1)/T), 0.999).

Continuous (masked diffusion, t ∈ [0, 1], α(0) = 1, α(1) = 0 exactly): ``linear`` α = 1 - t and
``cosine`` α = 1 - sin(πt/2) (= 1 - cos(π/2·(1-t)), MD4's cosine). 1 - α(t) is evaluated directly
(t, sin(πt/2)) rather than as 1 - α so small masking probabilities keep full relative precision.
"""

from __future__ import annotations

import math

import torch

from cgtools.errors import ConfigError

DISCRETE_SCHEDULES = ("linear-beta", "linear-alpha", "cosine")
MASK_SCHEDULES = ("linear", "cosine")

_COSINE_OFFSET = 0.008
_COSINE_BETA_MAX = 0.999


def default_beta_range(T: int) -> tuple[float, float]:
    """Default linear-β endpoints (0.1/T, min(20/T, 1)): DDPM's (1e-4, 0.02) at T = 1000."""
    return min(0.1 / T, 1.0), min(20.0 / T, 1.0)


def log_alpha_bar_table(kind: str, T: int, beta_min: float | None = None,
                        beta_max: float | None = None) -> torch.Tensor:
    """log ᾱ_t for t = 0..T, float64 [T+1], log ᾱ_0 = 0; -inf where ᾱ_t = 0 (only possible at t = T).

    Raises ConfigError for an unknown kind, T < 1, endpoints outside (0, 1], or a schedule that
    reaches ᾱ = 0 before t = T (every posterior would then be undefined).
    """
    if T < 1:
        raise ConfigError(f"the number of noise levels T must be >= 1, got {T}")
    given_range = beta_min is not None or beta_max is not None
    if kind in DISCRETE_SCHEDULES and kind != "linear-beta" and given_range:
        raise ConfigError("beta_min/beta_max apply only to the linear-beta schedule")
    t = torch.arange(T + 1, dtype=torch.float64)
    if kind == "linear-alpha":
        # Closed form rather than a cumulative product: exact 1 - t/T and log(0) = -inf at t = T.
        table = torch.log1p(-t / T)
    elif kind in ("linear-beta", "cosine"):
        if kind == "linear-beta":
            lo, hi = default_beta_range(T)
            lo = lo if beta_min is None else float(beta_min)
            hi = hi if beta_max is None else float(beta_max)
            if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
                raise ConfigError(f"linear-beta endpoints must lie in (0, 1], got ({lo}, {hi})")
            frac = (t[1:] - 1) / max(T - 1, 1)  # [T], 0 .. 1
            # Interpolate as lo·(1-f) + hi·f so that β_T = β_max exactly (β_max = 1 ⇒ ᾱ_T = 0).
            beta = lo * (1 - frac) + hi * frac if T > 1 else torch.full((1,), hi, dtype=torch.float64)
        else:
            f = torch.cos((t / T + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * (math.pi / 2))  # [T+1]
            beta = torch.clamp(1 - f[1:] / f[:-1], max=_COSINE_BETA_MAX)  # [T]
        # log α_t = log1p(-β_t) is -inf exactly when β_t = 1; cumsum keeps -inf thereafter.
        table = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-beta), 0)])
    else:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(DISCRETE_SCHEDULES)}")
    if T > 1 and not bool(torch.isfinite(table[:T]).all()):
        raise ConfigError(f"schedule {kind!r} reaches ᾱ = 0 before the last level T = {T}")
    return table


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, exact at both ends (x = 0 → -inf, x = -inf → 0)."""
    return torch.log(-torch.expm1(x))


class MaskSchedule:
    """α(t) of masked diffusion on t ∈ [0, 1] (float64 in, float64 out, any shape)."""

    def __init__(self, kind: str) -> None:
        if kind not in MASK_SCHEDULES:
            raise ConfigError(f"unknown masked schedule {kind!r}; choose one of {', '.join(MASK_SCHEDULES)}")
        self.kind = kind

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still unmasked at time t."""
        return 1 - self.one_minus_alpha(t)

    def one_minus_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Masking probability 1 - α(t), computed without cancellation."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "linear":
            return t.clone()
        return torch.sin(t * (math.pi / 2))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """α'(t) (<= 0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "linear":
            return torch.full_like(t, -1.0)
        return -(math.pi / 2) * torch.cos(t * (math.pi / 2))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight w(t) = -α'(t)/(1 - α(t)): 1/t (linear), (π/2)/tan(πt/2) (cosine); +inf at t = 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "linear":
            return 1 / t
        return (math.pi / 2) / torch.tan(t * (math.pi / 2))

    def time_for_masking(self, e: float) -> float:
        """The t with 1 - α(t) = e (e ∈ [0, 1]): e (linear), (2/π)·asin(e) (cosine)."""
        if not 0.0 <= e <= 1.0:
            raise ConfigError(f"the corruption level must lie in [0, 1], got {e}")
        if self.kind == "linear":
            return float(e)
        return min(1.0, 2 / math.pi * math.asin(e))
