"""The seams: the process and architecture registries, presets as the one place for defaults,
checkpoints that name their architecture, and training on data without a grammar."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.diffusion import (PROCESSES, MaskedConfig, MaskedDiffusion, UniformConfig, UniformDiffusion,
                               make_config, make_process, process_from_json)
from cgtools.diffusion.base import CategoricalProcess, Process
from cgtools.errors import ConfigError, SchemaError
from cgtools.formats.checkpoint import Checkpoint
from cgtools.formats.files import open_input
from cgtools.formats.sequences import SequencesWriter, sequences_meta
from cgtools.models import registry as arch_registry
from cgtools.models.registry import ARCHITECTURES, Architecture, DataSpec
from cgtools.training.config import TrainConfig
from cgtools.training.loop import train
from cgtools.training.presets import PRESETS, RunConfig, process_config, resolve_run
from cgtools.training.trained import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
RHM = DataSpec(vocab=8, length=8, depth=3, branching=2)


def test_every_registered_process_implements_the_whole_interface():
    for name, cls in PROCESSES.items():
        assert cls.name == name and cls.Config.process == name
        assert issubclass(cls, Process) and not getattr(cls, "__abstractmethods__", None)
        proc = make_process(make_config(name), 6)
        assert isinstance(proc, CategoricalProcess) == (name in ("uniform", "masked"))
        assert process_from_json(proc.config.to_json(), 6).describe() == proc.describe()
    with pytest.raises(ConfigError, match="unknown diffusion process 'poisson'"):
        make_config("poisson")
    with pytest.raises(ConfigError, match="unknown masked diffusion setting"):
        make_config("masked", {"beta_min": 0.1})


def test_corrupt_draws_exactly_e_for_both_processes():
    """corrupt(x0, E): uniform changes a token with probability E (K-1)/K, masking with E;
    E may differ per row. Bound: 5 standard errors of a binomial mean over 200,000 tokens."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 8, (2000, 100), generator=gen)
    e = torch.tensor([0.1] * 1000 + [0.7] * 1000, dtype=torch.float64)
    for proc, rate in ((make_process(UniformConfig(), 8), 7 / 8), (make_process(MaskedConfig(), 8), 1.0)):
        x_t = proc.corrupt(x0, e, gen)
        for rows, level in ((slice(0, 1000), 0.1), (slice(1000, 2000), 0.7)):
            p = level * rate
            got = (x_t[rows] != x0[rows]).double().mean().item()
            assert abs(got - p) < 5 * (p * (1 - p) / 100_000) ** 0.5
        assert torch.equal(proc.corrupt(x0, 0.0, gen), x0)


def test_leaf_evidence_layouts_agree():
    gen = torch.Generator().manual_seed(1)
    for proc in (make_process(UniformConfig(), 5), make_process(MaskedConfig(), 5)):
        x = torch.randint(0, proc.input_vocab, (7, 4), generator=gen)
        e = torch.rand(7, dtype=torch.float64, generator=gen)
        a, ca = proc.leaf_evidence(x, e, torch.float64)
        b, cb = proc.leaf_evidence(x, e, torch.float64, symbols_first=True)
        assert torch.equal(a.permute(2, 1, 0), b) and torch.equal(ca, cb)
        # λ_i(a) = p(x_t_i | x0_i = a): rows are likelihoods of the observation, not distributions
        direct = torch.empty_like(a)
        for i in range(7):
            for j in range(4):
                for sym in range(5):
                    obs = int(x[i, j])
                    if proc.mask_id is None:
                        direct[i, j, sym] = (1 - e[i]) * (obs == sym) + e[i] / 5
                    else:
                        direct[i, j, sym] = 1.0 if obs == proc.mask_id else float(obs == sym)
        assert torch.allclose(a, direct)


def test_presets_are_the_one_place_for_defaults_and_settings_are_routed_by_name():
    run = resolve_run("cpu", process="masked", arch="unet", data=RHM, settings={"T": 50, "width": 32})
    assert run.process == MaskedConfig(T=50) and run.model.width == 32 and run.model.input_vocab == 9
    assert run.train.steps == PRESETS["cpu"]["train"]["steps"]
    with pytest.raises(ConfigError, match="--beta-min does not apply to masked diffusion with the unet"):
        resolve_run("cpu", process="masked", arch="unet", data=RHM, settings={"beta_min": 0.1})
    # the masked process reads its own preset section (it used to drop the preset's process section)
    saved = PRESETS["cpu"]["process"]["masked"]
    PRESETS["cpu"]["process"]["masked"] = {"t_min": 0.01}
    try:
        assert resolve_run("cpu", process="masked", arch="unet", data=RHM, settings={}).process.t_min == 0.01
        assert process_config("cpu", "masked").t_min == 0.01
    finally:
        PRESETS["cpu"]["process"]["masked"] = saved
    # sample --denoiser bp without a checkpoint takes the preset's process settings
    assert process_config("cpu", "uniform", {"T": None}) == UniformConfig(T=100, schedule="linear-alpha",
                                                                         lambda_ce=0.01)
    with pytest.raises(ConfigError, match="unknown architecture"):
        resolve_run("cpu", process="uniform", arch="perceiver", data=RHM, settings={})


# ---- a new architecture is one module plus one registry line ------------------------------------
@dataclass(frozen=True)
class _BagConfig:
    vocab: int
    input_vocab: int
    length: int
    hidden: int = 8

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, obj):
        return cls(**(json.loads(obj) if isinstance(obj, str) else obj))


class _Bag(nn.Module):
    """A toy network: per-position embedding plus the mean of the sequence; ignores t."""

    def __init__(self, config: _BagConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(config.input_vocab, config.hidden, generator=gen) * 0.1)
        self.out = nn.Parameter(torch.randn(2 * config.hidden, config.vocab, generator=gen) * 0.1)

    def forward(self, x_t, t):
        h = self.embed[x_t]  # [B, d, h]
        ctx = h.mean(1, keepdim=True).expand_as(h)
        return torch.cat([h, ctx], -1) @ self.out  # [B, d, K]


_BAG = Architecture(
    name="bag", config_class=_BagConfig, settings=frozenset({"hidden"}),
    configure=lambda data, process, settings: _BagConfig(process.vocab, process.input_vocab, data.length, **settings),
    build=lambda config, process, seed: _Bag(config, seed))


def _text_table(path, tokens):
    """A sequences table with no grammar (as text tokenisation writes)."""
    with open(path, "wb") as sink:
        writer = SequencesWriter(sink, length=tokens.shape[1], vocab=int(tokens.max()) + 1,
                                 meta=sequences_meta(None, {}))
        writer.write(tokens)
        writer.close()


def test_a_registered_architecture_trains_samples_and_reloads_from_its_name(tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "bag", _BAG)
    gen = np.random.default_rng(0)
    tokens = gen.integers(0, 5, (64, 6))
    _text_table(tmp_path / "train.parquet", tokens)
    _text_table(tmp_path / "val.parquet", tokens[:16])
    run = resolve_run("cpu", process="masked", arch="bag", data=DataSpec(vocab=5, length=6),
                      settings={"hidden": 4, "lr_scheme": "global", "lr": 0.01, "steps": 3, "batch_size": 8, "eval_every": 3, "sample_check": 0,
                                "val_repeats": 1})
    train(run, tmp_path / "run", train_tokens=tokens, val_tokens=tokens[:16], grammar=None, provenance={})
    ckpt = Checkpoint(open_input(tmp_path / "run" / "model.safetensors"))
    assert ckpt.meta["arch"] == "bag" and ckpt.meta["grammar"] is None
    model = load_model(str(tmp_path / "run" / "model.safetensors"))
    assert isinstance(model.network, _Bag) and model.network.config.hidden == 4
    assert isinstance(model.process, MaskedDiffusion) and model.length == 6
    # the CLI trains it too (no grammar: the vocabulary comes from the tokens), and samples it
    res = runner.invoke(app, ["train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
                              "-o", str(tmp_path / "cli"), "--arch", "bag", "--process", "masked",
                              "--steps", "2", "--eval-every", "2", "--batch-size", "8",
                              "--lr-scheme", "global", "--lr", "0.01", "--allow-overlap"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["sample", str(tmp_path / "cli" / "model.safetensors"), "-n", "4", "--sampling-steps", "3",
                              "-o", str(tmp_path / "s.parquet")])
    assert res.exit_code == 0, res.stderr


def test_checkpoints_name_their_architecture_and_old_ones_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from cgtools.grammar.rhm import draw_grammar
    from cgtools.grammar.sampling import generate_sentences
    from cgtools.models.unet import UNetConfig

    g = draw_grammar(2, 2, 4, 2, seed=0)
    toks = np.concatenate([b.tokens for b in generate_sentences(g, 16, 0)])
    cfg = RunConfig("unet", UNetConfig(vocab=4, depth=2, branching=2, width=8),
                    UniformConfig(T=10, schedule="linear-alpha"),
                    TrainConfig(steps=2, batch_size=4, eval_every=2, sample_check=0, val_repeats=1))
    train(cfg, tmp_path / "run", train_tokens=toks, val_tokens=toks[:4], grammar=g, provenance={})
    path = tmp_path / "run" / "model.safetensors"
    meta = Checkpoint(open_input(path)).meta
    assert meta["schema"] == "checkpoint/2" and meta["arch"] == "unet"
    # a checkpoint/1 file (no "arch") reads as the U-Net
    old = {k: v for k, v in meta.items() if k != "arch"}
    old["schema"] = "checkpoint/1"
    save_file(load_file(path), tmp_path / "old.safetensors", metadata={"cgtools": json.dumps(old)})
    model = load_model(str(tmp_path / "old.safetensors"))
    assert model.arch == "unet" and isinstance(model.process, UniformDiffusion)
    # an unknown architecture name is a schema error naming the file
    bad = dict(meta, arch="perceiver")
    save_file(load_file(path), tmp_path / "bad.safetensors", metadata={"cgtools": json.dumps(bad)})
    with pytest.raises(SchemaError, match="bad.safetensors: unknown architecture 'perceiver'"):
        load_model(str(tmp_path / "bad.safetensors"))


def test_the_unet_refuses_lengths_that_are_not_powers_of_its_branching():
    with pytest.raises(ConfigError, match="power of 2"):
        resolve_run("cpu", process="uniform", arch="unet", data=DataSpec(vocab=5, length=6), settings={})
    run = resolve_run("cpu", process="uniform", arch="unet", data=DataSpec(vocab=5, length=9),
                      settings={"branching": 3})
    assert (run.model.depth, run.model.branching) == (2, 3)
    with pytest.raises(ConfigError, match="contradicts the grammar"):
        resolve_run("cpu", process="uniform", arch="unet", data=RHM, settings={"branching": 3})
    assert arch_registry.architecture_names()[0] == "unet"


def test_the_cli_starts_without_importing_torch():
    """Registering every command imports their modules; torch (~3 s) must wait for a command that
    needs it, so `cgtools --help` and typos answer at once."""
    import subprocess
    import sys

    code = "import sys, cgtools.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
