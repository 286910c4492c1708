"""Samplers: float64 categorical draws, exact output laws on tiny chains, respacing, the cached
masked sampler (identical samples), forward-backward and the time convention seen by the denoiser.

Goodness-of-fit checks are chi-square tests at a false-alarm rate of 1e-4 each (seeds are fixed,
so a pass is reproducible); exact laws are computed by brute-force propagation in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cgtools.diffusion import (MaskedConfig, UniformConfig, denoise, draw_categorical, forward_backward,
                               logits_denoiser, make_process, sample)
from cgtools.errors import ConfigError
from tests.helpers import TEST_FAILURE_RATE as ALPHA  # false-alarm rate of each goodness-of-fit test


def gof(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of integer samples against probabilities (cells with p = 0 must be empty)."""
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "a zero-probability outcome was drawn"
    keep = probs > 0
    return chisquare(counts[keep], len(samples) * probs[keep] / probs[keep].sum()).pvalue


class Recorder:
    """Wraps a denoiser and records every call's t and batch size."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, t):
        self.calls.append((t.clone(), x.shape[0]))
        return self.denoiser(x, t)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.calls)


def masked_toy(k: int, d: int, seed: int, time: bool = False):
    g = torch.Generator().manual_seed(seed)
    own = 1.5 * torch.randn(d, k + 1, k, generator=g)
    left = torch.randn(d, k + 1, k, generator=g)
    tim = 2 * torch.randn(d, k, generator=g)
    pos = torch.arange(d)

    def denoiser(x, t):
        logits = own[pos, x] + left[pos, x.roll(1, dims=1)]
        if time:
            logits = logits + t.float()[:, None, None] * tim
        return torch.log_softmax(logits, -1)

    return denoiser


# ---- categorical draws ------------------------------------------------------------------------------
def test_draw_categorical_law_and_zero_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = np.array([0.5, 0.0, 0.25, 1e-3, 0.249, 0.0])
    logp = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(100000, 6)
    draws = draw_categorical(logp, g)
    assert draws.dtype == torch.long and draws.shape == (100000,)
    assert gof(draws.numpy(), probs) > ALPHA
    # a row with a single allowed symbol, and -inf everywhere else
    one = torch.full((1000, 4), -math.inf)
    one[:, 3] = 0.0
    assert bool((draw_categorical(one, g) == 3).all())


def test_draw_categorical_resolves_float64_probabilities():
    """A symbol with probability 1e-12 next to one of 1 - 1e-12: float64 cumulative sums resolve it."""
    g = torch.Generator().manual_seed(0)
    logp = torch.tensor([[math.log1p(-1e-12), math.log(1e-12)]], dtype=torch.float64)
    u = torch.tensor([1 - 5e-13, 1 - 2e-12], dtype=torch.float64)
    from cgtools.diffusion.sampling import _inverse_cdf
    assert _inverse_cdf(logp.expand(2, 2), u).tolist() == [1, 0]
    assert draw_categorical(logp.expand(10, 2), g).eq(0).all()


# ---- exact laws of small chains (uniform) ------------------------------------------------------------------
def uniform_chain_law(proc, den, k: int, steps, final: str) -> np.ndarray:
    """Law of the sampler's output for d = 1, by propagating the state distribution (numpy)."""
    abar = proc.log_alpha_bar.exp().numpy()
    grid = proc.time_grid(steps) + [0]
    law = np.full(k, 1.0 / k)  # x_T uniform
    states = torch.arange(k)[:, None]  # every x_t value, [K, 1]
    for i, t in enumerate(grid[:-1]):
        s = grid[i + 1]
        p_hat = den(states, torch.full((k,), t)).exp()[:, 0].double().numpy()  # [k (x_t), i (x0)]
        a_ts = abar[t] / abar[s]
        A = a_ts * np.eye(k) + (1 - a_ts) / k  # [j (x_s), k (x_t)]
        if s > 0:
            kern = A.T * (abar[s] * p_hat + (1 - abar[s]) / k)  # [k, j]
        elif proc.config.decoder == "posterior":
            kern = A.T * p_hat
        else:
            kern = p_hat.copy()
        kern /= kern.sum(1, keepdims=True)
        if s == 0 and final == "argmax":
            kern = np.eye(k)[kern.argmax(1)]
        law = law @ kern
    return law


@pytest.mark.parametrize("cfg,steps,final", [
    (UniformConfig(T=6, schedule="linear-alpha"), None, "sample"),
    (UniformConfig(T=6, schedule="cosine", decoder="posterior"), None, "sample"),
    (UniformConfig(T=9, schedule="linear-beta", beta_min=0.05, beta_max=0.5), 3, "sample"),
    (UniformConfig(T=6, schedule="linear-alpha"), None, "argmax"),
])
def test_uniform_sampler_law(cfg, steps, final):
    """(g) the sampler calls the denoiser at the level of x_t and applies that level's kernel: its
    output law equals a brute-force propagation with a time-dependent denoiser."""
    k, n = 4, 60000
    proc = make_process(cfg, k)
    g0 = torch.Generator().manual_seed(7)
    table = 1.5 * torch.randn(cfg.T + 1, k, k, generator=g0)  # [t, x_t, x0]
    den = lambda x, t: torch.log_softmax(table[t][torch.arange(len(x))[:, None], x], -1)  # noqa: E731
    rec = Recorder(den)
    out = sample(proc, rec, n, 1, torch.Generator().manual_seed(1), steps=steps, batch_size=n,
                 final_step=final)
    assert [int(t[0]) for t, _ in rec.calls] == proc.time_grid(steps)
    assert all(t.dtype == torch.long and t.shape == (n,) for t, _ in rec.calls)
    law = uniform_chain_law(proc, den, k, steps, final)
    assert gof(out[:, 0].numpy(), law) > ALPHA


def test_uniform_sampler_is_exact_with_the_cavity_denoiser():
    """Independent positions and p̂ = the data marginal (cavity): samples follow the data law for
    any respacing (linear-ᾱ so the prior is exact; posterior decoder; sampled last step)."""
    k, d, n = 3, 2, 20000
    marg = torch.tensor([[0.6, 0.3, 0.1], [0.05, 0.15, 0.8]])
    den = lambda x, t: torch.log(marg).expand(len(x), d, k)  # noqa: E731
    for steps in (None, 4, 1):
        proc = make_process(UniformConfig(T=10, schedule="linear-alpha", decoder="posterior"), k)
        out = sample(proc, den, n, d, torch.Generator().manual_seed(3), steps=steps, final_step="sample",
                     batch_size=7000)
        for pos in range(d):
            assert gof(out[:, pos].numpy(), marg[pos].double().numpy()) > ALPHA


# ---- exact laws (masked) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,steps", [("linear", 5), ("cosine", 8)])
def test_masked_sampler_law(kind, steps):
    """d = 1 with a time-dependent denoiser: P(x = j) = Σ_i P(first reveal at step i)·p̂_j(t_i)."""
    k, n = 4, 60000
    proc = make_process(MaskedConfig(schedule=kind, time_conditioning=True), k)
    den = masked_toy(k, 1, seed=3, time=True)
    rec = Recorder(den)
    out = sample(proc, rec, n, 1, torch.Generator().manual_seed(2), steps=steps, batch_size=n)
    grid = proc.time_grid(steps)
    assert [float(t[0]) for t, _ in rec.calls] == grid
    assert all(t.dtype == torch.float64 for t, _ in rec.calls)
    law, still_masked = np.zeros(k), 1.0
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else 0.0
        rho = float(proc.unmask_probability(t, s))
        p_hat = den(torch.tensor([[k]]), torch.tensor([t], dtype=torch.float64)).exp()[0, 0].double().numpy()
        law += still_masked * rho * p_hat
        still_masked *= 1 - rho
    assert still_masked == 0.0 and law.sum() == pytest.approx(1.0)
    assert gof(out[:, 0].numpy(), law) > ALPHA


def test_masked_sampler_is_exact_with_the_marginal_denoiser():
    k, d, n = 3, 2, 30000
    marg = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    den = lambda x, t: torch.log(marg).expand(len(x), d, k)  # noqa: E731
    proc = make_process(MaskedConfig(schedule="cosine"), k)
    out = sample(proc, den, n, d, torch.Generator().manual_seed(4), steps=30, batch_size=10000)
    for pos in range(d):
        assert gof(out[:, pos].numpy(), marg[pos].double().numpy()) > ALPHA


# ---- the cached masked sampler ----------------------------------------------------------------------
@pytest.mark.parametrize("steps,batch_size,final", [(None, 64, "sample"), (25, 64, "sample"),
                                                     (1000, 17, "argmax"), (3, 64, "sample")])
def test_cached_sampler_equals_uncached(steps, batch_size, final):
    """(e) same generator seed -> identical samples, with far fewer denoiser rows evaluated."""
    k, d, n = 5, 8, 64
    proc = make_process(MaskedConfig(), k)
    den = masked_toy(k, d, seed=0)
    plain, cached = Recorder(den), Recorder(den)
    a = sample(proc, plain, n, d, torch.Generator().manual_seed(9), steps=steps, batch_size=batch_size,
               cache=False, final_step=final)
    b = sample(proc, cached, n, d, torch.Generator().manual_seed(9), steps=steps, batch_size=batch_size,
               final_step=final)  # cache defaults to on: the config has no time input
    assert torch.equal(a, b)
    assert not (a == proc.mask_id).any() and int(a.max()) < k
    n_steps = len(proc.time_grid(steps))
    assert plain.rows == n * n_steps
    assert cached.rows <= n * min(d, n_steps)  # one evaluation per distinct unmasking event at most


def test_cached_forward_backward_equals_uncached():
    k, d, n = 4, 8, 50
    proc = make_process(MaskedConfig(schedule="cosine"), k)
    den = masked_toy(k, d, seed=1)
    x0 = torch.randint(k, (n, d), generator=torch.Generator().manual_seed(0))
    a = forward_backward(proc, den, x0, 0.4, torch.Generator().manual_seed(5), cache=False)
    b = forward_backward(proc, den, x0, 0.4, torch.Generator().manual_seed(5), cache=True)
    assert torch.equal(a, b)


def test_cache_refused_for_uniform():
    proc = make_process(UniformConfig(T=5), 3)
    with pytest.raises(ConfigError):
        sample(proc, lambda x, t: torch.zeros(len(x), 2, 3), 2, 2, torch.Generator(), cache=True)


# ---- forward-backward ------------------------------------------------------------------------------------
def test_forward_backward_uniform_starts_at_the_matching_level():
    k, d, n, T = 4, 6, 40, 50
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha"), k)
    x0 = torch.randint(k, (n, d), generator=torch.Generator().manual_seed(0))
    den = logits_denoiser(lambda x, t: torch.zeros(len(x), d, k))
    assert torch.equal(forward_backward(proc, den, x0, 0.0, torch.Generator()), x0)
    rec = Recorder(den)
    out = forward_backward(proc, rec, x0, 0.3, torch.Generator().manual_seed(1), steps=10)
    levels = [int(t[0]) for t, _ in rec.calls]
    assert levels[0] == 15 and float(proc.corruption(torch.tensor([15]))[0]) == pytest.approx(0.3)
    assert levels == [15] + [t for t in proc.time_grid(10) if t < 15]
    assert out.shape == x0.shape and out.dtype == torch.long
    # an E between grid levels snaps to the nearest one
    rec = Recorder(den)
    forward_backward(proc, rec, x0[:2], 0.309, torch.Generator().manual_seed(1))
    assert int(rec.calls[0][0][0]) == 15 and len(rec.calls) == 15


def test_forward_backward_masked_keeps_revealed_tokens():
    k, d, n = 4, 8, 200
    proc = make_process(MaskedConfig(schedule="cosine"), k)
    x0 = torch.randint(k, (n, d), generator=torch.Generator().manual_seed(0))
    den = masked_toy(k, d, seed=2)
    rec = Recorder(den)
    out = forward_backward(proc, rec, x0, 0.5, torch.Generator().manual_seed(3), steps=100, cache=False)
    t0 = float(rec.calls[0][0][0])
    assert float(proc.corruption(torch.tensor([t0], dtype=torch.float64))[0]) == pytest.approx(0.5, rel=1e-12)
    # regenerate the same z_t: the first draws of the same generator seed
    z = proc.q_sample(x0, torch.full((n,), t0, dtype=torch.float64), torch.Generator().manual_seed(3))
    kept = z != proc.mask_id
    assert torch.equal(out[kept], x0[kept]) and 0.3 < float((~kept).double().mean()) < 0.7


# ---- API details -------------------------------------------------------------------------------------------
def test_sample_batches_shapes_and_errors():
    proc = make_process(UniformConfig(T=4), 3)
    den = logits_denoiser(lambda x, t: torch.zeros(len(x), x.shape[1], 3, dtype=torch.bfloat16))
    out = sample(proc, den, 10, 5, torch.Generator().manual_seed(0), batch_size=4)
    assert out.shape == (10, 5) and out.dtype == torch.long and int(out.max()) < 3
    assert sample(proc, den, 0, 5, torch.Generator()).shape == (0, 5)
    with pytest.raises(ConfigError):
        sample(proc, den, 2, 5, torch.Generator(), final_step="mode")
    with pytest.raises(ConfigError):
        forward_backward(proc, den, torch.full((2, 5), 3), 0.5, torch.Generator())  # id 3 >= K
    # the same seed reproduces, a different seed differs
    a = sample(proc, den, 50, 5, torch.Generator().manual_seed(1), final_step="sample")
    assert torch.equal(a, sample(proc, den, 50, 5, torch.Generator().manual_seed(1), final_step="sample"))
    assert not torch.equal(a, sample(proc, den, 50, 5, torch.Generator().manual_seed(2), final_step="sample"))


def test_network_denoiser_feeds_network_time():
    seen = []

    def net(x, tau):
        seen.append(tau)
        return torch.zeros(len(x), x.shape[1], 3, dtype=torch.bfloat16)

    from cgtools.diffusion import network_denoiser
    proc = make_process(UniformConfig(T=8), 3)
    out = network_denoiser(net, proc)(torch.zeros(2, 4, dtype=torch.long), torch.tensor([8, 2]))
    assert out.dtype == torch.float32 and torch.allclose(out.exp().sum(-1), torch.ones(2, 4))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [1.0, 0.25]


def test_denoise_from_given_state():
    proc = make_process(MaskedConfig(), 3)
    x = torch.tensor([[0, 3, 3, 1]])
    den = lambda x, t: torch.log(torch.tensor([0.0, 0.0, 1.0])).expand(len(x), 4, 3)  # noqa: E731
    out = denoise(proc, den, x, 0.5, torch.Generator().manual_seed(0), steps=4)
    assert out.tolist() == [[0, 2, 2, 1]]
