"""The MD4-style text transformer: shapes, attention structure, init, the masked bound of an exact
model, top-p and cached sampling, gradient clipping, training and sampling through the CLI, and
stacked (vmapped) training in a sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.diffusion.masked import MaskedConfig, MaskedDiffusion
from cgtools.diffusion.sampling import CountingDenoiser, nucleus, sample, top_p_denoiser
from cgtools.errors import ConfigError
from cgtools.formats.checkpoint import Checkpoint
from cgtools.formats.files import open_input
from cgtools.formats.metrics import read_metrics
from cgtools.formats.sequences import SequencesWriter, sequences_meta
from cgtools.models.registry import DataSpec
from cgtools.models.transformer import TransformerConfig, TransformerDenoiser
from cgtools.seeding import torch_generator
from cgtools.training.config import TrainConfig
from cgtools.training.presets import resolve_run
from cgtools.training.sweep import SweepMember, _trainer
from tests.helpers import TEST_FAILURE_RATE, assert_stacked_matches_single_runs

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

# Two-sided normal quantile of TEST_FAILURE_RATE (1e-4): 3.89.
Z = 3.89
V, D = 5, 6


def _net(seed=0, randomise_output=True, **kw):
    """A tiny transformer over V symbols (+ mask) and D positions; its zero output projection
    replaced by random weights so that the logits depend on the input."""
    cfg = TransformerConfig(**{"vocab": V, "input_vocab": V + 1, "length": D, "width": 16, "layers": 2,
                               "heads": 2, **kw})
    net = TransformerDenoiser(cfg, seed=seed)
    if randomise_output:
        with torch.no_grad():
            net.out.normal_(generator=torch.Generator().manual_seed(seed + 100))
    return net.eval()


def _x(batch=3, seed=0):
    return torch.randint(0, V + 1, (batch, D), generator=torch.Generator().manual_seed(seed))


# ---- the network ---------------------------------------------------------------------------------
def test_shapes_and_uniform_logits_at_init():
    net = _net(randomise_output=False)
    x = _x(4)
    logits = net(x, None)
    assert logits.shape == (4, D, V) and logits.dtype == torch.float32
    # zero-initialised output projection: every position predicts the uniform law
    assert torch.equal(logits, torch.zeros(4, D, V))
    assert torch.allclose(torch.log_softmax(logits, -1), torch.full((4, D, V), -math.log(V)))
    with pytest.raises(ValueError, match=r"x_t must be \[B, 6\]"):
        net(torch.zeros(2, D + 1, dtype=torch.long), None)
    # with time conditioning: t [B] or one shared time [1] (what every sampler step passes)
    tnet = _net(time_embedding=True)
    t = torch.full((4,), 0.3)
    assert tnet(x, t).shape == (4, D, V)
    assert torch.allclose(tnet(x, t), tnet(x, t[:1]), atol=1e-6)
    with pytest.raises(ConfigError, match="even head size"):
        TransformerConfig(vocab=V, width=12, heads=4)


def test_attention_is_bidirectional():
    net = _net()
    x = _x(2)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % (V + 1)  # change only the last token
    with torch.no_grad():
        a, b = net(x, None), net(y, None)
    # every earlier position sees the change (a causal model would leave them all equal)
    assert (a[:, :-1] - b[:, :-1]).abs().amax(-1).min() > 1e-4


def test_rope_makes_positions_matter(monkeypatch):
    net = _net()
    x = _x(2, seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        gap = (net(x[:, perm], None) - net(x, None)[:, perm]).abs().max()
        assert gap > 1e-3  # permuting the input does not just permute the output
        # control: with the rotation switched off (cos 1, sin 0) the network is equivariant
        ones = lambda d, dtype, device: (torch.ones(d, 4), torch.zeros(d, 4))  # noqa: E731
        monkeypatch.setattr(net, "_rope", ones)
        assert torch.allclose(net(x[:, perm], None), net(x, None)[:, perm], atol=1e-5)


def test_adaln_zero_blocks_start_as_the_identity():
    net = _net(time_embedding=True)
    x = _x(3)
    with torch.no_grad():
        h = F.rms_norm(F.embedding(x, net.embed), (16,), net.norm_f, net.config.norm_eps)
        expected = F.linear(h, net.out)  # embedding -> final norm -> readout, nothing in between
        for t in (0.05, 0.9):
            assert torch.allclose(net(x, torch.full((3,), t)), expected, atol=1e-6)
    # without adaLN the blocks are not the identity at init (only the readout is zero)
    plain = _net()
    with torch.no_grad():
        h = F.rms_norm(F.embedding(x, plain.embed), (16,), plain.norm_f, plain.config.norm_eps)
        assert not torch.allclose(plain(x, None), F.linear(h, plain.out), atol=1e-3)


def test_config_round_trips_and_the_registry_sizes_it_from_the_data():
    run = resolve_run("text", process=None, arch=None, data=DataSpec(vocab=27, length=64), settings={"layers": 2})
    cfg = run.model
    assert run.arch == "transformer" and run.process == MaskedConfig()
    assert (cfg.vocab, cfg.input_vocab, cfg.length, cfg.layers, cfg.width, cfg.time_embedding) == \
        (27, 28, 64, 2, 128, False)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    t = run.train
    assert (t.optimizer, t.lr, t.lr_scheme, t.grad_clip, t.ema, t.batch_size) == ("adam", 1e-3, "global", 1.0, 0.999, 32)
    assert resolve_run("text", process="masked", arch=None, data=DataSpec(vocab=27, length=64),
                       settings={"time_conditioning": True}).model.time_embedding
    # no μP classes: the μP learning-rate scheme of the cpu preset is refused before anything runs
    with pytest.raises(ConfigError, match="no μP learning rates.*--lr-scheme global"):
        resolve_run("cpu", process="masked", arch="transformer", data=DataSpec(vocab=5, length=6), settings={})
    with pytest.raises(ConfigError, match="--skip does not apply to masked diffusion with the transformer"):
        resolve_run("text", process=None, arch=None, data=DataSpec(vocab=5, length=6), settings={"skip": "add"})


# ---- the masked bound of an exact model -----------------------------------------------------------
def test_masked_elbo_of_the_exact_iid_model_is_the_entropy():
    """i.i.d. tokens with marginal p and the denoiser log p at every position: the continuous-time
    bound per token is H(p) nats in expectation (∫ w(t)(1 - α(t)) dt = 1, the t_min atom included),
    and so is the discrete N-step bound (Σ ρ_i (1 - α(t_i)) = 1)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    entropy = float(-(p * p.log()).sum())
    proc = MaskedDiffusion(MaskedConfig(), vocab=4)
    log_p = p.log().float()
    gen = torch_generator(0, "test")
    d, batch, estimates, bounds = 8, 1000, [], []
    denoiser = lambda x_t, t: log_p.expand(*x_t.shape, 4)  # noqa: E731 - ignores x_t and t
    for _ in range(20):
        x0 = torch.multinomial(p, batch * d, replacement=True, generator=gen).view(batch, d)
        t = proc.sample_t(batch, gen)
        x_t = proc.q_sample(x0, t, gen)
        estimates.append(proc.loss(denoiser(x_t, t), x0, x_t, t).loss.double())
        bounds.append(proc.bound(denoiser, x0, gen, steps=10) / d)
    for values in (torch.cat(estimates), torch.cat(bounds)):
        sem = float(values.std() / math.sqrt(len(values)))
        assert abs(float(values.mean()) - entropy) < Z * sem, (float(values.mean()), entropy, sem)


# ---- sampling: top-p and the cache -----------------------------------------------------------------
def _masked_process():
    return MaskedDiffusion(MaskedConfig(), vocab=V)


def _denoiser(net):
    @torch.inference_mode()
    def denoise(x_t, t):
        return torch.log_softmax(net(x_t, t.float()), -1)

    return denoise


def test_top_p_one_is_the_plain_sampler_and_the_cache_changes_nothing():
    net, proc = _net(), _masked_process()
    plain = sample(proc, _denoiser(net), 16, D, torch_generator(1, "s"), steps=40, cache=False)
    one = sample(proc, top_p_denoiser(_denoiser(net), 1.0), 16, D, torch_generator(1, "s"), steps=40, cache=False)
    assert torch.equal(plain, one)
    # p = 1 applied explicitly keeps every symbol too
    logp = torch.log_softmax(torch.randn(4, 7), -1)
    assert torch.equal(nucleus(logp, 1.0), logp)
    # cached: the network runs only on rows that changed, with the same samples draw for draw
    counted = CountingDenoiser(_denoiser(net))
    cached = sample(proc, counted, 16, D, torch_generator(1, "s"), steps=40, cache=True)
    assert torch.equal(cached, plain)
    assert counted.rows <= 16 * D < 16 * 40  # at most one evaluation per unmasking event
    # ... also under top-p < 1
    cut = top_p_denoiser(_denoiser(net), 0.8)
    assert torch.equal(sample(proc, cut, 16, D, torch_generator(2, "s"), steps=40, cache=True),
                       sample(proc, cut, 16, D, torch_generator(2, "s"), steps=40, cache=False))


@pytest.mark.statistical
@pytest.mark.parametrize("top_p, nucleus_size", [(0.45, 1), (0.7, 2), (0.85, 3)])
def test_top_p_never_draws_outside_the_nucleus(top_p, nucleus_size):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    inside = [1, 3, 2, 0][:nucleus_size]
    proc = MaskedDiffusion(MaskedConfig(), vocab=4)
    denoiser = lambda x_t, t: probs.log().expand(*x_t.shape, 4)  # noqa: E731
    n, d = 500, 8
    x = sample(proc, top_p_denoiser(denoiser, top_p), n, d, torch_generator(0, "nucleus"), steps=20)
    counts = torch.bincount(x.flatten(), minlength=4)
    assert counts[[s for s in range(4) if s not in inside]].sum() == 0
    # inside, the renormalised law: each count within Z standard deviations (binomial)
    law = probs[inside] / probs[inside].sum()
    total = n * d
    sd = (total * law * (1 - law)).sqrt()
    assert ((counts[inside] - total * law).abs() <= Z * sd + 1e-9).all(), (counts, law * total)
    assert TEST_FAILURE_RATE == 1e-4  # Z above is its two-sided normal quantile


# ---- training ---------------------------------------------------------------------------------------
TEXT_D = 16


def _tokens(n, seed, length=TEXT_D):
    """A toy corpus over V = 5 symbols: 0 1 2 3 4 0 ... counted up or down from a random start (10
    sentences; one visible token and the direction determine the others). Its entropy is ln 10 per
    sentence, so the best masked bound is ln(10)/16 = 0.14 nats per token, against ln 5 = 1.61 at init."""
    rng = np.random.default_rng(seed)
    start, step = rng.integers(0, V, (n, 1)), rng.choice([-1, 1], (n, 1))
    return ((start + step * np.arange(length)) % V).astype(np.int64)


TOKENIZER = {"kind": "chars", "alphabet": "abcde"}


def _text_table(path, tokens):
    with open(path, "wb") as sink:
        writer = SequencesWriter(sink, length=tokens.shape[1], vocab=V,
                                 meta=sequences_meta(None, {}, tokenizer=TOKENIZER, vocab=V))
        writer.write(tokens)
        writer.close()


def test_train_and_sample_a_text_table_through_the_cli(tmp_path):
    train_tokens, val_tokens = _tokens(512, 0), _tokens(64, 1)
    _text_table(tmp_path / "train.parquet", train_tokens)
    _text_table(tmp_path / "val.parquet", val_tokens)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
                              "-o", str(run), "--arch", "transformer", "--process", "masked", "--preset", "text",
                              "--width", "32", "--layers", "2", "--heads", "2", "--steps", "200",
                              "--batch-size", "32", "--warmup", "20", "--lr", "3e-3", "--ema", "0.9",
                              "--eval-every", "100", "--allow-overlap"])
    assert res.exit_code == 0, res.stderr
    rows = read_metrics(run / "metrics.parquet")
    # at init the zero readout predicts uniformly: the masked bound is ln V nats per token in
    # expectation; the learned model, which sees the pattern, must be 3x better (measured: ~5x)
    assert rows[-1]["val_loss"] < math.log(V) / 3, [r["val_loss"] for r in rows]
    assert [r["tokens"] for r in rows] == [r["step"] * 32 * TEXT_D for r in rows]
    meta = Checkpoint(open_input(run / "model.safetensors")).meta
    assert meta["arch"] == "transformer" and meta["tokenizer"] == TOKENIZER and meta["vocab"] == V
    assert meta["tokens"] == meta["step"] * 32 * TEXT_D and meta["train"]["grad_clip"] == 1.0
    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "-n", "8", "--sampling-steps", "30",
                              "--top-p", "0.9", "-o", str(tmp_path / "s.parquet")])
    assert res.exit_code == 0, res.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    out = json.loads(table.schema.metadata[b"cgtools"])
    assert out["tokenizer"] == TOKENIZER and out["vocab"] == V and out["grammar"] is None
    assert out["sampler"]["top_p"] == 0.9 and out["sampler"]["forwards"] <= 8 * TEXT_D < out["sampler"]["row_steps"]
    samples = np.array(table.column("tokens").to_pylist())
    assert samples.shape == (8, TEXT_D) and samples.min() >= 0 and samples.max() < V
    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "-n", "2", "--top-p", "0",
                              "-o", str(tmp_path / "bad.parquet")])
    assert res.exit_code == 2 and "--top-p" in res.stderr


def _member(tmp_path, seed, tag="m", **settings):
    base = dict(width=16, layers=2, heads=2, steps=4, batch_size=8, eval_every=4, val_repeats=1, seed=seed,
                warmup=0, ema=0.0)
    base.update(settings)
    run = resolve_run("text", process=None, arch=None, data=DataSpec(vocab=V, length=D), settings=base)
    return SweepMember(run, tmp_path / f"{tag}{seed}", _tokens(64, seed, D), _tokens(8, 100 + seed, D), None)


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_grad_clip_bounds_the_update_norm(tmp_path):
    # plain SGD at lr 1: the update is the (clipped) gradient itself
    sgd = dict(optimizer="sgd", momentum=0.0, lr=1.0, lr_schedule="constant")
    clipped = _trainer(_member(tmp_path, 0, "c", grad_clip=1e-3, **sgd), "cpu", False)
    free = _trainer(_member(tmp_path, 0, "f", **sgd), "cpu", False)
    updates = []
    for tr in (clipped, free):
        before = _flat(tr.model.network.parameters()).clone()
        tr._train_step()
        updates.append(float((_flat(tr.model.network.parameters()) - before).norm()))
    assert updates[0] == pytest.approx(1e-3, rel=1e-4)  # the unclipped gradient is far larger:
    assert updates[1] > 100 * 1e-3
    with pytest.raises(ConfigError, match="grad-clip must be positive"):
        TrainConfig(grad_clip=0.0)


@pytest.mark.parametrize("settings", [
    {},  # the text preset: Adam, grad clip 1
    {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "grad_clip": 0.05, "lr_schedule": "constant"},  # the clip binds
    {"time_conditioning": True, "ema": 0.9},  # adaLN on, weight average
])
def test_stacked_transformer_runs_match_single_runs(tmp_path, settings):
    assert_stacked_matches_single_runs([_member(tmp_path, s, **settings) for s in (0, 1)])
