"""A 2-D U-Net denoiser for images (the DDPM / Improved-DDPM backbone, CPU-sized).

Layout for images [B, C, H, W], base width n, channel multipliers m_0 … m_{L-1} (one level each,
the resolution halving between levels), R = ``num_res_blocks``:

    x_t [B, C, H, W] ──3×3 conv──▶ h [B, n·m_0, H, W]                               (skip)
    encoder, level l = 0 … L-1 at H/2^l × W/2^l:
        R × ( ResBlock → n·m_l channels [→ Attention] )                          (a skip each)
        strided 3×3 conv, ↓2 (not after the last level)                          (a skip)
    middle: ResBlock, Attention, ResBlock
    decoder, level l = L-1 … 0:
        (R + 1) × ( concat(h, last skip) → ResBlock → n·m_l [→ Attention] )
        nearest ↑2 + 3×3 conv (not after level 0)
    GroupNorm, SiLU, 3×3 conv (zero-initialised) ──▶ [B, out_channels, H, W] float32

    ResBlock(h, e): GN → SiLU → 3×3 conv → GN · (1 + scale) + shift → SiLU → dropout
                    → 3×3 conv (zero-initialised); plus h (through a 1×1 conv when channels change).
                    (scale, shift) = Linear(SiLU(e)) per channel: Improved DDPM's scale-shift norm.
    Attention(h):   GN → 1×1 conv to q, k, v → softmax attention over the positions, ``heads`` heads
                    → 1×1 conv (zero-initialised); plus h. No positional encoding: the convs' zero
                    padding is what tells positions apart.
    Time:           e = Linear(SiLU(Linear(sinusoid(t, n)))) ∈ R^time_dim, t the network time in [0, 1].

A level "has resolution r" when its feature maps are r pixels high (H/2^l); attention runs after
each ResBlock of the levels listed in ``attention_resolutions`` (default: every level below the
full resolution, i.e. r ≤ H/2, as Improved DDPM's 16, 8 at 32×32) and always in the middle.

Every zero-initialised layer ends a residual branch or the network, so the untrained network is
the identity on its skips and predicts exactly 0. Other weights are Glorot-uniform (DDPM's
variance scaling over fan_avg), biases 0, GroupNorm gains 1, all drawn in a fixed order from
``torch.Generator().manual_seed(seed)``: a (config, seed) names one network, and the global RNG is
never read.

The forward pass has no control flow on tensor values (only on shapes and the config), so it runs
under torch.func.vmap (cgtools sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgtools.errors import ConfigError
from cgtools.models.config_json import config_fields_from_json, config_to_json
from cgtools.models.time_embedding import sinusoid

CONFIG_SCHEMA = "unet2d/1"
GROUPNORM_EPS = 1e-5
_TUPLE_FIELDS = ("channel_mult", "attention_resolutions")


@dataclass(frozen=True)
class UNet2DConfig:
    """Everything that defines a 2-D U-Net; the weights are the only other state.

    From the data and the process: channels C of the input, out_channels of the prediction (C for
    a noise or x0 prediction, 2C with a learned variance; None means C), image_size H and
    image_width W (None means H: square images; H ≠ W is allowed).
    Settable: width n (base channels), channel_mult (one level per entry, n·m channels),
    num_res_blocks per level, attention_resolutions (feature-map heights that get attention;
    None: every level below full resolution), heads, dropout (in the ResBlocks), groups
    (GroupNorm groups, lowered to the largest divisor of a layer's channels), time_dim (None:
    4·n). Defaults suit 8×8 … 32×32 images on a CPU.
    """

    channels: int
    image_size: int
    out_channels: int | None = None
    image_width: int | None = None
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] | None = None
    heads: int = 4
    dropout: float = 0.0
    groups: int = 32
    time_dim: int | None = None

    def __post_init__(self) -> None:
        # JSON and flags give lists or "1,2,2": store tuples so configs compare and hash.
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _int_tuple(name, value))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.channels)
        if self.image_width is None:
            object.__setattr__(self, "image_width", self.image_size)
        if self.time_dim is None and _is_int(self.width):
            object.__setattr__(self, "time_dim", 4 * self.width)
        for name, minimum in (("channels", 1), ("out_channels", 1), ("image_size", 1), ("image_width", 1),
                              ("width", 4), ("num_res_blocks", 1), ("heads", 1), ("groups", 1), ("time_dim", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.width % 2:
            raise ConfigError(f"width must be even (the time sinusoid has sin and cos halves), got {self.width}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult needs one integer >= 1 per level, got {self.channel_mult!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        halvings = len(self.channel_mult) - 1
        if self.image_size % 2 ** halvings or self.image_width % 2 ** halvings:
            raise ConfigError(f"a {self.image_size}x{self.image_width} image cannot be halved {halvings} times "
                              f"({len(self.channel_mult)} levels in channel_mult); use a size divisible by "
                              f"{2 ** halvings} or fewer levels")
        heights = self.resolutions
        if self.attention_resolutions is None:
            object.__setattr__(self, "attention_resolutions", heights[1:])
        unknown = sorted(set(self.attention_resolutions) - set(heights))
        if unknown:
            raise ConfigError(f"attention resolution(s) {', '.join(map(str, unknown))} are not among the levels' "
                              f"resolutions {', '.join(map(str, heights))}")
        for level, mult in enumerate(self.channel_mult):
            c = self.width * mult
            attended = heights[level] in self.attention_resolutions or level == halvings  # (the middle)
            if attended and c % self.heads:
                raise ConfigError(f"{c} channels at resolution {heights[level]} cannot be split into "
                                  f"{self.heads} attention heads; choose heads dividing width·channel_mult")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map height of each level: H, H/2, …"""
        return tuple(self.image_size >> level for level in range(len(self.channel_mult)))

    # ---- JSON (stored in safetensors checkpoint metadata) --------------------------------------
    def to_json(self) -> str:
        return config_to_json(self, CONFIG_SCHEMA)

    @classmethod
    def from_json(cls, raw: str | bytes | dict) -> "UNet2DConfig":
        """Inverse of :meth:`to_json` (lists become tuples again); ConfigError on an unknown
        schema, missing or unknown keys."""
        return cls(**config_fields_from_json(cls, raw, CONFIG_SCHEMA, "unet2d", ("channels", "image_size")))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(name: str, value) -> tuple[int, ...]:
    """A tuple of ints from a tuple, a list or a comma-separated string."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(f"{name} must be integers separated by commas, got {value!r}") from None
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{name} must be a list of integers, got {value!r}")
    return tuple(value)


def group_count(channels: int, groups: int) -> int:
    """GroupNorm groups for `channels`: the largest divisor of `channels` that is <= `groups`."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


# ---- the layout, shared by the network and the estimates ------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One ResBlock (cin -> cout channels) at a feature map of height × width, optionally followed
    by attention."""

    cin: int
    cout: int
    height: int
    width: int
    attention: bool


@dataclass(frozen=True)
class _Level:
    """One resolution level of the encoder or decoder: its blocks, then a resample (down after an
    encoder level, up after a decoder level) of `channels` channels, or none."""

    blocks: tuple[_Block, ...]
    resample: bool
    channels: int
    height: int
    width: int


def _layout(c: UNet2DConfig) -> tuple[int, list[_Level], int, list[_Level]]:
    """(input conv channels, encoder levels, middle channels, decoder levels), as Improved DDPM:
    every encoder output (input conv, each block, each downsample) is a skip that one decoder
    block consumes, last in first out."""
    last = len(c.channel_mult) - 1
    ch = c.width * c.channel_mult[0]
    skips = [ch]
    encoder: list[_Level] = []
    for level, mult in enumerate(c.channel_mult):
        h, w = c.image_size >> level, c.image_width >> level
        attn = h in c.attention_resolutions
        blocks = []
        for _ in range(c.num_res_blocks):
            blocks.append(_Block(ch, c.width * mult, h, w, attn))
            ch = c.width * mult
            skips.append(ch)
        if level != last:
            skips.append(ch)
        encoder.append(_Level(tuple(blocks), level != last, ch, h, w))
    middle = ch
    decoder: list[_Level] = []
    for level in range(last, -1, -1):
        h, w = c.image_size >> level, c.image_width >> level
        attn = h in c.attention_resolutions
        blocks = []
        for _ in range(c.num_res_blocks + 1):
            cout = c.width * c.channel_mult[level]
            blocks.append(_Block(ch + skips.pop(), cout, h, w, attn))
            ch = cout
        decoder.append(_Level(tuple(blocks), level != 0, ch, h, w))
    assert not skips  # every skip is consumed exactly once
    return c.width * c.channel_mult[0], encoder, middle, decoder


# ---- layers with explicitly drawn weights --------------------------------------------------------
def _glorot(shape: tuple[int, ...], fan_in: int, fan_out: int, gen: torch.Generator) -> nn.Parameter:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)


class _Conv(nn.Module):
    """k×k conv, 'same' padding (stride 2 halves the size); Glorot-uniform or zero weights, zero bias."""

    def __init__(self, cin: int, cout: int, k: int, gen: torch.Generator, *, stride: int = 1,
                 zero: bool = False) -> None:
        super().__init__()
        shape = (cout, cin, k, k)
        self.weight = nn.Parameter(torch.zeros(shape)) if zero else _glorot(shape, cin * k * k, cout * k * k, gen)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.padding = stride, k // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class _Linear(nn.Module):
    """Glorot-uniform weight [out, in], zero bias."""

    def __init__(self, cin: int, cout: int, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = _glorot((cout, cin), cin, cout, gen)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, groups), channels, eps=GROUPNORM_EPS)


class _ResBlock(nn.Module):
    """GN, SiLU, conv; scale-shift GN from the time embedding, SiLU, dropout, zero conv; + skip."""

    def __init__(self, b: _Block, c: UNet2DConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.norm1 = _norm(b.cin, c.groups)
        self.conv1 = _Conv(b.cin, b.cout, 3, gen)
        self.time = _Linear(c.time_dim, 2 * b.cout, gen)
        self.norm2 = _norm(b.cout, c.groups)
        self.conv2 = _Conv(b.cout, b.cout, 3, gen, zero=True)  # the block starts as its skip
        self.skip = _Conv(b.cin, b.cout, 1, gen) if b.cin != b.cout else None
        self.dropout = c.dropout

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h [B, cin, h, w], emb = SiLU(time embedding) [B or 1, time_dim] -> [B, cout, h, w]."""
        a = self.conv1(F.silu(self.norm1(h)))  # [B, cout, h, w]
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)  # [B or 1, cout, 1, 1] each
        a = F.silu(self.norm2(a) * (1 + scale) + shift)
        if self.dropout > 0:  # (config, not tensor values: p = 0 would still draw a mask under vmap)
            a = F.dropout(a, self.dropout, self.training)
        a = self.conv2(a)
        return (h if self.skip is None else self.skip(h)) + a


class _Attention(nn.Module):
    """GN, 1×1 conv to q, k, v, multi-head self-attention over the positions, zero 1×1 conv; + h."""

    def __init__(self, channels: int, c: UNet2DConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm = _norm(channels, c.groups)
        self.qkv = _Conv(channels, 3 * channels, 1, gen)
        self.out = _Conv(channels, channels, 1, gen, zero=True)  # the block starts as the identity

    def forward(self, h: Tensor) -> Tensor:
        """h [B, C, h, w] -> [B, C, h, w]."""
        B, C, H, W = h.shape
        qkv = self.qkv(self.norm(h)).reshape(B, 3, self.heads, C // self.heads, H * W)  # [B, 3, heads, hd, N]
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # [B, heads, N, hd] each
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, hd], softmax(q·k/sqrt(hd))·v
        return h + self.out(o.transpose(-1, -2).reshape(B, C, H, W))


class _Stage(nn.Module):
    """A level's ResBlocks, each followed by attention or nothing (nn.Identity), then the resample."""

    def __init__(self, level: _Level, c: UNet2DConfig, gen: torch.Generator, resample: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for b in level.blocks:
            self.blocks.append(_ResBlock(b, c, gen))
            self.attentions.append(_Attention(b.cout, c, gen) if b.attention else nn.Identity())
        stride = 2 if resample == "down" else 1
        self.resample = _Conv(level.channels, level.channels, 3, gen, stride=stride) if level.resample else None


class UNet2D(nn.Module):
    """``UNet2D(config, seed)``: forward(x_t [B, C, H, W], t [B] | [1]) -> [B, out_channels, H, W].

    See the module docstring for the layout; t is the network time (Process.network_time) in [0, 1],
    one per image or one for the whole batch.
    """

    def __init__(self, config: UNet2DConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = c = config
        gen = torch.Generator().manual_seed(seed)
        ch_in, encoder, middle, decoder = _layout(c)
        # Draw order is fixed (time MLP, input conv, encoder, middle, decoder, output) so a seed names
        # one model.
        self.time_in = _Linear(c.width, c.time_dim, gen)
        self.time_out = _Linear(c.time_dim, c.time_dim, gen)
        self.conv_in = _Conv(c.channels, ch_in, 3, gen)
        self.encoder = nn.ModuleList(_Stage(level, c, gen, "down") for level in encoder)
        h, w = c.image_size >> (len(c.channel_mult) - 1), c.image_width >> (len(c.channel_mult) - 1)
        self.mid1 = _ResBlock(_Block(middle, middle, h, w, True), c, gen)
        self.mid_attention = _Attention(middle, c, gen)
        self.mid2 = _ResBlock(_Block(middle, middle, h, w, True), c, gen)
        self.decoder = nn.ModuleList(_Stage(level, c, gen, "up") for level in decoder)
        self.norm_out = _norm(ch_in, c.groups)
        self.conv_out = _Conv(ch_in, c.out_channels, 3, gen, zero=True)  # the untrained net predicts 0

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The prediction the process's loss expects (noise, x0, and/or variance channels) as float32."""
        c = self.config
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c.channels, c.image_size, c.image_width):
            raise ValueError(f"x_t must be [B, {c.channels}, {c.image_size}, {c.image_width}], "
                             f"got {list(x_t.shape)}")
        dtype = self.conv_in.weight.dtype
        h = self.conv_in(x_t.to(dtype))  # [B, n·m_0, H, W]
        emb = F.silu(self._time(t, x_t.shape[0]))  # [B or 1, time_dim]; every block reads SiLU(e)
        skips = [h]
        for stage in self.encoder:
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(h, emb))  # [B, n·m_l, H/2^l, W/2^l]
                skips.append(h)
            if stage.resample is not None:
                h = stage.resample(h)  # strided conv: [B, n·m_l, H/2^(l+1), W/2^(l+1)]
                skips.append(h)
        h = self.mid2(self.mid_attention(self.mid1(h, emb)), emb)  # [B, n·m_{L-1}, H/2^(L-1), W/2^(L-1)]
        for stage in self.decoder:
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))  # [B, n·m_l, H/2^l, W/2^l]
            if stage.resample is not None:
                h = stage.resample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [B, n·m_l, 2×, 2×]
        return self.conv_out(F.silu(self.norm_out(h))).float()  # [B, out_channels, H, W]

    def _time(self, t: Tensor, batch: int) -> Tensor:
        """Time embedding MLP(sinusoid(t, n)): [B or 1, time_dim]."""
        t = torch.as_tensor(t, dtype=self.time_in.weight.dtype, device=self.time_in.weight.device)
        # One time for the batch (a sampler step) is embedded once and broadcast; shapes only, no
        # test of values (vmap).
        t = t.reshape(1) if t.numel() == 1 else t.reshape(batch)
        return self.time_out(F.silu(self.time_in(sinusoid(t, self.config.width))))


# ---- sizes ----------------------------------------------------------------------------------------
def parameter_count(config: UNet2DConfig) -> int:
    """Number of weights, from the layout alone (the tests check it against the module)."""
    c = config
    ch_in, encoder, middle, decoder = _layout(c)

    def res(cin: int, cout: int) -> int:
        skip = cin * cout + cout if cin != cout else 0
        # GN1, conv1, time projection (scale and shift), GN2, conv2, 1×1 skip
        return 2 * cin + (9 * cin * cout + cout) + (c.time_dim + 1) * 2 * cout + 2 * cout + (9 * cout + 1) * cout + skip

    def attn(ch: int) -> int:
        return 2 * ch + 3 * ch * ch + 3 * ch + ch * ch + ch

    total = c.width * c.time_dim + c.time_dim + c.time_dim * c.time_dim + c.time_dim  # time MLP
    total += 9 * c.channels * ch_in + ch_in  # input conv
    for level in encoder + decoder:
        total += sum(res(b.cin, b.cout) + (attn(b.cout) if b.attention else 0) for b in level.blocks)
        total += 9 * level.channels ** 2 + level.channels if level.resample else 0
    total += 2 * res(middle, middle) + attn(middle)
    total += 2 * ch_in + 9 * ch_in * c.out_channels + c.out_channels  # output head
    return total


def activation_floats(config: UNet2DConfig, batch: int) -> int:
    """Floats the forward pass keeps for the backward pass (rough: per ResBlock its input twice
    (GN, SiLU) and six cout-sized maps; per attention seven maps and the heads × N² attention
    weights; the resamples' inputs and outputs)."""
    c = config
    ch_in, encoder, middle, decoder = _layout(c)
    H, W = c.image_size, c.image_width

    def res(b: _Block) -> int:
        return (2 * b.cin + 6 * b.cout) * b.height * b.width

    def attn(ch: int, h: int, w: int) -> int:
        n = h * w
        return 7 * ch * n + c.heads * n * n

    per_image = (c.channels + 3 * ch_in) * H * W + 3 * ch_in * H * W  # input conv; output GN, SiLU
    for levels, resample in ((encoder, 1), (decoder, 8)):  # ↓: the ¼-size output; ↑: two maps at 4× the pixels
        for level in levels:
            per_image += sum(res(b) + (attn(b.cout, b.height, b.width) if b.attention else 0) for b in level.blocks)
            per_image += resample * level.channels * level.height * level.width if level.resample else 0
    h, w = H >> (len(c.channel_mult) - 1), W >> (len(c.channel_mult) - 1)
    mid = _Block(middle, middle, h, w, True)
    per_image += 2 * res(mid) + attn(middle, h, w)
    return batch * per_image


def training_bytes(config: UNet2DConfig, batch: int) -> int:
    """A rough estimate of one training step's tensor memory (bytes): float32 weights with gradient
    and two Adam moments, plus the activations kept for the backward pass."""
    return 4 * (4 * parameter_count(config) + activation_floats(config, batch))
