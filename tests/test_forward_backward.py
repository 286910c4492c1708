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
from tests.helpers import TEST_FAILURE_RATE, noise_process
from tests.test_bp import all_trees

Z = stats.norm.isf(TEST_FAILURE_RATE / 2)  # two-sided bound of the statistical checks


pytestmark = pytest.mark.usefixtures("one_thread")


def sentences(g, n, seed=1):
    return np.concatenate([b.tokens for b in generate_sentences(g, n, seed=seed)])


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_no_noise_changes_nothing(process):
    g = draw_grammar(3, 2, 8, 2, 4, seed=0)
    (r,) = forward_backward(g, [sentences(g, 300)], [0.0], noise_process(process, g.vocab))
    assert r.changed == [0.0] * 4 and r.root_kept == 1.0 and r.grammatical == 1.0
    assert r.changed_expected == pytest.approx([0.0] * 4, abs=1e-6)
    assert r.susceptibility == 0.0 and r.n == 300


def test_full_uniform_noise_keeps_the_root_with_probability_one_over_n_classes():
    g = draw_grammar(3, 2, 8, 2, 4, seed=1)
    (r,) = forward_backward(g, [sentences(g, 500)], [1.0], noise_process("uniform", g.vocab), repeats=8)
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
    (r,) = forward_backward(g, [data], [1.0], noise_process("masked", g.vocab), repeats=400)
    clean = Parser(g).parse(data).symbols
    for level in range(g.depth + 1):
        prior = np.stack([(trees[level] == a).mean(0) for a in range(g.symbols(level))], -1)  # [w, n]
        kept = np.take_along_axis(prior[None], clean[level][..., None], -1)[..., 0].mean()
        assert r.changed_expected[level] == pytest.approx(1 - kept, abs=1e-6)
        sd = math.sqrt(kept * (1 - kept) / r.n)  # per draw, a mean of w_l indicators: var <= p(1-p)
        assert abs(r.changed[level] - (1 - kept)) < Z * sd + 1e-9


def test_sampled_changes_agree_with_posterior_expectation():
    g = draw_grammar(4, 2, 8, 2, seed=3)
    res = forward_backward(g, [sentences(g, 2000)], [0.2, 0.5], noise_process("uniform", g.vocab))
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
    a = forward_backward(g, [data], [0.3], noise_process("uniform", g.vocab), seed=5)[0]
    b = forward_backward(g, [data[:123], data[123:]], [0.1, 0.3, 0.9], noise_process("uniform", g.vocab), seed=5)[1]
    assert a.to_json() == b.to_json()
    c = forward_backward(g, [data], [0.3], noise_process("uniform", g.vocab), seed=6)[0]
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
    low, mid = forward_backward(g, [sentences(g, 1500)], [0.02, 0.5], noise_process("uniform", g.vocab))
    assert mid.susceptibility > 5 * max(low.susceptibility, 1e-3)
    assert mid.correlation[1] > 0  # neighbours (same level-1 parent) change together
    assert len(mid.correlation) == g.length and mid.distance == list(range(g.length))
    (none,) = forward_backward(g, [sentences(g, 50)], [0.5], noise_process("uniform", g.vocab), correlation="none")
    assert none.correlation == [] and none.susceptibility is None


def test_trained_model_hook_counts_invalid_latents_as_changed():
    """The token-level hook: an 'identity denoiser' returns x_t itself; at E = 1 most outputs
    are ungrammatical and their unparsable latents count as changed."""
    g = draw_grammar(3, 2, 8, 2, seed=6)
    uniform = noise_process("uniform", g.vocab)
    identity = tokens_sampler(g, lambda x0, noise, gen: uniform.corrupt(x0, noise, gen))
    data = sentences(g, 400)
    zero, full = forward_backward(g, [data], [0.0, 1.0], noise_process("uniform", g.vocab), sampler=identity)
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
        forward_backward(g, [bad], [0.5], noise_process("uniform", g.vocab))
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [1.5], noise_process("uniform", g.vocab))
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [0.5], noise_process("uniform", g.vocab), correlation="spearman")
    with pytest.raises(ConfigError):
        forward_backward(g, [sentences(g, 3)], [0.5], noise_process("uniform", g.vocab), repeats=0)


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


def load_data(path):
    """(grammar, tokens [N, d]) of a sequences table, read as the library reads it."""
    from cgtools.formats.files import open_input
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import resolve_grammar

    table = SequencesTable(open_input(str(path)))
    g = resolve_grammar(None, table)
    return g, table.read_column(length=g.length)


def test_cli_single_noise_json_contract(data):
    """The JSON line is the library's result for the same sentences, noise and seed (was: range
    checks only); the plain table prints the same numbers."""
    res = run("forward-backward", data, "--noise", 0.3, "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["changed"]) == 4 and out["noise"] == 0.3 and out["n"] == 200
    assert len(out["correlation"]) == 8
    assert "susceptibility" in out and out["process"] == "uniform"
    g, tokens = load_data(data)
    (lib,) = forward_backward(g, [tokens], [0.3], noise_process("uniform", g.vocab), seed=0)
    assert out == json.loads(json.dumps(lib.to_json()))  # same computation: equal to the bit
    assert out["root_kept"] == pytest.approx(1 - out["changed"][-1], abs=1e-15)
    assert out["susceptibility"] == pytest.approx(sum(out["correlation"][1:]), rel=1e-12)
    # a different seed gives other draws: the equality above is not trivially met
    (other,) = forward_backward(g, [tokens], [0.3], noise_process("uniform", g.vocab), seed=1)
    assert other.changed != out["changed"]
    res = run("forward-backward", data, "--noise", 0.3, "--threads", 1)
    assert res.exit_code == 0, res.stderr
    header, row = (line.split() for line in res.stdout.strip().splitlines())
    assert header == ["noise", "changed_0", "changed_1", "changed_2", "changed_3", "root_kept", "chi"]
    expected = [0.3, *out["changed"], out["root_kept"], out["susceptibility"]]
    assert [float(x) for x in row] == pytest.approx(expected, abs=5.1e-5)  # printed to 4 decimals


def test_cli_full_noise_draws_from_the_prior(data):
    """Uniform noise at E = 1 erases x_t's information: BP's x̂0 is a prior sample independent of
    x0, so a token is kept with probability prior_i(x0_i), the prior marginal of its clean symbol
    (enumerated over all 1024 derivations). changed_expected[0] = 1 - mean_i,x0 prior_i(x0_i)
    exactly; changed[0] is a mean over n = 200 sentences x 4 draws of per-sentence means of
    indicators, within Z sqrt(p(1 - p)/n) of it (false alarm TEST_FAILURE_RATE). (The closed form
    (v-1)/v = 7/8 assumes uniform token marginals; with m = 2 this grammar's are far from uniform,
    p = 0.80, so the enumerated prior is the reference.) The root is kept w.p. 1/n_classes."""
    res = run("forward-backward", data, "--noise", 1, "--repeats", 4, "--json", "--seed", 3)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    g, tokens = load_data(data)
    leaves = all_trees(g)[0]  # [N, d], all derivations equally likely
    prior = np.stack([(leaves == a).mean(0) for a in range(g.vocab)], -1)  # [d, v]
    kept = prior[np.arange(g.length), tokens].mean()
    assert out["n"] == 800
    assert out["changed_expected"][0] == pytest.approx(1 - kept, abs=1e-9)
    p = 1 - kept
    assert abs(out["changed"][0] - p) < Z * math.sqrt(p * (1 - p) / out["n"])
    assert out["root_kept_expected"] == pytest.approx(1 / g.n_classes, abs=1e-9)


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
    assert meta["schema"] == "results/1" and meta["kind"] == "forward-backward"
    assert meta["grammar"]["depth"] == 3
    assert meta["provenance"]["seed"] == 2
    res = run("forward-backward", data, "--noise", "0.1,0.2", "--json")
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 0 and [json.loads(x)["noise"] for x in lines] == [0.1, 0.2]
    res = run("forward-backward", data, "--noise", "0.1", "-o", out)
    assert res.exit_code == 1 and "exists" in res.stderr


def test_cli_errors(data, tmp_path):
    res = run("forward-backward", data, "--denoiser", tmp_path / "model.safetensors")
    assert res.exit_code == 1 and "no such file" in res.stderr
    res = run("forward-backward", data, "--noise", "2")
    assert res.exit_code == 1 and "[0, 1]" in res.stderr
    res = run("forward-backward", data, "--noise", "0:1")
    assert res.exit_code == 1 and "START:STOP:COUNT" in res.stderr
    res = run("forward-backward", data, "--process", "poisson")
    assert res.exit_code == 2
    res = run("forward-backward", data, "--process", "gaussian")  # registered, but BP needs token noise
    assert res.exit_code == 1 and "gaussian" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---- trained-model denoisers -----------------------------------------------------------------------
def _tiny_checkpoint(run_dir, data_path, process):
    """A barely trained model (a few SGD/Adam steps, width 16) on DATA's grammar: the wiring is
    under test here, not the quality of the model."""
    from cgtools.diffusion import MaskedConfig, UniformConfig
    from cgtools.formats.files import open_input
    from cgtools.formats.sequences import SequencesTable
    from cgtools.grammar.source import resolve_grammar
    from cgtools.models.unet import UNetConfig
    from cgtools.training.presets import RunConfig
    from cgtools.training.config import TrainConfig
    from cgtools.training.loop import train

    table = SequencesTable(open_input(data_path))
    g = resolve_grammar(None, table)
    tokens = table.read_column(length=g.length)
    masked = process == "masked"
    model = UNetConfig(vocab=g.vocab, input_vocab=g.vocab + masked, depth=g.depth, branching=g.branching,
                       width=16, time_embedding=not masked)
    proc = MaskedConfig(T=20) if masked else UniformConfig(T=20, schedule="linear-alpha")
    cfg = TrainConfig(steps=4, batch_size=8, optimizer="adam" if masked else "sgd", lr=0.01 if masked else 0.5,
                      eval_every=4, sample_check=0, val_repeats=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(RunConfig("unet", model, proc, cfg), run_dir, train_tokens=tokens[:150], val_tokens=tokens[150:], grammar=g,
              provenance={})
    finally:
        torch.set_num_threads(threads)
    return run_dir / "model.safetensors"


@pytest.fixture(scope="module")
def model_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("fb-model") / "data.parquet"
    res = run("rhm-gen", "-L", 3, "-s", 2, "-v", 8, "-m", 2, "-n", 200, "--seed", 0, "-o", path)
    assert res.exit_code == 0, res.stderr
    return path


@pytest.fixture(scope="module")
def checkpoints(model_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fb-ckpt")
    return {p: _tiny_checkpoint(root / p, model_data, p) for p in ("uniform", "masked")}


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_cli_model_denoiser_at_zero_noise_changes_nothing(model_data, checkpoints, process):
    res = run("forward-backward", model_data, "--noise", 0, "--denoiser", checkpoints[process],
              "--process", process, "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["changed"] == [0.0] * 4 and out["root_kept"] == 1.0 and out["grammatical"] == 1.0
    assert out["changed_expected"] is None and out["n"] == 200


def test_cli_model_denoiser_results_and_metadata(model_data, checkpoints, tmp_path):
    import hashlib

    ckpt = checkpoints["uniform"]
    out = tmp_path / "fb.parquet"
    res = run("forward-backward", model_data, "--noise", "0,0.5,1", "--denoiser", ckpt, "--sampling-steps", 5,
              "--limit", 64, "--repeats", 2, "--threads", 1, "-o", out)
    assert res.exit_code == 0, res.stderr
    table = pq.read_table(out)
    assert table.num_rows == 3 and table.column("n").to_pylist() == [128] * 3
    # was: 0 <= changed, grammatical <= 1 only. Now every row equals the library's experiment
    # with the same model, sentences (the first 64), steps, repeats and seed, and the JSON lines
    # of the same command equal the table's rows.
    from cgtools.inference.forward_backward import model_sampler
    from cgtools.training.trained import load_model

    g, tokens = load_data(model_data)
    model = load_model(str(ckpt))
    lib = forward_backward(g, [tokens[:64]], [0.0, 0.5, 1.0], model.process, seed=0, repeats=2,
                           sampler=model_sampler(model, g, steps=5))
    rows = table.to_pylist()
    for row, r in zip(rows, lib):
        expected = r.to_json()
        assert expected.pop("correlation_mode") == "covariance"  # table metadata, not a column
        assert {k: row[k] for k in expected} == expected
        assert [row[f"changed_{level}"] for level in range(4)] == row["changed"]
        assert row["root_kept"] == 1 - row["changed"][-1]
    assert rows[2]["changed"][-1] > 0 and rows[2]["grammatical"] < 1  # E = 1 really changes sentences
    res = run("forward-backward", model_data, "--noise", "0,0.5,1", "--denoiser", ckpt, "--sampling-steps", 5,
              "--limit", 64, "--repeats", 2, "--threads", 1, "--json")
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert lines == [json.loads(json.dumps(r.to_json())) for r in lib]
    assert [{k: row[k] for k in line if k != "correlation_mode"} for line, row in zip(lines, rows)] == \
        [{k: v for k, v in line.items() if k != "correlation_mode"} for line in lines]
    assert table.column("changed_expected").to_pylist() == [None] * 3
    assert table.column("root_kept_expected").to_pylist() == [None] * 3
    assert table.column("changed_0").to_pylist()[0] == 0.0
    meta = json.loads(table.schema.metadata[b"cgtools"])
    assert meta["denoiser"] == str(ckpt) and meta["correlation"] == "covariance" and meta["repeats"] == 2
    assert meta["model"]["steps"] == 5 and meta["model"]["final_step"] == "argmax"
    assert meta["model"]["process"]["process"] == "uniform" and meta["model"]["process"]["T"] == 20
    assert meta["provenance"]["inputs"][str(ckpt)] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # BP runs keep recording "bp"
    res = run("forward-backward", model_data, "--noise", 0.5, "--limit", 16, "-o", tmp_path / "bp.parquet")
    assert res.exit_code == 0, res.stderr
    assert json.loads(pq.read_table(tmp_path / "bp.parquet").schema.metadata[b"cgtools"])["denoiser"] == "bp"


def _one_line_error(res, text):
    assert res.exit_code == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools forward-backward: error:"), res.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("trained, asked", [("uniform", "masked"), ("masked", "uniform")])
def test_cli_model_process_must_match(model_data, checkpoints, tmp_path, trained, asked):
    out = tmp_path / "fb.parquet"
    res = run("forward-backward", model_data, "--noise", 0.3, "--denoiser", checkpoints[trained],
              "--process", asked, "-o", out)
    _one_line_error(res, f"was trained with {trained} diffusion; use --process {trained}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_model_grammar_must_match(checkpoints, tmp_path):
    other = tmp_path / "other.parquet"
    res = run("rhm-gen", "-L", 3, "-s", 2, "-v", 8, "-m", 2, "-n", 50, "--seed", 1, "-o", other)
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "fb.parquet"
    res = run("forward-backward", other, "--noise", 0.3, "--denoiser", checkpoints["uniform"], "-o", out)
    _one_line_error(res, "different grammar")
    assert not out.exists()
    # --grammar says which grammar to use: the checkpoint's is then not compared
    res = run("forward-backward", other, "--grammar", other, "--noise", 0.3, "--denoiser",
              checkpoints["uniform"], "--json", "--threads", 1)
    assert res.exit_code == 0, res.stderr
    # a grammar with another vocabulary cannot be denoised by this model at all
    wide = tmp_path / "wide.parquet"
    assert run("rhm-gen", "-L", 3, "-s", 2, "-v", 6, "-m", 2, "-n", 20, "-o", wide).exit_code == 0
    res = run("forward-backward", wide, "--grammar", wide, "--denoiser", checkpoints["uniform"])
    _one_line_error(res, "predicts 8 symbols but the grammar has v = 6")


def test_cli_model_options(model_data, checkpoints, tmp_path):
    res = run("forward-backward", model_data, "--sampling-steps", 5)
    assert res.exit_code == 2 and "--sampling-steps" in res.stderr  # meaningless for BP
    res = run("forward-backward", model_data, "--device", "cuda")
    assert res.exit_code == 2 and "--device" in res.stderr
    res = run("forward-backward", model_data, "--denoiser", checkpoints["uniform"], "--device", "tpu")
    assert res.exit_code == 2
    res = run("forward-backward", model_data, "--denoiser", checkpoints["uniform"], "--sampling-steps", 21)
    _one_line_error(res, "1..T = 20")
    if not torch.cuda.is_available():
        res = run("forward-backward", model_data, "--denoiser", checkpoints["uniform"], "--device", "cuda")
        _one_line_error(res, "no CUDA device")
    res = run("forward-backward", model_data, "--denoiser", tmp_path / "missing.safetensors")
    _one_line_error(res, "no such file")
    res = run("forward-backward", model_data, "--denoiser", model_data)
    _one_line_error(res, "not a safetensors checkpoint")


def test_model_sampler_starts_at_the_closest_level():
    """Uniform, T = 20 linear-alpha (1 - ᾱ_t = t/20): E = 0.02 is closer to level 0 than to level 1
    (0.05), so x̂0 = x_t; E = 0.3 starts at level 6 and really denoises: from 256 sentences whose
    first token is wrong, corrupted at 0.3, the 20-level reverse chain with BP cavities gives
    grammatical sentences at a rate of about 0.87 (the factorised reverse steps of a short chain
    are not an exact posterior sampler), against under 0.2 for its input."""
    from cgtools.diffusion import UniformConfig
    from cgtools.inference.forward_backward import model_sampler
    from cgtools.training.generate import exact_model

    g = draw_grammar(3, 2, 8, 2, seed=8)
    model = exact_model(g, UniformConfig(T=20, schedule="linear-alpha", decoder="posterior"))
    assert model.process.time_for_corruption(0.02) == 0 and model.process.time_for_corruption(0.3) == 6
    sampler = model_sampler(model)
    x_t = torch.from_numpy(sentences(g, 256))
    x_t[:, 0] = (x_t[:, 0] + 1) % g.vocab  # ungrammatical
    # the sampler corrupts at exactly E, then (E = 0.02: nothing to denoise) returns x_t as drawn
    corrupted = model.process.corrupt(x_t, 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(sampler.denoise_tokens(x_t, 0.02, torch.Generator().manual_seed(0)), corrupted)
    gen = torch.Generator().manual_seed(0)
    out = sampler.denoise_tokens(x_t, 0.3, gen)
    assert Parser(g).parse(x_t.numpy()).grammatical.mean() < 0.2  # a few land on a synonym
    assert out.shape == x_t.shape and Parser(g).parse(out.numpy()).grammatical.mean() > 0.8


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_model_path_with_the_exact_denoiser_reproduces_bp(process):
    """The model path with a perfect 'model' (BP cavities as the x0 prediction, T = 200) is a
    near-exact posterior sampler, so its `changed` must agree with exact BP sampling on the same
    x_t. Bound: each estimate is a mean over n sentences of a per-sentence mean of change
    indicators, variance <= p(1 - p)/n with p = BP's changed_expected; the two are compared at
    4 combined standard errors (false alarm < 1e-4 per level for independent estimates; the shared
    x_t only make them closer). The uniform decoder is "posterior": with the cavity as p̂ it is the
    exact t = 1 -> 0 marginal ("x0" would take the cavity's argmax and ignore the token itself).
    Power: returning x_t unchanged fails both the grammaticality and the root bound."""
    from cgtools.diffusion import MaskedConfig, UniformConfig
    from cgtools.inference.forward_backward import check_model, model_sampler
    from cgtools.training.generate import exact_model

    g = draw_grammar(3, 2, 8, 2, seed=3)
    data = sentences(g, 400)
    cfg = (UniformConfig(T=200, schedule="linear-alpha", decoder="posterior") if process == "uniform"
           else MaskedConfig(T=200))
    model = exact_model(g, cfg)
    check_model(model, g, process)
    (bp,) = forward_backward(g, [data], [0.3], noise_process(process, g.vocab), seed=9)
    (fb,) = forward_backward(g, [data], [0.3], noise_process(process, g.vocab), seed=9, sampler=model_sampler(model, g))
    (identity,) = forward_backward(g, [data], [0.3], noise_process(process, g.vocab), seed=9,
                                   sampler=tokens_sampler(g, lambda x0, e, gen: model.process.corrupt(
                                       x0, e, gen).clamp(max=g.vocab - 1)))
    assert fb.changed_expected is None and fb.n == bp.n == 400
    assert fb.grammatical >= 0.9 and identity.grammatical < 0.5
    for level in range(g.depth + 1):
        p = bp.changed_expected[level]
        tol = 4 * math.sqrt(2 * max(p * (1 - p), 1e-4) / bp.n)
        assert abs(fb.changed[level] - bp.changed[level]) < tol, (level, fb.changed, bp.changed)
    p = bp.changed_expected[-1]
    assert identity.changed[-1] - bp.changed[-1] > 4 * math.sqrt(2 * p * (1 - p) / bp.n)


def test_check_model_refusals():
    from cgtools.diffusion import MaskedConfig, UniformConfig
    from cgtools.inference.forward_backward import check_model
    from cgtools.training.generate import exact_model

    g = draw_grammar(3, 2, 8, 2, seed=3)
    model = exact_model(g, UniformConfig(T=20, schedule="linear-alpha"))
    with pytest.raises(ConfigError, match="trained with uniform diffusion; use --process uniform"):
        check_model(model, g, "masked", where="CKPT")
    with pytest.raises(ConfigError, match="trained with masked diffusion"):
        check_model(exact_model(g, MaskedConfig(T=20)), g, "uniform")
    other = draw_grammar(3, 2, 8, 2, seed=4)
    with pytest.raises(InputError, match="different grammar"):
        check_model(model, other, "uniform")
    check_model(model, other, "uniform", same_grammar=False)
    with pytest.raises(InputError, match="predicts 8 symbols"):
        check_model(model, draw_grammar(3, 2, 6, 2, seed=4), "uniform", same_grammar=False)
    model.grammar = None
    with pytest.raises(InputError, match="carries no grammar"):
        check_model(model, g, "uniform")


def test_old_flag_spellings_still_work_with_one_deprecation_line(model_data, checkpoints):
    """--steps and -n/--num were renamed (--sampling-steps, --limit: one meaning per flag across
    commands); for one release the old spellings give the same result plus a line on stderr."""
    new = run("forward-backward", model_data, "--noise", 0.5, "--denoiser", checkpoints["uniform"],
              "--sampling-steps", 5, "--limit", 16, "--json", "--threads", 1)
    old = run("forward-backward", model_data, "--noise", 0.5, "--denoiser", checkpoints["uniform"],
              "--steps", 5, "-n", 16, "--json", "--threads", 1)
    assert new.exit_code == old.exit_code == 0, old.stderr
    assert json.loads(new.stdout) == json.loads(old.stdout)
    warnings = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert len(warnings) == 2 and "--sampling-steps" in warnings[0] and "--limit" in warnings[1]
    assert "deprecated" not in new.stderr
