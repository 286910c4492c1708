"""Uniform D3PM: schedules, posterior, reverse model, bound and loss, against brute force.

Brute-force references are written independently of cgtools.diffusion: K×K transition matrices
in numpy float64, Bayes' rule by hand, expectations by enumerating every x_t of a tiny case.
Monte-Carlo comparisons use fixed seeds and a 5-standard-error tolerance (false-alarm rate
≈ 6e-7 per comparison under a normal approximation).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgtools.diffusion import UniformConfig, UniformDiffusion, config_from_json, make_process
from cgtools.diffusion.schedules import log_alpha_bar_table
from cgtools.errors import ConfigError

SCHEDULES = ["linear-beta", "linear-alpha", "cosine"]


# ---- independent references ------------------------------------------------------------------
def ref_betas(kind: str, T: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """β_1..β_T from the formulas of reference/diffusion.md §1.1 (numpy, float64)."""
    t = np.arange(1, T + 1, dtype=np.float64)
    if kind == "linear-beta":
        lo = min(0.1 / T, 1.0) if lo is None else lo
        hi = min(20.0 / T, 1.0) if hi is None else hi
        return lo + (t - 1) * (hi - lo) / max(T - 1, 1) if T > 1 else np.array([hi])
    if kind == "linear-alpha":
        return 1.0 / (T - t + 1)
    f = lambda tau: np.cos((tau + 0.008) / 1.008 * np.pi / 2)  # noqa: E731
    return np.minimum(1 - f(t / T) / f((t - 1) / T), 0.999)


def one_step(beta: float, k: int) -> np.ndarray:
    """Q = (1-β) I + β/K 11ᵀ, row = from, column = to."""
    return (1 - beta) * np.eye(k) + beta / k * np.ones((k, k))


def cumulative(betas: np.ndarray, k: int) -> list[np.ndarray]:
    """[Q̄_0 = I, Q̄_1, ..., Q̄_T] as explicit matrix products."""
    out = [np.eye(k)]
    for b in betas:
        out.append(out[-1] @ one_step(b, k))
    return out


def toy_denoiser(k: int, d: int, T: int, seed: int, dtype=torch.float64):
    """A fixed random 'network': log p̂ depends on the own token, the left neighbour and t/T."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(d, k, k, generator=g, dtype=dtype)
    left = 0.7 * torch.randn(d, k, k, generator=g, dtype=dtype)
    tim = torch.randn(d, k, generator=g, dtype=dtype)
    pos = torch.arange(d)

    def denoiser(x, t):
        logits = own[pos, x] + left[pos, x.roll(1, dims=1)] + (t.to(dtype) / T)[:, None, None] * tim
        return torch.log_softmax(logits, -1)

    return denoiser


def all_states(k: int, d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(k), repeat=d)), dtype=torch.long)


def exact_bound(proc: UniformDiffusion, denoiser, x0: np.ndarray, steps: int | None = None) -> float:
    """L_T + Σ E[KL] + E[decoder NLL] in nats for one sequence, by enumerating all x_t (brute force)."""
    k, T, d = proc.vocab, proc.T, len(x0)
    betas = ref_betas(proc.config.schedule, T, proc.config.beta_min, proc.config.beta_max)
    abar = [float(np.prod(1 - betas[:t])) for t in range(T + 1)]
    qbar = lambda t: abar[t] * np.eye(k) + (1 - abar[t]) / k  # noqa: E731
    grid = proc.time_grid(steps) + [0]
    states = all_states(k, d)
    # prior: KL(Q̄_T[x0] ‖ uniform) per position
    row = qbar(T)[0]
    total = d * float(np.sum(np.where(row > 0, row * np.log(row * k), 0.0)))
    for i, t in enumerate(grid[:-1]):
        s = grid[i + 1]
        probs = np.prod([qbar(t)[x0[n], states[:, n].numpy()] for n in range(d)], axis=0)  # q(x_t|x0)
        p_hat = denoiser(states, torch.full((len(states),), t)).exp().numpy()  # [S, d, K]
        q_ts = (abar[t] / abar[s]) * np.eye(k) + (1 - abar[t] / abar[s]) / k  # Q̄_{t|s}
        vals = np.zeros(len(states))
        for n in range(d):
            kk = states[:, n].numpy()
            if s > 0:
                post = q_ts[:, kk].T * qbar(s)[x0[n]][None, :]  # [S, K] ∝ q(x_t|x_s) q(x_s|x0)
                post /= post.sum(1, keepdims=True)
                model = q_ts[:, kk].T * (p_hat[:, n] @ qbar(s))
                model /= model.sum(1, keepdims=True)
                vals += np.sum(np.where(post > 0, post * np.log(post / model), 0.0), 1)
            elif proc.config.decoder == "x0":
                vals += -np.log(p_hat[:, n, x0[n]])
            else:
                model = q_ts[:, kk].T * p_hat[:, n]
                model /= model.sum(1, keepdims=True)
                vals += -np.log(model[:, x0[n]])
        total += float(probs @ vals)
    return total


# ---- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 7, 200, 1000])
def test_schedule_tables_match_beta_formulas(kind, T):
    table = log_alpha_bar_table(kind, T)
    assert table.dtype == torch.float64 and table.shape == (T + 1,) and table[0] == 0
    expected = np.concatenate([[1.0], np.cumprod(1 - ref_betas(kind, T))])
    np.testing.assert_allclose(table.exp().numpy(), expected, rtol=1e-12, atol=1e-300)
    assert bool((table[1:] < table[:-1]).all()), "ᾱ must decrease strictly"


def test_schedule_ends():
    T = 1000
    assert log_alpha_bar_table("linear-alpha", T)[-1] == -math.inf
    lb = log_alpha_bar_table("linear-beta", T).exp()
    assert lb[-1] == pytest.approx(math.exp(-np.sum(-np.log1p(-ref_betas("linear-beta", T)))), rel=1e-9)
    assert 1e-5 < float(lb[-1]) < 1e-4  # DDPM's endpoints: ᾱ_T ≈ 4e-5
    assert log_alpha_bar_table("linear-beta", 10, 0.1, 1.0)[-1] == -math.inf  # β_T = 1
    assert math.isfinite(log_alpha_bar_table("cosine", T)[-1])  # clipped at 0.999


@pytest.mark.parametrize("bad", [dict(schedule="quadratic"), dict(decoder="mean"), dict(lambda_ce=-1.0),
                                 dict(schedule="cosine", beta_max=0.5), dict(beta_min=0.0),
                                 dict(beta_min=1.0, beta_max=1.0, T=5), dict(T=0)])
def test_invalid_configs_raise(bad):
    with pytest.raises(ConfigError):
        make_process(UniformConfig(**bad), 4)


def test_config_json_round_trip():
    cfg = UniformConfig(T=200, schedule="linear-alpha", lambda_ce=0.1, decoder="posterior",
                        scale_vb_by_T=True)
    assert UniformConfig.from_json(cfg.to_json()) == cfg
    assert config_from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError):
        UniformConfig.from_json('{"process": "uniform", "T": 3, "bogus": 1}')
    with pytest.raises(ConfigError):
        UniformConfig.from_json('{"process": "masked"}')


# ---- forward process -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEDULES)
def test_forward_marginal_equals_matrix_products(kind):
    k, T = 5, 9
    proc = make_process(UniformConfig(T=T, schedule=kind), k)
    qbars = cumulative(ref_betas(kind, T), k)
    x0 = torch.arange(k)[:, None]  # [K, 1]: every start symbol
    for t in range(T + 1):
        got = proc.log_forward(x0, torch.full((k,), t)).exp()[:, 0].numpy()  # [K, K]
        np.testing.assert_allclose(got, qbars[t], rtol=1e-12, atol=1e-15)
    at_zero = proc.log_forward(x0, torch.zeros(k, dtype=torch.long)).exp()[:, 0]
    assert torch.equal(at_zero, torch.eye(k, dtype=torch.float64))


def test_q_sample_frequencies():
    """Chi-square test of q(x_t | x0) (false-alarm rate 1e-4; the seed is fixed)."""
    from scipy.stats import chisquare
    k, T, n = 4, 10, 40000
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha"), k)
    g = torch.Generator().manual_seed(1)
    for t in (1, 4, T):
        x0 = torch.full((n, 1), 2)
        x_t = proc.q_sample(x0, torch.full((n,), t), g)
        counts = np.bincount(x_t.ravel().numpy(), minlength=k)
        expected = n * proc.log_forward(x0[:1], torch.tensor([t])).exp()[0, 0].numpy()
        assert chisquare(counts, expected).pvalue > 1e-4


# ---- (a) posterior vs brute-force Bayes -----------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEDULES)
def test_posterior_equals_bayes(kind):
    k, T = 4, 8
    betas = ref_betas(kind, T)
    qbars = cumulative(betas, k)
    proc = make_process(UniformConfig(T=T, schedule=kind), k)
    i, kk = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    x0, x_t = torch.tensor(i.ravel())[:, None], torch.tensor(kk.ravel())[:, None]  # all (i, k) pairs
    for t in range(1, T + 1):
        q = one_step(betas[t - 1], k)
        want = q[:, kk.ravel()].T * qbars[t - 1][i.ravel()]  # [pairs, j] = Q_t[j,k] Q̄_{t-1}[i,j]
        want /= qbars[t][i.ravel(), kk.ravel()][:, None]
        got = proc.log_posterior(x0, x_t, torch.full((k * k,), t)).exp()[:, 0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)


def test_posterior_case_table():
    """The explicit cases of reference/diffusion.md §1.3, at every t of a linear-β schedule."""
    k, T = 5, 12
    proc = make_process(UniformConfig(T=T, schedule="linear-beta", beta_min=0.05, beta_max=1.0), k)
    abar = np.concatenate([[1.0], np.cumprod(1 - ref_betas("linear-beta", T, 0.05, 1.0))])
    for t in range(1, T + 1):
        a, b, ab_prev, ab = 1 - (1 - abar[t] / abar[t - 1]), 1 - abar[t] / abar[t - 1], abar[t - 1], abar[t]
        assert a * (1 - ab_prev) + b == pytest.approx(1 - ab, abs=1e-15)  # the identity of §1.3
        tt = torch.tensor([t])
        # i = k
        c = ab + (1 - ab) / k
        got = proc.log_posterior(torch.tensor([[1]]), torch.tensor([[1]]), tt).exp()[0, 0].numpy()
        assert got[1] == pytest.approx((a + b / k) * (ab_prev + (1 - ab_prev) / k) / c, rel=1e-12)
        assert got[3] == pytest.approx((b / k) * ((1 - ab_prev) / k) / c, rel=1e-12, abs=1e-300)
        # i ≠ k
        c = (1 - ab) / k
        got = proc.log_posterior(torch.tensor([[0]]), torch.tensor([[1]]), tt).exp()[0, 0].numpy()
        assert got[1] == pytest.approx((a + b / k) * ((1 - ab_prev) / k) / c, rel=1e-12, abs=1e-300)
        assert got[0] == pytest.approx((b / k) * (ab_prev + (1 - ab_prev) / k) / c, rel=1e-12)
        assert got[4] == pytest.approx((b / k) * ((1 - ab_prev) / k) / c, rel=1e-12, abs=1e-300)


def test_respaced_posterior_equals_bayes():
    k, T = 3, 10
    kind = "cosine"
    qbars = cumulative(ref_betas(kind, T), k)
    proc = make_process(UniformConfig(T=T, schedule=kind), k)
    for t, s in [(10, 3), (7, 1), (5, 0), (10, 0)]:
        q_ts = np.linalg.solve(qbars[s], qbars[t])  # Q_{s+1} ⋯ Q_t
        for i in range(k):
            for kk in range(k):
                want = q_ts[:, kk] * qbars[s][i] / qbars[t][i, kk]
                got = proc.log_posterior(torch.tensor([[i]]), torch.tensor([[kk]]), torch.tensor([t]),
                                         torch.tensor([s])).exp()[0, 0].numpy()
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# ---- (b) reverse model is normalised; closed-form normaliser ------------------------------------------
@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 9), T=st.integers(2, 60), data=st.data(), kind=st.sampled_from(SCHEDULES))
def test_reverse_model_normalised(k, T, data, kind):
    t = data.draw(st.integers(1, T))
    s = data.draw(st.integers(0, t - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    proc = make_process(UniformConfig(T=T, schedule=kind), k)
    log_p_hat = torch.log_softmax(3 * torch.randn(2, 3, k, generator=g, dtype=torch.float64), -1)
    x_t = torch.randint(k, (2, 3), generator=g)
    tt, ss = torch.full((2,), t), torch.full((2,), s)
    log_p = proc.log_reverse(log_p_hat, x_t, tt, ss)
    ones = torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(log_p.exp().sum(-1), ones, rtol=1e-12, atol=1e-12)
    # unnormalised A_j B̂_j in probability space; Σ_j = ᾱ_t p̂_k + (1 - ᾱ_t)/K
    ab = proc.log_alpha_bar.exp()
    a_ts, a_s = ab[t] / ab[s], ab[s]
    A = a_ts * torch.nn.functional.one_hot(x_t, k) + (1 - a_ts) / k
    Bh = a_s * log_p_hat.exp() + (1 - a_s) / k
    norm = (A * Bh).sum(-1)
    p_at_xt = log_p_hat.exp().gather(-1, x_t[..., None])[..., 0]
    torch.testing.assert_close(norm, ab[t] * p_at_xt + (1 - ab[t]) / k, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(log_p.exp(), A * Bh / norm[..., None], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("decoder", ["x0", "posterior"])
def test_sampler_weights_match_log_space_kernels(decoder):
    """The sampler's float64 probability-space weights are proportional to exp(log_reverse)."""
    k, T = 5, 12
    for kind in SCHEDULES:
        proc = make_process(UniformConfig(T=T, schedule=kind, decoder=decoder), k)
        g = torch.Generator().manual_seed(0)
        log_p_hat = torch.log_softmax(4 * torch.randn(3, 4, k, generator=g), -1)  # float32, like a network
        x_t = torch.randint(k, (3, 4), generator=g)
        for t, s in [(T, T - 1), (T, 0), (5, 4), (5, 1), (1, 0), (9, 2)]:
            tt = torch.full((3,), t)
            w = proc.reverse_weights(log_p_hat, x_t, t, s)
            assert w.dtype == torch.float64
            # float32 log-probs sum to 1 only within ~1e-7, so compare normalised laws
            want = torch.softmax(proc.log_reverse(log_p_hat.double(), x_t, tt, s), -1)
            torch.testing.assert_close(w / w.sum(-1, keepdim=True), want, rtol=1e-12, atol=1e-15)
        w = proc.decoder_weights(log_p_hat, x_t, 3)
        want = torch.softmax(proc.log_decoder(log_p_hat.double(), x_t, torch.full((3,), 3)), -1)
        torch.testing.assert_close(w / w.sum(-1, keepdim=True), want, rtol=1e-12, atol=1e-15)


def test_reverse_with_onehot_prediction_is_posterior():
    k, T = 4, 6
    proc = make_process(UniformConfig(T=T, schedule="linear-beta"), k)
    x0 = torch.tensor([[0, 1, 2, 3]])
    x_t = torch.tensor([[3, 1, 0, 2]])
    near_onehot = torch.log(torch.nn.functional.one_hot(x0, k).double() * (1 - 1e-14) + 1e-14 / k)
    for t in range(2, T + 1):
        tt = torch.tensor([t])
        torch.testing.assert_close(proc.log_reverse(near_onehot, x_t, tt).exp(),
                                   proc.log_posterior(x0, x_t, tt).exp(), rtol=1e-9, atol=1e-12)


# ---- bound: prior, explicit sum vs MC ------------------------------------------------------------------
@pytest.mark.parametrize("kind", SCHEDULES)
def test_prior_kl(kind):
    k, T = 6, 7
    proc = make_process(UniformConfig(T=T, schedule=kind), k)
    row = cumulative(ref_betas(kind, T), k)[-1][0]
    want = float(np.sum(np.where(row > 0, row * np.log(row * k), 0.0)))
    assert proc.prior_kl() == pytest.approx(want, rel=1e-9, abs=1e-15)
    if kind == "linear-alpha":
        assert proc.prior_kl() == 0.0


@pytest.mark.parametrize("kind,decoder", [("linear-alpha", "x0"), ("cosine", "posterior"),
                                          ("linear-beta", "x0")])
def test_bound_estimators_match_explicit_sum(kind, decoder):
    """(c) T·L_vb(t) + L_T from loss() and the all-terms bound() average to the enumerated bound."""
    k, d, T, n = 3, 2, 4, 60000
    proc = make_process(UniformConfig(T=T, schedule=kind, beta_min=0.2 if kind == "linear-beta" else None,
                                      beta_max=0.6 if kind == "linear-beta" else None, decoder=decoder), k)
    den = toy_denoiser(k, d, T, seed=3)
    x0_np = np.array([2, 0])
    exact = exact_bound(proc, den, x0_np)
    g = torch.Generator().manual_seed(11)
    x0 = torch.tensor(x0_np).repeat(n, 1)
    t = proc.sample_t(n, g)
    x_t = proc.q_sample(x0, t, g)
    elbo_nats = proc.loss(den(x_t, t), x0, x_t, t).elbo_bits * (d * math.log(2))
    se = float(elbo_nats.std()) / math.sqrt(n)
    assert abs(float(elbo_nats.mean()) - exact) < 5 * se
    full = proc.bound(den, x0[:20000], g)
    assert abs(float(full.mean()) - exact) < 5 * float(full.std()) / math.sqrt(20000)


def test_respaced_bound_matches_explicit_sum():
    k, d, T = 3, 2, 9
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha", decoder="posterior"), k)
    den = toy_denoiser(k, d, T, seed=5)
    x0_np = np.array([1, 1])
    for steps in (1, 3):
        exact = exact_bound(proc, den, x0_np, steps)
        g = torch.Generator().manual_seed(steps)
        full = proc.bound(den, torch.tensor(x0_np).repeat(20000, 1), g, steps=steps)
        assert abs(float(full.mean()) - exact) < 5 * float(full.std()) / math.sqrt(20000)
    # a coarser chain is a looser bound for this denoiser (not a theorem; a sanity check of the sum)
    assert exact_bound(proc, den, x0_np, 1) != exact_bound(proc, den, x0_np)


@pytest.mark.parametrize("steps", [None, 4, 1])
def test_exact_denoiser_gives_exact_likelihood(steps):
    """(d) Data with independent positions and p̂ = the data marginal (the cavity distribution):
    with decoder="posterior" and ᾱ_T = 0 the model chain equals the true reverse chain, so the bound
    is exactly -log p_data(x0) for every x0 (and its average the data entropy)."""
    k, d, T = 3, 2, 8
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha", decoder="posterior"), k)
    marg = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)  # [d, K]
    den = lambda x, t: torch.log(marg).expand(len(x), d, k)  # noqa: E731
    entropy = 0.0
    for x0 in itertools.product(range(k), repeat=d):
        nll = -float(sum(math.log(marg[n, x0[n]]) for n in range(d)))
        assert exact_bound(proc, den, np.array(x0), steps) == pytest.approx(nll, rel=1e-10)
        entropy += math.exp(-nll) * nll
    assert entropy == pytest.approx(-float((marg * marg.log()).sum()), rel=1e-12)
    # the "x0" decoder ignores x_{t_1}, so the same denoiser gives a strictly looser bound (unless
    # t_1 = T, where x_T carries no information about x0)
    proc_x0 = make_process(UniformConfig(T=T, schedule="linear-alpha", decoder="x0"), k)
    gap = exact_bound(proc_x0, den, np.array([0, 2]), steps) + math.log(0.6 * 0.6)
    assert gap > 1e-3 if steps != 1 else gap == pytest.approx(0.0, abs=1e-12)


# ---- loss ---------------------------------------------------------------------------------------------
def test_loss_terms_by_hand():
    k, d, T = 4, 3, 10
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha", lambda_ce=0.25), k)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, d, k, generator=g, dtype=torch.float64)
    log_p_hat = torch.log_softmax(logits, -1)
    x0 = torch.randint(k, (3, d), generator=g)
    t = torch.tensor([1, 2, T])
    x_t = proc.q_sample(x0, t, g)
    terms = proc.loss(logits, x0, x_t, t)
    ce = -log_p_hat.gather(-1, x0[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(terms.ce, ce / d)
    torch.testing.assert_close(terms.vb[0], ce[0] / d)  # t = 1: decoder p̂ directly
    for b in (1, 2):
        kl = proc.kl(proc.log_posterior(x0[b:b + 1], x_t[b:b + 1], t[b:b + 1]),
                     proc.log_reverse(log_p_hat[b:b + 1], x_t[b:b + 1], t[b:b + 1])).sum()
        torch.testing.assert_close(terms.vb[b], kl / d)
    torch.testing.assert_close(terms.loss, terms.vb + 0.25 * terms.ce)
    torch.testing.assert_close(terms.elbo_bits, T * terms.vb / math.log(2))
    # log-probabilities in place of logits give the same losses (log_softmax is idempotent)
    torch.testing.assert_close(proc.loss(log_p_hat, x0, x_t, t).loss, terms.loss)
    scaled = make_process(UniformConfig(T=T, schedule="linear-alpha", lambda_ce=0.25, scale_vb_by_T=True), k)
    torch.testing.assert_close(scaled.loss(logits, x0, x_t, t).loss, T * terms.vb + 0.25 * terms.ce)


def test_loss_gradient_matches_probability_space_reference():
    """Value and gradient of the hybrid loss against a plain float64 probability-space version."""
    k, d, T, lam = 4, 3, 7, 0.3
    proc = make_process(UniformConfig(T=T, schedule="cosine", lambda_ce=lam), k)
    abar = torch.tensor(np.concatenate([[1.0], np.cumprod(1 - ref_betas("cosine", T))]))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(k, (4, d), generator=g)
    t = torch.tensor([1, 2, 5, T])
    x_t = proc.q_sample(x0, t, g)
    logits = torch.randn(4, d, k, generator=g, dtype=torch.float64, requires_grad=True)
    proc.loss(logits, x0, x_t, t).loss.sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    p_hat = torch.softmax(logits, -1)
    onehot = lambda x: torch.nn.functional.one_hot(x, k).double()  # noqa: E731
    total = 0.0
    for b in range(4):
        tb = int(t[b])
        ce = -torch.log((p_hat[b] * onehot(x0[b])).sum(-1)).sum()
        if tb == 1:
            vb = ce
        else:
            a_t = abar[tb] / abar[tb - 1]
            A = a_t * onehot(x_t[b]) + (1 - a_t) / k  # [d, j]
            q = A * (abar[tb - 1] * onehot(x0[b]) + (1 - abar[tb - 1]) / k)
            q = q / q.sum(-1, keepdim=True)
            p = A * (abar[tb - 1] * p_hat[b] + (1 - abar[tb - 1]) / k)
            p = p / p.sum(-1, keepdim=True)
            vb = (q * torch.log(q / p)).sum()
        total = total + (vb + lam * ce) / d
    total.backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-9, atol=1e-12)


def test_posterior_decoder_variant():
    k, d, T = 4, 2, 5
    proc = make_process(UniformConfig(T=T, decoder="posterior"), k)
    g = torch.Generator().manual_seed(2)
    log_p_hat = torch.log_softmax(torch.randn(1, d, k, generator=g, dtype=torch.float64), -1)
    x0, x1 = torch.tensor([[0, 3]]), torch.tensor([[0, 1]])
    q1 = proc.log_forward(torch.arange(k)[None], torch.tensor([1])).exp()[0]  # [i, j] = q(x1=j | x0=i)
    p = q1[:, x1[0]].T * log_p_hat[0].exp()  # [d, i] ∝ q(x1 | i) p̂_i
    p = p / p.sum(-1, keepdim=True)
    want = -torch.log(p[torch.arange(d), x0[0]]).sum() / d
    torch.testing.assert_close(proc.loss(log_p_hat, x0, x1, torch.tensor([1])).vb[0], want)


# ---- (h) no NaN/Inf at the ends ------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [UniformConfig(T=50, schedule="linear-alpha"),
                                 UniformConfig(T=50, schedule="linear-beta", beta_min=1e-4, beta_max=1.0),
                                 UniformConfig(T=50, schedule="cosine"),
                                 UniformConfig(T=1000),
                                 UniformConfig(T=1000, schedule="linear-alpha", decoder="posterior")])
def test_no_nan_at_schedule_ends(cfg):
    k, d = 8, 16
    proc = make_process(cfg, k)
    T = cfg.T
    t = torch.tensor([1, 1, 2, 2, T - 1, T, T, T])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(k, (len(t), d), generator=g)
    x_t = proc.q_sample(x0, t, g)
    # extreme float32 logits: confident right, confident wrong, flat
    logits = 30.0 * torch.randn(len(t), d, k, generator=g)
    logits[1] = 0.0
    logits[2] = -1e4 * torch.nn.functional.one_hot(x0[2], k)  # near-zero p̂ at the true symbol
    logits.requires_grad_(True)
    terms = proc.loss(logits, x0, x_t, t)
    for name in ("loss", "vb", "ce", "elbo_bits"):
        assert torch.isfinite(getattr(terms, name)).all(), name
    assert (terms.vb >= -1e-5).all()
    terms.loss.mean().backward()
    assert torch.isfinite(logits.grad).all()
    lp = proc.log_reverse(torch.log_softmax(logits.detach(), -1), x_t, torch.clamp(t, min=2))
    assert torch.isfinite(lp).all()
    assert math.isfinite(proc.prior_kl())


# ---- (g) time convention ------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 7, 200, 1000, 4000])
def test_time_index_round_trip(T):
    proc = make_process(UniformConfig(T=T, schedule="linear-alpha"), 3)
    t = torch.arange(1, T + 1)
    tau = proc.network_time(t)
    assert tau.dtype == torch.float32 and float(tau.max()) == 1.0 and float(tau.min()) > 0
    assert torch.equal(torch.round(tau.double() * T).long(), t)
    draws = proc.sample_t(20000, torch.Generator().manual_seed(0))
    assert int(draws.min()) == 1 and int(draws.max()) == T
    # corruption(t) is the redraw probability of q_sample at that level, and inverts exactly on the grid
    for level in sorted({0, 1, T // 2, T}):
        e = float(proc.corruption(torch.tensor([level]))[0])
        assert proc.time_for_corruption(e) == level


def test_time_grid():
    proc = make_process(UniformConfig(T=1000), 4)
    assert proc.time_grid() == list(range(1000, 0, -1))
    for k in (1, 3, 10, 250, 999):
        grid = proc.time_grid(k)
        assert len(grid) == len(set(grid)) == k and grid[0] == 1000 and grid[-1] >= 1
        assert grid == sorted(grid, reverse=True)
    with pytest.raises(ConfigError):
        proc.time_grid(1001)


def test_to_device_keeps_tables():
    proc = make_process(UniformConfig(T=20), 4)
    moved = proc.to("cpu")
    assert torch.equal(moved.log_alpha_bar, proc.log_alpha_bar) and moved.config == proc.config
