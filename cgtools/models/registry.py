"""The network architectures by name: how a run's model config is made and a network built.

An architecture is one module with a config dataclass (to_json/from_json) and an nn.Module whose
``forward(x_t, t)`` takes the corrupted data and the network time (float32 [B] in [0, 1], see
Process.network_time) and returns the prediction the process's loss expects (logits [B, d, K]
for the token processes). Register it with one line in :data:`ARCHITECTURES`; checkpoints carry
the name, so `load_model` rebuilds any registered network (docs/CONTRIBUTING.md shows the steps).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from cgtools.diffusion.base import CategoricalProcess, Process
from cgtools.errors import ConfigError
from cgtools.models.transformer import TransformerConfig, TransformerDenoiser
from cgtools.models.transformer import training_bytes as transformer_training_bytes
from cgtools.models.unet import UNet, UNetConfig, reference_leaf_standardisation, training_bytes
from cgtools.models.unet2d import UNet2D, UNet2DConfig
from cgtools.models.unet2d import training_bytes as unet2d_training_bytes


@dataclass(frozen=True)
class DataSpec:
    """What an architecture is sized from: the data, not the flags.

    vocab: symbols a token model predicts (None for continuous data); length: sequence length d
    (None for images); depth and branching: the grammar's L and s when the data has a grammar;
    shape: the shape of one example of continuous data, (C, H, W) for images (None for tokens).
    """

    vocab: int | None = None
    length: int | None = None
    depth: int | None = None
    branching: int | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Architecture:
    """One registry entry.

    settings: the names a preset or flag may set (the config's free fields).
    configure(data, process, settings) -> config: the full config for this data and process.
    build(config, process, seed) -> network: freshly initialised weights from `seed`.
    """

    name: str
    config_class: type
    settings: frozenset[str]
    configure: Callable[[DataSpec, Process, dict[str, Any]], Any]
    build: Callable[[Any, Process, int], nn.Module]
    #: optional (config, batch) -> bytes a training step needs, to refuse runs that cannot fit
    memory_bytes: Callable[[Any, int], int] | None = None
    #: whether the network has μP parameter classes (param_info); if not, it trains with
    #: --lr-scheme global only (presets.resolve_run refuses the others before anything runs)
    mup: bool = True

    def config_from_json(self, obj: Any):
        return self.config_class.from_json(obj)


def _require_tokens(arch: str, data: DataSpec) -> None:
    """ConfigError when a token architecture is given images (or other continuous data)."""
    if data.shape is not None:
        raise ConfigError(f"the {arch} architecture denoises token sequences; image data needs --arch unet2d")


# ---- the paper's 1-D U-Net ------------------------------------------------------------------------
_UNET_DERIVED = {"vocab", "input_vocab", "depth", "branching"}


def _unet_configure(data: DataSpec, process: Process, settings: dict[str, Any]) -> UNetConfig:
    """U-Net config for token data of length d = s^L (L, s from the grammar, or from d and the
    `branching` setting, default 2)."""
    _require_tokens("unet", data)
    if not isinstance(process, CategoricalProcess):
        raise ConfigError(f"the unet architecture denoises tokens; {process.name} noise needs another --arch")
    kw = dict(settings)
    standardisation = kw.pop("leaf_standardisation", None)
    asked = kw.pop("branching", None)
    depth, branching = data.depth, data.branching
    if depth is not None and asked is not None and asked != branching:
        raise ConfigError(f"--branching {asked} contradicts the grammar's s = {branching}")
    if depth is None:
        branching = int(asked or 2)
        depth = round(math.log(data.length, branching)) if data.length and data.length > 1 else 0
        if data.length is None or branching ** depth != data.length:
            raise ConfigError(f"the unet needs sequences of length s^L; {data.length} is not a power of {branching}")
    masked = process.mask_id is not None
    if masked:
        # The optimal masked denoiser ignores t: embed time only when the process asks for it.
        kw.setdefault("time_embedding", bool(getattr(process.config, "time_conditioning", False)))
        if kw.get("input_mode") == "leaf_message":
            kw["input_mode"] = "onehot"  # a mask carries no leaf evidence to standardise
            standardisation = None
    if standardisation == "reference" and kw.get("input_mode") == "leaf_message" and kw.get("leaf_mean") is None:
        kw["leaf_mean"], kw["leaf_std"] = _reference_leaf_standardisation(process.vocab)
    return UNetConfig(vocab=process.vocab, input_vocab=process.input_vocab, depth=depth,
                      branching=branching, **kw)


def _reference_leaf_standardisation(vocab: int) -> tuple[float, float]:
    """The input standardisation of the authors' public code: leaf-message moments averaged over
    *its default* schedule table (linear β 1e-4 -> 0.02, T = 1000), not the diffusion's own
    (reference/peers.md §6 and feasibility.md §4.5 describe that quirk; reproduced on purpose)."""
    from cgtools.diffusion.schedules import log_alpha_bar_table

    table = log_alpha_bar_table("linear-beta", 1000, 1e-4, 0.02).exp()
    return reference_leaf_standardisation(table, vocab)


def _unet_build(config: UNetConfig, process: Process, seed: int) -> UNet:
    net = UNet(config, seed=seed)
    if config.input_mode == "leaf_message" and not config.masked:
        # ᾱ = 1 - E in float64, rounded once to float32 (as the input transform always did)
        net.keep_of_time = lambda tau: (1 - process.corruption_at_network_time(tau)).float()
    return net


UNET = Architecture(
    name="unet",
    config_class=UNetConfig,
    settings=frozenset({f.name for f in dataclasses.fields(UNetConfig)} - _UNET_DERIVED
                       | {"leaf_standardisation", "branching"}),
    configure=_unet_configure,
    build=_unet_build,
    memory_bytes=training_bytes,
)

# ---- the MD4-style bidirectional transformer (text) ------------------------------------------------
_TRANSFORMER_DERIVED = {"vocab", "input_vocab", "length"}


def _transformer_configure(data: DataSpec, process: Process, settings: dict[str, Any]) -> TransformerConfig:
    """Transformer config for token data of any fixed length d (the data's)."""
    _require_tokens("transformer", data)
    if not isinstance(process, CategoricalProcess):
        raise ConfigError(f"the transformer architecture denoises tokens; {process.name} noise needs another --arch")
    if data.length is None:
        raise ConfigError("the transformer needs sequences of one fixed length")
    kw = dict(settings)
    # Masked: the optimal denoiser ignores t, so embed it only when the process asks for it (as the
    # U-Net does). Uniform noise: the noise level is not visible in x_t, the network needs it.
    masked = process.mask_id is not None
    kw.setdefault("time_embedding", bool(getattr(process.config, "time_conditioning", False)) if masked else True)
    return TransformerConfig(vocab=process.vocab, input_vocab=process.input_vocab, length=data.length, **kw)


TRANSFORMER = Architecture(
    name="transformer",
    config_class=TransformerConfig,
    settings=frozenset({f.name for f in dataclasses.fields(TransformerConfig)} - _TRANSFORMER_DERIVED),
    configure=_transformer_configure,
    build=lambda config, process, seed: TransformerDenoiser(config, seed=seed),
    memory_bytes=transformer_training_bytes,
    mup=False,
)

# ---- the Improved-DDPM 2-D U-Net (images) ----------------------------------------------------------
_UNET2D_DERIVED = {"channels", "out_channels", "image_size", "image_width"}


def _unet2d_configure(data: DataSpec, process: Process, settings: dict[str, Any]) -> UNet2DConfig:
    """2-D U-Net config for images of data.shape = (C, H, W); the output has the channels the
    process asks for (`process.output_channels(C)`, e.g. 2C for a learned variance), else C."""
    if data.shape is None:
        raise ConfigError("the unet2d architecture denoises images; token data needs --arch unet or transformer")
    if isinstance(process, CategoricalProcess):
        raise ConfigError(f"the unet2d architecture denoises images; {process.name} noise corrupts tokens "
                          f"(images need a continuous process, e.g. Gaussian diffusion)")
    if len(data.shape) != 3:
        raise ConfigError(f"the unet2d architecture needs images of shape (C, H, W), got {tuple(data.shape)}")
    channels, height, width = (int(v) for v in data.shape)
    output_channels = getattr(process, "output_channels", None)
    out = int(output_channels(channels)) if output_channels is not None else channels
    return UNet2DConfig(channels=channels, out_channels=out, image_size=height, image_width=width, **settings)


UNET2D = Architecture(
    name="unet2d",
    config_class=UNet2DConfig,
    settings=frozenset({f.name for f in dataclasses.fields(UNet2DConfig)} - _UNET2D_DERIVED),
    configure=_unet2d_configure,
    build=lambda config, process, seed: UNet2D(config, seed=seed),
    memory_bytes=unet2d_training_bytes,
    mup=False,
)

#: name -> Architecture. Add a new network with one line here.
ARCHITECTURES: dict[str, Architecture] = {UNET.name: UNET, TRANSFORMER.name: TRANSFORMER, UNET2D.name: UNET2D}


def architecture(name: str) -> Architecture:
    """The registered architecture `name`; ConfigError naming the choices otherwise."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def architecture_names() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


def available_memory_bytes() -> int | None:
    """MemAvailable of this machine (Linux /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(arch: str, config, batch: int, device: str = "cpu") -> None:
    """ConfigError, before anything is trained, when a training step of `batch` sequences cannot
    fit in this machine's available memory (CPU runs; CUDA memory is the driver's to report)."""
    entry = architecture(arch)
    if entry.memory_bytes is None or not str(device).startswith("cpu"):
        return
    need, have = entry.memory_bytes(config, batch), available_memory_bytes()
    if have is not None and need > 0.9 * have:
        if hasattr(config, "image_size"):
            what = f"{batch} images of {config.channels}x{config.image_size}x{config.image_width}"
        else:
            what = f"{batch} sequences of {getattr(config, 'length', '?')} tokens"
        raise ConfigError(f"a training step needs about {need / 2**30:.1f} GiB ({what}, {arch} width "
                          f"{getattr(config, 'width', '?')}) but {have / 2**30:.1f} GiB are available; "
                          f"lower --batch-size or --width")
