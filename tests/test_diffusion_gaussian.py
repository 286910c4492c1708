"""Gaussian diffusion (Improved DDPM): schedules, posterior, loss, bound, sampler, importance sampling.

The references are written independently of cgtools.diffusion.gaussian: schedules and posterior
coefficients from the closed forms in numpy float64, posteriors also by conditioning the joint
Gaussian of (x_s, x_t) numerically, KL terms with torch.distributions, the decoder with
scipy.stats.norm. Monte-Carlo checks use fixed seeds and a 5-standard-error tolerance (false-alarm
rate ≈ 6e-7 per comparison under a normal approximation); binomial and chi-square tests reject at
p < 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal, kl_divergence

from cgtools.diffusion.base import LossTerms
from cgtools.diffusion.gaussian import GaussianConfig, GaussianDiffusion
from cgtools.diffusion.registry import PROCESSES, config_from_json, make_config, make_process
from cgtools.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

FIXED = dict(learn_sigma=False, loss="simple")  # fixed β̃ variance


# ---- independent references ------------------------------------------------------------------
def ref_alpha_bar(T: int, schedule: str = "cosine") -> np.ndarray:
    """ᾱ_0..ᾱ_T in numpy float64 from the closed forms of reference/diffusion.md §3."""
    t = np.arange(T + 1, dtype=np.float64)
    if schedule == "cosine":
        f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
        ab = f / f[0]
        ab[T] = ab[T - 1] * (1 - 0.999)  # β_T = 1 - f(T)/f(T-1) ≈ 1 is clipped to 0.999
        return ab
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return np.concatenate([[1.0], np.cumprod(1 - betas)])


def ref_step(ab: np.ndarray, t: int, s: int) -> dict[str, float]:
    """Closed-form posterior of the step t -> s (β' = 1 - ᾱ_t/ᾱ_s)."""
    beta = 1 - ab[t] / ab[s]
    return dict(beta=beta, var=beta * (1 - ab[s]) / (1 - ab[t]),
                c0=math.sqrt(ab[s]) * beta / (1 - ab[t]),
                ct=math.sqrt(1 - beta) * (1 - ab[s]) / (1 - ab[t]))


def bayes_step(ab: np.ndarray, t: int, s: int) -> tuple[float, float, float]:
    """(coefficient of x0, coefficient of x_t, variance) of x_s | x_t, x0 by conditioning the joint
    Gaussian of (x_s, x_t) built from x_s = √ᾱ_s x0 + √(1-ᾱ_s) z and
    x_t = √(ᾱ_t/ᾱ_s) x_s + √(1-ᾱ_t/ᾱ_s) w."""
    a_ts = ab[t] / ab[s]
    # coefficients of (x0, z, w) in x_s and x_t
    xs = np.array([math.sqrt(ab[s]), math.sqrt(1 - ab[s]), 0.0])
    xt = np.array([math.sqrt(a_ts) * xs[0], math.sqrt(a_ts) * xs[1], math.sqrt(1 - a_ts)])
    noise = np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64)  # z, w are the random parts
    cov = np.array([[xs @ noise @ noise.T @ xs, xs @ noise @ noise.T @ xt],
                    [xt @ noise @ noise.T @ xs, xt @ noise @ noise.T @ xt]])
    gain = cov[0, 1] / cov[1, 1]
    # E[x_s | x_t, x0] = xs[0] x0 + gain (x_t - xt[0] x0)
    return xs[0] - gain * xt[0], gain, cov[0, 0] - gain * cov[0, 1]


def discretized_nll(x0: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """-log P(bin of x0) under N(mean, std²), 256 bins of width 2/255 on [-1, 1], edges to ±∞."""
    hi = (x0 - mean + 1 / 255) / std
    lo = (x0 - mean - 1 / 255) / std
    inner = np.where(lo > 0, stats.norm.sf(lo) - stats.norm.sf(hi), stats.norm.cdf(hi) - stats.norm.cdf(lo))
    p = np.where(x0 < -0.999, stats.norm.cdf(hi), np.where(x0 > 0.999, stats.norm.sf(lo), inner))
    return -np.log(p)


def within(got: float, want: float, se: float, k: float = 5.0) -> bool:
    return abs(got - want) < k * se


def grid_values(shape, gen) -> torch.Tensor:
    """Data on the 256-level pixel grid of [-1, 1], including both ends."""
    k = torch.randint(0, 256, shape, generator=gen)
    k.view(-1)[:2] = torch.tensor([0, 255])
    return (k.double() * 2 / 255 - 1)


# ---- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_cosine_schedule_is_the_closed_form(T):
    proc = GaussianDiffusion(GaussianConfig(T=T))
    ab = ref_alpha_bar(T)
    levels = [0, 1, 2, T // 10, T // 2, T - 2, T - 1, T]
    got = proc.alpha_bar[levels].numpy()
    assert np.allclose(got, ab[levels], rtol=1e-10, atol=0)
    betas = proc.betas[1:]
    assert float(betas.max()) <= 0.999 and float(betas[-1]) == 0.999
    assert bool((proc.alpha_bar[1:] < proc.alpha_bar[:-1]).all())
    assert proc.corruption(torch.tensor([0, T])).tolist() == pytest.approx([0.0, 1 - ab[T]], rel=1e-12)


def test_linear_schedule_endpoints():
    for T, lo, hi in ((1000, 1e-4, 0.02), (500, 2e-4, 0.04), (4000, 2.5e-5, 0.005)):
        proc = GaussianDiffusion(GaussianConfig(T=T, schedule="linear", **FIXED))
        b = proc.betas[1:].numpy()
        assert b[0] == pytest.approx(lo, rel=1e-12) and b[-1] == pytest.approx(hi, rel=1e-12)
        assert np.allclose(np.diff(b), (hi - lo) / (T - 1), rtol=1e-6)
        assert np.allclose(proc.alpha_bar.numpy(), ref_alpha_bar(T, "linear"), rtol=1e-10)


# ---- posterior -----------------------------------------------------------------------------------
def test_posterior_coefficients_closed_form_and_bayes():
    T = 100
    proc = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    ab = ref_alpha_bar(T)
    table = proc.chain
    for t in (2, 3, 10, 50, 99, 100):
        row = T - t
        ref = ref_step(ab, t, t - 1)
        assert float(table["beta"][row]) == pytest.approx(ref["beta"], rel=1e-9)
        for key, name in (("coef_x0", "c0"), ("coef_xt", "ct"), ("post_var", "var")):
            assert float(table[key][row]) == pytest.approx(ref[name], rel=1e-9), (t, key)
        c0, ct, var = bayes_step(ab, t, t - 1)
        assert (float(table["coef_x0"][row]), float(table["coef_xt"][row]), float(table["post_var"][row])) \
            == pytest.approx((c0, ct, var), rel=1e-8)
    # t = 1: β̃_1 = 0, its log clipped to log β̃_2
    assert float(table["post_var"][T - 1]) == 0.0
    clipped = math.log(ref_step(ab, 2, 1)["var"])
    assert float(table["log_post_var"][T - 1]) == pytest.approx(clipped, rel=1e-12)
    # respaced steps t -> s use β' = 1 - ᾱ_t/ᾱ_s; the last (to 0) is clipped to the step above it
    grid = [100, 73, 40, 9, 4]
    rs = proc.kernel_table(grid)
    for i, (t, s) in enumerate(zip(grid, grid[1:] + [0])):
        c0, ct, var = bayes_step(ab, t, s) if s > 0 else (1.0, 0.0, 0.0)
        assert (float(rs["coef_x0"][i]), float(rs["coef_xt"][i]), float(rs["post_var"][i])) \
            == pytest.approx((c0, ct, var), rel=1e-8, abs=1e-15)
        assert float(rs["beta"][i]) == pytest.approx(1 - ab[t] / ab[s], rel=1e-9)
    assert float(rs["log_post_var"][-1]) == pytest.approx(math.log(ref_step(ab, 9, 4)["var"]), rel=1e-12)
    # q_posterior applies them
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 2, dtype=torch.float64, generator=gen)
    xt = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen)
    t = torch.tensor([2, 50, 100])
    mean, logvar = proc.q_posterior(x0, xt, t)
    for i, level in enumerate(t.tolist()):
        ref = ref_step(ab, level, level - 1)
        assert torch.allclose(mean[i], ref["c0"] * x0[i] + ref["ct"] * xt[i], rtol=1e-10)
        assert float(logvar[i].flatten()[0]) == pytest.approx(math.log(ref["var"]), rel=1e-10)


def test_posterior_monte_carlo():
    """Draw (x_{t-1}, x_t) from the forward chain; regress x_{t-1} on x_t: slope, intercept and residual
    variance must match the posterior (x0 fixed). 200,000 pairs, 5 standard errors."""
    T, t = 50, 20
    proc = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.4, dtype=torch.float64)
    x_prev = proc.q_sample(x0, torch.full((n,), t - 1), gen)
    beta = float(proc.betas[t])
    w = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * w
    mean, logvar = proc.q_posterior(x0, x_t, torch.full((n,), t))
    resid = (x_prev - mean).flatten()
    var = math.exp(float(logvar[0]))
    assert within(float(resid.mean()), 0.0, math.sqrt(var / n))
    assert within(float(resid.var()), var, var * math.sqrt(2 / n))
    assert within(float((resid * (x_t.flatten() - x_t.mean())).mean()), 0.0,
                  math.sqrt(var * float(x_t.var()) / n))


# ---- the loss ------------------------------------------------------------------------------------
def _batch(proc, t, shape=(2, 3, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(t)
    x0 = grid_values((b, *shape), gen)
    t = torch.tensor(t)
    x_t = proc.q_sample(x0, t, gen)
    return gen, x0, t, x_t


def test_vb_term_is_the_gaussian_kl_and_the_hybrid_loss():
    T, lam = 50, 0.001
    proc = GaussianDiffusion(GaussianConfig(T=T, lambda_vlb=lam))
    ab = ref_alpha_bar(T)
    gen, x0, t, x_t = _batch(proc, [2, 3, 17, 30, 49, 50])
    pred = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    terms = proc.loss(pred, x0, x_t, t)
    got = {k: getattr(terms, k).detach() for k in ("loss", "vb", "ce", "elbo_bits")}
    eps_hat, v = pred.detach()[:, :2], pred.detach()[:, 2:]
    for i, level in enumerate(t.tolist()):
        ref = ref_step(ab, level, level - 1)
        eps = (x_t[i] - math.sqrt(ab[level]) * x0[i]) / math.sqrt(1 - ab[level])
        x0_hat = (x_t[i] - math.sqrt(1 - ab[level]) * eps_hat[i]) / math.sqrt(ab[level])
        mu = ref["c0"] * x0_hat + ref["ct"] * x_t[i]
        f = (v[i] + 1) / 2
        logvar = f * math.log(ref["beta"]) + (1 - f) * math.log(ref["var"])
        q = Normal(ref["c0"] * x0[i] + ref["ct"] * x_t[i], math.sqrt(ref["var"]))
        kl = kl_divergence(q, Normal(mu, torch.exp(0.5 * logvar))).mean()
        mse = ((eps - eps_hat[i]) ** 2).mean()
        assert float(got["vb"][i]) == pytest.approx(float(kl), rel=1e-9)
        assert float(got["ce"][i]) == pytest.approx(float(mse), rel=1e-9)
        assert float(got["loss"][i]) == pytest.approx(float(mse + lam * T * kl / math.log(2)), rel=1e-9)
        assert float(got["elbo_bits"][i]) == pytest.approx(
            float(T * kl + kl_divergence(Normal(math.sqrt(ab[T]) * x0[i], math.sqrt(1 - ab[T])),
                                         Normal(0.0, 1.0)).mean()) / math.log(2), rel=1e-9)
    # stop-gradient: ε̂ learns from L_simple only, v from the VB term only
    terms.loss.sum().backward()
    ab_t = torch.from_numpy(ab)[t].view(-1, 1, 1, 1)
    eps_true = (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    assert torch.allclose(pred.grad[:, :2], 2 * (eps_hat - eps_true) / 18, rtol=1e-9)
    assert float(pred.grad[:, 2:].abs().min()) > 0


def test_vlb_loss_trains_the_mean_and_is_scaled_by_T():
    T = 40
    proc = GaussianDiffusion(GaussianConfig(T=T, loss="vlb"))
    gen, x0, t, x_t = _batch(proc, [1, 5, 40])
    pred = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    terms = proc.loss(pred, x0, x_t, t)
    assert torch.allclose(terms.loss, T * terms.vb / math.log(2), rtol=1e-12)
    terms.loss.sum().backward()
    assert float(pred.grad[:, :2].abs().min()) > 0  # the mean learns from the bound
    fixed = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    simple = fixed.loss(pred.detach()[:, :2], x0, x_t, t)
    assert torch.allclose(simple.loss, simple.ce)


def test_decoder_nll_is_the_discretised_gaussian():
    T = 1000
    ab = ref_alpha_bar(T)
    gen = torch.Generator().manual_seed(3)
    for config in (GaussianConfig(T=T), GaussianConfig(T=T, **FIXED)):
        proc = GaussianDiffusion(config)
        b = 8
        x0 = grid_values((b, 3, 4, 4), gen)
        t = torch.ones(b, dtype=torch.long)
        x_t = proc.q_sample(x0, t, gen)
        eps = (x_t - math.sqrt(ab[1]) * x0) / math.sqrt(1 - ab[1])
        eps_hat = eps + 0.3 * torch.randn(eps.shape, dtype=torch.float64, generator=gen)
        v = torch.rand(eps.shape, dtype=torch.float64, generator=gen) * 2 - 1
        pred = torch.cat([eps_hat, v], 1) if config.learn_sigma else eps_hat
        terms = proc.loss(pred, x0, x_t, t)
        x0_hat = ((x_t - math.sqrt(1 - ab[1]) * eps_hat) / math.sqrt(ab[1])).numpy()
        small = math.log(ref_step(ab, 2, 1)["var"])  # log β̃_1 clipped to log β̃_2
        f = (v.numpy() + 1) / 2 if config.learn_sigma else 0.0
        logvar = f * math.log(1 - ab[1]) + (1 - f) * small
        nll = discretized_nll(x0.numpy(), x0_hat, np.exp(0.5 * logvar)).reshape(b, -1).mean(1)
        assert np.allclose(terms.vb.numpy(), nll, rtol=1e-9)


def test_learned_range_interpolates_between_beta_tilde_and_beta():
    T = 30
    proc = GaussianDiffusion(GaussianConfig(T=T))
    ab = ref_alpha_bar(T)
    x = torch.zeros(3, 1, 2)
    for t in (1, 2, 15, 30):
        eps = torch.zeros_like(x)
        v = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1).expand_as(x)
        _, _, logvar = proc.p_mean_variance(eps.double(), v.double(), x.double(), torch.full((3,), t))
        small = math.log(ref_step(ab, max(t, 2), max(t, 2) - 1)["var"])
        big = math.log(1 - ab[t] / ab[t - 1])
        assert logvar[:, 0, 0].tolist() == pytest.approx([small, big, 0.5 * (small + big)], rel=1e-10)
    assert proc.output_channels(3) == 6
    assert GaussianDiffusion(GaussianConfig(T=T, **FIXED)).output_channels(3) == 3
    with pytest.raises(ConfigError, match="predicts shape"):
        proc.loss(torch.zeros(3, 1, 2), x, x, torch.ones(3, dtype=torch.long))


def test_float32_loss_is_finite_with_gradients_at_the_ends():
    proc = GaussianDiffusion(GaussianConfig(T=1000))
    gen, x0, t, x_t = _batch(proc, [1, 1, 2, 1000, 1000, 500], seed=4)
    pred = (torch.randn(6, 4, 3, 3, generator=gen) * 30).requires_grad_()
    terms = proc.loss(pred, x0.float(), x_t.float(), t)
    terms.loss.mean().backward()
    values = (terms.loss, terms.vb, terms.ce, terms.elbo_bits, pred.grad)
    assert all(bool(torch.isfinite(v).all()) for v in values)
    ref = proc.loss(pred.detach().double(), x0, x_t.float().double(), t)
    assert torch.allclose(terms.vb.double(), ref.vb, rtol=1e-3)


# ---- forward process -----------------------------------------------------------------------------
def test_q_sample_corrupt_and_prior_statistics():
    T, t = 1000, 300
    proc = GaussianDiffusion(GaussianConfig(T=T))
    ab = ref_alpha_bar(T)[t]
    gen = torch.Generator().manual_seed(5)
    n = 20_000
    x0 = torch.full((n, 1, 2, 2), 0.6)
    x = proc.q_sample(x0, torch.full((n,), t), gen).double().flatten()
    m = n * 4
    assert x.dtype == torch.float64 and within(float(x.mean()), math.sqrt(ab) * 0.6, math.sqrt((1 - ab) / m))
    assert within(float(x.var()), 1 - ab, (1 - ab) * math.sqrt(2 / m))
    e = torch.tensor([0.1] * (n // 2) + [0.7] * (n // 2), dtype=torch.float64)
    y = proc.corrupt(x0, e, gen)
    assert y.dtype == torch.float32
    for rows, level in ((slice(0, n // 2), 0.1), (slice(n // 2, n), 0.7)):
        z = y[rows].double().flatten()
        k = z.numel()
        assert within(float(z.mean()), math.sqrt(1 - level) * 0.6, math.sqrt(level / k))
        assert within(float(z.var()), level, level * math.sqrt(2 / k))
    assert torch.equal(proc.corrupt(x0, 0.0, gen), x0)
    p = proc.prior_sample((n, 4), gen).double().flatten()
    assert within(float(p.mean()), 0.0, math.sqrt(1 / m)) and within(float(p.var()), 1.0, math.sqrt(2 / m))
    with pytest.raises(ConfigError, match="float data"):
        proc.q_sample(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.long), gen)


def test_draws_come_only_from_the_explicit_generator():
    proc = GaussianDiffusion(GaussianConfig(T=20))
    state = torch.random.get_rng_state()
    x0 = torch.zeros(4, 1, 3)
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        t = proc.sample_t(4, gen)
        x = proc.q_sample(x0, t, gen)
        den = lambda x, t: torch.zeros(4, 2, 3)  # noqa: E731
        outs.append(proc.reverse(den, x, proc.time_grid(5), gen, final_step="sample"))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- time --------------------------------------------------------------------------------------
def test_time_conventions():
    T = 1000
    proc = GaussianDiffusion(GaussianConfig(T=T))
    ab = ref_alpha_bar(T)
    # space_timesteps with one section: accumulate the float stride and round (Python's round)
    for k in (2, 7, 50, 250, 999, 1000):
        stride, cur, idx = (T - 1) / (k - 1), 0.0, []
        for _ in range(k):
            idx.append(round(cur))
            cur += stride
        grid = proc.time_grid(k)
        assert grid == sorted((i + 1 for i in idx), reverse=True), k
        # evenly spaced: within ½ (plus rounding of the accumulated stride) of the exact points
        exact = 1 + np.arange(k)[::-1] * (T - 1) / (k - 1)
        assert len(set(grid)) == k and grid[0] == T and grid[-1] == 1
        assert np.abs(np.array(grid) - exact).max() <= 0.5 + 1e-9
    assert proc.time_grid() == list(range(T, 0, -1)) and proc.time_grid(1) == [T]
    for bad in (0, T + 1):
        with pytest.raises(ConfigError, match="steps must lie"):
            proc.time_grid(bad)
    t = torch.tensor([1, 17, 999, 1000])
    tau = proc.network_time(t)
    assert tau.dtype == torch.float32 and torch.equal(torch.round(tau.double() * T).long(), t)
    want = torch.from_numpy(1 - ab[t.numpy()])
    assert torch.allclose(proc.corruption_at_network_time(tau), want, rtol=1e-12)
    assert proc.time_for_corruption(0.0) == 0 and proc.time_for_corruption(1.0) == T
    for level in (3, 400, 800):
        e = 1 - ab[level]
        assert proc.time_for_corruption(e) == level
    full = proc.full_time(5, 3, "cpu")
    assert full.tolist() == [5, 5, 5] and full.dtype == torch.long
    gen = torch.Generator().manual_seed(0)
    draws = proc.sample_t(50_000, gen)
    assert int(draws.min()) >= 1 and int(draws.max()) <= T
    assert stats.chisquare(torch.bincount(draws - 1, minlength=T).numpy()).pvalue > 1e-4


# ---- the reverse process -------------------------------------------------------------------------
def point_denoiser(x0: torch.Tensor, ab: np.ndarray, channels_out: int | None = None):
    """The exact ε̂ for data that is the single point x0 (broadcast over the batch)."""
    def den(x, t):
        a = torch.from_numpy(ab)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if channels_out is None else torch.cat([eps, torch.zeros_like(eps)], 1)
    return den


@pytest.mark.parametrize("steps", [None, 50])
def test_exact_point_denoiser_walks_the_posterior_chain(steps):
    """With the exact denoiser for a single point and β̃ variances, every reverse step is the true
    posterior, so x at each visited level s ~ q(x_s | x0) = N(√ᾱ_s x0, 1 - ᾱ_s), and the end is x0."""
    T = 200
    proc = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    ab = ref_alpha_bar(T)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.linspace(-0.9, 0.9, 12).view(1, 3, 2, 2)
    seen = {}
    exact = point_denoiser(x0, ab)

    def spy(x, t):
        seen[int(t[0])] = x.double()
        return exact(x, t)

    n = 2000
    grid = proc.time_grid(steps)
    out = proc.reverse(spy, proc.prior_sample((n, 3, 2, 2), gen), grid, gen, final_step="argmax")
    assert torch.allclose(out, x0.expand_as(out), atol=1e-5)
    assert sorted(seen) == sorted(grid)
    m = n * 12
    for level in grid[1:]:  # grid[0] holds the prior draw
        z = ((seen[level] - math.sqrt(ab[level]) * x0.double()) / math.sqrt(1 - ab[level])).flatten()
        assert within(float(z.mean()), 0.0, math.sqrt(1 / m)), level
        assert within(float(z.var()), 1.0, math.sqrt(2 / m)), level


def test_one_respaced_step_draws_mean_plus_learned_sigma():
    T, t, s = 100, 60, 35
    proc = GaussianDiffusion(GaussianConfig(T=T, clip_denoised=False))
    ab = ref_alpha_bar(T)
    ref = ref_step(ab, t, s)
    gen = torch.Generator().manual_seed(9)
    n = 40_000
    x = torch.randn(n, 1, 1, generator=gen, dtype=torch.float64)
    seen = []

    def den(x_, lvl):
        seen.append(x_.clone())
        eps = 0.5 * x_ + 0.1
        return torch.cat([eps, torch.full_like(x_, 0.3)], 1)

    proc.reverse(den, x, [t, s], gen, final_step="argmax")
    x_s = seen[1].flatten()
    eps = 0.5 * x.flatten() + 0.1
    x0_hat = (x.flatten() - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
    mu = ref["c0"] * x0_hat + ref["ct"] * x.flatten()
    logvar = 0.65 * math.log(ref["beta"]) + 0.35 * math.log(ref["var"])
    z = (x_s - mu) / math.exp(0.5 * logvar)
    assert within(float(z.mean()), 0.0, math.sqrt(1 / n)) and within(float(z.var()), 1.0, math.sqrt(2 / n))


@pytest.mark.parametrize("steps", [None, 50])
def test_two_point_mixture_lands_on_its_atoms_with_their_weights(steps):
    """Data ±a with P(+a) = w per dimension; the exact posterior mean is
    a·tanh(√ᾱ a x_t/(1-ᾱ) + ½ log(w/(1-w))). Samples must sit on ±a.

    w = ½: the sampler is odd-symmetric, so the fraction at +a is exactly Binomial(n, ½): two-sided
    binomial test, rejecting at p < 1e-4. w = 0.3: ancestral sampling with β̃ variances is not
    exact (measured bias ≈ -0.002 on the full grid, -0.007 at 50 steps, -0.03 at 10 steps, over
    200,000 draws), so the fraction must lie within an allowance of 0.005 / 0.015 plus 5 standard
    errors of w.
    """
    T, a = 200, 0.5
    proc = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    ab = torch.from_numpy(ref_alpha_bar(T))
    for w, seed in ((0.5, 10), (0.3, 11)):
        def den(x, t):
            al = ab[t].to(x.dtype).view(-1, 1, 1, 1)
            mean_x0 = a * torch.tanh(al.sqrt() * a * x / (1 - al) + 0.5 * math.log(w / (1 - w)))
            return (x - al.sqrt() * mean_x0) / (1 - al).sqrt()

        gen = torch.Generator().manual_seed(seed)
        out = proc.reverse(den, proc.prior_sample((10_000, 1, 2, 2), gen), proc.time_grid(steps), gen,
                           final_step="argmax").flatten()
        assert float(((out.abs() - a).abs()).max()) < 1e-3
        n, k = out.numel(), int((out > 0).sum())
        if w == 0.5:
            assert stats.binomtest(k, n, w).pvalue > 1e-4, k / n
        else:
            allowance = 0.005 if steps is None else 0.015
            assert abs(k / n - w) < allowance + 5 * math.sqrt(w * (1 - w) / n), k / n


def test_final_step_sample_quantises_and_cache_is_refused():
    proc = GaussianDiffusion(GaussianConfig(T=50))
    gen = torch.Generator().manual_seed(11)
    den = lambda x, t: torch.cat([0.3 * x, torch.zeros_like(x)], 1)  # noqa: E731
    x = proc.prior_sample((64, 3, 4, 4), gen)
    out = proc.reverse(den, x, proc.time_grid(10), gen, final_step="sample")
    levels = (out.double() + 1) * 127.5
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    mean = proc.reverse(den, x, proc.time_grid(10), torch.Generator().manual_seed(11), final_step="argmax")
    assert not torch.allclose(levels, (mean.double() + 1) * 127.5)
    with pytest.raises(ConfigError, match="nothing to cache"):
        proc.reverse(den, x, proc.time_grid(10), gen, final_step="argmax", cache=True)
    with pytest.raises(ConfigError, match="final_step"):
        proc.reverse(den, x, proc.time_grid(10), gen, final_step="mode")

    class Bar:
        n = 0

        def advance(self):
            Bar.n += 1

    proc.reverse(den, x, proc.time_grid(7), gen, final_step="argmax", bar=Bar())
    assert Bar.n == 7


# ---- the bound -----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [None, 6])
def test_bound_is_the_sum_of_independently_computed_terms(steps):
    T = 20
    proc = GaussianDiffusion(GaussianConfig(T=T))
    ab = ref_alpha_bar(T)
    x0 = grid_values((3, 2, 2, 2), torch.Generator().manual_seed(12))
    calls = []

    def den(x, t):  # deterministic, data-dependent, not the truth; x̂0 sometimes leaves [-1, 1]
        calls.append((x.clone(), int(t[0])))
        al = float(ab[int(t[0])])
        eps = 0.9 * (x - math.sqrt(al) * x0) / math.sqrt(1 - al) + 0.2 * torch.sin(3 * x)
        return torch.cat([eps, torch.tanh(x)], 1)

    prior, diffusion, decoder = proc.bound_terms(den, x0, torch.Generator().manual_seed(13), steps)
    total = proc.bound(den, x0, torch.Generator().manual_seed(13), steps)  # the same draws
    grid = proc.time_grid(steps)
    assert [lvl for _, lvl in calls] == grid + grid
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(calls, calls[len(grid):]))
    q_T = Normal(math.sqrt(ab[T]) * x0, math.sqrt(1 - ab[T]))
    want_prior = kl_divergence(q_T, Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(prior, want_prior, rtol=1e-10)
    clip_var = ref_step(ab, grid[-2], grid[-1])["var"]
    terms = []
    for i, (x, t) in enumerate(calls[:len(grid)]):
        s = grid[i + 1] if i + 1 < len(grid) else 0
        ref = ref_step(ab, t, s)
        e = 0.9 * (x - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t]) + 0.2 * torch.sin(3 * x)
        x0_hat = ((x - math.sqrt(1 - ab[t]) * e) / math.sqrt(ab[t])).clamp(-1, 1)
        mu = ref["c0"] * x0_hat + ref["ct"] * x
        small = math.log(ref["var"]) if s > 0 else math.log(clip_var)
        f = (torch.tanh(x) + 1) / 2
        logvar = f * math.log(ref["beta"]) + (1 - f) * small
        if s > 0:
            q = Normal(ref["c0"] * x0 + ref["ct"] * x, math.sqrt(ref["var"]))
            terms.append(kl_divergence(q, Normal(mu, torch.exp(0.5 * logvar))).flatten(1).sum(1))
        else:
            nll = discretized_nll(x0.numpy(), mu.numpy(), np.exp(0.5 * logvar.numpy()))
            terms.append(torch.from_numpy(nll.reshape(3, -1).sum(1)))
    assert torch.allclose(decoder, terms[-1], rtol=1e-9)
    assert torch.allclose(diffusion, torch.stack(terms[-2::-1], 1), rtol=1e-9)
    assert torch.allclose(total, want_prior + sum(terms), rtol=1e-9)


def test_bound_of_the_exact_point_denoiser_is_prior_plus_decoder():
    """For a single data point the exact denoiser matches every posterior mean, so each KL is 0 and
    the bound is L_T plus the decoder of a Gaussian centred on x0 with variance β̃_2."""
    T = 100
    proc = GaussianDiffusion(GaussianConfig(T=T, **FIXED))
    ab = ref_alpha_bar(T)
    gen = torch.Generator().manual_seed(13)
    x0 = grid_values((1, 3, 2, 2), gen)
    batch = x0.expand(4, -1, -1, -1).clone()
    prior, diffusion, decoder = proc.bound_terms(point_denoiser(x0, ab), batch, gen)
    assert float(diffusion.abs().max()) < 1e-9
    std = math.sqrt(ref_step(ab, 2, 1)["var"])
    want = discretized_nll(x0.numpy(), x0.numpy(), np.full(x0.shape, std)).sum()
    assert torch.allclose(decoder, torch.full((4,), float(want), dtype=torch.float64), rtol=1e-9)
    assert bool(torch.isfinite(prior).all())


# ---- importance sampling --------------------------------------------------------------------------
def _feed(proc, T, rounds, value):
    for r in range(rounds):
        t = torch.arange(1, T + 1)
        vb = torch.tensor([value(level, r) for level in range(1, T + 1)], dtype=torch.float64)
        proc.observe_losses(t, LossTerms(loss=vb, vb=vb, ce=vb, elbo_bits=vb))


def test_importance_sampling_distribution_weights_and_state():
    T = 6
    proc = GaussianDiffusion(GaussianConfig(T=T, loss="vlb", importance_sampling=True))
    value = lambda level, r: level + 0.5 * r * (-1) ** level  # noqa: E731 (which rounds are kept matters)
    _feed(proc, T, 9, value)
    assert not proc.warmed_up() and torch.equal(proc.importance_weights(torch.arange(1, T + 1)),
                                                torch.ones(T, dtype=torch.float64))
    _feed(proc, T, 3, lambda level, r: value(level, r + 9))  # 12 rounds: rounds 2..11 are kept
    assert proc.warmed_up()
    hist = np.array([[value(level, r) for r in range(2, 12)] for level in range(1, T + 1)])
    assert np.array_equal(proc.state_dict()["loss_history"].numpy(), hist)
    assert proc.state_dict()["loss_counts"].tolist() == [10] * T
    w = np.sqrt((hist ** 2).mean(1))
    p = 0.999 * w / w.sum() + 0.001 / T
    assert np.allclose(proc.t_probabilities().numpy(), p, rtol=1e-12)
    weights = proc.importance_weights(torch.arange(1, T + 1)).numpy()
    assert np.allclose(weights, 1 / (T * p), rtol=1e-12)
    losses = hist[:, -1]
    assert float(np.sum(p * weights * losses)) == pytest.approx(float(losses.mean()), rel=1e-12)
    # the draws follow p (chi-square, p > 1e-4)
    gen = torch.Generator().manual_seed(14)
    t = proc.sample_t(60_000, gen)
    counts = torch.bincount(t - 1, minlength=T).numpy()
    assert stats.chisquare(counts, 60_000 * p).pvalue > 1e-4
    # the training loss carries the weight; vb and elbo_bits do not
    x0 = torch.zeros(T, 1, 2)
    x_t = proc.q_sample(x0, torch.arange(1, T + 1), gen)
    pred = torch.zeros(T, 2, 2)
    terms = proc.loss(pred, x0, x_t, torch.arange(1, T + 1))
    want = T * terms.vb.double() / math.log(2) * torch.from_numpy(weights)
    assert torch.allclose(terms.loss.double(), want, rtol=1e-5)
    # state round trip (also through .to), and refusal of a mismatched state
    state = proc.state_dict()
    fresh = GaussianDiffusion(GaussianConfig(T=T, loss="vlb", importance_sampling=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.t_probabilities(), proc.t_probabilities())
    assert torch.equal(proc.to("cpu").t_probabilities(), proc.t_probabilities())
    draws = [p.sample_t(20, torch.Generator().manual_seed(1)) for p in (fresh, proc)]
    assert torch.equal(*draws)
    with pytest.raises(ConfigError, match="does not match"):
        GaussianDiffusion(GaussianConfig(T=7, loss="vlb", importance_sampling=True)).load_state_dict(state)
    # without importance sampling the hooks keep the base no-op behaviour
    plain = GaussianDiffusion(GaussianConfig(T=T))
    _feed(plain, T, 12, value)
    assert plain.state_dict() == {} and not plain.warmed_up()


# ---- configuration --------------------------------------------------------------------------------
def test_config_round_trip_and_registry():
    cfg = GaussianConfig(T=4000, schedule="linear", learn_sigma=False, loss="vlb", importance_sampling=True,
                         clip_denoised=False)
    assert config_from_json(cfg.to_json()) == cfg
    assert GaussianConfig.from_json(cfg.to_json()) == cfg
    proc = make_process(make_config("gaussian", {"T": 50, "lambda_vlb": 0.01}), None)
    assert isinstance(proc, GaussianDiffusion) and PROCESSES["gaussian"] is GaussianDiffusion
    assert proc.config == GaussianConfig(T=50, lambda_vlb=0.01) and proc.default_final_step == "argmax"
    assert proc.describe()["process"] == "gaussian"
    assert make_process(GaussianConfig(), 8).T == 1000  # a vocabulary is accepted and ignored


@pytest.mark.parametrize("settings, message", [
    ({"T": 1}, "T must be"), ({"T": 2.5}, "T must be"), ({"schedule": "quadratic"}, "unknown schedule"),
    ({"schedule": "linear", "T": 20}, "T > 20"), ({"loss": "l1"}, "unknown loss"),
    ({"loss": "simple"}, "cannot train a learned variance"), ({"learn_sigma": False}, "needs learn_sigma"),
    ({"lambda_vlb": -1.0}, "lambda_vlb"), ({"lambda_vlb": 0.0}, "lambda_vlb > 0"),
    ({"importance_sampling": True}, "only to loss 'vlb'"), ({"learn_sigma": "yes"}, "true or false"),
    ({"beta_min": 0.1}, "unknown gaussian diffusion setting"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_config("gaussian", settings)
