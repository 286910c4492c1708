"""cgtools.images.features: the backbones load offline and safely, give the documented shapes per
depth, normalise as their weights expect (ImageNet predictions), and embed images batch-independently."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cgtools.errors import ConfigError, InputError
from cgtools.images.features import (EFFICIENTNET_DIMS, EFFICIENTNET_LAYERS, efficientnet_weights_file,
                                     extract_features, load_backbone, read_state_dict)
from cgtools.images.resnet import DIMS as RESNET_DIMS
from cgtools.images.resnet import LAYERS as RESNET_LAYERS
from cgtools.images.resnet import ResNet18

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def no_network():
    """Any connection attempt fails the test (the default backbone must need none)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def efficientnet(no_network):
    return load_backbone(resolution=64)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A ResNet-18 with random weights (and non-trivial BN statistics) saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ResNet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    save_file(state, str(path))
    return path, state


def images(n, size, channels, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8))


def test_default_backbone_loads_offline_with_seven_depths(efficientnet):
    assert efficientnet.name == "efficientnet-lite0"
    assert efficientnet.layers == EFFICIENTNET_LAYERS == tuple(f"stage{k}" for k in range(1, 8))
    assert efficientnet.dims == EFFICIENTNET_DIMS == (16, 24, 40, 80, 112, 192, 320)
    assert Path(efficientnet.weights) == efficientnet_weights_file() and efficientnet_weights_file().is_file()
    assert not efficientnet.module.training
    feats = efficientnet.features(images(3, 20, 1) + images(2, 64, 3, seed=1))  # grey and RGB, any size
    assert [f.shape for f in feats] == [(5, c) for c in (16, 24, 40, 80, 112, 192, 320)]
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in feats)


def test_efficientnet_feature_maps_at_224(efficientnet):
    with torch.inference_mode():
        maps = efficientnet.module.stages(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(c, s, s) for c, s in zip(
        (16, 24, 40, 80, 112, 192, 320), (112, 56, 28, 14, 14, 7, 7))]


def test_resnet18_from_safetensors(resnet_weights):
    path, state = resnet_weights
    net = load_backbone("resnet18", weights=path, resolution=64)
    assert net.layers == RESNET_LAYERS == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert net.dims == RESNET_DIMS == (64, 64, 128, 256, 512)
    assert torch.equal(net.module.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    feats = net.features(images(4, 64, 3))
    assert [f.shape for f in feats] == [(4, c) for c in (64, 64, 128, 256, 512)]
    with torch.inference_mode():
        maps = net.module.stages(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14),
                                                  (512, 7, 7)]


def reference_features(module, batch, mean, std):
    """Independent preprocessing for images already at the backbone's resolution: grey replicated
    to RGB, x/255 normalised per channel, then the module's stages averaged over positions."""
    x = np.stack([np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in batch]).astype(np.float64) / 255
    x = (x - np.array(mean)) / np.array(std)
    with torch.inference_mode():
        maps = module.stages(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32))
    return [m.mean(dim=(2, 3)).numpy() for m in maps]


def test_preprocessing_normalises_as_documented(efficientnet, resnet_weights):
    """EfficientNet-Lite: (x - 127) / 128 on 0..255 pixels; ResNet-18: ImageNet mean/std."""
    batch = images(2, 64, 1, seed=3) + images(2, 64, 3, seed=4)
    tflite = ((127 / 255,) * 3, (128 / 255,) * 3)
    for got, want in zip(efficientnet.features(batch), reference_features(efficientnet.module, batch, *tflite)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    resnet = load_backbone("resnet18", weights=resnet_weights[0], resolution=64)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for got, want in zip(resnet.features(batch), reference_features(resnet.module, batch, *imagenet)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resnet18_from_a_weights_only_pth(resnet_weights, tmp_path, monkeypatch):
    _, state = resnet_weights
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.pth"  # a training checkpoint: {'state_dict': DataParallel keys, 'epoch': 3}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        net = load_backbone("resnet18", weights=path, resolution=32)
        assert torch.equal(net.module.fc.weight, state["fc.weight"])
    assert calls == [True, True]


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_with_a_non_tensor_object_is_refused(resnet_weights, tmp_path):
    _, state = resnet_weights
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({**state, "extra": Payload(marker)}, evil)
    with pytest.raises(InputError, match="weights_only") as err:
        read_state_dict(evil)
    assert "\n" not in str(err.value)
    assert not marker.exists()  # nothing was executed
    strings = tmp_path / "strings.pth"
    torch.save({"conv1.weight": "not a tensor"}, strings)
    with pytest.raises(InputError, match="not a state dict"):
        read_state_dict(strings)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(InputError):
        load_backbone("resnet18", weights=text)


def test_wrong_or_missing_weights(resnet_weights):
    with pytest.raises(ConfigError, match="--weights"):
        load_backbone("resnet18")
    with pytest.raises(InputError, match="not resnet18 weights"):
        load_backbone("resnet18", weights=efficientnet_weights_file())
    with pytest.raises(InputError, match="not efficientnet-lite0 weights"):
        load_backbone("efficientnet-lite0", weights=resnet_weights[0])
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_backbone("vgg16")
    with pytest.raises(ConfigError, match="resolution"):
        load_backbone(resolution=16)


def imagenet_input(path):
    """The usual evaluation preprocessing, written independently with PIL: centre square, resize
    to 224 (bilinear), (x - 127) / 128 (the TF-Lite models' normalisation)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((224, 224), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return torch.tensor(x.transpose(2, 0, 1)[None].copy())


def test_efficientnet_recognises_a_cat_and_an_espresso(efficientnet):
    """The package's full model (with its head), built from the same weights file and loaded
    strictly, classifies scikit-image's chelsea as a cat (ImageNet 281..285) and coffee as
    espresso (967); and the backbone's 7 stages followed by the head give the same logits, so
    the stages run every block in order."""
    from efficientnet_lite_pytorch import EfficientNet

    from cgtools.images.sources import photos_dir

    full = EfficientNet.from_name("efficientnet-lite0")
    full.load_state_dict(torch.load(efficientnet_weights_file(), map_location="cpu", weights_only=True))
    full.eval()
    backbone = load_backbone()  # resolution 224
    net = backbone.module.net
    for name, want in (("chelsea.png", range(281, 286)), ("coffee.png", [967])):
        x = imagenet_input(photos_dir() / name)
        with torch.inference_mode():
            logits = full(x)
            last = backbone.module.stages(x)[-1]
            head = net._fc(net._swish(net._bn1(net._conv_head(last))).mean(dim=(2, 3)))
        assert int(logits.argmax()) in want, (name, logits.topk(5).indices.tolist())
        torch.testing.assert_close(head, logits, rtol=1e-4, atol=1e-4)
        from PIL import Image

        a = np.asarray(Image.open(photos_dir() / name).convert("RGB"))
        with torch.inference_mode():
            assert int(net(backbone.preprocess([a])).argmax()) in want  # cgtools' own preprocessing


def test_features_are_batch_independent(efficientnet):
    batch = images(5, 24, 3, seed=8) + images(2, 40, 1, seed=9)
    together = efficientnet.features(batch)
    alone = [efficientnet.features([a]) for a in batch]
    for k in range(len(together)):
        np.testing.assert_allclose(together[k], np.concatenate([f[k] for f in alone]), rtol=1e-4, atol=1e-5)
    # extract_features over uneven batches gives the same rows in the same order
    chunks = [batch[:3], batch[3:4], batch[4:]]
    for got, want in zip(extract_features(efficientnet, chunks, total=len(batch)), together):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        extract_features(efficientnet, [], total=0)


def test_a_missing_images_extra_is_a_one_line_error_naming_it(monkeypatch, tmp_path):
    """Without the backbone's packages, `cgtools mmd` says which packages and which extra, exit 1,
    before anything is read or written."""
    import importlib.util

    from typer.testing import CliRunner

    from cgtools.cli.main import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet") else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs efficientnet_lite_pytorch: pip install 'cgtools\[images\]'"):
        load_backbone("efficientnet-lite0")
    images = tmp_path / "d.parquet"
    assert CliRunner().invoke(app, ["images", "digits", "--limit", "4", "-o", str(images)]).exit_code == 0
    res = CliRunner().invoke(app, ["mmd", str(images), str(images), "-o", str(tmp_path / "m.parquet")])
    assert res.exit_code == 1 and "cgtools[images]" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.parquet").exists()
