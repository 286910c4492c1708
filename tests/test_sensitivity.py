"""The sensitivity S_{k,l} of App. D.1 (eq. 26): exact limits, a statistical check, a network whose
answer is known, and the command."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from torch import nn
from typer.testing import CliRunner

from cgtools.analysis.sensitivity import sensitivity
from cgtools.cli.main import app
from cgtools.diffusion import UniformConfig
from cgtools.diffusion.registry import make_process
from cgtools.errors import ConfigError
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.models.unet import UNet, UNetConfig
from tests.helpers import TEST_FAILURE_RATE

Z = stats.norm.isf(TEST_FAILURE_RATE / 2)  # two-sided bound of the statistical checks

pytestmark = pytest.mark.usefixtures("one_thread")

GRAMMAR = draw_grammar(3, 2, 8, 2, 8, seed=0)  # L = 3, s = 2, v = 8, m = 2, n = 8: d = 8, 1024 sentences
BIG = draw_grammar(3, 2, 16, 4, 16, seed=0)  # 16·4^7 = 262144 sentences


def _sentences(g, n, seed, level=None):
    """(tokens [n, d], R_level tokens [n, d] or None), n distinct sentences."""
    batches = list(generate_sentences(g, n, seed=seed, perturb_level=level))
    tokens = np.concatenate([b.tokens for b in batches])
    pert = np.concatenate([b.perturbed for b in batches]) if level is not None else None
    return tokens, pert


def _unet_model(g, width=32, seed=0):
    cfg = UNetConfig(vocab=g.vocab, depth=g.depth, branching=g.branching, width=width)
    process = make_process(UniformConfig(T=20, schedule="linear-alpha"), g.vocab)
    return SimpleNamespace(network=UNet(cfg, seed=seed).eval(), process=process)


def _pre(model, x, noise=0.0, generator=None):
    """Independent path: the U-Net's pre-activations {block: [N, F]} float64 at the lowest level t = 1."""
    x = torch.as_tensor(x)
    if noise:
        x = model.process.corrupt(x, noise, generator)
    tau = model.process.network_time(torch.full((x.shape[0],), max(1, model.process.time_for_corruption(noise))))
    with torch.no_grad():
        _, pre = model.network(x, tau, return_preactivations=True)
    return {k: v.reshape(x.shape[0], -1).double() for k, v in pre.items()}


# ---- exact limits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_identity_perturbation_gives_exactly_zero(noise):
    """R x = x: the numerator is exactly 0 (at E > 0 only if x and R x share one noise draw)."""
    model = _unet_model(GRAMMAR)
    x, _ = _sentences(GRAMMAR, 300, seed=1)
    res = sensitivity(model, {1: (x, x), 3: (x, x)}, noise=noise, batch_size=64)
    assert res.blocks == ["enc1", "enc2", "enc3", "dec1", "dec2", "dec3"] and res.levels == [1, 3]
    assert res.sensitivity == [[0.0, 0.0]] * 6 and res.numerator == [[0.0, 0.0]] * 6
    assert all(d > 0 for row in res.denominator for d in row) and res.n == [300, 300]


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_independent_sentences_give_one_in_expectation(noise):
    """R x = an independent sentence y: numerator and denominator estimate the same mean μ of
    h = ||a(x) - a(y)||². The numerator averages N iid h (sd σ/√N); the denominator is at E = 0 the
    all-pairs U-statistic (Hoeffding: sd <= σ√(2/N)), at E > 0 the mean of consecutive-pair h
    (adjacent terms share a sentence: sd <= σ√(3/N)). So |S - 1| <= Z (1 + √2 or √3) σ / (μ √N)
    but for a false-alarm rate TEST_FAILURE_RATE."""
    model = _unet_model(BIG)
    tokens, _ = _sentences(BIG, 4000, seed=2)
    x, y = tokens[:2000], tokens[2000:]
    res = sensitivity(model, {2: (x, y)}, noise=noise, batch_size=500, seed=3)
    ax = _pre(model, x, noise, torch.Generator().manual_seed(11))
    ay = _pre(model, y, noise, torch.Generator().manual_seed(11))  # same draws: coupled noise
    for k, name in enumerate(res.blocks):
        h = ((ax[name] - ay[name]) ** 2).sum(dim=1)  # [N]
        mu, sigma = float(h.mean()), float(h.std())
        if noise == 0:
            assert res.numerator[k][0] == pytest.approx(mu, rel=1e-9)  # the same quantity, computed here
        factor = 1 + math.sqrt(2 if noise == 0 else 3)
        tol = Z * factor * sigma / (mu * math.sqrt(len(x)))
        assert abs(res.sensitivity[k][0] - 1) < tol, (name, res.sensitivity[k][0], tol)
        assert tol < 0.25  # the check has power: a factor-2 error in either term cannot pass


def test_denominator_is_the_mean_over_all_pairs_and_batching_does_not_matter():
    model = _unet_model(GRAMMAR, width=16)
    x, r = _sentences(GRAMMAR, 120, seed=4, level=1)
    whole = sensitivity(model, {1: (x, r)}, batch_size=1000)
    ax = _pre(model, x)
    for k, name in enumerate(whole.blocks):
        a = ax[name]
        pairs = torch.cdist(a, a) ** 2  # [N, N], zero diagonal
        brute = float(pairs.sum()) / (len(x) * (len(x) - 1))
        assert whole.denominator[k][0] == pytest.approx(brute, rel=1e-6)
    # float32 GEMMs round differently for other batch shapes: agreement to float32 precision
    stream = [(x[i:i + 13], r[i:i + 13]) for i in range(0, len(x), 13)]
    for batching in ({1: (x, r)}, {1: stream}):
        small = sensitivity(model, batching, batch_size=7)
        assert np.allclose(small.sensitivity, whole.sensitivity, rtol=1e-6, atol=0)
    noisy = [sensitivity(model, {1: (x, r)}, noise=0.4, batch_size=b, seed=5).sensitivity for b in (7, 120)]
    assert np.allclose(noisy[0], noisy[1], rtol=1e-6, atol=0)  # noise is drawn per chunk, not per batch
    assert not np.allclose(noisy[0], whole.sensitivity, rtol=1e-3)  # ... and it is drawn


# ---- a network whose answer is known ---------------------------------------------------------------
class LatentProbe(nn.Module):
    """Blocks: 'tokens' (one-hot x), 'first_half' (one-hot of x_1..x_{d/2}) and 'latent_j' (one-hot
    of the level-j symbols of the parse of x, j = 1..L). R_l keeps every latent at levels >= l, so
    S(latent_j, l) = 0 exactly for j >= l and > 0 for j < l."""

    def __init__(self, grammar):
        super().__init__()
        self.grammar, self.parser = grammar, Parser(grammar)
        L = grammar.depth
        self.block_names = ["tokens", "first_half"] + [f"latent_{j}" for j in range(1, L + 1)]

    def forward(self, x_t, t, return_preactivations=False):
        g = self.grammar
        onehot = torch.nn.functional.one_hot(x_t, g.vocab).double()  # [B, d, v]
        pre = {"tokens": onehot, "first_half": onehot[:, : g.length // 2]}
        symbols = self.parser.parse(x_t.numpy()).symbols
        for j in range(1, g.depth + 1):
            width = 1 + (g.n_classes if j == g.depth else g.vocab)  # class 0: unparsable subtree
            pre[f"latent_{j}"] = torch.nn.functional.one_hot(torch.from_numpy(symbols[j] + 1), width).double()
        return (onehot, pre) if return_preactivations else onehot


def test_latent_probe_is_invariant_exactly_at_and_above_the_exchanged_level():
    g = GRAMMAR
    model = SimpleNamespace(network=LatentProbe(g), process=make_process(UniformConfig(T=20), g.vocab))
    data = {lv: _sentences(g, 400, seed=6, level=lv) for lv in (1, 2, 3)}
    res = sensitivity(model, data, batch_size=64)
    batched = sensitivity(model, data, batch_size=5)  # float64 blocks: the merged moments are exact
    assert np.allclose(batched.sensitivity, res.sensitivity, rtol=1e-12, atol=0)
    for j in range(1, g.depth + 1):
        for level in (1, 2, 3):
            s = res.value(f"latent_{j}", level)
            if j >= level:
                assert s == 0.0, (j, level)
            else:
                assert s > 0.3, (j, level, s)  # R_l changes every level-(l-1) tuple: far from 0
    # the token block against a brute-force Hamming ratio (||onehot(a) - onehot(b)||² = 2·Hamming)
    for level in (1, 2, 3):
        x, r = data[level]
        num = 2 * (x != r).sum(axis=1).mean()
        ham = (x[:, None, :] != x[None, :, :]).sum(axis=2)  # [N, N]
        den = 2 * ham.sum() / (len(x) * (len(x) - 1))
        assert res.value("tokens", level) == pytest.approx(num / den, rel=1e-9)
    # a perturbation of the second half only: the first-half block cannot see it
    x, _ = data[1]
    other, _ = _sentences(g, 400, seed=7)
    mixed = np.concatenate([x[:, : g.length // 2], other[:, g.length // 2:]], axis=1)
    res = sensitivity(model, {1: (x, mixed)})
    assert res.value("first_half", 1) == 0.0 and res.value("tokens", 1) > 0.2


def test_a_network_without_blocks_is_refused():
    class Plain(nn.Module):
        def forward(self, x_t, t):
            return x_t

    model = SimpleNamespace(network=Plain(), process=make_process(UniformConfig(T=20), 8))
    x, _ = _sentences(GRAMMAR, 10, seed=1)
    with pytest.raises(ConfigError, match="has no block representations"):
        sensitivity(model, {1: (x, x)})


# ---- the command -----------------------------------------------------------------------------------
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def _gen(path, *extra, seed=0):
    res = run("rhm-gen", "-L", "3", "-s", "2", "-v", "8", "-m", "2", "-n", "200", "--seed", seed, *extra, "-o", path)
    assert res.exit_code == 0, res.stderr
    return path


def _tiny_checkpoint(run_dir, data_path):
    """A barely trained U-Net (4 SGD steps, width 16) on DATA's grammar: the wiring is under test."""
    from cgtools.formats.files import open_input
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import resolve_grammar
    from cgtools.training.config import TrainConfig
    from cgtools.training.loop import train
    from cgtools.training.presets import RunConfig

    table = SequencesTable(open_input(data_path))
    g = resolve_grammar(None, table)
    tokens = table.read_column(length=g.length)
    model = UNetConfig(vocab=g.vocab, depth=g.depth, branching=g.branching, width=16)
    cfg = TrainConfig(steps=4, batch_size=8, optimizer="sgd", lr=0.5, eval_every=4, sample_check=0, val_repeats=1)
    train(RunConfig("unet", model, UniformConfig(T=20, schedule="linear-alpha"), cfg), run_dir,
          train_tokens=tokens[:150], val_tokens=tokens[150:], grammar=g, provenance={})
    return run_dir / "model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    tables = {lv: _gen(root / f"pert_{lv}.parquet", "--perturb", lv) for lv in (1, 2, 3)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = _tiny_checkpoint(root / "run", tables[2])
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, tables=tables, ckpt=ckpt)


def _one_line_error(res, text):
    assert res.exit_code == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools sensitivity: error:"), res.stderr
    assert text in lines[0], lines[0]


def test_cli_json_table_and_results(trained, tmp_path):
    t = trained.tables
    res = run("sensitivity", trained.ckpt, t[3], t[1], t[2], "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"blocks", "levels", "sensitivity", "n"} <= set(out)
    assert out["blocks"] == ["enc1", "enc2", "enc3", "dec1", "dec2", "dec3"] and out["levels"] == [1, 2, 3]
    assert len(out["sensitivity"]) == 6 and all(len(row) == 3 for row in out["sensitivity"])
    assert all(math.isfinite(s) and s >= 0 for row in out["sensitivity"] for s in row)
    assert out["n"] == [200, 200, 200] and out["noise"] == 0.0 and out["time"] == pytest.approx(1 / 20)

    res = run("sensitivity", trained.ckpt, t[1], t[2], "--threads", 1, "--limit", 50)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["block", "S_1", "S_2"] and [ln.split()[0] for ln in lines[1:]] == out["blocks"]

    table_path = tmp_path / "sens.parquet"
    res = run("sensitivity", trained.ckpt, t[1], t[2], t[3], "--tag", "P=150", "--tag", "seed=0",
              "--threads", 1, "-o", table_path)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    table = pq.read_table(table_path)
    for column in ("block", "block_index", "level", "sensitivity", "n", "P", "seed"):
        assert column in table.column_names
    assert table.num_rows == 18
    rows = table.to_pylist()
    assert [r["block_index"] for r in rows] == [k for k in range(6) for _ in range(3)]
    assert [r["level"] for r in rows] == [1, 2, 3] * 6 and {r["P"] for r in rows} == {150}
    assert [r["sensitivity"] for r in rows] == pytest.approx([s for row in out["sensitivity"] for s in row], rel=1e-12)
    meta = json.loads(table.schema.metadata[b"cgtools"])
    assert meta["kind"] == "sensitivity" and meta["tags"] == {"P": 150, "seed": 0}
    assert meta["schema"] == "results/1" and meta["grammar"]["depth"] == 3
    assert meta["provenance"]["tool"] == "cgtools sensitivity" and str(trained.ckpt) in meta["provenance"]["inputs"]
    assert [d["level"] for d in meta["data"]] == [1, 2, 3]
    # never overwritten without --force
    res = run("sensitivity", trained.ckpt, t[1], "-o", table_path)
    _one_line_error(res, "exists; use --force")


def test_cli_errors_are_one_line(trained, tmp_path):
    t, ckpt = trained.tables, trained.ckpt
    plain = _gen(tmp_path / "plain.parquet")
    _one_line_error(run("sensitivity", ckpt, plain), "no 'perturbed' column")
    _one_line_error(run("sensitivity", ckpt, t[1], t[1]), "both hold level 1")
    _one_line_error(run("sensitivity", t[1], t[1]), "not a safetensors checkpoint")
    other = _gen(tmp_path / "other.parquet", "--perturb", 1, seed=1)
    _one_line_error(run("sensitivity", ckpt, other), "different grammar")
    res = run("sensitivity", ckpt, other, "--grammar", other, "--json", "--limit", 20)  # allowed with --grammar
    assert res.exit_code == 0, res.stderr
    # a table claiming a level the grammar does not have
    table = pq.read_table(t[1])
    meta = json.loads(table.schema.metadata[b"cgtools"])
    meta["perturbation"]["level"] = 4
    deep = tmp_path / "level4.parquet"
    pq.write_table(table.replace_schema_metadata({"cgtools": json.dumps(meta)}), deep)
    _one_line_error(run("sensitivity", ckpt, deep), "perturbation level 4 is outside 1..3")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".parquet" and p.name.startswith("sens")]
