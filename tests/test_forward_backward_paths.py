"""One forward-backward: `sample --from DATA --noise E` and `forward-backward --denoiser CKPT`
corrupt at exactly E and denoise with the same library function, so their statistics agree.

Before the two were joined, `sample --from` corrupted at the nearest schedule level 1 - ᾱ_t and
the experiment at exactly E; at E = 0.02 with T = 20 (levels 0, 0.05, ...) the former returned
the data untouched while the latter changed 0.02·(v-1)/v of the tokens. These tests pin that down.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.diffusion import UniformConfig
from cgtools.formats.files import open_input
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.inference.forward_backward import forward_backward, model_sampler
from cgtools.training.generate import SampleConfig, exact_model, generate
from tests.helpers import TEST_FAILURE_RATE

Z = stats.norm.isf(TEST_FAILURE_RATE / 2)  # two-sided bound of the statistical checks
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def _sentences(g, n, seed=1):
    return np.concatenate([b.tokens for b in generate_sentences(g, n, seed=seed)])


def _token_changes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sentence fraction of changed tokens [N]."""
    return (a != b).mean(axis=1)


def _agree(x: np.ndarray, y: np.ndarray) -> None:
    """Two independent estimates of the same mean: |difference| within Z combined standard errors."""
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    assert abs(x.mean() - y.mean()) < Z * max(se, 1e-3), (x.mean(), y.mean(), se)


def test_library_paths_agree_with_the_exact_denoiser():
    """generate(from_tokens) and the experiment's model sampler, both with BP as the model:
    the token change fraction and the grammatical fraction agree at a mid and a tiny noise."""
    g = draw_grammar(3, 2, 8, 2, seed=3)
    x0 = _sentences(g, 600)
    model = exact_model(g, UniformConfig(T=20, schedule="linear-alpha"))
    parser = Parser(g)
    for noise in (0.02, 0.4):
        out = generate(model, SampleConfig(num=0, seed=4, noise=noise, batch_size=128), from_tokens=x0)
        (res,) = forward_backward(g, [x0], [noise], model.process, seed=5, sampler=model_sampler(model))
        ours = _token_changes(out, x0)
        # The experiment reports means only; its per-sentence spread is that of a binomial mean.
        p = res.changed[0]
        assert abs(ours.mean() - p) < Z * math.sqrt(ours.var(ddof=1) / len(ours) + p * (1 - p) / (8 * len(x0)) + 1e-8)
        g_ours = parser.parse(out).grammatical.mean()
        sd = math.sqrt(2 * max(g_ours * (1 - g_ours), 1e-3) / len(x0))
        assert abs(g_ours - res.grammatical) < Z * sd
    # E = 0.02 is below the first level (0.05): nothing is denoised, so x̂0 = x_t and exactly the
    # corruption shows: a token changes with probability E (v-1)/v.
    many = np.tile(_sentences(g, 1000), (4, 1))
    out = generate(model, SampleConfig(num=0, seed=6, noise=0.02), from_tokens=many)
    changed = _token_changes(out, many)
    expected = 0.02 * (g.vocab - 1) / g.vocab
    assert abs(changed.mean() - expected) < Z * math.sqrt(expected * (1 - expected) / changed.size / 8)
    assert changed.mean() > 0.5 * expected  # the old nearest-level path gave exactly 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A grammar, 400 clean sentences, and a barely trained checkpoint on them (T = 20)."""
    from cgtools.grammar.source import resolve_grammar
    from cgtools.models.unet import UNetConfig
    from cgtools.training.config import TrainConfig
    from cgtools.training.loop import train
    from cgtools.training.presets import RunConfig

    root = tmp_path_factory.mktemp("fb-paths")
    data = root / "data.parquet"
    assert run("rhm-gen", "-L", 3, "-s", 2, "-v", 8, "-m", 2, "-n", 400, "--seed", 0, "-o", data).exit_code == 0
    table = SequencesTable(open_input(data))
    g = resolve_grammar(None, table)
    tokens = table.read_column(length=g.length)
    run_cfg = RunConfig("unet", UNetConfig(vocab=g.vocab, depth=g.depth, branching=g.branching, width=16),
                        UniformConfig(T=20, schedule="linear-alpha"),
                        TrainConfig(steps=4, batch_size=8, lr=0.5, eval_every=4, sample_check=0, val_repeats=1))
    train(run_cfg, root / "run", train_tokens=tokens, val_tokens=tokens[:50], grammar=g, provenance={})
    return data, root / "run" / "model.safetensors", tokens


@pytest.mark.parametrize("noise", [0.02, 0.5])
def test_cli_sample_from_and_forward_backward_agree(files, tmp_path, noise):
    """The two commands on the same checkpoint and data: same token change fraction (statistically;
    their random streams differ), and at E = 0.02 both equal the exact corruption rate."""
    data, ckpt, tokens = files
    out = tmp_path / "fb.parquet"
    res = run("sample", ckpt, "--from", data, "--noise", noise, "--seed", 1, "-o", out)
    assert res.exit_code == 0, res.stderr
    ours = _token_changes(SequencesTable(open_input(out)).read_column(length=8), tokens)
    res = run("forward-backward", data, "--noise", noise, "--denoiser", ckpt, "--repeats", 4,
              "--seed", 2, "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    theirs = json.loads(res.stdout)
    p = theirs["changed"][0]
    se = math.sqrt(ours.var(ddof=1) / len(ours) + p * (1 - p) / (8 * theirs["n"]) + 1e-8)
    assert abs(ours.mean() - p) < Z * se, (ours.mean(), p)
    if noise < 0.05:
        expected = noise * 7 / 8
        for value, count in ((ours.mean(), ours.size * 8), (p, theirs["n"] * 8)):
            assert abs(value - expected) < Z * math.sqrt(expected * (1 - expected) / count)
