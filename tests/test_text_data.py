"""Text data: tokenizers, corpora (local files, the embedded Shakespeare), `cgtools tokenize` and
`cgtools detokenize`, and that `cgtools train` accepts the tables they write."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.errors import CgtoolsError, ConfigError, InputError
from cgtools.formats.files import open_input
from cgtools.formats.sequences import SequencesTable
from cgtools.text import corpus as tc
from cgtools.text.tokenizers import (ByteTokenizer, CharTokenizer, TextTokenizer, chars_from_texts, load_tokenizer,
                                     separator_ids, tokenizer_for_corpus)
from cgtools.training.source import training_data

runner = CliRunner()
DOCS = ["The quick brown fox jumps over the lazy dog.\nAnd then it ran away, far away.\n",
        "Second document: colourless green ideas sleep furiously; 12345 numbers too!\n",
        "A third one, shorter.\n"]
VALIDATION_PLAYS = ["henry-iv-part-1", "love-s-labours-lost", "the-merchant-of-venice"]


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def meta(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"cgtools"])


def tokens(path) -> np.ndarray:
    return SequencesTable(open_input(path)).read_column()


def texts(path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


def assert_one_line_error(res, *words):
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgtools ") and ": error: " in lines[0], res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def corpus_files(tmp_path):
    paths = []
    for i, doc in enumerate(DOCS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(doc)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


# --- tokenizers ------------------------------------------------------------------------------------

def test_gpt2_ids_match_the_original_bpe(gpt2):
    assert isinstance(gpt2, TextTokenizer)
    assert gpt2.vocab == 50257 and gpt2.spec == {"kind": "gpt2"}
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello") == [18435]  # the space belongs to the word (byte-level BPE)
    assert separator_ids(gpt2) == [50256] and gpt2.encode("<|endoftext|>") == [50256]
    text = "Ünïcode — and 'quotes'\n\ttabs  "
    assert gpt2.decode(gpt2.encode(text)) == text


def test_bytes_and_chars_round_trip_and_specs_rebuild_them():
    b = ByteTokenizer()
    assert b.vocab == 256 and b.encode("é") == [0xC3, 0xA9] and b.decode([0xC3]) == "\ufffd"
    assert load_tokenizer(b.spec).encode("abc") == [97, 98, 99]
    c = chars_from_texts(DOCS)
    assert c.spec["kind"] == "chars" and c.vocab == len(c.spec["alphabet"]) == len(set("".join(DOCS)) | {"\n"})
    assert list(c.spec["alphabet"]) == sorted(c.spec["alphabet"])  # same corpus, same ids
    again = load_tokenizer(json.loads(json.dumps(c.spec)))
    for doc in DOCS:
        assert again.encode(doc) == c.encode(doc) and c.decode(c.encode(doc)) == doc
    assert separator_ids(c) == c.encode("\n")
    with pytest.raises(InputError, match="U\\+0051"):
        c.encode("Q")  # not in the corpus
    with pytest.raises(ConfigError, match="alphabet"):
        load_tokenizer("chars")  # a chars tokenizer only exists with its alphabet
    assert tokenizer_for_corpus("chars", ["ba"]).spec == {"kind": "chars", "alphabet": "\nab"}
    with pytest.raises(ConfigError, match="repeats"):
        CharTokenizer("aa")
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        load_tokenizer("no-such-tokenizer")


def test_a_tokenizer_directory_loads_offline_with_its_eos_as_separator(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    loaded = load_tokenizer(str(d))
    assert loaded.spec == {"kind": "dir", "path": str(d.resolve())}
    assert loaded.vocab == tok.get_vocab_size()
    assert loaded.encode(DOCS[0]) == tok.encode(DOCS[0]).ids
    assert separator_ids(loaded) == [tok.token_to_id("</s>")]
    assert load_tokenizer(loaded.spec).encode("green ideas") == loaded.encode("green ideas")


def test_a_missing_extra_is_a_clear_error(monkeypatch, tmp_path, corpus_files):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(CgtoolsError, match=r"pip install 'cgtools\[text\]'"):
        load_tokenizer("gpt2")
    out = tmp_path / "t.parquet"
    assert_one_line_error(run("tokenize", *corpus_files, "--split", "all", "--length", 4, "-o", out),
                          "cgtools[text]")
    assert not out.exists()


# --- corpora ---------------------------------------------------------------------------------------

def test_shakespeare_loads_offline_and_splits_by_play_deterministically():
    c = tc.shakespeare()
    assert len(c.documents) == len(c.names) == 38 and c.names == sorted(c.names)
    train, val = c.split("train"), c.split("validation")
    assert tc.split_documents(c.names, "validation") == VALIDATION_PLAYS
    assert len(train) == 35 and len(val) == 3 and not set(train) & set(val)
    assert sorted(train + val) == sorted(c.documents) == sorted(c.split("all"))
    assert tc.shakespeare().documents == c.documents
    hamlet = c.documents[c.names.index("hamlet")]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?\n" in hamlet
    assert not any(mark in doc for doc in c.documents for mark in ("**", "_", "\\[", "#", "  \n"))


def test_local_text_jsonl_and_parquet_corpora(tmp_path, corpus_files):
    assert tc.read_files(corpus_files).documents == DOCS  # one document per text file
    assert tc.read_files(corpus_files[:1], sample_by="line").documents == DOCS[0].splitlines()
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    pqf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": DOCS[::-1]}), pqf)
    got = tc.read_files([corpus_files[0], jl, pqf], text_column="body").documents
    assert got == [DOCS[0], *DOCS, *DOCS[::-1]]  # the order of the files, then of the rows
    with pytest.raises(InputError, match="no column 'text'"):
        tc.read_files([jl])
    with pytest.raises(InputError, match="not text"):
        tc.read_files([jl], text_column="n")


# --- tokenize / detokenize -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bytes", "gpt2", "chars"])
def test_tokenize_detokenize_round_trip(tmp_path, corpus_files, kind):
    out, back = tmp_path / "seq.parquet", tmp_path / "texts.parquet"
    length = 16 if kind == "gpt2" else 40
    res = run("tokenize", *corpus_files, "--tokenizer", kind, "--split", "all", "--length", length, "-o", out)
    assert res.exit_code == 0, res.stderr
    tok = load_tokenizer(meta(out)["tokenizer"])
    sep = tok.decode(separator_ids(tok))
    assert sep == ("<|endoftext|>" if kind == "gpt2" else "\n")
    stream = sum(len(tok.encode(d)) for d in DOCS) + len(DOCS) - 1  # a separator between documents
    ids = tokens(out)
    assert ids.shape == (stream // length, length)
    res = run("detokenize", out, "-o", back)
    assert res.exit_code == 0, res.stderr
    got = texts(back)
    assert len(got) == len(ids) and all(len(tok.encode(t)) == length for t in got)
    joined = sep.join(DOCS)
    # the chunks, in order, are the text exactly, up to the dropped remainder (< one chunk)
    assert joined.startswith("".join(got))
    assert 0 <= len(tok.encode(joined[len("".join(got)):])) < length + 2
    if kind != "gpt2":
        assert "".join(got) == joined[: len(ids) * length]  # one token per byte/character (ASCII)
    assert meta(back)["tokenizer"] == meta(out)["tokenizer"]
    res = run("detokenize", out, "--print", "--limit", 2)
    assert res.exit_code == 0 and res.stdout == "".join(f"--- sequence {i} ---\n{t}\n" for i, t in enumerate(got[:2]))


def test_table_metadata_and_training_accepts_it(tmp_path):
    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    res = run("tokenize", "--tokenizer", "bytes", "--length", 32, "--limit-chunks", 20, "-o", train, "--val-out", val)
    assert res.exit_code == 0, res.stderr
    m = meta(train)
    assert m["schema"] == "sequences/1" and m["grammar"] is None and m["vocab"] == 256
    assert m["tokenizer"] == {"kind": "bytes"} and m["provenance"]["tool"] == "cgtools tokenize"
    assert m["corpus"]["kind"] == "shakespeare" and m["corpus"]["split"] == "train"
    assert m["corpus"]["separator"] == [10] and m["corpus"]["length"] == 32
    assert meta(val)["corpus"]["names"] == VALIDATION_PLAYS[:1]  # 20 chunks come from the first play
    assert pq.read_schema(train).field("tokens").type == pa.list_(pa.int16(), 32)
    data = training_data(SequencesTable(open_input(train)), SequencesTable(open_input(val)))
    assert data.grammar is None and data.spec.vocab == 256 and data.spec.length == 32
    assert data.train.shape == data.val.shape == (20, 32)


def test_shakespeare_tables_are_deterministic_and_disjoint(tmp_path):
    paths = {name: tmp_path / f"{name}.parquet" for name in ("a", "b", "va", "vb")}
    for run_name, val_name in (("a", "va"), ("b", "vb")):
        res = run("tokenize", "--length", 64, "--limit-chunks", 30, "-o", paths[run_name], "--val-out", paths[val_name])
        assert res.exit_code == 0, res.stderr
    a, b, va = tokens(paths["a"]), tokens(paths["b"]), tokens(paths["va"])
    assert a.shape == (30, 64) and np.array_equal(a, b) and np.array_equal(va, tokens(paths["vb"]))
    assert not {tuple(r) for r in a} & {tuple(r) for r in va}
    assert load_tokenizer("gpt2").decode(a[0]).startswith("A Midsummer Night's Dream\n\nACT I")
    # --split validation writes what --val-out wrote
    res = run("tokenize", "--length", 64, "--limit-chunks", 30, "--split", "validation", "-o", tmp_path / "v.parquet")
    assert res.exit_code == 0 and np.array_equal(tokens(tmp_path / "v.parquet"), va)


def test_chars_alphabet_is_reused_from_a_table(tmp_path, corpus_files):
    first, second = tmp_path / "1.parquet", tmp_path / "2.parquet"
    assert run("tokenize", *corpus_files, "--tokenizer", "chars", "--split", "all", "--length", 8, "-o", first).exit_code == 0
    alphabet = meta(first)["tokenizer"]["alphabet"]
    assert alphabet == "".join(sorted(set("".join(DOCS)) | {"\n"}))
    res = run("tokenize", corpus_files[2], "--tokenizer", first, "--split", "all", "--length", 8, "-o", second)
    assert res.exit_code == 0, res.stderr
    assert meta(second)["tokenizer"]["alphabet"] == alphabet  # not rebuilt from the smaller corpus
    (tmp_path / "q.txt").write_text("Quiz" * 10)
    res = run("tokenize", tmp_path / "q.txt", "--tokenizer", first, "--split", "all", "--length", 8, "-o", tmp_path / "3.parquet")
    assert_one_line_error(res, "U+0051")
    assert not (tmp_path / "3.parquet").exists()


def test_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path, corpus_files, monkeypatch):
    def refuse(*args, **kwargs):  # the --hub case must fail offline, never reach a hub
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    out = tmp_path / "out.parquet"
    common = ["--tokenizer", "bytes", "--split", "all", "--length", 4, "-o", out]
    assert_one_line_error(run("tokenize", tmp_path / "missing.txt", *common), "no such file")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run("tokenize", tmp_path / "empty.txt", *common), "no text")
    assert_one_line_error(run("tokenize", *corpus_files, "--tokenizer", "bytes", "--split", "all", "--length", 10_000, "-o", out),
                          "fewer than one chunk")
    # three documents: no 10th document for a validation split, and nothing is written at all
    val = tmp_path / "val.parquet"
    assert_one_line_error(run("tokenize", *corpus_files, "--tokenizer", "bytes", "--length", 4, "-o", out, "--val-out", val), "validation")
    assert_one_line_error(run("tokenize", "--hub", "someone/no-such-dataset", *common), "hub")
    res = run("tokenize", *corpus_files, "--split", "all", "--length", 0, "-o", out)
    assert res.exit_code == 2 and "--length" in res.stderr  # a usage error (click's range check)
    assert not out.exists() and not val.exists()
    with pytest.raises(ConfigError, match="--length"):
        tc.chunk_documents(DOCS, ByteTokenizer(), 0)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # an existing output is kept without --force, replaced with it
    out.write_bytes(b"keep")
    assert_one_line_error(run("tokenize", *corpus_files, *common), "--force")
    assert out.read_bytes() == b"keep"
    assert run("tokenize", *corpus_files, *common, "--force").exit_code == 0
    assert tokens(out).shape[1] == 4


def test_detokenize_refuses_tables_without_a_tokenizer(tmp_path):
    rhm = tmp_path / "rhm.parquet"
    assert run("rhm-gen", "-L", 2, "-s", 2, "-v", 4, "-m", 2, "-n", 8, "-o", rhm).exit_code == 0
    out = tmp_path / "texts.parquet"
    assert_one_line_error(run("detokenize", rhm, "-o", out), "no tokenizer")
    assert_one_line_error(run("detokenize", tmp_path / "missing.parquet", "-o", out), "no such file")
    assert not out.exists()
    # --tokenizer decodes it anyway (ids < 256 are bytes)
    res = run("detokenize", rhm, "--tokenizer", "bytes", "-o", out)
    assert res.exit_code == 0 and len(texts(out)) == 8
