"""Masked (absorbing) diffusion: schedules, ELBO weights, time sampling, bound estimators.

References are independent: finite differences for α', mask patterns enumerated for E_z,
scipy quadrature for the time integral. Monte-Carlo comparisons use fixed seeds and a
5-standard-error tolerance (false-alarm rate ≈ 6e-7 each under a normal approximation).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from cgtools.diffusion import MaskedConfig, MaskedDiffusion, config_from_json, make_process
from cgtools.diffusion.schedules import MaskSchedule
from cgtools.errors import ConfigError

KINDS = ["linear", "cosine"]


def toy_denoiser(k: int, d: int, seed: int, time: bool = False, dtype=torch.float64):
    """Fixed random log p̂ [B, d, K] from the own and left-neighbour ids (K + 1 inputs), optionally t."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(d, k + 1, k, generator=g, dtype=dtype)
    left = 0.7 * torch.randn(d, k + 1, k, generator=g, dtype=dtype)
    tim = torch.randn(d, k, generator=g, dtype=dtype)
    pos = torch.arange(d)

    def denoiser(x, t):
        logits = own[pos, x] + left[pos, x.roll(1, dims=1)]
        if time:
            logits = logits + t.to(dtype)[:, None, None] * tim
        return torch.log_softmax(logits, -1)

    return denoiser


def expected_masked_ce(proc: MaskedDiffusion, den, x0: list[int], t: float) -> float:
    """E_{z_t}[Σ_masked -log p̂(x0 | z_t)] by enumerating the 2^d mask patterns."""
    d, k = len(x0), proc.vocab
    e = float(proc.corruption(torch.tensor([t], dtype=torch.float64))[0])
    total = 0.0
    for pattern in itertools.product([0, 1], repeat=d):
        prob = math.prod(e if m else 1 - e for m in pattern)
        if prob == 0.0:
            continue
        z = torch.tensor([[k if m else x for m, x in zip(pattern, x0)]])
        lp = den(z, torch.tensor([t], dtype=torch.float64))[0]
        total += prob * sum(-float(lp[n, x0[n]]) for n in range(d) if pattern[n])
    return total


def continuous_bound(proc: MaskedDiffusion, den, x0: list[int]) -> float:
    """∫_{t_min}^1 w(t) E_z[Σ CE] dt (scipy quadrature) + E_z[Σ CE at t_min] (the last step)."""
    def integrand(t):
        w = float(proc.schedule.weight(torch.tensor(t, dtype=torch.float64)))
        return w * expected_masked_ce(proc, den, x0, t)
    t_min = proc.config.t_min
    return quad(integrand, t_min, 1.0, epsabs=1e-12, limit=200)[0] + expected_masked_ce(proc, den, x0, t_min)


def discrete_bound(proc: MaskedDiffusion, den, x0: list[int]) -> float:
    """Σ_i ρ_i E_z[Σ CE(z_{i/T})] over the T steps."""
    T = proc.config.T
    return sum(float(proc.unmask_probability(i / T, (i - 1) / T)) * expected_masked_ce(proc, den, x0, i / T)
               for i in range(1, T + 1))


# ---- schedules and weights -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_schedule_ends_and_monotone(kind):
    sch = MaskSchedule(kind)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = sch.alpha(t)
    assert float(a[0]) == 1.0 and float(a[-1]) == 0.0
    assert bool((a[1:] < a[:-1]).all())
    torch.testing.assert_close(sch.alpha(t) + sch.one_minus_alpha(t), torch.ones_like(t))
    # small masking probabilities keep full relative precision
    assert float(sch.one_minus_alpha(torch.tensor(1e-12))) == pytest.approx(
        1e-12 if kind == "linear" else math.sin(math.pi / 2 * 1e-12), rel=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_elbo_weight_matches_finite_differences(kind):
    """(e) w(t) = -α'(t)/(1 - α(t)) against central differences of α, and α' against them too."""
    sch = MaskSchedule(kind)
    h = 1e-6
    for t in np.linspace(0.01, 0.99, 50):
        fd = -(float(sch.alpha(torch.tensor(t + h))) - float(sch.alpha(torch.tensor(t - h)))) / (2 * h)
        assert -float(sch.dalpha(torch.tensor(t))) == pytest.approx(fd, rel=1e-7)
        one_minus_alpha = 1 - float(sch.alpha(torch.tensor(t)))
        assert float(sch.weight(torch.tensor(t))) == pytest.approx(fd / one_minus_alpha, rel=1e-7)
    if kind == "linear":
        assert float(sch.weight(torch.tensor(0.25))) == pytest.approx(4.0)
    else:  # the MD4 form (π/2)·tan(π/2·(1 - t))
        want = math.pi / 2 * math.tan(math.pi / 2 * 0.7)
        assert float(sch.weight(torch.tensor(0.3, dtype=torch.float64))) == pytest.approx(want)
        assert float(sch.weight(torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_time_for_corruption_inverts(kind):
    proc = make_process(MaskedConfig(schedule=kind), 5)
    for e in [0.0, 1e-9, 0.1, 0.5, 0.9, 1.0]:
        t = proc.time_for_corruption(e)
        got = float(proc.corruption(torch.tensor([t], dtype=torch.float64))[0])
        assert got == pytest.approx(e, rel=1e-12, abs=1e-15)
    with pytest.raises(ConfigError):
        proc.time_for_corruption(1.5)


def test_unmask_probability():
    proc = make_process(MaskedConfig(schedule="cosine"), 5)
    assert float(proc.unmask_probability(0.37, 0.0)) == 1.0
    t, s = 0.6, 0.45
    a = lambda x: 1 - math.sin(math.pi * x / 2)  # noqa: E731
    assert float(proc.unmask_probability(t, s)) == pytest.approx((a(s) - a(t)) / (1 - a(t)), rel=1e-12)


# ---- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(schedule="loglinear"), dict(t_min=0.0), dict(t_min=1.0), dict(T=0)])
def test_invalid_configs_raise(bad):
    with pytest.raises(ConfigError):
        MaskedConfig(**bad)


def test_config_json_round_trip():
    cfg = MaskedConfig(schedule="cosine", t_min=1e-4, T=64, time_conditioning=True)
    assert MaskedConfig.from_json(cfg.to_json()) == cfg
    assert config_from_json(cfg.to_json()) == cfg
    proc = make_process(cfg, 8)
    assert proc.vocab == 8 and proc.input_vocab == 9 and proc.mask_id == 8
    with pytest.raises(ConfigError):
        config_from_json('{"process": "poisson"}')


# ---- time sampling ---------------------------------------------------------------------------------
def test_stratified_times():
    proc = make_process(MaskedConfig(t_min=1e-3), 4)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 7, 64):
        t = proc.sample_t(batch, g)
        assert t.dtype == torch.float64 and t.shape == (batch,)
        assert float(t.min()) >= 1e-3 and float(t.max()) < 1.0
        # exactly one time per stratum [b/B, (b+1)/B) (up to the clamp at t_min)
        strata = torch.floor(t * batch).long()
        assert sorted(strata.tolist()) == list(range(batch))
    many = torch.cat([proc.sample_t(8, g) for _ in range(4000)])
    assert float(many.mean()) == pytest.approx(0.5, abs=0.01)


def test_discrete_times_and_weights():
    T = 10
    proc = make_process(MaskedConfig(T=T), 4)
    g = torch.Generator().manual_seed(0)
    t = torch.cat([proc.sample_t(10, g) for _ in range(50)])
    i = torch.round(t * T)
    assert torch.equal(t, i / T) and int(i.min()) == 1 and int(i.max()) == T
    # linear schedule: T·ρ_i = T·(1/T)/(i/T) = 1/t
    torch.testing.assert_close(proc.weight(t), 1 / t)
    cos = make_process(MaskedConfig(schedule="cosine", T=T), 4)
    s = (i - 1) / T
    m = lambda x: torch.sin(math.pi * x / 2)  # noqa: E731
    torch.testing.assert_close(cos.weight(t), T * (m(t) - m(s)) / m(t))


def test_continuous_weight_has_last_step_atom():
    for kind in KINDS:
        proc = make_process(MaskedConfig(schedule=kind, t_min=0.01), 4)
        t = torch.tensor([0.01, 0.02, 0.5, 1.0], dtype=torch.float64)
        w = proc.weight(t)
        assert float(w[0]) == pytest.approx(100.0)
        torch.testing.assert_close(w[1:], MaskSchedule(kind).weight(t[1:]))


# ---- forward process and loss -----------------------------------------------------------------------
def test_q_sample_mask_rate():
    proc = make_process(MaskedConfig(schedule="cosine"), 6)
    g = torch.Generator().manual_seed(3)
    n = 200000
    for t in (0.1, 0.5, 1.0):
        x0 = torch.randint(6, (n // 20, 20), generator=g)
        z = proc.q_sample(x0, torch.full((len(x0),), t, dtype=torch.float64), g)
        kept = z != proc.mask_id
        assert torch.equal(z[kept], x0[kept])
        e = math.sin(math.pi * t / 2)
        rate = float((~kept).double().mean())
        assert abs(rate - e) < 5 * math.sqrt(e * (1 - e) / n) + 1e-12
    assert torch.equal(proc.prior_sample((2, 3)), torch.full((2, 3), 6))


def test_loss_by_hand_and_unmasked_positions_ignored():
    k, d = 4, 5
    proc = make_process(MaskedConfig(), k)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(k, (3, d), generator=g)
    x_t = x0.clone()
    x_t[0, [1, 3]] = k
    x_t[2, :] = k
    logits = torch.randn(3, d, k, generator=g, dtype=torch.float64)
    logits[0, 0, :] = -math.inf  # an unmasked position may hold anything, even -inf
    logits[0, 0, 0] = 0.0
    t = torch.tensor([0.3, 0.6, 1.0], dtype=torch.float64)
    terms = proc.loss(logits, x0, x_t, t)
    lp = torch.log_softmax(logits, -1)
    nll = -lp.gather(-1, x0[..., None])[..., 0]
    ce = torch.stack([nll[0, [1, 3]].sum(), nll.new_zeros(()), nll[2].sum()])
    torch.testing.assert_close(terms.ce, ce / d)
    torch.testing.assert_close(terms.loss, ce / t / d)
    torch.testing.assert_close(terms.elbo_bits, ce / t / d / math.log(2))
    with pytest.raises(ConfigError):
        proc.loss(torch.zeros(3, d, k + 1), x0, x_t, t)  # a head must not predict the mask


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_at_time_ends(kind):
    """(h) finite losses and gradients at t_min, t = 1 and with extreme logits."""
    k, d = 8, 16
    proc = make_process(MaskedConfig(schedule=kind), k)
    t = torch.tensor([1e-3, 1e-3, 0.5, 1.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(k, (len(t), d), generator=g)
    x_t = proc.q_sample(x0, t, g)
    logits = 30 * torch.randn(len(t), d, k, generator=g)
    logits[1] = -1e4 * torch.nn.functional.one_hot(x0[1], k)
    logits.requires_grad_(True)
    terms = proc.loss(logits, x0, x_t, t)
    assert all(torch.isfinite(getattr(terms, f)).all() for f in ("loss", "vb", "ce", "elbo_bits"))
    terms.loss.mean().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.isfinite(proc.weight(torch.tensor([0.0, 1e-300, 1.0], dtype=torch.float64))).all()


# ---- bound estimators -----------------------------------------------------------------------------
def _batch_mean_losses(proc, den, x0, n, batch, g):
    """Training-loss estimates of the bound (nats per sequence) for n copies of x0, averaged per
    stratified batch of t: draws within a batch are dependent, batch means are independent."""
    xs = torch.tensor(x0).repeat(n, 1)
    t = torch.cat([proc.sample_t(batch, g) for _ in range(n // batch)])
    z = proc.q_sample(xs, t, g)
    return (proc.loss(den(z, t), xs, z, t).loss * xs.shape[1]).view(-1, batch).mean(1)


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_estimator_matches_quadrature(kind):
    """E[loss] = ∫_{t_min}^1 w(t) E_z[Σ CE] dt + E_z[Σ CE at t_min], by quadrature and enumeration."""
    k, d, n = 3, 3, 200000
    t_min = 0.02
    proc = make_process(MaskedConfig(schedule=kind, t_min=t_min), k)
    den = toy_denoiser(k, d, seed=2)
    x0 = [2, 0, 1]
    exact = continuous_bound(proc, den, x0)
    means = _batch_mean_losses(proc, den, x0, n, 1000, torch.Generator().manual_seed(5))
    assert abs(float(means.mean()) - exact) < 5 * float(means.std()) / math.sqrt(len(means))


@pytest.mark.parametrize("kind", KINDS)
def test_discrete_estimators_match_explicit_sum(kind):
    """Discrete-T loss and the all-terms bound() both average to Σ_i ρ_i E_z[Σ CE(z_{t_i})]."""
    k, d, T, n = 3, 3, 6, 60000
    proc = make_process(MaskedConfig(schedule=kind, T=T), k)
    den = toy_denoiser(k, d, seed=4, time=True)
    x0 = [1, 1, 0]
    exact = discrete_bound(proc, den, x0)
    g = torch.Generator().manual_seed(6)
    means = _batch_mean_losses(proc, den, x0, n, 100, g)
    assert abs(float(means.mean()) - exact) < 5 * float(means.std()) / math.sqrt(len(means))
    full = proc.bound(den, torch.tensor(x0).repeat(20000, 1), g)
    assert abs(float(full.mean()) - exact) < 5 * float(full.std()) / math.sqrt(20000)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_denoiser_gives_entropy(kind):
    """(d) independent positions, p̂ = data marginal: every estimator averages to -log p_data(x0)
    exactly, for any schedule, t_min or grid (∫ -α' dt + the last step telescopes to 1)."""
    k, d = 3, 2
    marg = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    den = lambda x, t: torch.log(marg).expand(len(x), d, k)  # noqa: E731
    x0 = [1, 2]
    nll = -math.log(0.3) - math.log(0.8)
    for cfg in (MaskedConfig(schedule=kind, t_min=0.05), MaskedConfig(schedule=kind, T=7)):
        proc = make_process(cfg, k)
        if cfg.T is None:
            exact = continuous_bound(proc, den, x0)
        else:
            exact = discrete_bound(proc, den, x0)
        assert exact == pytest.approx(nll, rel=1e-9)
