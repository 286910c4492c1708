"""Image sets from anywhere into image tables (cgtools.formats.images): `cgtools images`.

Sources (:func:`load_source`):

* ``digits``: scikit-learn's 1,797 handwritten digits, 8x8 greys 0..16 scaled to 0..255
  (round(x * 255 / 16)), labels 0..9; in the scikit-learn wheel, the offline default;
* ``photos``: the 20 photographs and scans in scikit-image's wheel (:data:`PHOTOS`), read as
  files (the package is not imported), labelled by name; they differ in size, so they are
  cropped and resized (default 64x64, colour);
* ``noise``: uniform random uint8 images (``--num``, ``--size`` required), the null check;
* an image folder: png/jpg/jpeg/bmp/gif/webp/tif files found recursively, sorted by path;
  with subfolders, the label is the first-level subfolder (class names sorted, as
  torchvision's ImageFolder);
* a local Hugging Face `datasets` dataset: a Parquet or Arrow file, or a ``save_to_disk``
  directory; the image column is an ``Image`` feature (or uint8 arrays), the label column a
  ClassLabel, integers or strings;
* a hub dataset, only with ``hub=NAME`` (the network; nothing else here uses it).

Items are decoded only once they are selected: the split (:func:`split_indices`, deterministic
from the seed, disjoint) and the limit come first. Each selected image is converted to the
channel count (default: 1 if every selected image is grey, else 3), centre-cropped to the aspect
ratio of the target size and resized with PIL's bicubic filter (antialiased when shrinking).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cgtools.errors import ConfigError, InputError, SchemaError
from cgtools.formats.files import InputFile, atomic_output, check_output, open_input
from cgtools.images import require
from cgtools.logs import progress, progress_enabled
from cgtools.seeding import generator

log = logging.getLogger("cgtools.images")

BUILTIN = ("digits", "photos", "noise")
SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
PHOTOS_DEFAULT_SIZE = (64, 64)
DEFAULT_NOISE = 1000
# (name, file in skimage/data): the natural photographs and scans that ship inside the wheel
# (synthetic test patterns, the RGBA logo and the binary horse are left out).
PHOTOS = (("astronaut", "astronaut.png"), ("brick", "brick.png"), ("camera", "camera.png"),
          ("cell", "cell.png"), ("chelsea", "chelsea.png"), ("clock", "clock_motion.png"),
          ("coffee", "coffee.png"), ("coins", "coins.png"), ("grass", "grass.png"), ("gravel", "gravel.png"),
          ("hubble_deep_field", "hubble_deep_field.jpg"), ("immunohistochemistry", "ihc.png"),
          ("microaneurysms", "microaneurysms.png"), ("moon", "moon.png"),
          ("motorcycle_left", "motorcycle_left.png"), ("motorcycle_right", "motorcycle_right.png"),
          ("page", "page.png"), ("retina", "retina.jpg"), ("rocket", "rocket.jpg"), ("text", "text.png"))


@dataclass
class ImageSource:
    """An image set before decoding. `items[i]` is a uint8 array [H, W] / [H, W, C], PNG/JPEG
    bytes or a file path; `labels` int64 [N] or None."""

    items: list[Any]
    labels: np.ndarray | None
    label_names: list[str] | None
    source: dict  # JSON-able description, stored in the table metadata under "source"
    inputs: list[InputFile] = field(default_factory=list)  # hashed into the provenance
    default_size: tuple[int, int] | None = None
    default_channels: int | None = None

    def __len__(self) -> int:
        return len(self.items)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'H' or 'HxW' -> (H, W); ConfigError otherwise."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ConfigError(f"--size must be H or HxW with positive integers, got {text!r}")
    return (values[0], values[-1])


# --- the split ------------------------------------------------------------------------------------

def split_indices(n: int, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Indices (ascending, int64) of the `split` of n items: a seeded permutation puts
    round(test_fraction * n) items in test (at least 1 and at most n - 1 when 0 < fraction < 1
    and n >= 2), the rest in train; "all" is every item. Train and test are disjoint and cover
    all n; the same (n, fraction, seed) always gives the same split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must lie in [0, 1), got {test_fraction}")
    if split == "all":
        return np.arange(n, dtype=np.int64)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    perm = generator(seed, "images-split").permutation(n)
    chosen = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(chosen).astype(np.int64)


# --- sources --------------------------------------------------------------------------------------

def digits() -> ImageSource:
    """scikit-learn's digits: 1,797 images 8x8 grey, labels 0..9."""
    import sklearn
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    return ImageSource(list(images), d.target.astype(np.int64), [str(k) for k in range(10)],
                       {"kind": "digits", "package": f"scikit-learn {sklearn.__version__}"},
                       default_channels=1)


def photos_dir() -> Path:
    """skimage/data of the installed scikit-image (found without importing the package)."""
    require("the photos source", "skimage")
    spec = importlib.util.find_spec("skimage")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def photos() -> ImageSource:
    """The photographs of :data:`PHOTOS`, labelled by name (label k = PHOTOS[k])."""
    import importlib.metadata as md

    root = photos_dir()
    paths = [root / f for _, f in PHOTOS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{root}: scikit-image's sample photos {', '.join(missing)} are missing")
    return ImageSource([str(p) for p in paths], np.arange(len(PHOTOS), dtype=np.int64), [n for n, _ in PHOTOS],
                       {"kind": "photos", "package": f"scikit-image {md.version('scikit-image')}"},
                       default_size=PHOTOS_DEFAULT_SIZE, default_channels=3)


def noise(num: int, size: tuple[int, int] | None, channels: int | None, seed: int) -> ImageSource:
    """`num` images of independent uniform uint8 pixels (stream "images-noise" of the seed)."""
    if size is None:
        raise ConfigError("the noise source needs --size H[xW]")
    c = channels or 1
    pixels = generator(seed, "images-noise").integers(0, 256, size=(num, *size, c), dtype=np.uint8)
    return ImageSource(list(pixels), None, None, {"kind": "noise", "num": num, "seed": seed},
                       default_size=size, default_channels=c)


def folder(root: Path) -> ImageSource:
    """Image files under `root` (recursive, sorted by relative path); labels from the first-level
    subfolders when the images lie in subfolders."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    rel = [p.relative_to(root) for p in files]
    nested = [len(r.parts) > 1 for r in rel]
    labels = names = None
    if any(nested):
        if not all(nested):
            loose = next(r for r, n in zip(rel, nested) if not n)
            raise InputError(f"{root}: images both in subfolders (classes) and at the top ({loose}); "
                             "put every image in a class folder, or none")
        names = sorted({r.parts[0] for r in rel})
        index = {n: k for k, n in enumerate(names)}
        labels = np.array([index[r.parts[0]] for r in rel], dtype=np.int64)
    inputs = [InputFile(str(p), None) for p in files]
    return ImageSource([str(p) for p in files], labels, names,
                       {"kind": "folder", "path": str(root), "files": len(files)}, inputs)


def _datasets():
    require("reading a `datasets` dataset", "datasets")
    import datasets

    return datasets


@contextmanager
def _quiet(datasets):
    """While `datasets` reads: its tqdm bars only when ours would show (an interactive stderr),
    and none of its log lines (it logs an unreadable file before raising; the error reaches the
    user once, as our one-line InputError). The previous settings are restored afterwards."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    if not progress_enabled():
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def local_dataset(path: Path, image_column: str | None, label_column: str | None) -> ImageSource:
    """A `datasets` dataset on disk: a .parquet or .arrow file, or a save_to_disk directory."""
    datasets = _datasets()
    with _quiet(datasets):
        return _local_dataset(datasets, path, image_column, label_column)


def _local_dataset(datasets, path: Path, image_column: str | None, label_column: str | None) -> ImageSource:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            pick = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if pick is None:
                raise InputError(f"{path}: a DatasetDict with splits {', '.join(splits)}; give the split's "
                                 f"directory, e.g. {path / splits[0]}")
            path = path / pick
        if not (path / "state.json").is_file():
            raise InputError(f"{path}: neither an image folder nor a `datasets` save_to_disk directory")
        inputs = [InputFile(str(p), None) for p in sorted(path.iterdir()) if p.suffix in (".arrow", ".json")]
        ds = _load(lambda: datasets.load_from_disk(str(path), keep_in_memory=True), path)
    else:
        inputs = [open_input(path)]
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            # A throwaway cache: a local file is re-read every time (no stale Arrow copies in ~/.cache).
            with tempfile.TemporaryDirectory(prefix="cgtools-datasets-") as cache:
                ds = _load(lambda: datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True),
                           path)
        elif suffix == ".arrow":
            ds = _load(lambda: datasets.Dataset.from_file(str(path), in_memory=True), path)
        else:
            raise InputError(f"{path}: not an image source (a folder, a .parquet or .arrow `datasets` file, "
                             f"or one of {', '.join(BUILTIN)})")
    return _from_dataset(ds, str(path), image_column, label_column,
                         {"kind": "datasets", "path": str(path)}, inputs)


def hub_dataset(name: str, split: str, image_column: str | None, label_column: str | None) -> ImageSource:
    """A Hugging Face hub dataset (the network, or datasets' cache when offline)."""
    datasets = _datasets()
    with _quiet(datasets):
        ds = _load(lambda: datasets.load_dataset(name, split=split), f"hub dataset {name!r} (split {split!r})")
        return _from_dataset(ds, f"hub dataset {name!r}", image_column, label_column,
                             {"kind": "hub", "name": name, "split": split}, [])


def _load(make, where):
    try:
        return make()
    except Exception as exc:  # datasets wraps reader and network errors in many classes
        text = str(exc).strip().splitlines()
        raise InputError(f"{where}: cannot load it ({text[0] if text else type(exc).__name__})") from None


def _from_dataset(ds, where: str, image_column: str | None, label_column: str | None, source: dict,
                  inputs: list[InputFile]) -> ImageSource:
    import datasets

    features = ds.features
    if image_column is None:
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        image_column = "image" if "image" in features else (images[0] if len(images) == 1 else None)
        if image_column is None:
            raise SchemaError(f"{where}: no 'image' column (columns: {', '.join(features)}); name it with "
                              "--image-column")
    if image_column not in features:
        raise SchemaError(f"{where}: no column {image_column!r} (columns: {', '.join(features)})")
    if isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # keep the encoded bytes
        items = []
        for value in ds[image_column]:
            if value is None or (value.get("bytes") is None and not value.get("path")):
                raise SchemaError(f"{where}: an image in column {image_column!r} has neither bytes nor a path")
            items.append(value["bytes"] if value.get("bytes") is not None else value["path"])
    else:
        items = [np.asarray(v) for v in ds.with_format("numpy")[image_column]]
    labels, names = _labels(ds, where, label_column)
    source = dict(source, image_column=image_column, label_column=label_column if labels is not None else None)
    return ImageSource(items, labels, names, source, inputs)


def _labels(ds, where: str, column: str | None) -> tuple[np.ndarray | None, list[str] | None]:
    import datasets

    name = column or "label"
    if name not in ds.features:
        if column is not None:
            raise SchemaError(f"{where}: no label column {column!r} (columns: {', '.join(ds.features)})")
        return None, None
    feature = ds.features[name]
    values = ds[name]
    if isinstance(feature, datasets.ClassLabel):
        return np.asarray(values, dtype=np.int64), list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        names = sorted(set(values))
        index = {n: k for k, n in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), names
    if dtype is None or not str(dtype).startswith(("int", "uint")):
        raise SchemaError(f"{where}: label column {name!r} holds {feature}, not integers, strings or a ClassLabel")
    return np.asarray(values, dtype=np.int64), None


def load_source(source: str | None, *, hub: str | None = None, hub_split: str = "train",
                image_column: str | None = None, label_column: str | None = None, num: int | None = None,
                size: tuple[int, int] | None = None, channels: int | None = None, seed: int = 0) -> ImageSource:
    """The source named `source` (default digits), or the hub dataset `hub` (see the module
    docstring). A path that exists wins over a built-in name."""
    if hub is not None:
        if source is not None:
            raise ConfigError("give SOURCE or --hub NAME, not both")
        return hub_dataset(hub, hub_split, image_column, label_column)
    source = source or "digits"
    path = Path(source)
    if num is not None and (source != "noise" or path.exists()):
        raise ConfigError("--num is the number of images of the noise source")
    if path.exists():
        if path.is_dir() and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            return folder(path)
        return local_dataset(path, image_column, label_column)
    if source == "digits":
        return digits()
    if source == "photos":
        return photos()
    if source == "noise":
        return noise(DEFAULT_NOISE if num is None else num, size, channels, seed)
    if source == "-":
        raise InputError("images are read from a source name, a folder or a file, not stdin")
    raise InputError(f"{source}: no such file or folder, and not a built-in source ({', '.join(BUILTIN)})")


# --- decoding and conversion ----------------------------------------------------------------------

def _open(item: Any, where: str):
    """One item as a PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(item, np.ndarray):
            a = item
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[..., 0]
            if a.dtype != np.uint8:
                if not np.issubdtype(a.dtype, np.integer) or a.size and (a.min() < 0 or a.max() > 255):
                    raise SchemaError(f"{where}: array images must hold integers 0..255, got {a.dtype}")
                a = a.astype(np.uint8)
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
                raise SchemaError(f"{where}: array images must be [H, W] or [H, W, 3], got shape {a.shape}")
            return Image.fromarray(a)
        if isinstance(item, (bytes, bytearray)):
            img = Image.open(io.BytesIO(item))
        elif isinstance(item, Image.Image):
            return item
        else:
            img = Image.open(item)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        name = item if isinstance(item, str) else where
        raise InputError(f"{name}: cannot read it as an image ({exc})") from None


def fit(img, size: tuple[int, int], channels: int) -> np.ndarray:
    """PIL image -> uint8 [H, W, C]: convert to grey (C = 1) or RGB (C = 3), crop the centre to
    the aspect ratio of `size` (H, W) and resize it there (bicubic)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    h, w = size
    if (img.height, img.width) != (h, w):
        # The largest centred box of aspect w:h inside the image.
        if img.width * h > img.height * w:
            box_w, box_h = img.height * w / h, img.height
        else:
            box_w, box_h = img.width, img.width * h / w
        left, top = (img.width - box_w) / 2, (img.height - box_h) / 2
        img = img.resize((w, h), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


@dataclass
class ImportResult:
    """What `cgtools images` wrote: the images uint8 [N, H, W, C], their labels and the split."""

    images: np.ndarray
    labels: np.ndarray | None
    indices: np.ndarray  # the source index of every row, int64 [N]
    source_count: int


def select(src: ImageSource, *, split: str = "all", test_fraction: float = 0.2, seed: int = 0,
           limit: int | None = None, size: tuple[int, int] | None = None,
           channels: int | None = None) -> ImportResult:
    """Split, limit, decode and convert: the rows of the table (see the module docstring)."""
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {channels}")
    indices = split_indices(len(src), split, test_fraction, seed)
    if limit is not None:
        indices = indices[:limit]
    if not len(indices):
        raise InputError(f"{src.source.get('path', src.source['kind'])}: the {split} split has no images "
                         f"(source of {len(src)}, --test-fraction {test_fraction})")
    where = src.source.get("path") or src.source.get("name") or src.source["kind"]
    with progress(len(indices), "decode") as bar:
        opened = []
        for i in indices.tolist():
            opened.append(_open(src.items[i], where))
            bar.advance()
    c = channels or src.default_channels or (1 if all(im.mode in GREY_MODES for im in opened) else 3)
    target = size or src.default_size
    if target is None:
        shapes = {(im.height, im.width) for im in opened}
        if len(shapes) > 1:
            raise InputError(f"{where}: images differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(shapes)[:3])}"
                             f"{', ...' if len(shapes) > 3 else ''}); choose one with --size H[xW]")
        target = shapes.pop()
    images = np.stack([fit(im, target, c) for im in opened])
    labels = src.labels[indices] if src.labels is not None else None
    return ImportResult(images, labels, indices, len(src))


def import_images(src: ImageSource, out: str, force: bool, *, provenance: dict, split: str = "all",
                  test_fraction: float = 0.2, seed: int = 0, limit: int | None = None,
                  size: tuple[int, int] | None = None, channels: int | None = None) -> ImportResult:
    """Select the rows (:func:`select`) and write them atomically as an image table."""
    from cgtools.formats.images import write_images

    check_output(out, force)
    result = select(src, split=split, test_fraction=test_fraction, seed=seed, limit=limit, size=size,
                    channels=channels)
    meta = {"provenance": provenance, "source": src.source,
            "split": {"name": split, "test_fraction": test_fraction if split != "all" else None,
                      "seed": seed, "source_count": result.source_count, "limit": limit}}
    with atomic_output(out, force) as sink:
        write_images(sink, result.images, meta, labels=result.labels, label_names=src.label_names)
    n, h, w, c = result.images.shape
    log.info("%s: %d images %dx%dx%d (%s split of %d)", "<stdout>" if out == "-" else out, n, h, w, c, split,
             result.source_count)
    return result
