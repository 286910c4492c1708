"""Exact inference by belief propagation: checked against brute-force enumeration of all sentences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from cgtools.errors import ConfigError, InputError
from cgtools.grammar.derivations import expand
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.inference.bp import BeliefPropagation
from tests.helpers import noise_process


def leaf_likelihood(x, noise, process, vocab, dtype=torch.float32):
    """The named process's BP leaf evidence (lik [B, d, v], log constant [B])."""
    return noise_process(process, vocab).leaf_evidence(x, noise, dtype)


def noise_tokens(x0, noise, process, vocab, gen):
    """x0 corrupted at exactly `noise` by the named process."""
    return noise_process(process, vocab).corrupt(x0, noise, gen)
from cgtools.inference.denoiser import BPDenoiser
from tests.helpers import TEST_FAILURE_RATE, brute_force_sentences


pytestmark = pytest.mark.usefixtures("one_thread")


# (L, s, v, m, n_classes): n_classes != v on purpose in most, s = 3 once.
TINY = [(2, 2, 3, 2, 3), (3, 2, 3, 2, 2), (2, 3, 3, 2, 4), (2, 2, 4, 2, 2)]
NOISES = [0.0, 0.2, 0.7, 1.0]


# ---- brute force ---------------------------------------------------------------------------------
def all_trees(g):
    """Every derivation's tree: nodes[l] [N, w_l] (N = n_classes * m^K)."""
    digits = np.array(list(itertools.product(range(g.synonyms), repeat=g.n_internal)), dtype=np.int64)
    classes = np.repeat(np.arange(g.n_classes), len(digits))
    return expand(g, classes, np.tile(digits, (g.n_classes, 1)))


def brute_posterior(g, lik, log_const, limit=False):
    """Exact log P(x_t) [B] and marginals per level [B, w_l, n_l] by enumeration.

    lik [B, d, v] leaf likelihoods. limit=True gives the δ → 0 limit used for impossible
    observations: zero likelihoods count as δ; only the trees with the fewest of them remain.
    """
    nodes = all_trees(g)
    lik = lik.double().numpy()
    n_trees = nodes[0].shape[0]
    factors = np.stack([lik[:, i, :][:, nodes[0][:, i]] for i in range(g.length)])  # [d, B, N]
    if limit:
        zeros = (factors == 0).sum(0)  # [B, N]
        best = zeros.min(1, keepdims=True)
        w = np.where(zeros == best, np.where(factors == 0, 1.0, factors).prod(0), 0.0)
    else:
        w = factors.prod(0)  # [B, N]
    with np.errstate(divide="ignore", invalid="ignore"):  # impossible rows: -inf and NaN
        ll = np.log(w.sum(1) / n_trees) + log_const.numpy()
        margs = []
        for level in range(g.depth + 1):
            onehot = np.eye(g.symbols(level))[nodes[level]]  # [N, w, n]
            margs.append(np.einsum("bn,nwa->bwa", w, onehot) / w.sum(1)[:, None, None])
    return ll, margs


def observations(g, process, noise, gen, count=6):
    """Half noised grammatical sentences, half arbitrary token strings (often ungrammatical)."""
    clean = torch.from_numpy(next(generate_sentences(g, count // 2, seed=7)).tokens)
    noisy = noise_tokens(clean, noise, process, g.vocab, gen)
    top = g.vocab + (process == "masked")
    junk = torch.randint(0, top, (count - count // 2, g.length), generator=gen)
    if process == "masked":  # a masked observation at E has masks only where E allows
        junk = torch.where(torch.rand(junk.shape, generator=gen) < noise, torch.full_like(junk, g.vocab),
                           torch.clamp(junk, max=g.vocab - 1))
    return torch.cat([noisy, junk])


# ---- marginals and likelihood --------------------------------------------------------------------
@pytest.mark.parametrize("dims", TINY)
@pytest.mark.parametrize("process", ["uniform", "masked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_marginals_and_likelihood_equal_enumeration(dims, process, dtype):
    g = draw_grammar(*dims, seed=1)
    bp = BeliefPropagation(g, dtype)
    gen = torch.Generator().manual_seed(0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for noise in NOISES:
        x = observations(g, process, noise, gen)
        lik, const = leaf_likelihood(x, noise, process, g.vocab, torch.float64)
        beliefs = bp.infer(x, noise, noise_process(process, g.vocab))
        ll, margs = brute_posterior(g, lik, const)
        possible = np.isfinite(ll)
        got = beliefs.log_likelihood.numpy()
        assert np.array_equal(np.isneginf(got), ~possible)
        np.testing.assert_allclose(got[possible], ll[possible], atol=tol * 10, rtol=tol)
        rows = possible & (lik.sum(-1) > 0).all(-1).numpy()  # posterior defined by enumeration
        rows &= np.isfinite(margs[0]).all((1, 2))
        for level in range(g.depth + 1):
            m = beliefs.marginal(level).double().numpy()
            assert m.shape == (x.shape[0], g.width(level), g.symbols(level))
            assert not np.isnan(m).any()
            np.testing.assert_allclose(m[rows], margs[level][rows], atol=tol)
            np.testing.assert_allclose(m.sum(-1), 1.0, atol=tol)


@pytest.mark.parametrize("dims", TINY[:3])
@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_cavity_is_the_posterior_without_the_token(dims, process):
    g = draw_grammar(*dims, seed=2)
    bp = BeliefPropagation(g, torch.float64)
    gen = torch.Generator().manual_seed(1)
    noise = 0.4
    x = observations(g, process, noise, gen)
    lik, const = leaf_likelihood(x, noise, process, g.vocab, torch.float64)
    cav = bp.infer(x, noise, noise_process(process, g.vocab)).cavity().numpy()
    for i in range(g.length):
        drop = lik.clone()
        drop[:, i, :] = 1.0  # remove token i's evidence
        _, margs = brute_posterior(g, drop, const)
        ok = np.isfinite(margs[0][:, i]).all(-1)
        np.testing.assert_allclose(cav[ok, i], margs[0][ok, i], atol=1e-10)


@pytest.mark.parametrize("dims", TINY)
def test_impossible_observations_give_minus_inf_and_the_nearest_sentences(dims):
    """Hard evidence no sentence matches: log P = -inf and the δ → 0 limit posterior, no NaN."""
    g = draw_grammar(*dims, seed=3)
    bp = BeliefPropagation(g)
    gen = torch.Generator().manual_seed(2)
    for process in ("uniform", "masked"):
        x = observations(g, process, 0.0 if process == "uniform" else 0.3, gen, count=10)
        noise = 0.0 if process == "uniform" else 0.3
        lik, const = leaf_likelihood(x, noise, process, g.vocab, torch.float64)
        beliefs = bp.infer(x, noise, noise_process(process, g.vocab))
        ll, _ = brute_posterior(g, lik, const)
        _, limit = brute_posterior(g, lik, const, limit=True)
        impossible = np.isneginf(ll)
        assert impossible.any(), "the test needs impossible observations"
        assert np.isneginf(beliefs.log_likelihood.numpy()[impossible]).all()
        assert beliefs.fallback.numpy()[impossible].all()
        for level in range(g.depth + 1):
            m = beliefs.marginal(level).double().numpy()
            assert np.isfinite(m).all()
            np.testing.assert_allclose(m[impossible], limit[level][impossible], atol=1e-6)
        assert np.isfinite(beliefs.cavity().numpy()).all()


def test_underflow_in_float32_falls_back_to_exact_log_space():
    """Soft evidence 1 vs 1e-35 on ungrammatical strings: float32 products underflow (every
    production needs a 1e-35 factor); the log-space path keeps the results exact."""
    g = draw_grammar(3, 2, 4, 2, 3, seed=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, g.vocab, (5, g.length), generator=gen)
    assert not Parser(g).parse(x.numpy()).valid[1].any()
    lik = torch.where(torch.nn.functional.one_hot(x, g.vocab).bool(), 1.0, 1e-35).double()
    ll, margs = brute_posterior(g, lik, torch.zeros(5, dtype=torch.float64))
    beliefs = BeliefPropagation(g, torch.float32).infer_evidence(lik)
    assert beliefs.fallback.any()
    np.testing.assert_allclose(beliefs.log_likelihood.numpy(), ll, rtol=1e-9)
    for level in range(g.depth + 1):
        np.testing.assert_allclose(beliefs.marginal(level).double().numpy(), margs[level], atol=1e-6)


def test_per_sentence_noise_levels_match_separate_calls():
    g = draw_grammar(3, 2, 4, 2, seed=5)
    bp = BeliefPropagation(g, torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, g.vocab, (4, g.length), generator=gen)
    e = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    together = bp.infer(x, e, noise_process("uniform", g.vocab))
    for i in range(4):
        alone = bp.infer(x[i:i + 1], float(e[i]), noise_process("uniform", g.vocab))
        assert torch.allclose(together.marginal(1)[i], alone.marginal(1)[0])
        assert torch.allclose(together.log_likelihood[i], alone.log_likelihood[0]) or (
            torch.isneginf(together.log_likelihood[i]) and torch.isneginf(alone.log_likelihood[0]))


def test_blocks_do_not_change_results(monkeypatch):
    import cgtools.inference.bp as bpm

    g = draw_grammar(3, 2, 8, 2, seed=6)
    x = torch.randint(0, g.vocab, (300, g.length), generator=torch.Generator().manual_seed(5))
    whole = BeliefPropagation(g, torch.float64).infer(x, 0.3, noise_process("uniform", g.vocab))
    monkeypatch.setattr(bpm, "_BLOCK_BYTES", 1)  # minimum blocks of 32 sentences
    pieces = BeliefPropagation(g, torch.float64).infer(x, 0.3, noise_process("uniform", g.vocab))
    assert torch.allclose(whole.log_likelihood, pieces.log_likelihood)
    for level in range(g.depth + 1):
        assert torch.allclose(whole.marginal(level), pieces.marginal(level))


def test_deep_trees_have_no_nan_or_underflow():
    """L = 8 (d = 256): grammatical sentences at E = 0 have log P = -log(#sentences) exactly;
    small noise, ungrammatical hard evidence and masks all stay finite."""
    g = draw_grammar(8, 2, 4, 2, seed=7)
    bp = BeliefPropagation(g)
    clean = torch.from_numpy(next(generate_sentences(g, 16, seed=1)).tokens)
    log_n = math.log(g.n_classes) + g.n_internal * math.log(g.synonyms)
    beliefs = bp.infer(clean, 0.0, noise_process("uniform", g.vocab))
    np.testing.assert_allclose(beliefs.log_likelihood.numpy(), -log_n, rtol=1e-6)
    assert not beliefs.fallback.any()
    gen = torch.Generator().manual_seed(6)
    cases = [(noise_tokens(clean, 1e-6, "uniform", g.vocab, gen), 1e-6, "uniform"),
             (noise_tokens(clean, 0.5, "uniform", g.vocab, gen), 0.5, "uniform"),
             (torch.randint(0, g.vocab, clean.shape, generator=gen), 0.0, "uniform"),
             (torch.randint(0, g.vocab + 1, clean.shape, generator=gen), 0.5, "masked")]
    for x, noise, process in cases:
        beliefs = bp.infer(x, noise, noise_process(process, g.vocab))
        assert not torch.isnan(beliefs.log_likelihood).any()
        for level in range(g.depth + 1):
            m = beliefs.marginal(level)
            assert torch.isfinite(m).all()
            assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-4)
        nodes = bp.sample(beliefs, gen)
        assert Parser(g).parse(nodes[0].numpy()).grammatical.all()


# ---- posterior sampling --------------------------------------------------------------------------
def _sentence_counts(g, tokens):
    index = {s: i for i, s in enumerate(brute_force_sentences(g))}
    counts = np.zeros(len(index), dtype=np.int64)
    for row in tokens.tolist():
        counts[index[tuple(row)]] += 1
    return counts


@pytest.mark.statistical
def test_masked_at_one_samples_uniformly_over_the_language():
    """Everything masked: posterior = prior, so exact samples are uniform over all sentences."""
    g = draw_grammar(2, 2, 3, 2, 2, seed=8)  # 2 * 2^3 = 16 sentences
    n = 16000
    bp = BeliefPropagation(g)
    x = torch.full((n, g.length), g.vocab)
    nodes = bp.sample(bp.infer(x, 1.0, noise_process("masked", g.vocab), downward=False), torch.Generator().manual_seed(7))
    counts = _sentence_counts(g, nodes[0])
    assert counts.sum() == n
    assert stats.chisquare(counts).pvalue > TEST_FAILURE_RATE


@pytest.mark.statistical
@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_samples_follow_the_exact_posterior(process):
    g = draw_grammar(2, 2, 3, 2, 3, seed=9)
    sentences = brute_force_sentences(g)
    gen = torch.Generator().manual_seed(8)
    obs = torch.tensor([sentences[5]])
    if process == "masked":
        obs[0, 1:] = g.vocab  # keep one token: several sentences remain possible
    else:
        obs = noise_tokens(obs, 0.5, process, g.vocab, gen)
    lik, const = leaf_likelihood(obs, 0.5, process, g.vocab, torch.float64)
    tokens = torch.tensor(sentences)
    weights = np.prod([lik[0, i, :].numpy()[tokens[:, i].numpy()] for i in range(g.length)], axis=0)
    n = 20000
    bp = BeliefPropagation(g)
    beliefs = bp.infer(obs.expand(n, -1), 0.5, noise_process(process, g.vocab), downward=False)
    nodes = bp.sample(beliefs, gen)
    counts = _sentence_counts(g, nodes[0])
    support = weights > 0
    assert support.sum() > 2 and counts[~support].sum() == 0
    expected = weights[support] / weights.sum() * n
    assert stats.chisquare(counts[support], expected).pvalue > TEST_FAILURE_RATE


def test_sampled_trees_are_consistent_parses():
    g = draw_grammar(4, 3, 5, 3, 4, seed=10)
    bp = BeliefPropagation(g)
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(0, g.vocab, (64, g.length), generator=gen)
    nodes = bp.sample(bp.infer(x, 0.3, noise_process("uniform", g.vocab)), gen)
    parse = Parser(g).parse(nodes[0].numpy())
    assert parse.grammatical.all()
    for level in range(g.depth + 1):
        assert np.array_equal(parse.symbols[level], nodes[level].numpy())


# ---- evidence and errors -------------------------------------------------------------------------
def test_noise_tokens_rates():
    gen = torch.Generator().manual_seed(10)
    x0 = torch.zeros((2000, 16), dtype=torch.long)
    u = noise_tokens(x0, 0.5, "uniform", 8, gen)
    assert abs((u != 0).float().mean().item() - 0.5 * 7 / 8) < 0.01
    mk = noise_tokens(x0, 0.25, "masked", 8, gen)
    assert set(mk.unique().tolist()) == {0, 8} and abs((mk == 8).float().mean().item() - 0.25) < 0.01
    assert torch.equal(noise_tokens(x0, 0.0, "uniform", 8, gen), x0)


def test_bad_inputs_raise_user_errors():
    g = draw_grammar(2, 2, 4, 2, seed=11)
    bp = BeliefPropagation(g)
    with pytest.raises(InputError):
        bp.infer(torch.full((1, 4), 4), 0.5, noise_process("uniform", 4))  # the mask id is not a uniform-process token
    with pytest.raises(ConfigError):
        bp.infer(torch.zeros((1, 4), dtype=torch.long), 1.5, noise_process("uniform", 4))
    with pytest.raises(ConfigError):
        bp.infer(torch.zeros((1, 4), dtype=torch.long), 0.5, noise_process("gaussian", 4))
    with pytest.raises(InputError):
        bp.infer_evidence(torch.ones((1, 5, 4)))


# ---- the denoiser --------------------------------------------------------------------------------
def test_denoiser_outputs_normalised_log_probs_and_the_two_kinds_agree():
    g = draw_grammar(3, 2, 6, 2, seed=12)
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, g.vocab, (10, g.length), generator=gen)
    e = torch.linspace(0.0, 1.0, 10)
    cav = BPDenoiser(g, noise_process("uniform", g.vocab), kind="cavity", batch_size=3)(x, e)
    mar = BPDenoiser(g, noise_process("uniform", g.vocab), kind="marginal")(x, e)
    assert cav.shape == (10, g.length, g.vocab) and cav.dtype == torch.float32
    assert not torch.isnan(cav).any() and not torch.isnan(mar).any()
    assert torch.allclose(cav.exp().sum(-1), torch.ones(()), atol=1e-5)
    # marginal ∝ cavity × own evidence (rows with E > 0: at E = 0 the evidence is hard)
    lik, _ = leaf_likelihood(x, e, "uniform", g.vocab, torch.float64)
    prod = cav.double().exp() * lik
    prod = prod / prod.sum(-1, keepdim=True)
    assert torch.allclose(prod[1:], mar.double().exp()[1:], atol=1e-5)
    masked = BPDenoiser(g, noise_process("masked", g.vocab))
    assert masked.mask_id == g.vocab
    out = masked(torch.full((2, g.length), g.vocab), 1.0)
    assert torch.allclose(out.exp().sum(-1), torch.ones(()), atol=1e-5)


def _d3pm_sample(denoiser, n, steps, gen):
    """Tiny uniform-D3PM ancestral sampler (linear ᾱ_t = 1 - t/T) driven by an x0 predictor."""
    v, d = denoiser.vocab, denoiser.grammar.length
    abar = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    x = torch.randint(0, v, (n, d), generator=gen)
    for t in range(steps, 0, -1):
        alpha = abar[t] / abar[t - 1]
        p0 = denoiser(x, torch.full((n,), float(1 - abar[t]))).double().exp()  # [n, d, v]
        keep = (1 - alpha) / v + alpha * torch.nn.functional.one_hot(x, v).double()  # q(x_t | x_{t-1}=j)
        kernel = keep * (abar[t - 1] * p0 + (1 - abar[t - 1]) / v)
        x = torch.multinomial(kernel.view(-1, v), 1, generator=gen).view(n, d)
    return x


def test_cavity_makes_exact_d3pm_generation_grammatical_and_marginals_do_not():
    """The peers.md §5 finding: plugging cavities into the D3PM kernel gives grammatical samples,
    plugging full marginals (own evidence counted twice) mostly ungrammatical ones."""
    g = draw_grammar(3, 2, 8, 2, seed=3)
    parser = Parser(g)
    fractions = {}
    for kind in ("cavity", "marginal"):
        x = _d3pm_sample(BPDenoiser(g, noise_process("uniform", g.vocab), kind=kind), 400, 100, torch.Generator().manual_seed(12))
        fractions[kind] = parser.parse(x.numpy()).grammatical.mean()
    assert fractions["cavity"] >= 0.95
    assert fractions["marginal"] < 0.7 and fractions["marginal"] < fractions["cavity"] - 0.25


def test_probability_of_given_symbols_matches_the_marginals():
    g = draw_grammar(3, 2, 4, 2, 3, seed=13)
    bp = BeliefPropagation(g)
    gen = torch.Generator().manual_seed(13)
    x = torch.randint(0, g.vocab, (20, g.length), generator=gen)
    for noise in (0.0, 0.4):  # E = 0: impossible rows take the log-space path
        beliefs = bp.infer(x, noise, noise_process("uniform", g.vocab))
        for level in range(g.depth + 1):
            sym = torch.randint(0, g.symbols(level), (20, g.width(level)), generator=gen)
            expect = torch.gather(beliefs.marginal(level), 2, sym.unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(beliefs.probability(level, sym), expect, atol=1e-6)


@pytest.mark.statistical
@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_sample_command_with_bp_is_uniform_over_the_language(tmp_path, process):
    """`cgtools sample --denoiser bp`: samples grammatical, and their law over the 32 sentences of
    a tiny grammar uniform (chi-square, false-alarm rate TEST_FAILURE_RATE). The reverse kernel
    factorises over positions, so tokens changed in the same step can clash: measured 0.8 %
    (T = 200) and 0.2 % (T = 1000) ungrammatical, both processes; we allow 2 % at T = 200. Uniform noise
    exercises the cavity + "posterior" decoder pairing: with the "x0" decoder the samples collapse
    onto a few sentences and this test fails."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from cgtools.cli.main import app
    from cgtools.formats.files import open_input
    from cgtools.grammar.source import load_grammar

    runner = CliRunner()
    gfile = tmp_path / "g.safetensors"
    res = runner.invoke(app, ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "--seed", "5", "-n", "1",
                              "--grammar-out", str(gfile), "-o", str(tmp_path / "one.parquet")])
    assert res.exit_code == 0, res.stderr
    g = load_grammar(open_input(str(gfile)))  # 4 classes · 2^3 = 32 sentences
    out = tmp_path / "s.parquet"
    res = runner.invoke(app, ["sample", "--denoiser", "bp", "--grammar", str(gfile), "--process", process,
                              "--T", "200", "-n", "3200", "--seed", "3", "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    tokens = np.array(pq.read_table(out).column("tokens").to_pylist())
    sentences = sorted(brute_force_sentences(g))
    assert len(sentences) == 32
    index = {s: i for i, s in enumerate(sentences)}
    hits = [index.get(tuple(row)) for row in tokens.tolist()]
    valid = [h for h in hits if h is not None]
    assert len(valid) >= 0.98 * len(hits)
    counts = np.bincount(valid, minlength=32)
    assert stats.chisquare(counts).pvalue > TEST_FAILURE_RATE
