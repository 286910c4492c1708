"""A bidirectional transformer denoiser for token sequences (the MD4 text backbone, CPU-sized).

Layout for d tokens, width n (d_model), H heads of size n/H, symbols K (``vocab``):

    x_t [B, d] ──embed (input_vocab rows: K, or K + 1 with the mask id K)──▶ h [B, d, n]
    layers × block:  h += gate₁ · Attn(mod(RMSNorm(h)))     (RoPE on q, k; no causal mask)
                     h += gate₂ · MLP(mod(RMSNorm(h)))      (SwiGLU or GELU)
    RMSNorm, mod ──output projection (zero-initialised)──▶ logits [B, d, K]

mod(·) and the gates are the adaLN time conditioning (``time_embedding``): a sinusoidal
embedding of 1000·t, an MLP, and per block a zero-initialised projection to shift, scale and
gate, so every block starts as the identity. Without time conditioning (the default under masked
diffusion: its optimal denoiser ignores t) mod is the identity and the gates are 1, and t is
ignored (it may be None).

Initialisation (MD4/GPT-2 style, standard parameterisation, so the architecture trains with
``--lr-scheme global``): weights N(0, 0.02²), the residual output projections N(0, 0.02²/(2·layers))
(depth-scaled), RMSNorm gains 1, the output projection 0 (uniform logits at init). Every weight is
drawn from an explicit generator: a (config, seed) names one network.

The forward pass has no control flow on tensor values (only on shapes and the config), so it runs
under torch.func.vmap (cgtools sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgtools.errors import ConfigError
from cgtools.models.config_json import config_fields_from_json, config_to_json
from cgtools.models.time_embedding import sinusoid

CONFIG_SCHEMA = "transformer/1"
INIT_STD = 0.02


@dataclass(frozen=True)
class TransformerConfig:
    """Everything that defines a transformer denoiser; the weights are the only other state.

    vocab: K, real symbols (output size). input_vocab: K (uniform noise) or K + 1 (masked; the
    mask id is K); None means K. length: d, tokens per sequence. width: d_model. layers: blocks.
    heads: attention heads (width/heads must be even, for RoPE). mlp: "swiglu" (gated, hidden
    ⌈8/3·width⌉ rounded up to a multiple of 8: the parameters of a 4×width GELU MLP) or "gelu"
    (hidden 4·width). time_embedding: adaLN conditioning on t. time_dim: sinusoid size.
    rope_base: RoPE frequency base. norm_eps: RMSNorm epsilon.
    """

    vocab: int
    input_vocab: int | None = None
    length: int = 256
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    time_embedding: bool = False
    time_dim: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.input_vocab is None:
            object.__setattr__(self, "input_vocab", self.vocab)
        for name, minimum in (("vocab", 2), ("length", 1), ("width", 2), ("layers", 1), ("heads", 1),
                              ("time_dim", 4)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.input_vocab not in (self.vocab, self.vocab + 1):
            raise ConfigError(f"input_vocab must be vocab ({self.vocab}) or vocab + 1 (masked), "
                              f"got {self.input_vocab}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"width {self.width} must be a multiple of heads {self.heads} with an even "
                              f"head size (RoPE rotates pairs); try --width {2 * self.heads * max(1, self.width // (2 * self.heads))}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if not isinstance(self.time_embedding, bool):
            raise ConfigError(f"time_embedding must be a bool, got {self.time_embedding!r}")
        if self.time_dim % 2:
            raise ConfigError(f"time_dim must be even (sin and cos halves), got {self.time_dim}")
        if not self.rope_base > 1 or not self.norm_eps > 0:
            raise ConfigError("rope_base must be > 1 and norm_eps > 0")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        """MLP hidden units."""
        if self.mlp == "gelu":
            return 4 * self.width
        return -(-8 * self.width // 3 // 8) * 8

    @property
    def masked(self) -> bool:
        return self.input_vocab == self.vocab + 1

    # ---- JSON (stored in safetensors checkpoint metadata) --------------------------------------
    def to_json(self) -> str:
        return config_to_json(self, CONFIG_SCHEMA)

    @classmethod
    def from_json(cls, raw: str | bytes | dict) -> "TransformerConfig":
        """Inverse of :meth:`to_json`; ConfigError on unknown schema, missing or unknown keys."""
        return cls(**config_fields_from_json(cls, raw, CONFIG_SCHEMA, "transformer", ("vocab",)))


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=gen) * std)


class _Block(nn.Module):
    """Pre-norm attention + MLP with optional adaLN-zero modulation. Weights are [out, in] (F.linear)."""

    def __init__(self, c: TransformerConfig, gen: torch.Generator) -> None:
        super().__init__()
        n, hidden = c.width, c.hidden
        resid_std = INIT_STD / math.sqrt(2 * c.layers)  # depth-scaled: the residual stream stays O(1)
        self.norm1 = nn.Parameter(torch.ones(n))
        self.qkv = _normal((3 * n, n), INIT_STD, gen)
        self.attn_out = _normal((n, n), resid_std, gen)
        self.norm2 = nn.Parameter(torch.ones(n))
        self.mlp_in = _normal(((2 if c.mlp == "swiglu" else 1) * hidden, n), INIT_STD, gen)
        self.mlp_out = _normal((n, hidden), resid_std, gen)
        # adaLN-zero: shift, scale, gate for attention and MLP; zero so the block starts as identity.
        self.modulation = nn.Parameter(torch.zeros(6 * n, n)) if c.time_embedding else None


class TransformerDenoiser(nn.Module):
    """``TransformerDenoiser(config, seed)``: forward(x_t [B, d] long, t [B] | [1] | None) -> logits [B, d, K].

    See the module docstring for the layout; t is the network time in [0, 1], read only with
    ``time_embedding``.
    """

    def __init__(self, config: TransformerConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = c = config
        gen = torch.Generator().manual_seed(seed)
        # Draw order is fixed (embed, blocks, time MLP) so a seed names one model.
        self.embed = _normal((c.input_vocab, c.width), INIT_STD, gen)
        self.blocks = nn.ModuleList(_Block(c, gen) for _ in range(c.layers))
        self.norm_f = nn.Parameter(torch.ones(c.width))
        self.out = nn.Parameter(torch.zeros(c.vocab, c.width))  # zero: uniform logits at init
        if c.time_embedding:
            self.time_in = _normal((c.width, c.time_dim), INIT_STD, gen)
            self.time_hidden = _normal((c.width, c.width), INIT_STD, gen)
            self.final_modulation = nn.Parameter(torch.zeros(2 * c.width, c.width))
        else:
            self.time_in = self.time_hidden = self.final_modulation = None

    @property
    def width(self) -> int:
        return self.config.width

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """Logits of p̂(x0 | x_t): x_t [B, d] ids in [0, input_vocab), t [B] or [1] -> [B, d, K] float32."""
        c = self.config
        if x_t.dim() != 2 or x_t.shape[1] != c.length:
            raise ValueError(f"x_t must be [B, {c.length}], got {list(x_t.shape)}")
        B, d = x_t.shape
        h = F.embedding(x_t, self.embed)  # [B, d, n]
        cond = self._time(t, B)  # [B or 1, 1, n] or None
        cos, sin = self._rope(d, h.dtype, h.device)  # [d, hd/2] each
        for blk in self.blocks:
            if cond is not None:
                mods = F.linear(cond, blk.modulation).chunk(6, dim=-1)  # 6 × [B or 1, 1, n]
            else:
                mods = (None,) * 6
            a = _modulate(F.rms_norm(h, (c.width,), blk.norm1, c.norm_eps), mods[0], mods[1])
            h = h + _gate(self._attention(a, blk, cos, sin), mods[2])
            m = _modulate(F.rms_norm(h, (c.width,), blk.norm2, c.norm_eps), mods[3], mods[4])
            h = h + _gate(self._mlp(m, blk), mods[5])
        h = F.rms_norm(h, (c.width,), self.norm_f, c.norm_eps)
        if cond is not None:
            shift, scale = F.linear(cond, self.final_modulation).chunk(2, dim=-1)
            h = _modulate(h, shift, scale)
        return F.linear(h, self.out).float()  # [B, d, K]

    def _attention(self, x: Tensor, blk: _Block, cos: Tensor, sin: Tensor) -> Tensor:
        """Bidirectional multi-head self-attention with RoPE: [B, d, n] -> [B, d, n]."""
        c = self.config
        B, d, n = x.shape
        qkv = F.linear(x, blk.qkv).view(B, d, 3, c.heads, c.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, d, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # [B, H, d, hd]
        return F.linear(o.transpose(1, 2).reshape(B, d, n), blk.attn_out)

    def _mlp(self, x: Tensor, blk: _Block) -> Tensor:
        """SwiGLU (silu(a)·b) or GELU MLP: [B, d, n] -> [B, d, n]."""
        u = F.linear(x, blk.mlp_in)
        if self.config.mlp == "swiglu":
            a, b = u.chunk(2, dim=-1)
            u = F.silu(a) * b
        else:
            u = F.gelu(u)
        return F.linear(u, blk.mlp_out)

    def _rope(self, d: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of position p times frequency base^(-2i/hd): [d, hd/2] each (from shapes only)."""
        half = self.config.head_dim // 2
        inv = self.config.rope_base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
        angle = torch.arange(d, dtype=torch.float64, device=device)[:, None] * inv[None, :]
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def _time(self, t: Tensor | None, batch: int) -> Tensor | None:
        """adaLN conditioning vector SiLU(MLP(sinusoid(1000·t))): [B or 1, 1, n], or None."""
        if self.time_in is None:
            return None
        if t is None:
            raise ValueError("this transformer is time-conditioned: forward needs t")
        c = self.config
        t = torch.as_tensor(t, dtype=self.time_in.dtype, device=self.time_in.device)
        # One time for the batch (a sampler step) is embedded once and broadcast; shapes only, no
        # test of values (vmap).
        t = t.reshape(1) if t.numel() == 1 else t.reshape(batch)
        emb = sinusoid(t, c.time_dim)  # [B, time_dim]
        cond = F.linear(F.silu(F.linear(emb, self.time_in)), self.time_hidden)
        return F.silu(cond)[:, None, :]  # [B, 1, n]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the last axis, halves convention: x [..., d, hd], cos/sin [d, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _modulate(x: Tensor, shift: Tensor | None, scale: Tensor | None) -> Tensor:
    return x if shift is None else x * (1 + scale) + shift


def _gate(x: Tensor, gate: Tensor | None) -> Tensor:
    return x if gate is None else gate * x


def parameter_count(config: TransformerConfig) -> int:
    """Number of weights (for logs and the memory estimate)."""
    c = config
    n, h = c.width, c.hidden
    block = 2 * n + 3 * n * n + n * n + (2 if c.mlp == "swiglu" else 1) * h * n + h * n
    if c.time_embedding:
        block += 6 * n * n
    extra = c.width * c.time_dim + n * n + 2 * n * n if c.time_embedding else 0
    return c.input_vocab * n + c.layers * block + n + c.vocab * n + extra


def training_bytes(config: TransformerConfig, batch: int) -> int:
    """A rough estimate of one training step's tensor memory (bytes): float32 weights with gradient
    and two Adam moments, plus per block the activations kept for the backward pass (the residual
    stream, q/k/v, attention weights B·H·d², the MLP hidden units)."""
    c = config
    tokens = batch * c.length
    per_block = tokens * (10 * c.width + 3 * c.hidden) + batch * c.heads * c.length ** 2 * 2
    logits = 3 * tokens * c.vocab
    return 4 * (4 * parameter_count(c) + c.layers * per_block + logits)
