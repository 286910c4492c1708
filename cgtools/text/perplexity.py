"""Conditional perplexity versus context length under a causal LM (paper App. D.3, Fig. 8).

For every text (a sample), its first tokens x_0 x_1 ... form a window; for a context length T,

    nll(T) = mean over the windows with a token at position T of  -log p_LM(x_T | x_0 ... x_{T-1})

in nats, and perplexity(T) = exp(nll(T)) (Eq. 27: the exponential of the mean, not the mean of
exponentials). If the text is coherent only over a length l, nll(T) stops falling for T > l.
T counts text tokens only: a tokenizer's own start token (LLaMA's <s>) is put before every window
and is not part of the context length. Windows are batched with right padding and an attention
mask; a padded position is never a scored target, and in a causal model it cannot influence a
real one, so batching does not change the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.errors import ConfigError, InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile
from cgtools.logs import progress

DEFAULT_MAX_LENGTH = 1024  # the paper's MD4 context (App. C)
TEXT = "text"
TOKENS = "tokens"


@dataclass
class PerplexityResult:
    """One row per context length T; lists are aligned with `context_length`."""

    context_length: list[int]  # T
    nll: list[float]  # mean -log p(x_T | x_<T), nats
    nll_se: list[float | None]  # standard error of that mean (None when n = 1)
    perplexity: list[float]  # exp(nll)
    n: list[int]  # windows with a token at position T
    windows: int  # windows scored
    tokens: int  # tokens fed to the model (prefixes and padding excluded)
    max_length: int  # window length in tokens
    extra: dict = field(default_factory=dict)  # model name, input description...

    def columns(self) -> dict:
        """Typed Arrow columns of the results table (kind "perplexity")."""
        return {"context_length": pa.array(self.context_length, pa.int64()),
                "nll": pa.array(self.nll, pa.float64()),
                "nll_se": pa.array(self.nll_se, pa.float64()),
                "perplexity": pa.array(self.perplexity, pa.float64()),
                "n": pa.array(self.n, pa.int64())}

    def to_json(self) -> dict:
        return {"context_length": self.context_length, "nll": self.nll, "nll_se": self.nll_se,
                "perplexity": self.perplexity, "n": self.n, "windows": self.windows, "tokens": self.tokens,
                "max_length": self.max_length, **self.extra}


def powers_of_two(longest: int) -> list[int]:
    """1, 2, 4, ... up to `longest` (the default context lengths)."""
    out, t = [], 1
    while t <= longest:
        out.append(t)
        t *= 2
    return out


def parse_context_lengths(spec: str | None) -> list[int] | None:
    """'1,2,8' -> [1, 2, 8]; 'all' -> [] (every position); None -> None (powers of two)."""
    if spec is None:
        return None
    if spec.strip().lower() == "all":
        return []
    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"context lengths must be integers separated by commas, or 'all'; got {spec!r}") from None
    if not values or values[0] < 0:
        raise ConfigError(f"context lengths must be non-negative integers, got {spec!r}")
    return values


def make_windows(ids: Sequence[Sequence[int]], length: int, all_windows: bool = False) -> list[np.ndarray]:
    """Windows of at most `length` tokens: the start of every text, or (all_windows) its
    consecutive non-overlapping pieces. Windows of fewer than 2 tokens score nothing and are dropped."""
    out = []
    for seq in ids:
        arr = np.asarray(seq, dtype=np.int64)
        starts = range(0, len(arr), length) if all_windows else range(min(1, len(arr)))
        out.extend(w for w in (arr[s:s + length] for s in starts) if len(w) >= 2)
    return out


class _Moments:
    """Count, sum and sum of squares of the nll at each context length (float64)."""

    def __init__(self, k: int) -> None:
        self.count = np.zeros(k, dtype=np.int64)
        self.total = np.zeros(k)
        self.squares = np.zeros(k)

    def add(self, nll: np.ndarray, valid: np.ndarray) -> None:
        """nll, valid [B, K]."""
        values = np.where(valid, nll, 0.0)
        self.count += valid.sum(axis=0)
        self.total += values.sum(axis=0)
        self.squares += (values ** 2).sum(axis=0)


def score_batch(model, windows: Sequence[np.ndarray], context_lengths: Sequence[int], *,
                prefix: Sequence[int] = (), pad_id: int = 0, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """-log p(x_T | prefix, x_<T) in nats for each window and each T of `context_lengths`
    (ascending): (nll [B, K] float64, NaN
    where the window has no token at position T; valid [B, K] bool, False there).

    The windows are right-padded into one [B, P + max len] batch (P = len(prefix)) with an
    attention mask; only the logits of the positions that predict a requested token are computed
    when the model takes `logits_to_keep` (the vocabulary projection dominates memory otherwise).
    """
    import torch

    p = len(prefix)
    lengths = np.array([len(w) for w in windows])
    width = p + int(lengths.max())
    ids = np.full((len(windows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(windows), width), dtype=np.int64)
    for b, w in enumerate(windows):
        ids[b, :p] = prefix
        ids[b, p:p + len(w)] = w
        mask[b, :p + len(w)] = 1
    t = np.asarray(context_lengths, dtype=np.int64)
    if np.any(np.diff(t) <= 0):
        raise ValueError("context_lengths must be strictly ascending")  # `keep` below is a prefix of t
    keep = t[p + t < width]  # targets beyond the longest window of this batch: nobody has them
    valid = np.zeros((len(windows), len(t)), dtype=bool)
    nll = np.full((len(windows), len(t)), np.nan)
    if keep.size == 0:
        return nll, valid
    source = p + keep - 1  # the logits at position i predict the token at i + 1
    input_ids = torch.from_numpy(ids).to(device)
    attention = torch.from_numpy(mask).to(device)
    with torch.inference_mode():
        if _takes_logits_to_keep(model):
            logits = model(input_ids=input_ids, attention_mask=attention,
                           logits_to_keep=torch.from_numpy(source).to(device)).logits  # [B, K', V]
        else:
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, torch.from_numpy(source)]
        # float64: the log-normaliser of a 50k vocabulary loses digits in float32
        logp = torch.log_softmax(logits.double(), dim=-1)
        target = input_ids[:, torch.from_numpy(source + 1).to(device)]  # [B, K']
        picked = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu().numpy()
    k = len(keep)
    valid[:, :k] = (p + keep)[None, :] < (p + lengths)[:, None]
    nll[:, :k] = np.where(valid[:, :k], picked, np.nan)  # a padded target is not a score
    return nll, valid


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def conditional_nll(model, windows: Sequence[np.ndarray], context_lengths: Sequence[int] | None = None, *,
                    prefix: Sequence[int] = (), pad_id: int = 0, batch_size: int = 8, device: str = "cpu",
                    max_length: int | None = None, extra: dict | None = None) -> PerplexityResult:
    """Mean -log p(x_T | x_<T) over the windows at each context length T (default: powers of two
    up to the last position of the longest window; [] = every position); rows that no window
    reaches are left out. Windows are scored longest first (batches of similar length, little
    padding); the result does not depend on the order or on batch_size beyond float rounding."""
    if not windows:
        raise InputError("no text of 2 tokens or more to score")
    longest = max(len(w) for w in windows)
    if context_lengths is None:
        ts = powers_of_two(longest - 1)
    elif len(context_lengths) == 0:
        ts = list(range(0 if prefix else 1, longest))
    else:
        ts = sorted(set(int(t) for t in context_lengths))
        if ts[0] == 0 and not prefix:
            raise ConfigError("context length 0 needs a start token, and this tokenizer adds none; "
                              "the first scorable token is at T = 1")
    # Positions past the last requested one are never needed: cut the windows there.
    cut = max(ts) + 1
    windows = [w[:cut] for w in windows if len(w) >= 2]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    moments = _Moments(len(ts))
    total_tokens = int(sum(len(w) for w in windows))
    with progress(total_tokens, "perplexity") as bar:
        for lo in range(0, len(order), batch_size):
            batch = [windows[i] for i in order[lo:lo + batch_size]]
            nll, valid = score_batch(model, batch, ts, prefix=prefix, pad_id=pad_id, device=device)
            moments.add(nll, valid)
            bar.advance(sum(len(w) for w in batch))
    rows = [k for k in range(len(ts)) if moments.count[k] > 0]
    count = moments.count[rows]
    mean = moments.total[rows] / count
    var = np.maximum(moments.squares[rows] - count * mean ** 2, 0.0) / np.maximum(count - 1, 1)
    se = [math.sqrt(v / c) if c > 1 else None for v, c in zip(var.tolist(), count.tolist())]
    return PerplexityResult(context_length=[ts[k] for k in rows], nll=mean.tolist(), nll_se=se,
                            perplexity=[math.exp(m) for m in mean.tolist()], n=count.tolist(),
                            windows=len(windows), tokens=total_tokens,
                            max_length=max_length if max_length is not None else longest, extra=dict(extra or {}))


def perplexity(lm, texts: Iterable[str], context_lengths: Sequence[int] | None = None, *,
               max_length: int | None = None, all_windows: bool = False, batch_size: int = 8) -> PerplexityResult:
    """nll and perplexity versus context length of `texts` under `lm` (a
    cgtools.text.language_model.LanguageModel). Windows of max_length tokens (default
    min(1024, what the model attends to)): one per text, or every consecutive one (all_windows)."""
    room = lm.max_positions - len(lm.prefix)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, room)
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2 tokens, got {max_length}")
    if max_length > room:
        raise ConfigError(f"--max-length {max_length} exceeds what {lm.name} attends to "
                          f"({lm.max_positions} positions{', one for its start token' if lm.prefix else ''})")
    if context_lengths:
        too_long = [t for t in context_lengths if t > max_length - 1]
        if too_long:
            raise ConfigError(f"context length {too_long[0]} needs {too_long[0] + 1} tokens; --max-length is "
                              f"{max_length}")
    texts = list(texts)
    windows = make_windows(lm.encode(texts, None if all_windows else max_length), max_length, all_windows)
    return conditional_nll(lm.model, windows, context_lengths, prefix=lm.prefix, pad_id=lm.pad_id,
                           batch_size=batch_size, device=lm.device, max_length=max_length,
                           extra={"model": lm.name, "texts": len(texts)})


@dataclass
class TextInput:
    """The texts of an input table and how they were obtained."""

    texts: list[str]
    kind: str  # "text" (a string column) or "sequences" (token ids decoded with their tokenizer)
    tokenizer: dict | str | None = None  # the sequences table's tokenizer spec


def read_texts(source: InputFile, limit: int | None = None) -> TextInput:
    """The texts of a Parquet table with a string column `text`, or of a sequences table whose
    cgtools metadata names its tokenizer (decoded with cgtools.text.tokenizers); first `limit` rows."""
    where = source.display()
    try:
        handle = pa.BufferReader(source.data) if source.data is not None else source.name
        file = pq.ParquetFile(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where}: not a readable Parquet file ({_first_line(exc)})") from None
    schema = file.schema_arrow
    if TEXT in schema.names:
        t = schema.field(TEXT).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise SchemaError(f"{where}: column '{TEXT}' must hold strings, got {t}")
        texts = _read_column(file, TEXT, limit, where)
        if any(x is None for x in texts):
            raise SchemaError(f"{where}: column '{TEXT}' has missing values")
        return TextInput(texts, "text")
    if TOKENS in schema.names:
        raw = (schema.metadata or {}).get(metadata.METADATA_KEY.encode())
        meta = metadata.decode(raw, where) if raw is not None else {}
        spec = meta.get("tokenizer")
        if not spec:
            raise SchemaError(f"{where}: a sequences table without a tokenizer in its metadata (RHM data?); "
                              f"perplexity needs text: a table with a string column '{TEXT}', or token ids "
                              f"written by `cgtools tokenize`")
        from cgtools.text.tokenizers import load_tokenizer  # only text sequences need it

        tokenizer = load_tokenizer(spec)
        rows = _read_column(file, TOKENS, limit, where)
        if any(r is None for r in rows):
            raise SchemaError(f"{where}: column '{TOKENS}' has missing values")
        bad = next((i for r in rows for i in r if i is None or not 0 <= i < tokenizer.vocab), False)
        if bad is not False:
            raise SchemaError(f"{where}: token id {bad} outside its tokenizer's vocabulary [0, {tokenizer.vocab})")
        return TextInput([tokenizer.decode(list(r)) for r in rows], "sequences", spec)
    raise SchemaError(f"{where}: no '{TEXT}' column (strings) and no '{TOKENS}' column "
                      f"(columns: {', '.join(schema.names) or 'none'})")


def _read_column(file: pq.ParquetFile, column: str, limit: int | None, where: str) -> list:
    out: list = []
    try:
        for batch in file.iter_batches(batch_size=4096, columns=[column]):
            out.extend(batch.column(0).to_pylist())
            if limit is not None and len(out) >= limit:
                return out[:limit]
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: damaged table, cannot read its data ({_first_line(exc)})") from None
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
