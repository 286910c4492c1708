"""The command line: contract flags, exit codes, one-line errors, no half-written files, real pipes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.errors import ConfigError, OutputError
from cgtools.formats.files import check_output

runner = CliRunner()
GEN = ["rhm-gen", "-L", "3", "-s", "2", "-v", "8", "-m", "2"]


def run(*args, input=None):
    return runner.invoke(app, list(map(str, args)), input=input)


def _meta(path):
    return json.loads(pq.read_schema(path).metadata[b"cgtools"])


def test_help_lists_commands_and_version():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("rhm-gen", "measure-accuracy", "theory"):
        assert cmd in res.stdout
    res = run("--version")
    assert res.exit_code == 0 and res.stdout.startswith("cgtools ")


def test_rhm_gen_writes_table_with_contract_metadata(tmp_path):
    out, gout = tmp_path / "train.parquet", tmp_path / "g.safetensors"
    res = run(*GEN, "-n", 100, "--seed", 3, "--latents", "--perturb", 2, "--grammar-out", gout, "-o", out)
    assert res.exit_code == 0, res.stderr
    table = pq.read_table(out)
    assert table.num_rows == 100
    assert table.column_names == ["tokens", "latent_1", "latent_2", "latent_3", "perturbed"]
    assert table.schema.field("tokens").type.list_size == 8
    assert table.schema.field("latent_3").type.list_size == 1
    meta = _meta(out)
    assert meta["schema"] == "sequences/1"
    g = meta["grammar"]
    assert (g["depth"], g["branching"], g["vocab"], g["synonyms"], g["n_classes"], g["seed"]) == (3, 2, 8, 2, 8, 3)
    assert len(g["rules"]) == 3 and len(g["rules"][2]) == 8
    assert meta["provenance"]["seed"] == 3 and meta["provenance"]["tool"] == "cgtools rhm-gen"
    assert meta["perturbation"] == {"level": 2, "mode": "synonym"}
    assert gout.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_grammar_reuse_and_exclude_give_disjoint_splits(tmp_path):
    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    assert run(*GEN, "-n", 900, "-o", train).exit_code == 0
    res = run("rhm-gen", "--grammar", train, "--exclude", train, "-n", 124, "--seed", 1, "-o", val)
    assert res.exit_code == 0, res.stderr
    a = {tuple(r) for r in pq.read_table(train)["tokens"].to_pylist()}
    b = {tuple(r) for r in pq.read_table(val)["tokens"].to_pylist()}
    assert len(b) == 124 and not a & b
    assert _meta(val)["grammar"] == _meta(train)["grammar"]
    # the last sentence left is one too many
    res = run("rhm-gen", "--grammar", train, "--exclude", train, "--exclude", val, "-n", 1, "-o", tmp_path / "x.parquet")
    assert res.exit_code == 1 and "only 1024" in res.stderr and not (tmp_path / "x.parquet").exists()


def _assert_one_line_error(res, fragment):
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cgtools ") and ": error: " in lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize("args, fragment", [
    (["rhm-gen", "-L", "3", "-s", "2", "-v", "4", "-m", "5", "-n", "1"], "m <= v^(s-1)"),
    (["rhm-gen", "-L", "3", "-s", "2", "-v", "4", "-m", "2", "--n-classes", "9", "-n", "1"], "n_classes * m"),
    (GEN + ["-n", "1025"], "only 1024"),
    (["rhm-gen", "-L", "3", "-n", "5"], "missing --branching"),
    (GEN + ["-n", "5", "--perturb", "4"], "--perturb"),
    (["rhm-gen", "--grammar", "nope.parquet", "-n", "5"], "nope.parquet: no such file"),
])
def test_rhm_gen_bad_input_one_line_exit_1_no_file(tmp_path, args, fragment):
    out = tmp_path / "out.parquet"
    res = run(*args, "-o", out)
    _assert_one_line_error(res, fragment)
    assert list(tmp_path.iterdir()) == []


def test_grammar_from_a_file_that_is_not_a_grammar(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    _assert_one_line_error(run("rhm-gen", "--grammar", junk, "-n", 1, "-o", tmp_path / "o.parquet"),
                           "neither a Parquet table nor a safetensors file")
    out = tmp_path / "a.parquet"
    run(*GEN, "-n", 10, "-o", out)
    _assert_one_line_error(run("rhm-gen", "--grammar", out, "-v", "9", "-n", 1, "-o", tmp_path / "o.parquet"),
                           "contradicts")


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "t.parquet"
    out.write_bytes(b"precious")
    _assert_one_line_error(run(*GEN, "-n", 5, "-o", out), "--force")
    assert out.read_bytes() == b"precious"
    assert run(*GEN, "-n", 5, "-o", out, "--force").exit_code == 0
    assert pq.read_table(out).num_rows == 5


def test_binary_output_is_refused_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with pytest.raises(OutputError, match="terminal"):
        check_output("-", force=False)


def test_usage_errors_exit_2(tmp_path):
    assert run("rhm-gen", "--no-such-flag").exit_code == 2
    assert run(*GEN, "-n", "-3", "-o", tmp_path / "x").exit_code == 2
    assert run(*GEN, "-n", "5", "--perturb-mode", "bogus", "-o", tmp_path / "x").exit_code == 2
    assert run("measure-accuracy", "a", "b").exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_exception():
    res = run("--debug", "rhm-gen", "-L", "3", "-s", "2", "-v", "4", "-m", "5", "-n", "1", "-o", "x")
    assert isinstance(res.exception, ConfigError)


def test_measure_accuracy_table_json_and_stdin(tmp_path):
    train, samples = tmp_path / "train.parquet", tmp_path / "s.parquet"
    run(*GEN, "-n", 200, "-o", train)
    run(*GEN, "-n", 300, "--seed", 0, "-o", samples)  # same grammar seed: overlaps the training set
    res = run("measure-accuracy", samples, "--train", train, "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["n"] == 300 and report["accuracy"] == [1.0, 1.0, 1.0]
    assert 0 < report["memorized"] < 1 and report["memorized"] + report["novel_valid"] == pytest.approx(1.0)
    res = run("measure-accuracy", "-", input=samples.read_bytes())
    assert res.exit_code == 0 and "A_3" in res.stdout and "1.0000" in res.stdout


def test_measure_accuracy_bad_inputs(tmp_path):
    import pyarrow as pa

    grammar_table = tmp_path / "g.parquet"
    run(*GEN, "-n", 5, "-o", grammar_table)
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 4}), short)
    _assert_one_line_error(run("measure-accuracy", short), "carries no grammar")
    _assert_one_line_error(run("measure-accuracy", short, "--grammar", grammar_table), "length 3")
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"tokens": [[0] * 7 + [99]]}), big)
    _assert_one_line_error(run("measure-accuracy", big, "-g", grammar_table), "outside the vocabulary")
    notparquet = tmp_path / "n.parquet"
    notparquet.write_text("not parquet")
    _assert_one_line_error(run("measure-accuracy", notparquet), "not a readable Parquet file")
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"text": ["a"]}), nocol)
    _assert_one_line_error(run("measure-accuracy", nocol), "no 'tokens' column")
    _assert_one_line_error(run("measure-accuracy", tmp_path / "missing.parquet"), "no such file")


def test_theory_json():
    res = run("theory", "-L", 3, "-s", 2, "-v", 8, "-m", 2, "--json")
    t = json.loads(res.stdout)
    assert t["n_sentences"] == 1024 and t["p_star"] == pytest.approx(8 * 16 / 0.75)
    res = run("theory", "-L", 3, "-s", 2, "-v", 8, "-m", 2)
    assert "P_l" in res.stdout


def test_real_shell_pipe(tmp_path):
    """`rhm-gen -o - | measure-accuracy -` through real processes; stdout carries only data."""
    exe = Path(sys.executable).parent / "cgtools"
    cmd = f"'{exe}' rhm-gen -L 4 -s 2 -v 8 -m 4 -n 3000 --seed 2 -o - | '{exe}' measure-accuracy - --json"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n"] == 3000 and report["accuracy"] == [1.0] * 4 and report["distinct"] == 1.0
    # the binary stream itself is a valid Parquet table
    raw = subprocess.run([str(exe), "rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "10", "-o", "-"],
                         capture_output=True, timeout=60).stdout
    assert pq.read_table(io.BytesIO(raw)).num_rows == 10
    # a reader that goes away early is not an error worth a traceback
    proc = subprocess.run(["bash", "-c", f"'{exe}' theory -L 3 -s 2 -v 8 -m 2 | head -1"], capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr
