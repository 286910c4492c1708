"""The image table: Parquet as Hugging Face `datasets` writes an `Image` feature, plus cgtools metadata.

Columns: `image`, a struct of PNG `bytes` and `path` (null for images made in memory), and an
optional int64 `label`. The schema carries two metadata blobs: `huggingface` (the features, so
``datasets.Dataset.from_parquet`` decodes `image` to PIL images) and `cgtools` (schema "images/1",
provenance, height, width, channels, and whatever the writer adds).

Arrays: images are uint8 [N, H, W, C] (C = 1 grey or 3 RGB) at the table's edge; models see
float32 [N, C, H, W] in [-1, 1] (:func:`to_model_range` / :func:`from_model_range`).
"""

from __future__ import annotations

import io
import json
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cgtools.errors import InputError, SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile

IMAGE = "image"
LABEL = "label"
IMAGES_SCHEMA = "images/1"
HF_KEY = b"huggingface"
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 image [H, W, C] (C = 1 or 3) or [H, W] as PNG bytes (lossless)."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise InputError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG (or any format PIL reads) bytes -> uint8 [H, W, C]; `channels` 1 or 3 converts,
    `size` (H, W) resizes (bilinear)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if channels is None:
        channels = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def hf_features(labels: bool, label_names: list[str] | None = None) -> dict:
    """The `datasets` features JSON for an image (and label) column."""
    features: dict = {IMAGE: {"_type": "Image"}}
    if labels:
        features[LABEL] = ({"names": list(label_names), "_type": "ClassLabel"} if label_names
                           else {"dtype": "int64", "_type": "Value"})
    return features


def images_schema(meta: dict, labels: bool, label_names: list[str] | None = None) -> pa.Schema:
    fields = [pa.field(IMAGE, IMAGE_TYPE)]
    if labels:
        fields.append(pa.field(LABEL, pa.int64()))
    hf = json.dumps({"info": {"features": hf_features(labels, label_names)}}).encode()
    return pa.schema(fields, metadata={metadata.METADATA_KEY: metadata.encode(IMAGES_SCHEMA, **meta), HF_KEY: hf})


def write_images(sink: BinaryIO, images: np.ndarray, meta: dict, labels: np.ndarray | None = None,
                 label_names: list[str] | None = None, compression: str = "zstd") -> None:
    """Write uint8 images [N, H, W, C] (and int labels [N]) as an image table into `sink`.

    `meta` is the cgtools metadata (provenance, source, …); height, width and channels are added.
    """
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[3] not in (1, 3):
        raise InputError(f"images must be [N, H, W, C] with C = 1 or 3, got shape {a.shape}")
    if labels is not None and len(labels) != len(a):
        raise InputError(f"{len(labels)} labels for {len(a)} images")
    meta = {**meta, "height": int(a.shape[1]), "width": int(a.shape[2]), "channels": int(a.shape[3]),
            "count": int(len(a))}
    schema = images_schema(meta, labels is not None, label_names)
    structs = pa.array([{"bytes": encode_png(x), "path": None} for x in a], type=IMAGE_TYPE)
    arrays = [structs]
    if labels is not None:
        arrays.append(pa.array(np.asarray(labels, dtype=np.int64)))
    table = pa.Table.from_arrays(arrays, schema=schema)
    pq.write_table(table, sink, compression=compression)


class ImagesTable:
    """Read access to an image table (cgtools' own or any Parquet `datasets` wrote with an Image
    column)."""

    def __init__(self, source: InputFile) -> None:
        self.source = source
        try:
            handle = pa.BufferReader(source.data) if source.data is not None else source.name
            self._table = pq.read_table(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{source.display()}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        schema = self._table.schema
        raw = (schema.metadata or {}).get(metadata.METADATA_KEY.encode())
        self.meta = metadata.decode(raw, source.display()) if raw is not None else {}
        if IMAGE not in schema.names:
            raise SchemaError(f"{source.display()}: no '{IMAGE}' column, not an image table "
                              f"(columns: {', '.join(schema.names)}); make one with `cgtools images`")
        t = schema.field(IMAGE).type
        if not (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0):
            raise SchemaError(f"{source.display()}: column '{IMAGE}' must be a struct with PNG 'bytes' "
                              f"(the datasets Image feature), got {t}")

    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    def display(self) -> str:
        return self.source.display()

    def labels(self) -> np.ndarray | None:
        """int64 [N], or None when the table has no label column."""
        if LABEL not in self._table.schema.names:
            return None
        return self._table.column(LABEL).to_numpy(zero_copy_only=False).astype(np.int64)

    def label_names(self) -> list[str] | None:
        """Class names of the label column (a `datasets` ClassLabel), or None."""
        raw = (self._table.schema.metadata or {}).get(HF_KEY)
        try:
            feature = json.loads(raw)["info"]["features"][LABEL] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None
        names = feature.get("names") if isinstance(feature, dict) else None
        return list(names) if names else None

    def png_bytes(self, limit: int | None = None) -> list[bytes]:
        """The encoded bytes of the first `limit` images (only those are copied out of Arrow)."""
        col = self._table.column(IMAGE).slice(0, limit).combine_chunks().field("bytes")
        out = col.to_pylist()
        if any(b is None for b in out):
            raise SchemaError(f"{self.display()}: an image has no bytes (path-only images are not supported)")
        return out

    def read(self, limit: int | None = None, channels: int | None = None,
             size: tuple[int, int] | None = None) -> np.ndarray:
        """The first `limit` images as uint8 [N, H, W, C]. Images of different sizes need `size`
        (H, W); `channels` (1 or 3) converts, default the table's (or the first image's)."""
        data = self.png_bytes(limit)
        if channels is None:
            channels = self.meta.get("channels")
        try:
            images = [decode_png(b, channels, size) for b in data]
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.display()}: an image cannot be decoded ({exc})") from None
        if not images:
            raise InputError(f"{self.display()}: no images")
        shapes = {x.shape for x in images}
        if len(shapes) > 1:
            raise InputError(f"{self.display()}: images differ in size ({', '.join(map(str, sorted(shapes)[:3]))}); "
                             f"resize them (e.g. `cgtools images --size`)")
        return np.stack(images)

    def iter_batches(self, batch_size: int, limit: int | None = None, channels: int | None = None,
                     size: tuple[int, int] | None = None) -> Iterator[list[np.ndarray]]:
        """The first `limit` images decoded `batch_size` at a time: lists of uint8 [H, W, C]
        (sizes may differ between images unless `size` is given). Only one batch is decoded at
        once."""
        data = self.png_bytes(limit)
        if not data:
            raise InputError(f"{self.display()}: no images")
        if channels is None:
            channels = self.meta.get("channels")
        for start in range(0, len(data), batch_size):
            try:
                yield [decode_png(b, channels, size) for b in data[start:start + batch_size]]
            except (OSError, ValueError) as exc:
                raise InputError(f"{self.display()}: an image cannot be decoded ({exc})") from None


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (x / 127.5 - 1, as Improved DDPM)."""
    return (np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0).copy()


def from_model_range(x: np.ndarray) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (clipped, rounded)."""
    a = np.clip((np.asarray(x, dtype=np.float64) + 1.0) * 127.5, 0, 255)
    return np.rint(a).astype(np.uint8).transpose(0, 2, 3, 1).copy()
