"""The data a training run reads: tokens (or images), the validation split, the grammar if there is
one, and the DataSpec an architecture is sized from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cgtools.errors import InputError
from cgtools.formats.files import InputFile, file_kind
from cgtools.formats.sequences import SequencesTable
from cgtools.grammar.rhm import Grammar
from cgtools.grammar.source import check_same_grammar, resolve_grammar
from cgtools.models.registry import DataSpec


#: Metadata keys of a training table that its checkpoints and their samples carry, so that the
#: samples can be decoded downstream (`cgtools detokenize` reads "tokenizer").
CARRIED_KEYS = ("tokenizer", "vocab", "images")


def carried_meta(meta: dict) -> dict:
    """The CARRIED_KEYS present (and not None) in a table's or checkpoint's metadata."""
    return {k: meta[k] for k in CARRIED_KEYS if meta.get(k) is not None}


@dataclass(frozen=True)
class TrainingData:
    train: np.ndarray  # [P, d] int64 tokens, or float32 [P, C, H, W] images in [-1, 1]
    val: np.ndarray  # [N, d] int64, or float32 [N, C, H, W]
    grammar: Grammar | None
    spec: DataSpec
    meta: dict = field(default_factory=dict)  # carried_meta of the training table


def training_data(table: SequencesTable, val_table: SequencesTable, *, online: bool = False,
                  allow_overlap: bool = False) -> TrainingData:
    """Read and check a training and a validation table, before any training starts.

    With a grammar (RHM data) the sizes come from it and the validation table must share it;
    without one (text) the vocabulary is the metadata's "vocab" or, failing that, the largest
    token id + 1 over both tables. InputError for: no validation (or, offline, no training)
    sequences, token ids outside the vocabulary, and validation sequences that also occur in the
    training data (early stopping would measure memorisation) unless allow_overlap.
    """
    grammar = resolve_grammar(None, table, required=False)
    if grammar is not None:
        check_same_grammar(grammar, val_table, f"was drawn from a different grammar than {table.display()}")
        length = grammar.length
        train = table.read_column(length=length)
        val = val_table.read_column(length=length)
        spec = DataSpec(vocab=grammar.vocab, length=length, depth=grammar.depth,
                        branching=grammar.branching)
    else:
        train = table.read_column()
        val = val_table.read_column(length=train.shape[1] if train.size else None)
        if not train.size:
            raise InputError(f"{table.display()}: no training sequences")
        vocab = table.meta.get("vocab") or int(max(train.max(), val.max() if val.size else 0)) + 1
        spec = DataSpec(vocab=int(vocab), length=train.shape[1])
    if not len(val):
        raise InputError(f"{val_table.display()}: no validation sequences")
    if not online and not len(train):
        raise InputError(f"{table.display()}: no training sequences")
    for tokens, t in ((train, table), (val, val_table)):
        if tokens.size and (tokens.min() < 0 or tokens.max() >= spec.vocab):
            raise InputError(f"{t.display()}: token ids outside the vocabulary [0, {spec.vocab}) "
                             f"(found {int(tokens.min())}..{int(tokens.max())})")
    if not allow_overlap and len(train):
        shared = overlap_fraction(val, train)
        if shared > 0:
            raise InputError(f"{val_table.display()}: {shared:.1%} of the validation sequences are also in "
                             f"{table.display()} (early stopping would measure memorisation); draw a disjoint "
                             f"split (rhm-gen --exclude) or pass --allow-overlap")
    return TrainingData(train, val, grammar, spec, carried_meta(table.meta))


def overlap_fraction(rows: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of `rows` [N, d] that equal some row of `reference` [P, d]."""
    if not len(rows) or not len(reference):
        return 0.0
    as_void = lambda a: np.ascontiguousarray(a, dtype=np.int64).view(  # noqa: E731
        np.dtype((np.void, a.shape[1] * 8))).ravel()
    return float(np.isin(as_void(rows), as_void(reference)).mean())


def is_image_table(source: InputFile) -> bool:
    """Whether `source` is a Parquet table with an `image` column (an image table) rather than
    a sequences table; only the footer is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file_kind(source) != "parquet":
        return False
    try:
        handle = pa.BufferReader(source.data) if source.data is not None else source.name
        return "image" in pq.read_schema(handle).names
    except (pa.ArrowInvalid, OSError):
        return False  # the sequences reader reports the damage


def read_training_tables(data: InputFile, val: InputFile):
    """The training and validation tables: both image tables or both sequences tables."""
    from cgtools.formats.images import ImagesTable

    kinds = [is_image_table(s) for s in (data, val)]
    if kinds[0] != kinds[1]:
        what = lambda image: "an image table" if image else "a sequences table"  # noqa: E731
        raise InputError(f"{data.display()} is {what(kinds[0])} but {val.display()} is {what(kinds[1])}; "
                         f"train and validate on the same kind of data")
    if kinds[0]:
        return ImagesTable(data), ImagesTable(val)
    return SequencesTable(data), SequencesTable(val)


def load_training_data(data: InputFile, val: InputFile, *, online: bool = False,
                       allow_overlap: bool = False) -> TrainingData:
    """:func:`training_data` or :func:`image_training_data`, by the kind of the tables."""
    table, val_table = read_training_tables(data, val)
    if isinstance(table, SequencesTable):
        return training_data(table, val_table, online=online, allow_overlap=allow_overlap)
    if online:
        raise InputError("--online draws sentences from a grammar; image data trains offline")
    return image_training_data(table, val_table, allow_overlap=allow_overlap)


def image_training_data(table, val_table, *, allow_overlap: bool = False) -> TrainingData:
    """Training and validation images (cgtools.formats.images.ImagesTable) as float32
    [N, C, H, W] in [-1, 1]; both tables must hold images of one size and channel count.
    InputError for an empty table, mismatched shapes, and validation images that also occur in
    the training set (unless allow_overlap)."""
    from cgtools.formats.images import to_model_range

    pixels = []
    for t in (table, val_table):
        if not t.num_rows:
            raise InputError(f"{t.display()}: no images")
        pixels.append(t.read())  # uint8 [N, H, W, C]
    (train, val) = pixels
    if train.shape[1:] != val.shape[1:]:
        h, w, c = train.shape[1:]
        raise InputError(f"{val_table.display()}: images of shape {val.shape[1:]} (H, W, C), but the training "
                         f"images are {h}x{w} with {c} channels; convert them with `cgtools images --size "
                         f"{h}x{w} --channels {c}`")
    if not allow_overlap:
        flat = lambda a: a.reshape(len(a), -1).astype(np.int64)  # noqa: E731
        shared = overlap_fraction(flat(val), flat(train))
        if shared > 0:
            raise InputError(f"{val_table.display()}: {shared:.1%} of the validation images are also in "
                             f"{table.display()}; use a disjoint split (cgtools images --split) or pass "
                             f"--allow-overlap")
    _, h, w, c = train.shape
    spec = DataSpec(shape=(int(c), int(h), int(w)))
    meta = {"images": {"channels": int(c), "height": int(h), "width": int(w)}}
    return TrainingData(to_model_range(train), to_model_range(val), None, spec, meta)


def image_examples(table, shape: tuple[int, ...]):
    """The images of `table` as the model's examples, float32 [N, C, H, W] in [-1, 1]; InputError
    unless they have the model's shape (C, H, W)."""
    from cgtools.formats.images import to_model_range

    pixels = table.read()  # uint8 [N, H, W, C]
    c, h, w = shape
    if pixels.shape[1:] != (h, w, c):
        raise InputError(f"{table.display()}: images of shape {pixels.shape[1:]} (H, W, C), but the model makes "
                         f"{h}x{w} with {c} channels")
    return to_model_range(pixels)
