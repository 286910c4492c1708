"""Image tables (cgtools.formats.images) and `cgtools images` (cgtools.images.sources): PNG round
trips, compatibility with Hugging Face `datasets` both ways, the built-in sources against their
packages, splits, folders, and the error and overwrite policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cgtools.cli.main import app
from cgtools.errors import InputError
from cgtools.formats.files import open_input
from cgtools.formats.images import ImagesTable, decode_png, encode_png, write_images
from cgtools.images.sources import PHOTOS, photos_dir, split_indices
from tests.helpers import assert_one_line_error

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, ["images", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def one_line_error(res, *needles):
    assert_one_line_error(res, *needles, command="images")


def table(path):
    return ImagesTable(open_input(path))


def rows(images, labels):
    """The rows of a table as a multiset of (pixel bytes, label)."""
    return Counter(zip((a.tobytes() for a in images), labels.tolist()))


# --- PNG and the table layout -----------------------------------------------------------------

def test_png_round_trip_is_lossless():
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (5, 7, 1), (6, 4, 3), (1, 1, 1)):
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        data = encode_png(a)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        back = decode_png(data)
        assert back.dtype == np.uint8 and back.shape == (shape[0], shape[1], 1 if len(shape) == 2 else shape[2])
        np.testing.assert_array_equal(back.reshape(a.shape), a)
    rgb = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    grey = decode_png(encode_png(rgb), channels=1)
    want = np.asarray(Image.fromarray(rgb).convert("L"))  # PIL's ITU-R 601 luma
    np.testing.assert_array_equal(grey[..., 0], want)
    np.testing.assert_array_equal(decode_png(encode_png(rgb[..., :1]), channels=3), np.repeat(rgb[..., :1], 3, 2))
    with pytest.raises(InputError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.float32))


def test_table_written_by_cgtools_reads_in_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 2, 1])
    path = tmp_path / "t.parquet"
    with open(path, "wb") as f:
        write_images(f, images, {"note": "test"}, labels=labels, label_names=["a", "b", "c"])
    t = table(path)
    np.testing.assert_array_equal(t.read(), images)
    np.testing.assert_array_equal(t.labels(), labels)
    assert t.label_names() == ["a", "b", "c"]
    assert t.meta["schema"] == "images/1" and t.meta["note"] == "test"
    assert (t.meta["height"], t.meta["width"], t.meta["channels"], t.meta["count"]) == (5, 7, 3, 6)

    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].names == ["a", "b", "c"]
    assert len(ds) == 6
    for k, row in enumerate(ds):
        assert row["image"].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(row["image"]), images[k])
        assert row["label"] == labels[k]

    grey = rng.integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)  # grey, no labels
    path2 = tmp_path / "g.parquet"
    with open(path2, "wb") as f:
        write_images(f, grey, {})
    ds2 = datasets.Dataset.from_parquet(str(path2), cache_dir=str(tmp_path / "cache2"))
    assert list(ds2.features) == ["image"] and ds2[0]["image"].mode == "L"
    np.testing.assert_array_equal(np.asarray(ds2[2]["image"]), grey[2, ..., 0])
    assert table(path2).labels() is None


def test_table_written_by_datasets_reads_in_cgtools(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(5, 6, 9, 3), dtype=np.uint8)
    labels = [1, 0, 1, 1, 0]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in pixels], "label": labels})
    ds = ds.cast_column("image", datasets.Image())
    path = tmp_path / "hf.parquet"
    ds.to_parquet(str(path))

    t = table(path)
    assert t.num_rows == 5 and t.meta == {}
    np.testing.assert_array_equal(t.read(), pixels)
    np.testing.assert_array_equal(t.labels(), labels)

    out = tmp_path / "imported.parquet"
    ok(cli(path, "-o", out))
    t2 = table(out)
    np.testing.assert_array_equal(t2.read(), pixels)
    np.testing.assert_array_equal(t2.labels(), labels)
    assert t2.meta["source"]["kind"] == "datasets" and t2.meta["split"]["source_count"] == 5
    assert str(path) in t2.meta["provenance"]["inputs"]


def test_datasets_string_labels_and_named_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    pixels = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(a) for a in pixels],
                                     "kind": ["dog", "cat", "dog", "emu"]})
    ds = ds.cast_column("picture", datasets.Image())
    path = tmp_path / "named.parquet"
    ds.to_parquet(str(path))
    out = tmp_path / "out.parquet"
    ok(cli(path, "--label-column", "kind", "-o", out))  # the only Image column is found by type
    t = table(out)
    np.testing.assert_array_equal(t.read()[..., 0], pixels)
    assert t.label_names() == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(t.labels(), [1, 0, 1, 2])
    one_line_error(cli(path, "--label-column", "nope", "-o", tmp_path / "x.parquet"), "'nope'")
    assert not (tmp_path / "x.parquet").exists()


def test_datasets_save_to_disk_directories_and_arrow_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    pixels = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in pixels], "label": [0, 1, 0, 1, 1]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([3, 4])}).save_to_disk(str(tmp_path / "dict"))
    arrays = datasets.Dataset.from_dict({"img": [a.tolist() for a in pixels[:3]]})  # uint8 arrays, no Image
    arrays.save_to_disk(str(tmp_path / "arrays"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    cases = [(tmp_path / "saved", [], pixels, [0, 1, 0, 1, 1]), (arrow, [], pixels, [0, 1, 0, 1, 1]),
             (tmp_path / "dict", [], pixels, [0, 1, 0, 1, 1]),  # a DatasetDict: its train split
             (tmp_path / "dict" / "test", [], pixels[3:], [1, 1]),
             (tmp_path / "arrays", ["--image-column", "img"], pixels[:3], None)]
    for k, (source, extra, want, labels) in enumerate(cases):
        out = tmp_path / f"out{k}.parquet"
        ok(cli(source, *extra, "-o", out))
        t = table(out)
        np.testing.assert_array_equal(t.read()[..., 0], want)
        assert (t.labels() is None) if labels is None else np.array_equal(t.labels(), labels)
    one_line_error(cli(tmp_path / "arrays", "-o", tmp_path / "x.parquet"), "--image-column")


# --- built-in sources ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "all.parquet"
    ok(cli("digits", "-o", out))
    return out


def test_digits_match_scikit_learn(digits_all):
    from sklearn.datasets import load_digits

    d = load_digits()
    t = table(digits_all)
    images = t.read()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(t.labels(), d.target)
    assert set(t.labels().tolist()) == set(range(10))
    assert t.label_names() == [str(k) for k in range(10)]
    # the documented scaling round(x * 255 / 16) of the integer greys 0..16, in integer arithmetic
    raw = d.images.astype(np.int64)
    assert raw.min() == 0 and raw.max() == 16 and np.array_equal(raw, d.images)
    want = (raw * 255 + 8) // 16
    np.testing.assert_array_equal(images[..., 0], want)
    assert want[raw == 16].min() == 255 and want[raw == 8].min() == 128 and want[raw == 1].min() == 16
    assert t.meta["source"]["kind"] == "digits" and t.meta["channels"] == 1


def test_splits_are_disjoint_deterministic_and_complete(digits_all, tmp_path):
    whole = table(digits_all)
    all_rows = rows(whole.read(), whole.labels())
    parts = {}
    for split in ("train", "test"):
        ok(cli("digits", "--split", split, "--seed", 3, "-o", tmp_path / f"{split}.parquet"))
        t = table(tmp_path / f"{split}.parquet")
        parts[split] = (t.read(), t.labels())
        assert t.meta["split"] == {"name": split, "test_fraction": 0.2, "seed": 3, "source_count": 1797,
                                   "limit": None}
    assert len(parts["test"][0]) == round(0.2 * 1797) and len(parts["train"][0]) == 1797 - 359
    assert rows(*parts["train"]) + rows(*parts["test"]) == all_rows  # together: the whole set

    ok(cli("digits", "--split", "test", "--seed", 3, "-o", tmp_path / "again.parquet"))
    np.testing.assert_array_equal(table(tmp_path / "again.parquet").read(), parts["test"][0])
    ok(cli("digits", "--split", "test", "--seed", 4, "-o", tmp_path / "other.parquet"))
    assert not np.array_equal(table(tmp_path / "other.parquet").read(), parts["test"][0])

    for n, fraction in ((1797, 0.2), (10, 0.5), (2, 0.01), (7, 0.99)):
        train, test = (split_indices(n, s, fraction, seed=5) for s in ("train", "test"))
        assert not set(train.tolist()) & set(test.tolist())
        assert sorted(train.tolist() + test.tolist()) == list(range(n))
        assert len(test) == min(max(round(fraction * n), 1), n - 1)
        assert np.array_equal(test, split_indices(n, "test", fraction, seed=5))


def test_limit_takes_the_first_rows_of_the_split(digits_all, tmp_path):
    ok(cli("digits", "--limit", 10, "-o", tmp_path / "ten.parquet"))
    np.testing.assert_array_equal(table(tmp_path / "ten.parquet").read(), table(digits_all).read()[:10])


def test_photos(tmp_path):
    ok(cli("photos", "-o", tmp_path / "p.parquet"))
    t = table(tmp_path / "p.parquet")
    images = t.read()
    assert images.shape == (20, 64, 64, 3)
    assert t.label_names() == [name for name, _ in PHOTOS]
    np.testing.assert_array_equal(t.labels(), np.arange(20))
    assert len({a.tobytes() for a in images}) == 20
    # at the photo's own size nothing is cropped or resampled: chelsea is the file's pixels
    chelsea = np.asarray(Image.open(photos_dir() / "chelsea.png").convert("RGB"))
    assert chelsea.shape == (300, 451, 3)
    ok(cli("photos", "--size", "300x451", "--limit", 5, "-o", tmp_path / "big.parquet"))
    np.testing.assert_array_equal(table(tmp_path / "big.parquet").read()[4], chelsea)
    ok(cli("photos", "--size", 8, "--channels", 1, "-o", tmp_path / "small.parquet"))
    assert table(tmp_path / "small.parquet").read().shape == (20, 8, 8, 1)


def test_noise(tmp_path):
    ok(cli("noise", "--size", "6x5", "-n", 400, "--seed", 1, "-o", tmp_path / "a.parquet"))
    t = table(tmp_path / "a.parquet")
    a = t.read()
    assert a.shape == (400, 6, 5, 1) and t.labels() is None
    # uniform on 0..255: mean 127.5, sd 73.9, over 12,000 pixels the mean's sd is 0.67
    assert abs(a.mean() - 127.5) < 4 and a.min() == 0 and a.max() == 255
    ok(cli("noise", "--size", "6x5", "-n", 400, "--seed", 1, "-o", tmp_path / "b.parquet"))
    np.testing.assert_array_equal(table(tmp_path / "b.parquet").read(), a)
    ok(cli("noise", "--size", 4, "-n", 3, "--channels", 3, "--seed", 2, "-o", tmp_path / "c.parquet"))
    c = table(tmp_path / "c.parquet").read()
    assert c.shape == (3, 4, 4, 3) and not np.array_equal(c[..., 0], a[:3, :4, :4, 0])


def test_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "pics"
    rng = np.random.default_rng(3)
    want = {}
    for cls, n in (("dogs", 2), ("cats", 3)):
        (root / cls).mkdir(parents=True)
        for k in range(n):
            a = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{k}.png")
            want[(cls, k)] = a
    ok(cli(root, "-o", tmp_path / "f.parquet"))
    t = table(tmp_path / "f.parquet")
    assert t.label_names() == ["cats", "dogs"]  # sorted class names, as torchvision's ImageFolder
    np.testing.assert_array_equal(t.labels(), [0, 0, 0, 1, 1])  # files sorted by path
    images = t.read()
    for i, key in enumerate([("cats", 0), ("cats", 1), ("cats", 2), ("dogs", 0), ("dogs", 1)]):
        np.testing.assert_array_equal(images[i], want[key])
    assert t.meta["source"]["kind"] == "folder" and len(t.meta["provenance"]["inputs"]) == 5

    (root / "loose.png").write_bytes((root / "cats" / "0.png").read_bytes())
    one_line_error(cli(root, "-o", tmp_path / "g.parquet"), "loose.png")
    assert not (tmp_path / "g.parquet").exists()


def test_centre_crop_to_the_target_aspect(tmp_path):
    """A 4x8 image: red quarter, green half, blue quarter. --size 4 keeps the centre 4x4: green."""
    root = tmp_path / "flat"
    root.mkdir()
    a = np.zeros((4, 8, 3), dtype=np.uint8)
    a[:, :2, 0] = 255
    a[:, 2:6, 1] = 255
    a[:, 6:, 2] = 255
    Image.fromarray(a).save(root / "x.png")
    ok(cli(root, "--size", 4, "-o", tmp_path / "c.parquet"))
    got = table(tmp_path / "c.parquet").read()[0]
    np.testing.assert_array_equal(got, a[:, 2:6])
    assert table(tmp_path / "c.parquet").labels() is None
    # mixed sizes need --size
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(root / "y.png")
    one_line_error(cli(root, "-o", tmp_path / "m.parquet"), "--size")
    ok(cli(root, "--size", 2, "-o", tmp_path / "m.parquet"))
    assert table(tmp_path / "m.parquet").read().shape == (2, 2, 2, 3)  # a grey image among RGB: RGB


# --- errors and outputs -------------------------------------------------------------------------

def no_leftovers(directory: Path, *names):
    for name in names:
        assert not (directory / name).exists(), name
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_bad_inputs_are_one_line_errors(tmp_path):
    out = tmp_path / "out.parquet"
    one_line_error(cli("nonesuch", "-o", out), "nonesuch", "digits")
    one_line_error(cli("noise", "-o", out), "--size")
    one_line_error(cli("digits", "--num", 5, "-o", out), "--num")
    one_line_error(cli("digits", "--size", "8x", "-o", out), "--size")
    one_line_error(cli("digits", "--split", "test", "--test-fraction", 0, "-o", out), "no images")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    one_line_error(cli(bad, "-o", out), str(bad))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    one_line_error(cli(other, "-o", out), str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one_line_error(cli(broken, "-o", out), "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli(empty, "-o", out), "no image files")
    one_line_error(cli("digits", "-o", tmp_path / "missing" / "x.parquet"), "no such directory")
    # a sequences table is not an image set
    seq = tmp_path / "seq.parquet"
    assert runner.invoke(app, ["rhm-gen", "-L", "2", "-s", "2", "-v", "4", "-m", "2", "-n", "8",
                               "-o", str(seq)]).exit_code == 0
    one_line_error(cli(seq, "-o", out), "image")
    assert cli("digits", "--split", "nope", "-o", out).exit_code == 2  # usage errors: click's exit code
    assert cli("digits", "--channels", 2, "-o", out).exit_code == 2
    no_leftovers(tmp_path, "out.parquet")


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "digits.parquet"
    out.write_bytes(b"precious")
    one_line_error(cli("digits", "--limit", 3, "-o", out), "--force")
    assert out.read_bytes() == b"precious"
    ok(cli("digits", "--limit", 3, "-o", out, "--force"))
    assert table(out).num_rows == 3
    no_leftovers(tmp_path)


def test_stdout_output_pipes_into_a_table(tmp_path):
    res = ok(cli("digits", "--limit", 4))
    path = tmp_path / "piped.parquet"
    path.write_bytes(res.stdout_bytes)
    t = table(path)
    assert t.num_rows == 4 and json.loads(json.dumps(t.meta))["source"]["kind"] == "digits"


def test_a_hub_dataset_fails_offline_without_touching_the_network(tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    out = tmp_path / "hub.parquet"
    one_line_error(cli("--hub", "someone/no-such-dataset", "-o", out), "hub dataset")
    assert not out.exists()
