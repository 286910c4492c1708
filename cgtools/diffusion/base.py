"""The small interface shared by the noise processes, and the pieces both use.

Shapes: B = batch, d = positions, K = real symbols (the vocabulary of the data; the masked
process adds a mask id K to its *input* vocabulary only).

A *denoiser* is any callable ``denoiser(x_t [B, d] long, t [B]) -> [B, d, K]`` returning
log p̂(x0 | x_t), float32 (float64 is accepted too). For the uniform process t is a LongTensor of
levels in 1..T; for the masked process a float64 tensor of times in (0, 1]. A network returning
logits becomes a denoiser with :func:`logits_denoiser`; a BP denoiser with
``lambda x, t: bp(x, process.corruption(t))``. Networks should embed ``process.network_time(t)``
(float32 in [0, 1]) rather than t itself, so train and sample share one time convention.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from cgtools.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossTerms:
    """Per-example losses of one training batch, every field a tensor [B].

    loss: the training objective in nats per token (mean over positions); average it over the batch.
    vb: the sampled bound term in nats per token (uniform: L_{t-1} or L_0; masked: the weighted CE).
    ce: cross-entropy -log p̂(x0 | x_t) in nats per token (masked: summed over masked positions only,
        divided by d).
    elbo_bits: an unbiased estimate of the full bound -log p(x0) <= ... in bits per token, for
        validation logs (not differentiated by anyone).
    """

    loss: torch.Tensor
    vb: torch.Tensor
    ce: torch.Tensor
    elbo_bits: torch.Tensor


class ConfigJson:
    """to_json/from_json for frozen config dataclasses; the JSON carries a "process" tag."""

    process: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"process": self.process, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def to_json(self) -> str:
        """One JSON object, e.g. for a checkpoint's metadata."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]):
        """Inverse of :meth:`to_json`; accepts the JSON text or the decoded object."""
        obj = json.loads(text) if isinstance(text, str) else dict(text)
        tag = obj.pop("process", cls.process)
        if tag != cls.process:
            raise ConfigError(f"config is for process {tag!r}, not {cls.process!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.process} diffusion setting(s): {', '.join(unknown)}")
        return cls(**obj)


@runtime_checkable
class Process(Protocol):
    """What a training loop and the samplers need from a noise process."""

    kind: str  # "uniform" or "masked"
    vocab: int  # K, symbols the denoiser predicts
    input_vocab: int  # ids x_t may hold: K (uniform) or K + 1 (masked, mask id = K)
    config: ConfigJson
    device: torch.device

    def to(self, device: torch.device | str) -> "Process":
        """The same process with its tables on `device`."""
        ...

    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times [B]: long levels 1..T (uniform) or float64 times (masked)."""
        ...

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_t ~ q(x_t | x0): x0 [B, d] long, t [B] -> [B, d] long."""
        ...

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """x at the start of the reverse process, long of `shape`."""
        ...

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> LossTerms:
        """Per-example losses from logits or log p̂ [B, d, K] (log_softmax is applied)."""
        ...

    def corruption(self, t: torch.Tensor) -> torch.Tensor:
        """E(t) [B] float64: probability that a token has been redrawn (uniform) or masked."""
        ...

    def time_for_corruption(self, e: float) -> float | int:
        """The time whose corruption is (closest to) e."""
        ...

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The float32 [B] time in [0, 1] a network should embed (t/T uniform, t masked)."""
        ...

    def time_grid(self, steps: int | None = None) -> list:
        """Reverse-process times, descending from the start level; the end (0) is implicit."""
        ...

    def bound(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
              steps: int | None = None) -> torch.Tensor:
        """Every term of the (respaced) bound, one x_t draw each: [B] nats per sequence."""
        ...


def logits_denoiser(network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Denoiser:
    """Wrap a network returning logits [B, d, K] as a denoiser (float32 log-softmax)."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(network(x_t, t).float(), dim=-1)

    return denoiser


def network_denoiser(network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     process: "Process") -> Denoiser:
    """The usual denoiser of a trained network: log_softmax(network(x_t, process.network_time(t)))."""
    return logits_denoiser(lambda x_t, t: network(x_t, process.network_time(t)))


def uniforms(shape: Sequence[int], generator: torch.Generator,
             device: torch.device | str | None) -> torch.Tensor:
    """float64 U[0, 1) draws made on the generator's device, then moved to `device`.

    Drawing where the generator lives makes results independent of the compute device.
    """
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=generator.device)
    return u if device is None else u.to(device)


def randint(high: int, shape: Sequence[int], generator: torch.Generator,
            device: torch.device | str | None) -> torch.Tensor:
    """Uniform integers in [0, high), long, drawn on the generator's device then moved."""
    r = torch.randint(high, tuple(shape), generator=generator, device=generator.device)
    return r if device is None else r.to(device)


def log_probs_of(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (float64 kept), whatever the network's working dtype was."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def check_tokens(x: torch.Tensor, high: int, name: str) -> None:
    """Fail early on ids outside [0, high): they would silently index wrong rows."""
    if x.dtype != torch.long:
        raise ConfigError(f"{name} must be a long tensor, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
        raise ConfigError(f"{name} holds ids outside [0, {high})")
