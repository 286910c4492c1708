"""Faults and bad inputs, tried as a user meets them: each gives exit 1 (130 after Ctrl-C), one
line on stderr naming the file and the problem, no traceback, and leaves no half-written or
overwritten file. Subprocess cases run the real `cgtools` entry point."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.formats.files import sweep_stale_temporaries

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
GEN = ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2"]
TINY = ["--steps", "4", "--eval-every", "2", "--width", "16", "--sample-check", "0", "--batch-size", "8",
        "--threads", "1"]


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def one_line_error(res, *texts, code=1):
    """The contract for a known error: exit `code`, exactly one stderr line, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("cgtools "), lines[0]
    for text in texts:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train / validation splits of a tiny grammar and a 4-step run on them."""
    root = tmp_path_factory.mktemp("faults")
    assert run(*GEN, "-n", 24, "--seed", 0, "-o", root / "train.parquet").exit_code == 0
    assert run("rhm-gen", "-g", root / "train.parquet", "-x", root / "train.parquet", "-n", 8, "--seed", 1,
               "-o", root / "val.parquet").exit_code == 0
    res = run("train", root / "train.parquet", "--val", root / "val.parquet", "-o", root / "run", *TINY)
    assert res.exit_code == 0, res.stderr
    return root


def _damaged_copies(ckpt: Path, where: Path) -> dict[str, Path]:
    data = ckpt.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    out = {}
    out["truncated"] = where / "truncated.safetensors"
    out["truncated"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    middle = (header + len(data)) // 2
    flipped[middle:middle + 100] = bytes(255 - b for b in flipped[middle:middle + 100])  # inside the tensors
    out["bit-flipped"] = where / "flipped.safetensors"
    out["bit-flipped"].write_bytes(bytes(flipped))
    broken = bytearray(data)
    broken[12:24] = b"@" * 12  # inside the JSON header
    out["header"] = where / "header.safetensors"
    out["header"].write_bytes(bytes(broken))
    out["wrong kind"] = where / "table.safetensors"
    out["wrong kind"].write_bytes((ckpt.parent / "metrics.parquet").read_bytes())
    return out


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "header", "wrong kind"])
def test_damaged_checkpoints_are_one_line_errors_in_every_command(trained, tmp_path, damage):
    bad = _damaged_copies(trained / "run" / "model.safetensors", tmp_path)[damage]
    expect = {"truncated": "damaged checkpoint", "bit-flipped": "does not match its checksum",
              "header": "not a readable safetensors file", "wrong kind": "not a safetensors checkpoint"}[damage]
    out = tmp_path / "s.parquet"
    one_line_error(run("sample", bad, "-n", 4, "-o", out), bad.name, expect)
    assert not out.exists()
    one_line_error(run("forward-backward", trained / "val.parquet", "--denoiser", bad, "-o", out), bad.name, expect)
    assert not out.exists()
    # a damaged last.safetensors: --resume refuses, and leaves the run as it was
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.safetensors").write_bytes(bad.read_bytes())
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", run_dir, "--resume", *TINY)
    one_line_error(res, "last.safetensors", expect)
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.safetensors"]


def test_damaged_tables_are_one_line_errors(trained, tmp_path):
    data = (trained / "train.parquet").read_bytes()
    cases = {"half.parquet": data[: len(data) // 2], "empty.parquet": b"",
             "text.parquet": b"tokens\n1 2 3 4\n"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        one_line_error(run("measure-accuracy", tmp_path / name), name)
        one_line_error(run("forward-backward", tmp_path / name), name)
    # a checkpoint where a table is expected
    one_line_error(run("measure-accuracy", trained / "run" / "model.safetensors"), "model.safetensors")


def test_training_inputs_are_checked_before_training(trained, tmp_path):
    out = tmp_path / "run"
    # the validation file is the training file: early stopping would measure memorisation
    res = run("train", trained / "train.parquet", "--val", trained / "train.parquet", "-o", out, *TINY)
    one_line_error(res, "100.0% of the validation sequences", "--allow-overlap")
    assert not out.exists()
    res = run("train", trained / "train.parquet", "--val", trained / "train.parquet", "-o", out, "--allow-overlap", *TINY)
    assert res.exit_code == 0, res.stderr
    # a validation table with no rows
    assert run("rhm-gen", "-g", trained / "train.parquet", "-n", 0, "-o", tmp_path / "none.parquet").exit_code == 0
    res = run("train", trained / "train.parquet", "--val", tmp_path / "none.parquet", "-o", tmp_path / "r0", *TINY)
    one_line_error(res, "none.parquet", "no validation sequences")
    assert not (tmp_path / "r0").exists()


def test_resume_refusal_lists_each_changed_setting(trained, tmp_path):
    args = ["train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", tmp_path / "run"]
    assert run(*args, *TINY).exit_code == 0
    res = run(*args, *TINY, "--resume", "--lr", "0.05", "--momentum", "0.5")
    one_line_error(res, "different training settings", "lr: 0.3 -> 0.05", "momentum: 0.9 -> 0.5")


def test_a_run_directory_without_checkpoints_counts_as_empty(trained, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".model.safetensors.tmp-elsewhere-1-abc").write_bytes(b"x")  # another host's temporary
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", run_dir, *TINY)
    assert res.exit_code == 0, res.stderr
    # --resume with nothing to resume starts the run
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", tmp_path / "fresh",
              "--resume", *TINY)
    assert res.exit_code == 0 and (tmp_path / "fresh" / "last.safetensors").exists(), res.stderr
    # but a user's file is never destroyed without --force
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", mine, *TINY)
    one_line_error(res, "notes.txt", "--force")
    assert (mine / "notes.txt").read_text() == "mine"


def test_sample_from_refuses_sentences_of_another_grammar(trained, tmp_path):
    assert run(*GEN, "-n", 8, "--seed", 0, "--grammar-seed", 9, "-o", tmp_path / "other.parquet").exit_code == 0
    out = tmp_path / "s.parquet"
    res = run("sample", trained / "run" / "model.safetensors", "--from", tmp_path / "other.parquet",
              "--noise", 0.5, "-o", out)
    one_line_error(res, "other.parquet", "different grammar")
    assert not out.exists()
    res = run("sample", trained / "run" / "model.safetensors", "--from", tmp_path / "other.parquet",
              "--noise", 0.5, "--grammar", tmp_path / "other.parquet", "-o", out)
    assert res.exit_code == 0, res.stderr


def test_theory_of_a_huge_grammar_answers_at_once():
    t0 = time.perf_counter()
    res = run("theory", "-L", 40, "-s", 4, "-v", 1000, "-m", 100, "--json")
    assert res.exit_code == 0 and time.perf_counter() - t0 < 5
    out = json.loads(res.stdout)
    assert out["n_sentences"] is None
    # log10(n m^((d-1)/(s-1))) with d = 4^40
    assert out["log10_n_sentences"] == pytest.approx(3 + (4**40 - 1) // 3 * 2, rel=1e-12)


# ---- subprocess faults -----------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CGTOOLS_DEBUG": ""}


def _cgtools(*args, **kw):
    return subprocess.run([sys.executable, "-m", "cgtools", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def _limit_file_size(limit: int):
    """In the child: files may not grow past `limit` bytes, and exceeding it is EFBIG (ignore SIGXFSZ),
    the way a full disk looks to a writer."""
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def test_a_full_disk_names_the_file_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "big.parquet"
    res = _cgtools(*GEN[:1], "-L", 8, "-s", 2, "-v", 16, "-m", 4, "-n", 200000, "-o", out,
                   preexec_fn=_limit_file_size(200_000))
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary


def test_sigkill_of_a_writer_leaves_the_original_and_the_next_write_sweeps_its_temporary(tmp_path):
    out = tmp_path / "data.parquet"
    assert _cgtools(*GEN, "-n", 16, "-o", out).returncode == 0
    original = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "cgtools", "rhm-gen", "-L", "10", "-s", "2", "-v", "16", "-m", "4",
                             "-n", "3000000", "-o", str(out), "--force"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if p.name.startswith(".data.parquet.tmp-")]:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert out.read_bytes() == original  # the target is untouched
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".data.parquet.tmp-")]
    assert len(stale) == 1  # the dead writer's temporary, named with its pid
    assert str(proc.pid) in stale[0].name
    assert sweep_stale_temporaries(out) == stale and not stale[0].exists()
    # a live writer's temporary is never swept
    mine = tmp_path / f".data.parquet.tmp-{os.uname().nodename}-{os.getpid()}-x"
    mine.write_bytes(b"live")
    assert sweep_stale_temporaries(out) == [] and mine.exists()


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. A shell starts background jobs (CI
    under nohup, `make test &`) with SIGINT ignored, and Python then never raises
    KeyboardInterrupt: the interrupt tests would wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "cgtools", "rhm-gen", "-L", "10", "-s", "2", "-v", "16", "-m", "4",
                             "-n", "3000000", "-o", str(tmp_path / "x.parquet")], env=ENV, preexec_fn=_sigint_default,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["cgtools rhm-gen: interrupted"], err
    assert list(tmp_path.iterdir()) == []


def test_a_run_too_large_for_the_machine_is_refused_before_it_starts(trained, tmp_path):
    """Sentences of 2^20 tokens at width 256: the estimate (about 1 TiB) is refused in one line
    before any file is written (the run used to die in the allocator with a 59-line traceback)."""
    from cgtools.models.registry import check_fits
    from cgtools.models.unet import UNetConfig, training_bytes

    big = UNetConfig(vocab=4, depth=20, branching=2, width=256)
    assert training_bytes(big, 64) > 2**39
    with pytest.raises(Exception, match="GiB are available; lower --batch-size or --width"):
        check_fits("unet", big, 64)
    check_fits("unet", UNetConfig(vocab=4, depth=2, branching=2, width=16), 8)  # a small run fits
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", tmp_path / "r",
              "--width", 200000, "--steps", 1)
    one_line_error(res, "GiB are available")
    assert not (tmp_path / "r").exists()


def test_nan_loss_is_one_line(trained, tmp_path):
    res = run("train", trained / "train.parquet", "--val", trained / "val.parquet", "-o", tmp_path / "r",
              "--lr", 1e30, "--optimizer", "sgd", *TINY)
    one_line_error(res, "training diverged at step", "lower --lr")


# ---- every file kind, damaged ----------------------------------------------------------------------
def _damage(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[: len(blob) // 2]
    if how == "bit-flipped":  # the middle of the file: table data or tensor data
        b = bytearray(blob)
        mid = len(b) // 2
        b[mid:mid + 64] = bytes(255 - x for x in b[mid:mid + 64])
        return bytes(b)
    if how == "header":  # the first bytes: Parquet magic or safetensors header
        return b"\x00" * 16 + blob[16:]
    raise AssertionError(how)


@pytest.fixture(scope="module")
def every_kind(trained):
    """One file of every kind cgtools writes, and a command reading it (with its other args)."""
    root = trained
    assert run("rhm-gen", "-g", root / "train.parquet", "-n", 4, "--seed", 5, "--grammar-out",
               root / "grammar.safetensors", "-o", root / "g4.parquet", "--force").exit_code == 0
    assert run("measure-accuracy", root / "val.parquet", "-o", root / "acc.parquet", "--tag", "P=8",
               "--force").exit_code == 0
    return {
        "sequences": (root / "val.parquet", lambda f: ["measure-accuracy", f]),
        "grammar": (root / "grammar.safetensors", lambda f: ["sample", "--denoiser", "bp", "--grammar", f, "-n", 2]),
        "checkpoint": (root / "run" / "model.safetensors", lambda f: ["sample", f, "-n", 2]),
        "metrics": (root / "run" / "metrics.parquet", lambda f: ["plot", "accuracy-online", f]),
        "results": (root / "acc.parquet", lambda f: ["sample-complexity", f]),
    }


@pytest.mark.parametrize("kind", ["sequences", "grammar", "checkpoint", "metrics", "results"])
@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "header"])
def test_damaged_files_of_every_kind(every_kind, tmp_path, kind, how):
    """A damaged file is a one-line error naming it; the output is not created. (A flipped byte
    inside a table's data pages can decode to other values: Parquet's own page checksums are off
    by default, so then only a checkpoint, whose tensors carry a CRC, is guaranteed to notice.)"""
    source, command = every_kind[kind]
    bad = tmp_path / f"bad{source.suffix}"
    bad.write_bytes(_damage(source.read_bytes(), how))
    out = tmp_path / ("fig.png" if kind == "metrics" else "out.parquet")
    res = run(*command(bad), "-o", out)
    if res.exit_code == 0:  # only possible for a bit flip the format cannot see
        assert how == "bit-flipped" and kind in ("sequences", "metrics", "results"), res.stderr
        return
    one_line_error(res, bad.name)
    assert not out.exists()


def test_wrong_kind_everywhere(every_kind, tmp_path):
    """Every reader refuses a file of another kind with one line naming it."""
    files = {k: v[0] for k, v in every_kind.items()}
    out = tmp_path / "out.parquet"
    one_line_error(run("sample", files["sequences"], "-n", 2, "-o", out), "not a safetensors checkpoint")
    one_line_error(run("measure-accuracy", files["checkpoint"]), files["checkpoint"].name)
    one_line_error(run("sample-complexity", files["sequences"]), files["sequences"].name)
    one_line_error(run("plot", "accuracy", files["metrics"], "-o", tmp_path / "f.png"), files["metrics"].name)
    one_line_error(run("rhm-gen", "-g", files["results"], "-n", 2, "-o", out), files["results"].name)
    assert not out.exists()


# ---- kill and interrupt the long commands ----------------------------------------------------------
def _rows_of(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            return pq.read_metadata(f).num_rows
    except FileNotFoundError:
        return 0


def test_sigkill_during_train_then_resume_is_bit_identical(trained, tmp_path):
    args = ["train", trained / "train.parquet", "--val", trained / "val.parquet", "--width", 32, "--steps", 400,
            "--eval-every", 25, "--sample-check", 0, "--batch-size", 8, "--threads", 1]
    assert _cgtools(*args, "-o", tmp_path / "whole").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cgtools", *map(str, args), "-o", str(tmp_path / "cut")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics = tmp_path / "cut" / "metrics.parquet"
    while time.time() < deadline and proc.poll() is None:
        # read through one open file: pq.read_table(path) may open the path twice (footer, then
        # pages) and straddle the trainer's atomic replacement of the file
        if metrics.exists() and _rows_of(metrics) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    res = _cgtools(*args, "-o", tmp_path / "cut", "--resume")
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    import torch

    a = load_file(tmp_path / "whole" / "last.safetensors")
    b = load_file(tmp_path / "cut" / "last.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("command", ["train", "sample"])
def test_ctrl_c_during_train_and_sample(trained, tmp_path, command):
    if command == "train":
        args = ["train", trained / "train.parquet", "--val", trained / "val.parquet", "--width", 32,
                "--steps", 100000, "--eval-every", 50, "--sample-check", 0, "--batch-size", 8, "--threads", 1,
                "-o", tmp_path / "run"]
        ready = lambda: (tmp_path / "run" / "metrics.parquet").exists()  # noqa: E731
    else:
        args = ["sample", trained / "run" / "model.safetensors", "-n", 200000, "--batch-size", 256, "--threads", 1,
                "-o", tmp_path / "s.parquet"]
        ready = lambda: True  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-m", "cgtools", *map(str, args)], env=ENV, preexec_fn=_sigint_default,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ready():
        time.sleep(0.05)
    time.sleep(3.0)  # into the work (imports and set-up done)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"cgtools {command}: interrupted", err
    assert "Traceback" not in err
    if command == "train":  # the state was saved: --resume continues from it
        assert (tmp_path / "run" / "last.safetensors").exists()
    else:
        assert not (tmp_path / "s.parquet").exists()
