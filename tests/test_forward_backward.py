"""The forward-backward experiment: limits, statistics, reproducibility and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.errors import ConfigError, InputError
from cgtools.grammar.parse import Parser
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.inference.forward_backward import change_correlation, forward_backward, tokens_sampler
from tests.helpers import TEST_FAILURE_RATE
from tests.test_bp import all_trees

Z = stats.norm.isf(TEST_FAILURE_RATE / 2)  # two-sided bound of the statistical checks


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentences(g, n, seed=1):
    return np.concatenate([b.tokens for b in generate_sentences(g, n, seed=seed)])


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_no_noise_changes_nothing(process):
    g = draw_grammar(3, 2, 8, 2, 4, seed=0)
    (r,) = forward_backward(g, [sentences(g, 300)], [0.0], process)
    assert r.changed == [0.0] * 4 and r.root_kept == 1.0 and r.grammatical == 1.0
    assert r.changed_expected == pytest.approx([0.0] * 4, abs=1e-6)
    assert r.susceptibility == 0.0 and r.n == 300


def test_full_uniform_noise_keeps_the_root_with_probability_one_over_n_classes():
    g = draw_grammar(3, 2, 8, 2, 4, seed=1)
    (r,) = forward_backward(g, [sentences(g, 500)], [1.0], "uniform", repeats=8)
    n = 1 / g.n_classes
    assert r.root_kept_expected == pytest.approx(n, abs=1e-6)  # the root posterior is the prior
    sd = math.sqrt(n * (1 - n) / r.n)
    assert abs(r.root_kept - n) < Z * sd


def test_full_masking_samples_from_the_prior():
    """Masked at E = 1: x̂0 is an unconditional sample, so a node is kept with probability equal
    to the prior probability of its clean symbol (computed here by enumeration)."""
    g = draw_grammar(2, 2, 3, 2, 2, seed=2)
    trees = all_trees(g)
    data = sentences(g, 12)  # a few distinct sentences, each repeated by --repeats
    (r,) = forward_backward(g, [data], [1.0], "masked", repeats=400)
    clean = Parser(g).parse(data).symbols
    for level in range(g.depth + 1):
        prior = np.stack([(trees[level] == a).mean(0) for a in range(g.symbols(level))], -1)  # [w, n]
        kept = np.take_along_axis(prior[None], clean[level][..., None], -1)[..., 0].mean()
        assert r.changed_expected[level] == pytest.approx(1 - kept, abs=1e-6)
        sd = math.sqrt(kept * (1 - kept) / r.n)  # per draw, a mean of w_l indicators: var <= p(1-p)
        assert abs(r.changed[level] - (1 - kept)) < Z * sd + 1e-9


def test_sampled_changes_agree_with_posterior_expectation():
    g = draw_grammar(4, 2, 8, 2, seed=3)
    res = forward_backward(g, [sentences(g, 2000)], [0.2, 0.5], "uniform")
    for r in res:
        for level in range(g.depth + 1):
            # per sentence, the mean of w_l change indicators has variance <= p(1 - p)
            p = r.changed_expected[level]
            sd = math.sqrt(max(p * (1 - p), 1e-4) / r.n)
            assert abs(r.changed[level] - p) < Z * sd
        assert r.changed[0] < r.changed[-1] or r.noise < 0.3  # the root changes most
    assert res[0].changed[-1] < res[1].changed[-1]


def test_results_are_reproducible_and_do_not_depend_on_the_sweep_or_batching():
    g = draw_grammar(3, 2, 8, 2, seed=4)
    data = sentences(g, 500)
    a = forward_backward(g, [data], [0.3], seed=5)[0]
    b = forward_backward(g, [data[:123], data[123:]], [0.1, 0.3, 0.9], seed=5)[1]
    assert a.to_json() == b.to_json()
    c = forward_backward(g, [data], [0.3], seed=6)[0]
    assert c.changed != a.changed


def test_change_correlation_definitions():
    # two equally likely patterns: tokens (0,1) change together, or (2,3) do
    c = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=float)
    mean, second = c.mean(0), c.T @ c / 2
    dist, cov = change_correlation(mean, second)
    assert dist.tolist() == [0, 1, 2, 3]
    assert cov == pytest.approx([0.25, (0.25 - 0.25 + 0.25) / 3, -0.25, -0.25])
    _, rho = change_correlation(mean, second, pearson=True)
    assert rho == pytest.approx([1.0, 1 / 3, -1.0, -1.0])
    # a constant indicator has no correlation
    _, rho = change_correlation(np.array([1.0, 0.5]), np.array([[1.0, 0.5], [0.5, 0.5]]), pearson=True)
    assert rho[1] == 0.0


def test_changes_come_in_correlated_blocks_near_the_transition():
    g = draw_grammar(4, 2, 8, 2, seed=5)
    low, mid = forward_backward(g, [sentences(g, 1500)], [0.02, 0.5], "uniform")
    assert mid.susceptibility > 5 * max(low.susceptibility, 1e-3)
    assert mid.correlation[1] > 0  # neighbours (same level-1 parent) change together
    assert len(mid.correlation) == g.length and mid.distance == list(range(g.length))
    (none,) = forward_backward(g, [sentences(g, 50)], [0.5], correlation="none")
    assert none.correlation == [] and none.susceptibility is None


def test_trained_model_hook_counts_invalid_latents_as_changed():
    """The token-level hook: an 'identity denoiser' returns x_t itself; at E = 1 most outputs
    are ungrammatical and their unparsable latents count as changed."""
    g = draw_grammar(3, 2, 8, 2, seed=6)
    identity = tokens_sampler(g, lambda x_t, noise, gen: x_t)
    data = sentences(g, 400)
    zero, full = forward_backward(g, [data], [0.0, 1.0], sampler=identity)
    assert zero.changed == [0.0] * 4 and zero.changed_expected is None
    assert full.grammatical < 0.05 and full.changed[-1] > 0.95
    assert full.changed[0] == pytest.approx(7 / 8, abs=0.03)


def test_user_errors():
    g = draw_grammar(3, 2, 8, 2, seed=7)
    bad = sentences(g, 3)
    bad[1, 0] = (bad[1, 0] + 1) % 8
    bad[1, 1] = (bad[1, 1] + 3) % 8
    if Parser(g).parse(bad).grammatical[1]:
        bad[1] = bad[1][::-1]
    with pytest.raises(InputError, match="sentence 1 is not grammatical"):
        forward_backward(g, [bad], [0.5])
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [1.5])
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [0.5], correlation="spearman")
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [0.5], repeats=0)


# ---- the command ---------------------------------------------------------------------------------
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.parquet"
    res = run("rhm-gen", "-L", 3, "-s", 2, "-v", 8, "-m", 2, "-n", 200, "--seed", 0, "-o", path)
    assert res.exit_code == 0, res.stderr
    return path


def test_cli_single_noise_json_contract(data):
    res = run("forward-backward", data, "--noise", 0.3, "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["changed"]) == 4 and out["noise"] == 0.3 and out["n"] == 200
    assert 0 <= out["root_kept"] <= 1 and len(out["correlation"]) == 8
    assert "susceptibility" in out and out["process"] == "uniform"


def test_cli_sweep_writes_one_row_per_noise_level(data, tmp_path):
    out = tmp_path / "sweep.parquet"
    res = run("forward-backward", data, "--noise", "0:1:5", "--process", "masked", "-o", out, "--seed", 2)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    table = pq.read_table(out)
    assert table.column("noise").to_pylist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert table.column("changed_0").to_pylist()[0] == 0.0
    assert {"changed", "changed_3", "root_kept", "susceptibility", "correlation"} <= set(table.column_names)
    meta = json.loads(table.schema.metadata[b"cgtools"])
    assert meta["schema"] == "forward-backward/1" and meta["grammar"]["depth"] == 3
    assert meta["provenance"]["seed"] == 2
    res = run("forward-backward", data, "--noise", "0.1,0.2", "--json")
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 0 and [json.loads(x)["noise"] for x in lines] == [0.1, 0.2]
    res = run("forward-backward", data, "--noise", "0.1", "-o", out)
    assert res.exit_code == 1 and "exists" in res.stderr


def test_cli_errors(data, tmp_path):
    res = run("forward-backward", data, "--denoiser", tmp_path / "model.safetensors")
    assert res.exit_code == 1 and "cgtools train" in res.stderr
    res = run("forward-backward", data, "--noise", "2")
    assert res.exit_code == 1 and "[0, 1]" in res.stderr
    res = run("forward-backward", data, "--noise", "0:1")
    assert res.exit_code == 1 and "START:STOP:COUNT" in res.stderr
    res = run("forward-backward", data, "--process", "gaussian")
    assert res.exit_code == 2
