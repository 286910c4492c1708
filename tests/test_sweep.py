"""The sweep trainer: stacked runs against single runs, early stopping, files, resume, manifests."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.diffusion.uniform import UniformDiffusion
from cgtools.errors import ConfigError
from cgtools.formats.metrics import read_metrics
from cgtools.grammar.rhm import draw_grammar
from cgtools.grammar.sampling import generate_sentences
from cgtools.models.registry import DataSpec
from cgtools.training.loop import Trainer, train
from cgtools.training.presets import resolve_run
from cgtools.training.sweep import StackedRun, SweepMember, _trainer, plan_stacks, train_sweep
from cgtools.training.trained import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

# Tolerances. Stacked GEMMs (bmm) round differently from single ones (mm), by a few float32 ulps
# per step. First-step losses: relative 1e-5. SGD is linear in the gradient, so after a few
# steps weights and momenta stay within 1e-5 of the single run's (observed: ~1e-7). Adam divides
# by sqrt(v): on entries whose gradient is ~0 a rounding difference becomes an O(lr) step, so
# after training only statistics are compared: validation losses within 2 % (observed: < 0.1 %).
LOSS_RTOL = 1e-5
SGD_ATOL = 1e-5
ADAM_VAL_RTOL = 0.02

G = draw_grammar(2, 2, 4, 2, seed=0)  # L = 2, s = 2, v = 4, m = 2: d = 4, 32 sentences
G2 = draw_grammar(2, 2, 4, 2, seed=5)  # another grammar of the same shape
SPEC = DataSpec(vocab=4, length=4, depth=2, branching=2)


def _tables(grammar, n_train, n_val=8, seed=0):
    toks = np.concatenate([b.tokens for b in generate_sentences(grammar, n_train + n_val, seed)])
    return toks[:n_train], toks[n_train:]


def _run(process="uniform", **settings):
    base = dict(width=16, T=20, steps=6, batch_size=8, eval_every=3, sample_check=4, sample_steps=3,
                val_repeats=1, optimizer="sgd", lr=0.5, lr_schedule="constant")
    if process == "masked":
        base.pop("T")
    base.update(settings)
    return resolve_run(base.pop("preset", "cpu"), process=process, arch="unet", data=SPEC, settings=base)


def _members(tmp_path, runs, tag="sw"):
    """Members with different data: training-set sizes 16/12/20, two grammars, own seeds."""
    data = [(G, 16), (G, 12), (G2, 20), (G, 8)]
    out = []
    for i, run in enumerate(runs):
        g, p = data[i % len(data)]
        tr, va = _tables(g, p, seed=i)
        out.append(SweepMember(run, tmp_path / f"{tag}{i}", tr, va, g, {"who": i}))
    return out


def _single(member, run_dir):
    return train(member.run, run_dir, train_tokens=member.train_tokens, val_tokens=member.val_tokens,
                 grammar=member.grammar, provenance=member.provenance)


def _tensors(path):
    return load_file(str(path))


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), \
            (k, float((a[k].double() - b[k].double()).abs().max()))


@pytest.mark.parametrize("process, settings", [
    ("uniform", {}),
    ("uniform", {"optimizer": "adam", "lr": 0.3, "ema": 0.9}),
    ("masked", {"optimizer": "adam", "lr": 0.01}),
    # the authors' conventions: LayerNorm, leaf-message input, concatenated skips, no biases
    ("uniform", {"preset": "reference-code", "width": 16}),
])
def test_first_step_losses_equal_single_runs(tmp_path, process, settings):
    runs = [_run(process, seed=s, **settings) for s in (0, 1, 2)]
    members = _members(tmp_path, runs)
    singles = [_trainer(m, "cpu", False) for m in members]
    expected = [s._train_step() for s in singles]
    stacked = StackedRun([_trainer(m, "cpu", False) for m in members])
    losses, finite = stacked._step()
    assert all(finite) and len(set(expected)) == 3  # three different runs
    assert losses == pytest.approx(expected, rel=LOSS_RTOL)
    # ... and the next step starts from the same weights (the step's update matched too)
    for tr in stacked.trainers:
        tr.step += 1  # StackedRun.run advances the counters
    assert stacked._step()[0] == pytest.approx([s._train_step() for s in singles], rel=1e-4)


def test_sgd_weights_and_momenta_match_single_runs(tmp_path):
    runs = [_run(seed=s) for s in (3, 4, 5)]
    members = _members(tmp_path, runs)
    results = train_sweep(members)
    for i, m in enumerate(members):
        single = _single(m, tmp_path / f"single{i}")
        ours, theirs = _tensors(m.run_dir / "last.safetensors"), _tensors(tmp_path / f"single{i}" / "last.safetensors")
        _assert_close(ours, theirs, SGD_ATOL)  # model.*, optim.* (momentum buffers)
        for a, b in zip(results[i].metrics, single.metrics):
            assert a["step"] == b["step"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_adam_runs_end_with_the_statistics_of_single_runs(tmp_path):
    runs = [_run(seed=s, optimizer="adam", lr=0.3, lr_schedule="cosine", decay_start=0.5, steps=40,
                 eval_every=10, sample_check=0) for s in (0, 1, 2, 3)]
    members = _members(tmp_path, runs)
    results = train_sweep(members)
    for i, m in enumerate(members):
        single = _single(m, tmp_path / f"single{i}")
        assert [r["step"] for r in results[i].metrics] == [10, 20, 30, 40]
        for a, b in zip(results[i].metrics, single.metrics):
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=ADAM_VAL_RTOL)
        assert results[i].best_step == single.best_step


def test_early_stopping_of_one_member_leaves_the_others_alone(tmp_path, monkeypatch):
    real = Trainer.evaluate
    curve = iter([1.0, 2.0, 3.0])  # the stopping member's validation losses: worse and worse

    def evaluate(self):
        row = real(self)
        if "stops" in self.label:
            row["val_loss"] = next(curve)
        return row

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    runs = [_run(seed=0, steps=12), _run(seed=1, steps=12, patience=1), _run(seed=2, steps=12)]
    members = _members(tmp_path, runs)
    members[1].label = "member stops"
    results = train_sweep(members)
    assert results[1].stopped_early and results[1].steps_done == 6 and results[1].best_step == 3
    assert [r["step"] for r in results[1].metrics] == [3, 6]
    assert json.loads(load_file_meta(members[1].run_dir / "model.safetensors"))["step"] == 3
    assert json.loads(load_file_meta(members[1].run_dir / "last.safetensors"))["step"] == 6
    monkeypatch.setattr(Trainer, "evaluate", real)
    for i in (0, 2):  # the others ran to the end, as if the stopping member had never been there
        assert not results[i].stopped_early and results[i].steps_done == 12
        _single(members[i], tmp_path / f"single{i}")
        _assert_close(_tensors(members[i].run_dir / "last.safetensors"),
                      _tensors(tmp_path / f"single{i}" / "last.safetensors"), SGD_ATOL)


def load_file_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["cgtools"]


def test_a_diverging_member_is_named_and_the_others_finish(tmp_path, monkeypatch):
    real = UniformDiffusion.loss

    def loss(self, logits, x0, x_t, t):
        terms = real(self, logits, x0, x_t, t)
        if logits.shape[0] == 3 * 8:  # a stacked training batch [K·B]
            calls.append(1)
            if len(calls) == 3:  # step 2: member 1's rows [B, 2B) diverge
                terms.loss[8:16] = float("nan")
        return terms

    calls: list[int] = []
    monkeypatch.setattr(UniformDiffusion, "loss", loss)
    members = _members(tmp_path, [_run(seed=s) for s in (0, 1, 2)])
    with pytest.raises(ConfigError, match=r"sw1: training diverged at step 2 .*the other runs of the sweep finished"):
        train_sweep(members)
    monkeypatch.setattr(UniformDiffusion, "loss", real)
    for i in (0, 2):
        _single(members[i], tmp_path / f"single{i}")
        _assert_close(_tensors(members[i].run_dir / "last.safetensors"),
                      _tensors(tmp_path / f"single{i}" / "last.safetensors"), SGD_ATOL)
    assert not (members[1].run_dir / "last.safetensors").exists()  # it never reached a validation


def test_resumed_sweep_ends_where_an_uninterrupted_one_would(tmp_path):
    runs = [_run(seed=s, optimizer="adam", lr=0.3, ema=0.9, steps=9) for s in (0, 1, 2)]
    full = train_sweep(_members(tmp_path, runs, "full"))
    part = train_sweep(_members(tmp_path, runs, "part"), stop_after=4)
    assert [r.steps_done for r in part] == [4, 4, 4]
    resumed = train_sweep(_members(tmp_path, runs, "part"), resume=True)
    for i in range(3):
        a = _tensors(tmp_path / f"full{i}" / "last.safetensors")
        b = _tensors(tmp_path / f"part{i}" / "last.safetensors")
        assert a.keys() == b.keys()
        for k in a:  # the same stacked computation from the same state: bit for bit
            assert torch.equal(a[k], b[k]), k
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert strip(full[i].metrics) == strip(resumed[i].metrics)
    # an interrupted sweep member continues under `cgtools train --resume`: its files are a single run's
    solo = _members(tmp_path, runs[:2], "solo")
    train_sweep(solo, stop_after=4)
    again = train(solo[0].run, solo[0].run_dir, train_tokens=solo[0].train_tokens,
                  val_tokens=solo[0].val_tokens, grammar=solo[0].grammar, provenance={}, resume=True)
    assert again.steps_done == 9 and [r["step"] for r in again.metrics] == [3, 6, 9]
    for a, b in zip(again.metrics, full[0].metrics):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=ADAM_VAL_RTOL)


def test_an_interrupt_stops_between_steps_and_saves_every_member(tmp_path, monkeypatch):
    """What a sweep's Ctrl-C does to each stack (and to a run alone): stop before the next step,
    save last.safetensors; --resume then ends where an uninterrupted sweep ends."""
    runs = [_run(seed=s, optimizer="adam", lr=0.3, steps=9) for s in (0, 1)] + [_run(seed=2, width=8, steps=9)]
    full = train_sweep(_members(tmp_path, runs, "full"))
    stop = threading.Event()
    real = Trainer.after_step

    def after_step(self, loss):
        out = real(self, loss)
        if self.step == 4:
            stop.set()  # "Ctrl-C" during step 4 of each run
        return out

    monkeypatch.setattr(Trainer, "after_step", after_step)
    trainers = [_trainer(m, "cpu", False) for m in _members(tmp_path, runs, "cut")]
    with pytest.raises(KeyboardInterrupt):
        StackedRun(trainers[:2]).run(interrupt=stop)
    stop.clear()
    with pytest.raises(KeyboardInterrupt):
        trainers[2].run(interrupt=stop)
    monkeypatch.setattr(Trainer, "after_step", real)
    for i in range(3):
        assert json.loads(load_file_meta(tmp_path / f"cut{i}" / "last.safetensors"))["step"] == 4
    resumed = train_sweep(_members(tmp_path, runs, "cut"), resume=True)
    for i in range(3):
        a, b = _tensors(tmp_path / f"full{i}" / "last.safetensors"), _tensors(tmp_path / f"cut{i}" / "last.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert resumed[i].steps_done == full[i].steps_done == 9


def test_a_member_alone_is_exactly_a_single_run(tmp_path):
    members = _members(tmp_path, [_run(seed=0), _run(seed=1, width=8)])
    assert plan_stacks([m.run for m in members]) == [[0], [1]]
    train_sweep(members)
    for i, m in enumerate(members):
        _single(m, tmp_path / f"single{i}")
        a, b = _tensors(m.run_dir / "last.safetensors"), _tensors(tmp_path / f"single{i}" / "last.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_plan_stacks_groups_by_shape_and_trajectory():
    runs = [_run(seed=0), _run(seed=1, patience=2, eval_every=2, sample_check=0),  # stack with 0
            _run(seed=2, width=8),  # another width
            _run(seed=3, lr_schedule="cosine"), _run(seed=4, lr_schedule="cosine", steps=7),  # steps matter
            _run(seed=5, steps=9)]  # constant lr: steps do not change the trajectory
    assert plan_stacks(runs) == [[0, 1, 5], [2], [3], [4]]
    assert plan_stacks(runs, max_stack=2) == [[0, 5], [1], [2], [3], [4]]
    assert plan_stacks(runs[:2] + runs[5:], jobs=2) == [[0, 2], [1]]  # halved to keep 2 jobs busy
    assert plan_stacks(runs, start_steps=[0, 3, 0, 0, 0, 0]) == [[0, 5], [1], [2], [3], [4]]
    with pytest.raises(ConfigError):
        plan_stacks(runs, max_stack=0)


def test_stacks_side_by_side_match_one_after_another(tmp_path):
    runs = [_run(seed=s) for s in range(4)]
    train_sweep(_members(tmp_path, runs, "a"), jobs=1)
    train_sweep(_members(tmp_path, runs, "b"), jobs=2, threads=1)
    for i in range(4):
        _assert_close(_tensors(tmp_path / f"a{i}" / "last.safetensors"),
                      _tensors(tmp_path / f"b{i}" / "last.safetensors"), SGD_ATOL)


# ---- the command ------------------------------------------------------------------------------------
def _write_tables(tmp_path):
    """d1/v1 and d2/v2: training and disjoint validation tables of two grammars of one shape."""
    gen = ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2"]
    for args in ([*gen, "-n", "16", "--seed", "0", "-o", "d1.parquet"],
                 ["rhm-gen", "-g", "d1.parquet", "--exclude", "d1.parquet", "-n", "8", "--seed", "1", "-o", "v1.parquet"],
                 [*gen, "--grammar-seed", "7", "-n", "12", "--seed", "2", "-o", "d2.parquet"],
                 ["rhm-gen", "-g", "d2.parquet", "--exclude", "d2.parquet", "-n", "8", "--seed", "3", "-o", "v2.parquet"]):
        res = runner.invoke(app, [a if not a.endswith(".parquet") else str(tmp_path / a) for a in args])
        assert res.exit_code == 0, res.stderr


FLAGS = ["--steps", "6", "--batch-size", "8", "--width", "16", "--T", "20", "--eval-every", "3",
         "--sample-check", "4", "--sampling-steps", "3", "--optimizer", "sgd", "--lr", "0.5",
         "--lr-schedule", "constant", "--threads", "1"]


def test_sweep_command_writes_run_dirs_that_load_and_sample(tmp_path):
    _write_tables(tmp_path)
    (tmp_path / "runs.csv").write_text("data,val,out,seed,patience\n"
                                       "d1.parquet,v1.parquet,r1,0,\n"
                                       "d2.parquet,v2.parquet,r2,1,2\n")
    res = runner.invoke(app, ["sweep", str(tmp_path / "runs.csv"), *FLAGS])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["train", str(tmp_path / "d1.parquet"), "--val", str(tmp_path / "v1.parquet"),
                              "-o", str(tmp_path / "single"), "--seed", "0", *FLAGS])
    assert res.exit_code == 0, res.stderr
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "r1") == files(tmp_path / "r2") == files(tmp_path / "single")
    _assert_close(_tensors(tmp_path / "r1" / "last.safetensors"),
                  _tensors(tmp_path / "single" / "last.safetensors"), SGD_ATOL)
    for run in ("r1", "r2"):
        model = load_model(str(tmp_path / run / "model.safetensors"))
        assert model.network.config.width == 16 and model.grammar is not None
        meta = json.loads(load_file_meta(tmp_path / run / "model.safetensors"))
        assert meta["provenance"]["tool"] == "cgtools sweep" and meta["train"]["seed"] == int(run[1]) - 1
        assert [r["step"] for r in read_metrics(tmp_path / run / "metrics.parquet")] == [3, 6]
        out = tmp_path / f"s_{run}.parquet"
        res = runner.invoke(app, ["sample", str(tmp_path / run / "model.safetensors"), "-n", "5",
                                  "--sampling-steps", "3", "-o", str(out)])
        assert res.exit_code == 0, res.stderr
    assert json.loads(load_file_meta(tmp_path / "r2" / "last.safetensors"))["train"]["patience"] == 2
    assert load_model(str(tmp_path / "r2" / "model.safetensors")).grammar != load_model(
        str(tmp_path / "r1" / "model.safetensors")).grammar
    # JSON manifest, a per-run override of a flag, --resume of finished runs
    (tmp_path / "runs.json").write_text(json.dumps({"runs": [
        {"data": "d1.parquet", "val": "v1.parquet", "out": "j1", "width": 8, "--lr": "0.25"}]}))
    res = runner.invoke(app, ["sweep", str(tmp_path / "runs.json"), *FLAGS])
    assert res.exit_code == 0, res.stderr
    meta = json.loads(load_file_meta(tmp_path / "j1" / "model.safetensors"))
    assert meta["model"]["width"] == 8 and meta["train"]["lr"] == 0.25
    res = runner.invoke(app, ["sweep", str(tmp_path / "runs.csv"), *FLAGS, "--resume"])
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize("manifest, message", [
    ("data,val\nd1.parquet,v1.parquet\n", "run 1 has no 'out'"),
    ("data,val,out,widht\nd1.parquet,v1.parquet,r,8\n", "run 1: unknown key 'widht'"),
    ("data,val,out,width\nd1.parquet,v1.parquet,r,abc\n", "run 1: width: .*integer"),
    ("data,val,out,width\nd1.parquet,v1.parquet,r,0\n", "run 1: width: .*greater than or equal to 1"),
    ("data,val,out\nd1.parquet,v1.parquet,r\nd2.parquet,v2.parquet,r/\n", "members 1 and 2 both write"),
    ("data,val,out\nnope.parquet,v1.parquet,r\n", "nope.parquet: no such file"),
    ("data,val,out\n", "lists no runs"),
    ("", "empty manifest"),
    ("data,val,out\nd1.parquet,v2.parquet,r\n", "different grammar"),
    ("data,val,out,lr\nd1.parquet,v1.parquet,r,-1\n", "lr must be positive"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, manifest, message):
    _write_tables(tmp_path)
    path = tmp_path / "runs.csv"
    path.write_text(manifest)
    res = runner.invoke(app, ["sweep", str(path), *FLAGS])
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools sweep: error: "), res.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"runs": 3}', "list of objects"),
    ('[{"data": "d1.parquet", "val": "v1.parquet", "out": "r", "seed": [1]}]', "seed must be a single value"),
    ('[{"data": 3, "val": "v1.parquet", "out": "r"}]', "data must be a path"),
])
def test_bad_json_manifests_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "runs.json"
    path.write_text(text)
    res = runner.invoke(app, ["sweep", str(path)])
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
