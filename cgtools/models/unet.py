"""The paper's 1-D convolutional U-Net (Sec. 3.1, App. C), written as channel-last matmuls.

Layout for d = s^L tokens, width n (channels), symbols K (``vocab``):

    x_t [B, d] ──embed (1x1 conv)──▶ e0 [B, d, n]
    enc_l (conv, filter s, stride s; + bias + time bias, [LayerNorm], GeLU):
          [B, d/s^(l-1), n] → [B, d/s^l, n]                          l = 1..L
    dec_j (transposed conv, filter s, stride s; same tail):
          [B, d/s^(L-j+1), c_in] → [B, d/s^(L-j), n]                 j = 1..L
    readout (1x1 conv): [B, d, c_in] → logits [B, d, K]

Skips join equal resolutions. ``skip="add"``: dec_1 reads e_L; dec_j (j ≥ 2) reads
z_{j-1} + e_{L-j+1}; the readout reads z_L + e_0. ``skip="concat"`` (the authors' public code):
every decoder reads concat(z_{j-1}, e_{L-j+1}) with z_0 = e_L (so dec_1 concatenates the
bottleneck with itself) and the readout reads concat(z_L, e_0); fan-ins double.

A conv with filter s and stride s is one GEMM on the channel-last tensor reshaped to
[B, d/s, s·n] (the s neighbours of each output are contiguous); a transposed conv is one GEMM to
[B, len, s·n] reshaped to [B, s·len, n]. The weights are stored in these GEMM layouts:
``enc[l].weight[k·n_in + c, o] = conv.weight[o, c, k]`` and
``dec[j].weight[c, k·n_out + o] = conv_transpose.weight[c, o, k]``.

Parameterisation (see :mod:`cgtools.models.mup`): every weight N(0, 1) from an explicit generator,
biases 0, LayerNorm gains 1; the forward pass multiplies by 1/sqrt(fan_in) (embedding, convs,
time projection) and by 1/fan_in at the readout.

Time convention: ``t`` is the noise level as a float in [0, 1] — τ = k/T for step k of a T-step
discrete process (uniform noise), the continuous time for masked diffusion. The network embeds
1000·t with sinusoids of ``time_dim`` sizes and projects it to one per-channel bias per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgtools.errors import ConfigError
from cgtools.models.config_json import config_fields_from_json, config_to_json
from cgtools.models.mup import ParamInfo, check_param_info
from cgtools.models.time_embedding import sinusoid

PAPER_WIDTH = 8192
CONFIG_SCHEMA = "unet/1"
LAYERNORM_EPS = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a U-Net; the weights are the only other state.

    vocab: K, real symbols (output size). input_vocab: K for uniform noise, K + 1 for masked
    diffusion (mask id = K); None means K. depth: L; branching: s (filter size = stride); d = s^L.
    width: n channels (paper 8192). The remaining flags choose between the paper's description
    and the authors' public code (docs/unet.md lists them).
    """

    vocab: int
    input_vocab: int | None = None
    depth: int = 3
    branching: int = 2
    width: int = PAPER_WIDTH
    time_embedding: bool = True
    time_dim: int = 128
    skip: Literal["add", "concat"] = "add"
    norm: Literal["none", "layernorm"] = "none"
    input_mode: Literal["onehot", "leaf_message"] = "onehot"
    bias: bool = True
    embed_gelu: bool = False  # GeLU after the embedding (authors' public code)
    readout: Literal["mup", "standard"] = "mup"  # readout multiplier 1/fan_in or 1/sqrt(fan_in)
    deconv_fan_in: Literal["cin", "cin_k"] = "cin"  # transposed conv / sqrt(C_in) or sqrt(C_in·s)
    leaf_mean: float | None = None  # leaf_message standardisation; None: 1/K
    leaf_std: float | None = None  # None: sqrt(K-1)/K (the std of a clean one-hot)

    def __post_init__(self) -> None:
        if self.input_vocab is None:
            object.__setattr__(self, "input_vocab", self.vocab)
        _check_int("vocab", self.vocab, 2)
        if self.input_vocab not in (self.vocab, self.vocab + 1):
            raise ConfigError(f"input_vocab must be vocab ({self.vocab}) or vocab + 1 (masked), "
                              f"got {self.input_vocab}")
        _check_int("depth", self.depth, 1)
        _check_int("branching", self.branching, 2)
        _check_int("width", self.width, 1)
        _check_int("time_dim", self.time_dim, 4)
        if self.time_dim % 2:
            raise ConfigError(f"time_dim must be even (sin and cos halves), got {self.time_dim}")
        for name, allowed in (("skip", ("add", "concat")), ("norm", ("none", "layernorm")),
                              ("input_mode", ("onehot", "leaf_message")),
                              ("readout", ("mup", "standard")),
                              ("deconv_fan_in", ("cin", "cin_k"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("time_embedding", "bias", "embed_gelu"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.leaf_std is not None and not self.leaf_std > 0:
            raise ConfigError(f"leaf_std must be positive, got {self.leaf_std}")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """d = s^L, the number of tokens."""
        return self.branching ** self.depth

    @property
    def masked(self) -> bool:
        return self.input_vocab == self.vocab + 1

    @property
    def skip_factor(self) -> int:
        """Decoder / readout input channels in units of n."""
        return 2 if self.skip == "concat" else 1

    @property
    def embed_rows(self) -> int:
        """Embedding input channels: one-hot over input_vocab, or leaf messages over vocab."""
        return self.input_vocab if self.input_mode == "onehot" else self.vocab

    # ---- JSON (stored in safetensors checkpoint metadata) --------------------------------------
    def to_json(self) -> str:
        return config_to_json(self, CONFIG_SCHEMA)

    @classmethod
    def from_json(cls, raw: str | bytes | dict) -> UNetConfig:
        """Inverse of :meth:`to_json`; ConfigError on unknown schema, missing or unknown keys."""
        return cls(**config_fields_from_json(cls, raw, CONFIG_SCHEMA, "U-Net", ("vocab",)))


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def reference_leaf_standardisation(alphabar: Tensor, vocab: int) -> tuple[float, float]:
    """(leaf_mean, leaf_std) as the authors' public code computes them from a schedule table.

    With a = ᾱ_t over the table: mean = avg(a + (1-a)/K), std = sqrt(avg(a + (1-a)/K²) - mean²)
    (moments of the leaf message averaged over t, as in their bpUNET input transform).
    """
    a = alphabar.double()
    mean = (a + (1 - a) / vocab).mean()
    std = ((a + (1 - a) / vocab**2).mean() - mean**2).sqrt()
    return float(mean), float(std)


class _Block(nn.Module):
    """One encoder or decoder block: GEMM weight in channel-last layout, bias, LayerNorm affine."""

    def __init__(self, rows: int, cols: int, width: int, config: UNetConfig, gen: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols, generator=gen))
        self.bias = nn.Parameter(torch.zeros(width)) if config.bias else None
        if config.norm == "layernorm":
            self.norm_weight = nn.Parameter(torch.ones(width))
            self.norm_bias = nn.Parameter(torch.zeros(width))
        else:
            self.norm_weight = self.norm_bias = None


class UNet(nn.Module):
    """The RHM U-Net. ``UNet(config, seed)`` is reproducible: same config and seed, same weights.

    forward(x_t [B, d] long, t [B] or [1] (one time for the batch) float in [0, 1], keep_prob [B] | None) -> logits [B, d, K]
    (float32). See the module docstring for the layout and the time convention.
    """

    def __init__(self, config: UNetConfig, seed: int = 0):
        super().__init__()
        self.config = config
        c = config
        n, s, L = c.width, c.branching, c.depth
        gen = torch.Generator().manual_seed(seed)
        # Draw order is fixed (embed, enc1..L, dec1..L, readout, time) so a seed names one model.
        self.embed_weight = nn.Parameter(torch.randn(c.embed_rows, n, generator=gen))
        self.embed_bias = nn.Parameter(torch.zeros(n)) if c.bias else None
        self.enc = nn.ModuleList(_Block(s * n, n, n, c, gen) for _ in range(L))
        self.dec = nn.ModuleList(_Block(c.skip_factor * n, s * n, n, c, gen) for _ in range(L))
        self.readout_weight = nn.Parameter(torch.randn(c.skip_factor * n, c.vocab, generator=gen))
        self.readout_bias = nn.Parameter(torch.zeros(c.vocab)) if c.bias else None
        if c.time_embedding:
            self.time_weight = nn.Parameter(torch.randn(c.time_dim, 2 * L * n, generator=gen))
        else:
            self.time_weight = None
        self._infos = self._build_param_info()
        check_param_info(self, self._infos)
        # leaf_message inputs with uniform noise need ᾱ at the network time t; the architecture
        # registry binds the process's map here (not a parameter: it is rebuilt from the config).
        self.keep_of_time: Callable[[Tensor], Tensor] | None = None

    # ---- μP bookkeeping ------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.config.width

    def _build_param_info(self) -> dict[str, ParamInfo]:
        c = self.config
        n, s = c.width, c.branching
        vec = ParamInfo("vector", 1, 1.0)
        enc_fan_in = s * n
        dec_fan_in = c.skip_factor * n  # true fan-in of a stride = filter transposed conv
        dec_mult = (dec_fan_in * (s if c.deconv_fan_in == "cin_k" else 1)) ** -0.5
        read_fan_in = c.skip_factor * n
        read_mult = 1 / read_fan_in if c.readout == "mup" else read_fan_in ** -0.5
        out = {"embed_weight": ParamInfo("input", c.embed_rows, c.embed_rows ** -0.5),
               "embed_bias": vec,
               "readout_weight": ParamInfo("output", read_fan_in, read_mult),
               "readout_bias": ParamInfo("output_vector", 1, 1.0),
               "time_weight": ParamInfo("input", c.time_dim, c.time_dim ** -0.5)}
        enc_info = ParamInfo("hidden", enc_fan_in, enc_fan_in ** -0.5)
        dec_info = ParamInfo("hidden", dec_fan_in, dec_mult)
        for prefix, blocks, weight in (("enc", self.enc, enc_info), ("dec", self.dec, dec_info)):
            for i in range(len(blocks)):
                out[f"{prefix}.{i}.weight"] = weight
                for name in ("bias", "norm_weight", "norm_bias"):
                    out[f"{prefix}.{i}.{name}"] = vec
        present = {name for name, _ in self.named_parameters()}
        return {name: info for name, info in out.items() if name in present}

    def param_info(self) -> dict[str, ParamInfo]:
        """{parameter name: μP class, fan-in, forward multiplier} (used by mup.param_groups)."""
        return dict(self._infos)

    @property
    def block_names(self) -> list[str]:
        """Pre-activation keys in order from input to output: enc1..encL, dec1..decL."""
        L = self.config.depth
        return [f"enc{i}" for i in range(1, L + 1)] + [f"dec{j}" for j in range(1, L + 1)]

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor | None, keep_prob: Tensor | None = None,
                return_preactivations: bool = False):
        """Logits of p̂(x0 | x_t) [B, d, K], float32.

        x_t: long [B, d], symbols in [0, input_vocab). t: float [B] (or a scalar), noise level
        in [0, 1]; ignored, and may be None, when ``time_embedding`` is off. keep_prob: float [B],
        ᾱ_t, the probability that a token is still clean; required by
        ``input_mode="leaf_message"`` with uniform noise (for masked inputs the message of a mask
        is uniform and keep_prob is not needed); ignored for one-hot inputs.
        With ``return_preactivations`` returns (logits, {block name: GeLU input [B, len, n]}),
        names enc1..encL, dec1..decL in order from input to output (after bias, time bias and
        LayerNorm, before the GeLU; the skip is added after the GeLU).
        """
        c = self.config
        n, s, L = c.width, c.branching, c.depth
        if x_t.dim() != 2 or x_t.shape[1] != c.length:
            raise ValueError(f"x_t must be [B, {c.length}], got {list(x_t.shape)}")
        B = x_t.shape[0]
        pre: dict[str, Tensor] | None = {} if return_preactivations else None

        if keep_prob is None and self.keep_of_time is not None and c.input_mode == "leaf_message":
            keep_prob = self.keep_of_time(t).to(x_t.device)  # [B]
        h = self._embed(x_t, keep_prob)  # [B, d, n]
        time_bias = self._time_biases(t, B)  # [B or 1, 2L, n] or None
        # Inference with one time for the whole batch (every sampler step): fold the time bias and
        # the μP multiplier into the GEMM (its bias and alpha), saving two passes over the
        # activations per block. Training keeps the explicit form (see _gemm for why).
        fold = pre is None and not torch.is_grad_enabled() and (time_bias is None or time_bias.shape[0] == 1)
        skips = [h]  # skips[l] = e_l, output of encoder l (e_0 = embedding), [B, d/s^l, n]
        for i, blk in enumerate(self.enc):
            length = h.shape[1] // s
            h = self._layer(h.reshape(B * length, s * n), (B, length, n), blk, f"enc.{i}.weight",
                            time_bias, i, pre, f"enc{i + 1}", fold)
            skips.append(h)

        z = skips[L]
        for j, blk in enumerate(self.dec):
            skip = skips[L - j]  # same resolution as z
            inp = self._join(z, skip, first=j == 0)  # [B, len, c_in]
            length = inp.shape[1]
            # [B·len, s·n] -> [B, s·len, n]: the s outputs of one input position are adjacent.
            z = self._layer(inp.reshape(B * length, inp.shape[2]), (B, length * s, n), blk, f"dec.{j}.weight",
                            time_bias, L + j, pre, f"dec{j + 1}", fold)

        inp = self._join(z, skips[0], first=False)  # [B, d, c_in]
        flat = inp.reshape(B * c.length, inp.shape[2]) * self._infos["readout_weight"].multiplier
        if self.readout_bias is not None:
            logits = torch.addmm(self.readout_bias, flat, self.readout_weight)
        else:
            logits = torch.mm(flat, self.readout_weight)
        logits = logits.view(B, c.length, c.vocab).float()  # [B, d, K]
        return (logits, pre) if return_preactivations else logits

    def _embed(self, x_t: Tensor, keep_prob: Tensor | None) -> Tensor:
        """1x1 conv of the input: row lookup (one-hot) or GEMM (leaf messages). [B, d, n]"""
        c = self.config
        mult = self._infos["embed_weight"].multiplier
        if c.input_mode == "onehot":
            h = F.embedding(x_t, self.embed_weight) * mult  # [B, d, n]
        else:
            msg = self._leaf_message(x_t, keep_prob)  # [B, d, K]
            h = torch.matmul(msg, self.embed_weight) * mult  # [B, d, n]
        if self.embed_bias is not None:
            h = h + self.embed_bias
        return F.gelu(h) if c.embed_gelu else h

    def _leaf_message(self, x_t: Tensor, keep_prob: Tensor | None) -> Tensor:
        """Standardised leaf message (ᾱ·onehot(x_t) + (1-ᾱ)/K - mean) / std, [B, d, K]."""
        c = self.config
        K = c.vocab
        mean = 1.0 / K if c.leaf_mean is None else c.leaf_mean
        std = math.sqrt(K - 1) / K if c.leaf_std is None else c.leaf_std
        dtype = self.embed_weight.dtype
        if c.masked:
            # A clean token is certain, a mask says nothing: one-hot or uniform.
            is_mask = x_t == K
            msg = F.one_hot(x_t.clamp(max=K - 1), K).to(dtype)  # [B, d, K]
            msg = torch.where(is_mask[..., None], torch.full_like(msg, 1.0 / K), msg)
        else:
            if keep_prob is None:
                raise ValueError("input_mode='leaf_message' needs keep_prob (ᾱ_t per sequence)")
            a = keep_prob.to(dtype).view(-1, 1, 1)  # [B, 1, 1]
            msg = a * F.one_hot(x_t, K).to(dtype) + (1 - a) / K  # [B, d, K]
        return (msg - mean) / std

    def _time_biases(self, t: Tensor | None, batch: int) -> Tensor | None:
        """Per-block, per-channel biases from the sinusoidal embedding of 1000·t. [B, 2L, n]"""
        if self.time_weight is None:
            return None
        if t is None:
            raise ValueError("this U-Net is time-conditioned: forward needs t")
        c = self.config
        t = torch.as_tensor(t, dtype=self.time_weight.dtype, device=self.time_weight.device)
        # One time for the whole batch (a sampler step passes a scalar): embed it once and let it
        # broadcast below. No test of the values here: under vmap (cgtools sweep) that is
        # data-dependent control flow.
        t = t.reshape(1) if t.numel() == 1 else t.reshape(batch)
        rows = t.shape[0]
        emb = sinusoid(t, c.time_dim)  # [B, time_dim]
        mult = self._infos["time_weight"].multiplier
        return (torch.mm(emb, self.time_weight) * mult).view(rows, 2 * c.depth, c.width)  # broadcasts over B

    def _gemm(self, x: Tensor, blk: _Block, name: str) -> Tensor:
        """(multiplier · x) @ W + bias for one block: [M, K] -> [M, cols]."""
        # Scale the activations, not the product: the backward of a scaled product would
        # allocate and rescale a weight-sized gradient, which dominates at large widths.
        x = x * self._infos[name].multiplier
        if blk.bias is None:
            return torch.mm(x, blk.weight)
        reps = blk.weight.shape[1] // blk.bias.shape[0]  # decoder: s outputs per input position
        return torch.addmm(blk.bias.repeat(reps) if reps > 1 else blk.bias, x, blk.weight)

    def _layer(self, x: Tensor, shape: tuple[int, int, int], blk: _Block, name: str, time_bias: Tensor | None,
               index: int, pre: dict[str, Tensor] | None, tag: str, fold: bool) -> Tensor:
        """One block: GEMM, time bias, [LayerNorm], GeLU. x [M, K] -> `shape` [B, len, n]. With `fold`
        (inference, one time for the batch) the time bias and μP multiplier ride in the GEMM."""
        if fold:
            return self._tail(self._gemm_folded(x, blk, name, time_bias, index).view(shape), blk, None, index, None, "")
        return self._tail(self._gemm(x, blk, name).view(shape), blk, time_bias, index, pre, tag)

    def _gemm_folded(self, x: Tensor, blk: _Block, name: str, time_bias: Tensor | None, index: int) -> Tensor:
        """The inference form of _gemm + time bias: bias + time bias (one row) + multiplier·(x @ W)
        in one addmm. [M, K] -> [M, cols]"""
        reps = blk.weight.shape[1] // self.config.width  # decoder: s outputs per input position
        bias = blk.bias
        if time_bias is not None:
            tb = time_bias[0, index]  # [n]
            bias = tb if bias is None else bias + tb
        mult = self._infos[name].multiplier
        if bias is None:
            return torch.mm(x, blk.weight).mul_(mult)
        return torch.addmm(bias.repeat(reps) if reps > 1 else bias, x, blk.weight, alpha=mult)

    def _tail(self, a: Tensor, blk: _Block, time_bias: Tensor | None, index: int,
              pre: dict[str, Tensor] | None, name: str) -> Tensor:
        """+ time bias, [LayerNorm], record the pre-activation, GeLU. [B, len, n]"""
        if time_bias is not None:
            a = a + time_bias[:, index, None, :]  # [B, 1, n] broadcast over positions
        if blk.norm_weight is not None:
            a = F.layer_norm(a, (a.shape[-1],), blk.norm_weight, blk.norm_bias, LAYERNORM_EPS)
        if pre is not None:
            pre[name] = a
        return F.gelu(a)

    def _join(self, z: Tensor, skip: Tensor, first: bool) -> Tensor:
        """Skip connection at equal resolution: z + skip, or concat(z, skip) along channels."""
        if self.config.skip == "concat":
            return torch.cat([z, skip], dim=-1)  # [B, len, 2n]
        return z if first else z + skip  # dec1 reads the bottleneck alone


def flops_forward(config: UNetConfig, batch: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the forward GEMMs for `batch` sequences.

    Counted: encoder and decoder GEMMs, readout, embedding GEMM in leaf_message mode (one-hot
    embedding is a row lookup: 0), time projection. Elementwise work (bias, GeLU, LayerNorm) is not.
    """
    return sum(2 * m * k * n for m, k, n, _ in _gemms(config, batch))


def flops_per_step(config: UNetConfig, batch: int) -> int:
    """Forward + backward GEMM FLOPs of one training step (≈ 3 × forward).

    Backward = one GEMM for the weight gradient plus one for the input gradient, except where the
    GEMM input needs no gradient (the leaf-message embedding and the time projection).
    """
    return sum(2 * m * k * n * (3 if needs_input_grad else 2)
               for m, k, n, needs_input_grad in _gemms(config, batch))


def training_bytes(config: UNetConfig, batch: int) -> int:
    """A rough estimate of the tensor memory (bytes) one training step needs: float32 weights with
    their gradient and two Adam moments, and for every GEMM its input, output, activation and
    gradients kept for the backward pass. Used to refuse runs that cannot fit before they start."""
    weights = sum(k * n for _, k, n, _ in _gemms(config, 1))
    activations = sum(m * k + 4 * m * n for m, k, n, _ in _gemms(config, batch))
    return 4 * (5 * weights + activations)


def _gemms(c: UNetConfig, batch: int) -> list[tuple[int, int, int, bool]]:
    """(M, K, N, input needs grad) of every forward GEMM."""
    n, s, L, d = c.width, c.branching, c.depth, c.length
    out = []
    if c.input_mode == "leaf_message":
        out.append((batch * d, c.vocab, n, False))
    if c.time_embedding:
        out.append((batch, c.time_dim, 2 * L * n, False))
    for level in range(1, L + 1):  # encoder: output length d / s^level
        out.append((batch * d // s**level, s * n, n, True))
    for level in range(L, 0, -1):  # decoder: input length d / s^level
        out.append((batch * d // s**level, c.skip_factor * n, s * n, True))
    out.append((batch * d, c.skip_factor * n, c.vocab, True))
    return out
