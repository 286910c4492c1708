"""The training loop: exact resume, DDP equivalence, early stopping, data streams, checkpoints."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.diffusion import MaskedConfig, UniformConfig
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.models.unet import UNetConfig
from cgtools.models.registry import DataSpec
from cgtools.training.config import TrainConfig
from cgtools.training.presets import RunConfig, resolve_run
from cgtools.training.data import OfflineData, OnlineData
from cgtools.training.loop import Trainer, log_spaced_steps, train
from cgtools.training.trained import load_model

runner = CliRunner()


def _data(grammar, n_train, n_val, seed=0):
    toks = np.concatenate([b.tokens for b in generate_sentences(grammar, n_train + n_val, seed)])
    return toks[:n_train], toks[n_train:]


def _configs(g, process="uniform", **train_kw):
    model = UNetConfig(vocab=g.vocab, input_vocab=g.vocab + (process == "masked"), depth=g.depth,
                       branching=g.branching, width=16, time_embedding=process == "uniform")
    proc = UniformConfig(T=20, schedule="linear-alpha") if process == "uniform" else MaskedConfig()
    kw = dict(steps=12, batch_size=8, lr=0.5, eval_every=4, sample_check=6, sample_steps=5,
              val_repeats=1)
    kw.update(train_kw)
    return model, proc, TrainConfig(**kw)


def _weights(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path).items() if k.startswith("model.")}


@pytest.mark.parametrize("process, extra", [("uniform", {}), ("masked", {"optimizer": "adam", "lr": 0.01}),
                                            ("uniform", {"ema": 0.9, "lr_schedule": "cosine", "warmup": 3})])
def test_resumed_run_ends_where_an_uninterrupted_one_would(tmp_path, process, extra):
    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model, proc, cfg = _configs(g, process, **extra)
    common = dict(train_tokens=tr, val_tokens=va, grammar=g, provenance={})
    full = train(RunConfig("unet", model, proc, cfg), tmp_path / "full", **common)
    part = train(RunConfig("unet", model, proc, cfg), tmp_path / "part", stop_after=7, **common)
    assert part.steps_done == 7
    resumed = train(RunConfig("unet", model, proc, cfg), tmp_path / "part", resume=True, **common)
    assert resumed.steps_done == full.steps_done == 12
    a, b = _weights(tmp_path / "full" / "last.safetensors"), _weights(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(full.metrics) == strip(resumed.metrics)
    assert [r["step"] for r in full.metrics] == [4, 8, 12]


def test_resume_refuses_other_settings(tmp_path):
    from cgtools.errors import ConfigError

    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model, proc, cfg = _configs(g)
    train(RunConfig("unet", model, proc, cfg), tmp_path, train_tokens=tr, val_tokens=va, grammar=g, provenance={}, stop_after=3)
    _, _, other = _configs(g, lr=0.3)
    with pytest.raises(ConfigError, match="different training settings"):
        train(RunConfig("unet", model, proc, other), tmp_path, train_tokens=tr, val_tokens=va, grammar=g, provenance={}, resume=True)


def test_early_stopping_keeps_the_best_model(tmp_path, monkeypatch):
    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model, proc, cfg = _configs(g, steps=40, patience=2)
    losses = iter([3.0, 1.0, 2.0, 2.5, 0.1])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(losses), "val_elbo_bits": 0.0})
    result = train(RunConfig("unet", model, proc, cfg), tmp_path, train_tokens=tr, val_tokens=va, grammar=g, provenance={})
    assert result.stopped_early and result.steps_done == 16 and result.best_step == 8
    meta = json.loads(_header(tmp_path / "model.safetensors")["__metadata__"]["cgtools"])
    assert meta["step"] == 8 and meta["best_val_loss"] == 1.0


def test_early_evals_validate_at_log_spaced_steps_and_keep_an_early_best(tmp_path, monkeypatch):
    # --early-evals 4 with --eval-every 100: validations at 1, 2, 3, 6, 10, 18, 32, 56 (10^(k/4)
    # rounded) and then every 100; the best model is the one of the lowest validation loss.
    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model, proc, cfg = _configs(g, steps=200, eval_every=100, early_evals=4)
    losses = iter([5.0, 4.0, 3.0, 2.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(losses), "val_elbo_bits": 0.0})
    result = train(RunConfig("unet", model, proc, cfg), tmp_path, train_tokens=tr, val_tokens=va, grammar=g, provenance={})
    assert [r["step"] for r in result.metrics] == [1, 2, 3, 6, 10, 18, 32, 56, 100, 200]
    assert result.best_step == 10
    meta = json.loads(_header(tmp_path / "model.safetensors")["__metadata__"]["cgtools"])
    assert meta["step"] == 10 and meta["best_val_loss"] == 0.5


def _header(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_checkpoints_are_safetensors_and_sample_needs_nothing_else(tmp_path):
    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model, proc, cfg = _configs(g, steps=10, checkpoints_per_decade=2)
    train(RunConfig("unet", model, proc, cfg), tmp_path / "run", train_tokens=tr, val_tokens=va, grammar=g, provenance={})
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [f"step_{s:08d}.safetensors" for s in sorted(log_spaced_steps(10, 2))]
    for path in [tmp_path / "run" / "model.safetensors", tmp_path / "run" / "last.safetensors",
                 *(tmp_path / "run" / "checkpoints").iterdir()]:
        raw = path.read_bytes()
        assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # not a pickle / torch zip
        meta = json.loads(_header(path)["__metadata__"]["cgtools"])
        assert meta["schema"] == "checkpoint/2" and meta["grammar"]["vocab"] == 4
        assert meta["arch"] == "unet"
    out = tmp_path / "s.parquet"
    res = runner.invoke(app, ["sample", str(tmp_path / "run" / "model.safetensors"), "-n", "5", "--sampling-steps", "4", "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["measure-accuracy", str(out), "--json"])
    assert json.loads(res.stdout)["n"] == 5
    m = load_model(str(tmp_path / "run" / "model.safetensors"))
    assert m.network.config == model and m.grammar == g


def test_offline_epochs_visit_every_sentence_once():
    tokens = np.arange(10).reshape(10, 1)
    data = OfflineData(tokens, batch_size=4, seed=0)
    seen = torch.cat([data.batch(k) for k in range(5)])[:, 0].numpy()  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # reshuffled
    assert torch.equal(OfflineData(tokens, 4, 0).batch(3), data.batch(3))  # stateless in k


def test_online_batches_are_fresh_and_never_validation():
    g = draw_grammar(2, 2, 4, 2, seed=0)  # 32 sentences
    val = np.concatenate([b.tokens for b in generate_sentences(g, 24, 0)])
    data = OnlineData(g, batch_size=64, seed=1, exclude=val)
    rows = {tuple(r) for k in range(20) for r in data.batch(k).tolist()}
    val_rows = {tuple(r) for r in val.tolist()}
    assert rows and not rows & val_rows and len(rows) == 8  # exactly the 8 other sentences
    assert not torch.equal(data.batch(0), data.batch(1))


def resolve_configs(preset, process, vocab, depth, branching, process_flags, model_flags, train_flags):
    """(model, process, train) configs of a preset with explicit settings, for an RHM (v, L, s)."""
    run = resolve_run(preset, process=process, arch="unet",
                      data=DataSpec(vocab=vocab, length=branching**depth, depth=depth, branching=branching),
                      settings={**process_flags, **model_flags, **train_flags})
    return run.model, run.process, run.train


def test_presets_and_flags():
    m, p, t = resolve_configs("paper", "uniform", 8, 3, 2, {}, {"width": 64}, {})
    assert (p.T, p.schedule, p.lambda_ce, t.optimizer, t.lr, t.batch_size, m.width) == \
        (1000, "linear-beta", 0.0, "sgd", 1.0, 32, 64)
    m, p, t = resolve_configs("reference-code", "uniform", 8, 3, 2, {"T": 100}, {}, {"lr": 1e-3})
    assert (p.T, p.beta_min, p.beta_max, t.optimizer, t.lr, t.lr_scheme) == (100, 1e-3, 0.1, "adam", 1e-3, "global")
    assert (m.norm, m.time_embedding, m.input_mode, m.skip) == ("layernorm", False, "leaf_message", "concat")
    assert m.deconv_fan_in == "cin_k"
    # their input standardisation: leaf-message moments over their default table (β 1e-4 -> 0.02, T = 1000)
    beta = np.linspace(1e-4, 0.02, 1000)
    a = np.concatenate([[1.0], np.cumprod(1 - beta)])
    mean = np.mean(a + (1 - a) / 8)
    std = np.sqrt(np.mean(a + (1 - a) / 64) - mean**2)
    assert m.leaf_mean == pytest.approx(mean, rel=1e-9) and m.leaf_std == pytest.approx(std, rel=1e-9)
    m, p, t = resolve_configs("cpu", "uniform", 8, 3, 2, {}, {}, {})
    assert (p.T, p.schedule, p.lambda_ce, t.optimizer, t.lr, t.lr_schedule, t.decay_start, t.steps, m.width) == \
        (100, "linear-alpha", 0.01, "adam", 0.3, "cosine", 0.5, 6000, 256)
    m, p, t = resolve_configs("cpu", "masked", 8, 3, 2, {}, {}, {})
    assert m.input_vocab == 9 and not m.time_embedding and p.process == "masked"


def test_train_cli_refuses_to_clobber_a_run(tmp_path):
    """A non-empty run directory is refused with a one-line error and left as it was; --device
    cuda without a GPU is refused before anything is written (was: the exit code only); the same
    command on an empty directory does train (so the refusals are not a broken command)."""
    out = tmp_path / "d.parquet"
    res = runner.invoke(app, ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "20", "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    small = ["--steps", "2", "--width", "16", "--T", "20", "--eval-every", "2", "--sample-check", "0",
             "--threads", "1", "--allow-overlap"]  # --val = DATA: only the run directory is under test
    res = runner.invoke(app, ["train", str(out), "--val", str(out), "-o", str(run_dir), *small])
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"cgtools train: error: {run_dir} is not empty") and "--force" in line
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "mine"
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["train", str(out), "--val", str(out), "-o", str(tmp_path / "r2"), *small,
                              "--device", "cuda"])
    if torch.cuda.is_available():
        assert res.exit_code == 0, res.stderr
        assert (tmp_path / "r2" / "model.safetensors").exists()
    else:
        assert res.exit_code == 1
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith("cgtools train: error:") and "no CUDA device" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no r2, nothing else
    res = runner.invoke(app, ["train", str(out), "--val", str(out), "-o", str(tmp_path / "r3"), *small])
    assert res.exit_code == 0, res.stderr
    assert {"model.safetensors", "last.safetensors", "metrics.parquet"} <= {p.name for p in (tmp_path / "r3").iterdir()}
    from cgtools.formats.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "r3" / "metrics.parquet")] == [2]


def test_ddp_with_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun, 2 processes (gloo): each takes half of the global batch; the averaged gradient is
    the full-batch gradient, so the weights match a single-process run up to float rounding."""
    data = tmp_path / "d.parquet"
    res = runner.invoke(app, ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "24", "-o", str(data)])
    assert res.exit_code == 0, res.stderr
    args = ["train", str(data), "--val", str(data), "--allow-overlap", "--steps", "6", "--batch-size", "8", "--width", "16",
            "--T", "20", "--eval-every", "3", "--sample-check", "0", "--threads", "1", "--lr", "0.5",
            # SGD: the step is linear in the gradient, so rounding differences stay rounding-sized
            # (Adam's g/sqrt(v) turns them into O(lr) steps on entries whose gradient is ~0)
            "--optimizer", "sgd", "--lr-schedule", "constant"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "cgtools", *args, "-o", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cgtools", *args, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "last.safetensors"), _weights(tmp_path / "two" / "last.safetensors")
    init = _weights(tmp_path / "one" / "checkpoints" / "step_00000001.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights


def _ema_trainer(tmp_path):
    """A Trainer (EMA 0.5, SGD lr 0.5) after 3 steps: its EMA weights differ from the raw ones."""
    from cgtools.training.trained import build_model

    g = draw_grammar(2, 2, 4, 2, seed=0)
    tr, va = _data(g, 12, 4)
    model_cfg, proc, cfg = _configs(g, steps=8, eval_every=4, ema=0.5, sample_check=0)
    meta = {"arch": "unet", "model": json.loads(model_cfg.to_json()), "process": json.loads(proc.to_json()),
            "train": cfg.to_dict(), "grammar": g.to_json(), "provenance": {}}
    model = build_model("unet", model_cfg, proc, seed=cfg.seed, grammar=g, meta=meta)
    trainer = Trainer(model, cfg, tmp_path, train_tokens=tr, val_tokens=va, grammar=g, meta=meta)
    model.network.train()
    for _ in range(3):
        trainer._train_step()
    raw = {k: v.clone() for k, v in model.network.state_dict().items()}
    ema = {k: v.clone() for k, v in trainer.ema.items()}
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    return trainer, raw, ema


@pytest.mark.parametrize("error", [RuntimeError("validation broke"), KeyboardInterrupt()])
def test_failed_validation_restores_the_raw_weights_and_train_mode(tmp_path, error):
    """Trainer.evaluate swaps the EMA weights in for validation; when validation raises (an error,
    or Ctrl-C) the network must get its raw weights back and return to train mode. The patched
    _evaluate first checks that the swap did happen (EMA weights, eval mode), so the test cannot
    pass with an evaluate that never swaps."""
    trainer, raw, ema = _ema_trainer(tmp_path)
    net = trainer.model.network
    seen = {}

    def failing():
        seen["ema"] = all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
        seen["training"] = net.training
        raise error

    trainer._evaluate = failing
    with pytest.raises(type(error)):
        trainer.evaluate()
    assert seen == {"ema": True, "training": False}
    state = net.state_dict()
    assert state.keys() == raw.keys() and all(torch.equal(state[k], raw[k]) for k in raw)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(trainer.ema[k], ema[k]) for k in ema)  # the average itself is untouched


def test_ctrl_c_in_validation_saves_raw_weights_for_resume(tmp_path):
    """Through Trainer.run: Ctrl-C during the first validation saves last.safetensors for --resume;
    its model weights must be the raw ones (not the EMA that validation had swapped in) and its
    ema the average, so resuming continues the same trajectory."""
    trainer, _, _ = _ema_trainer(tmp_path)
    trainer.step = 0  # run from the start: validation at step 4
    net = trainer.model.network

    def interrupted():
        raise KeyboardInterrupt

    trainer._evaluate = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.step == 4 and net.training
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "last.safetensors")
    state = net.state_dict()
    for k, v in state.items():
        assert torch.equal(saved[f"model.{k}"], v.cpu()), k
        assert torch.equal(saved[f"ema.{k}"], trainer.ema[k].cpu()), k
    assert any(not torch.equal(state[k], trainer.ema[k]) for k in state if state[k].is_floating_point())
