"""Image diffusion end to end: Gaussian DDPM with the 2-D U-Net trained by `cgtools train` on an
image table, sampled by `cgtools sample` into an image table; a tiny model overfits a few images;
exact resume keeps the importance sampler's state; wrong kinds of data are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.checkpoint import Checkpoint
from cgtools.formats.files import open_input
from cgtools.formats.images import ImagesTable, to_model_range, write_images
from cgtools.formats.metrics import read_metrics
from cgtools.models.registry import DataSpec
from cgtools.training.generate import SampleConfig, generate
from cgtools.training.loop import train
from cgtools.training.presets import resolve_run
from cgtools.training.trained import load_model
from tests.helpers import assert_stacked_matches_single_runs

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TINY = ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--heads", "1"]


def _blobs(n: int, seed: int, size: int = 8) -> np.ndarray:
    """n grey uint8 images [n, size, size, 1]: one bright square at a random place each on a
    faintly noisy background (so that two draws are distinct images)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(10, 40, (n, size, size, 1)).astype(np.uint8)
    for k in range(n):
        i, j = rng.integers(0, size - 3, 2)
        out[k, i:i + 3, j:j + 3, 0] = 230
    return out


def _table(path, images, labels=None):
    with open(path, "wb") as f:
        write_images(f, images, {"provenance": {"test": True}}, labels=labels)
    return path


def test_train_and_sample_an_image_table_through_the_cli(tmp_path):
    train_t = _table(tmp_path / "train.parquet", _blobs(48, 0))
    val_t = _table(tmp_path / "val.parquet", _blobs(16, 1))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(train_t), "--val", str(val_t), "-o", str(run), "--preset", "image",
                              *TINY, "--steps", "40", "--batch-size", "16", "--eval-every", "20", "--T", "100"])
    assert res.exit_code == 0, res.stderr
    rows = read_metrics(run / "metrics.parquet")
    assert [r["step"] for r in rows] == [20, 40] and all(np.isfinite(r["val_loss"]) for r in rows)
    assert all(r["tokens"] is None for r in rows)  # images have no tokens
    meta = Checkpoint(open_input(run / "model.safetensors")).meta
    assert meta["arch"] == "unet2d" and meta["process"]["process"] == "gaussian"
    assert meta["images"] == {"channels": 1, "height": 8, "width": 8} and meta["grammar"] is None
    assert meta["model"]["out_channels"] == 2  # learned variance: ε and v per channel
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000040.safetensors"

    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "-n", "6", "--sampling-steps", "10",
                              "-o", str(tmp_path / "s.parquet")])
    assert res.exit_code == 0, res.stderr
    samples = ImagesTable(open_input(tmp_path / "s.parquet"))
    pixels = samples.read()
    assert pixels.shape == (6, 8, 8, 1) and pixels.dtype == np.uint8
    assert samples.meta["schema"] == "images/1" and samples.meta["sampler"]["steps"] == 10
    assert samples.meta["provenance"]["tool"] == "cgtools sample"
    assert str(run / "model.safetensors") in samples.meta["provenance"]["inputs"]

    # forward-backward on images: E = 0 returns the inputs exactly (no reverse steps)
    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "--from", str(val_t), "--noise", "0",
                              "-o", str(tmp_path / "fb0.parquet")])
    assert res.exit_code == 0, res.stderr
    assert np.array_equal(ImagesTable(open_input(tmp_path / "fb0.parquet")).read(), _blobs(16, 1))
    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "--from", str(val_t), "--noise", "0.2",
                              "--sampling-steps", "10", "-o", str(tmp_path / "fb.parquet")])
    assert res.exit_code == 0, res.stderr
    assert ImagesTable(open_input(tmp_path / "fb.parquet")).read().shape == (16, 8, 8, 1)


def test_wrong_data_kinds_are_one_line_errors(tmp_path):
    images = _table(tmp_path / "img.parquet", _blobs(8, 0))
    other = _table(tmp_path / "big.parquet", np.zeros((8, 16, 16, 1), dtype=np.uint8))
    res = runner.invoke(app, ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "8", "-o",
                              str(tmp_path / "seq.parquet")])
    assert res.exit_code == 0, res.stderr
    cases = [
        (["train", str(images), "--val", str(tmp_path / "seq.parquet")], "image table"),
        (["train", str(images), "--val", str(other)], "16"),
        (["train", str(images), "--val", str(images)], "also in"),  # overlap
        (["train", str(images), "--val", str(_table(tmp_path / "v.parquet", _blobs(4, 3))), "--arch", "unet",
          "--allow-overlap"], "unet2d"),
        (["train", str(images), "--val", str(tmp_path / "v.parquet"), "--online", "--allow-overlap"], "offline"),
        (["train", str(tmp_path / "seq.parquet"), "--val", str(tmp_path / "seq.parquet"), "--arch", "unet2d",
          "--allow-overlap"], "images"),
    ]
    for args, words in cases:
        res = runner.invoke(app, [*args, "-o", str(tmp_path / "run")])
        assert res.exit_code == 1, (args, res.stderr)
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert not (tmp_path / "run" / "model.safetensors").exists()


def _run_config(**settings):
    base = dict(width=8, channel_mult=(1, 2), num_res_blocks=1, heads=1, T=50, batch_size=8, val_repeats=1,
                eval_every=10, warmup=0, ema=0.0, sample_check=0)
    base.update(settings)
    return resolve_run("image", process=None, arch=None, data=DataSpec(shape=(1, 8, 8)), settings=base)


def test_resume_is_exact_with_the_importance_sampler_state(tmp_path):
    """20 steps straight equal 10 steps, a stop, and 10 resumed steps: weights, optimiser and the
    loss history of importance sampling (which changes the times drawn once it is warm)."""
    x = to_model_range(_blobs(16, 0))
    v = to_model_range(_blobs(8, 1))
    run = _run_config(loss="vlb", learn_sigma=True, importance_sampling=True, steps=20, T=2, lr=1e-3)
    kw = dict(train_tokens=x, val_tokens=v, grammar=None, provenance={}, data_meta={})
    train(run, tmp_path / "straight", **kw)
    train(run, tmp_path / "split", stop_after=10, **kw)
    train(run, tmp_path / "split", resume=True, **kw)
    a = Checkpoint(open_input(tmp_path / "straight" / "last.safetensors"))
    b = Checkpoint(open_input(tmp_path / "split" / "last.safetensors"))
    assert a.process_state and set(a.process_state) == set(b.process_state)
    for k in a.process_state:
        assert torch.equal(a.process_state[k], b.process_state[k]), k
    # T = 2 levels, 10 losses each: the sampler is warm within the run (counts reach 10)
    assert int(a.process_state[next(k for k in a.process_state if "count" in k)].min()) >= 10
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


@pytest.mark.parametrize("loss", [pytest.param("simple", marks=pytest.mark.slow), "hybrid"])
def test_a_tiny_model_overfits_a_few_images(tmp_path, loss):
    """Four training images, a small net trained to a low loss: every sample lands near one of the
    four (mean squared distance in [-1, 1] units below 5 % of that between distinct training
    images; measured 0.9 % (simple) and 1.3 % (hybrid)) and all four are reached."""
    x = to_model_range(_blobs(4, 7))  # [4, 1, 8, 8]
    run = _run_config(loss=loss, learn_sigma=loss == "hybrid", steps=400, lr=3e-3, width=16, T=100,
                      batch_size=16, eval_every=400, ema=0.0, lr_schedule="constant")
    result = train(run, tmp_path / "run", train_tokens=x, val_tokens=x, grammar=None, provenance={},
                   data_meta={"images": {"channels": 1, "height": 8, "width": 8}})
    assert result.steps_done == 400
    model = load_model(str(tmp_path / "run" / "last.safetensors"))
    torch.manual_seed(0)  # nothing below may draw from it: the sampler has its own generator
    out = generate(model, SampleConfig(num=64, seed=3, steps=50))  # float32 [64, 1, 8, 8]
    assert out.shape == (64, 1, 8, 8) and np.isfinite(out).all()
    d = ((out[:, None] - x[None]) ** 2).reshape(64, 4, -1).mean(-1)  # [64, 4] per-pixel MSE
    between = ((x[:, None] - x[None]) ** 2).reshape(4, 4, -1).mean(-1)[~np.eye(4, dtype=bool)]
    assert np.median(d.min(1)) < 0.05 * between.min(), (np.median(d.min(1)), between.min())
    assert len(set(d.argmin(1).tolist())) == 4


def test_stacked_image_runs_match_single_runs(tmp_path):
    """`cgtools sweep` trains image DDPMs as one vmapped stack: the same losses and weights as one
    `train` each (two steps, two seeds and data sets); importance sampling is refused there."""
    from cgtools.errors import ConfigError
    from cgtools.training.sweep import SweepMember, member_from_files

    members = []
    for seed in (0, 1):
        # SGD: Adam's g/sqrt(v) turns rounding-sized differences of near-zero gradients (behind the
        # zero-initialised layers) into lr-sized steps, as in the DDP equivalence test
        run = _run_config(seed=seed, steps=4, optimizer="sgd", lr=0.05, momentum=0.9)
        members.append(SweepMember(run, tmp_path / f"m{seed}", to_model_range(_blobs(16, seed)),
                                   to_model_range(_blobs(8, 10 + seed)), None,
                                   data_meta={"images": {"channels": 1, "height": 8, "width": 8}}))
    assert_stacked_matches_single_runs(members)
    data = _table(tmp_path / "a.parquet", _blobs(8, 0))
    val = _table(tmp_path / "b.parquet", _blobs(4, 100))
    settings = dict(width=8, channel_mult=(1, 2), num_res_blocks=1, heads=1, loss="vlb", importance_sampling=True)
    with pytest.raises(ConfigError, match="importance-sampling"):
        member_from_files(data, val, tmp_path / "r", preset="image", process=None, arch=None, settings=settings)


def test_forward_backward_refuses_images_of_another_size(tmp_path):
    train_t = _table(tmp_path / "train.parquet", _blobs(16, 0))
    val_t = _table(tmp_path / "val.parquet", _blobs(8, 1))
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(train_t), "--val", str(val_t), "-o", str(run), "--preset", "image",
                              *TINY, "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--T", "20"])
    assert res.exit_code == 0, res.stderr
    big = _table(tmp_path / "big.parquet", np.zeros((4, 16, 16, 1), dtype=np.uint8))
    res = runner.invoke(app, ["sample", str(run / "model.safetensors"), "--from", str(big), "--noise", "0.5",
                              "-o", str(tmp_path / "fb.parquet")])
    assert res.exit_code == 1 and "8x8 with 1 channels" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fb.parquet").exists()


def test_importance_sampling_is_refused_under_ddp(tmp_path):
    """Each DDP rank sees the losses of its own slice only; the refusal comes before any process
    group or file is touched."""
    from cgtools.errors import ConfigError
    from cgtools.training.loop import Distributed, Trainer
    from cgtools.training.trained import build_model

    run = _run_config(loss="vlb", importance_sampling=True, steps=2)
    model = build_model(run.arch, run.model, run.process, seed=0)
    kw = dict(train_tokens=to_model_range(_blobs(8, 0)), val_tokens=to_model_range(_blobs(4, 1)), grammar=None,
              meta={})
    with pytest.raises(ConfigError, match="importance-sampling"):
        Trainer(model, run.train, tmp_path / "run", dist=Distributed(0, 2), **kw)
    assert not (tmp_path / "run").exists()
    Trainer(model, run.train, tmp_path / "run", dist=Distributed(0, 1), **kw)  # one process: fine
