"""The Process interface every noise process implements, and the pieces they share.

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
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch

from cgtools.errors import ConfigError, InputError

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


class ProcessConfig:
    """to_json/from_json for frozen process-config dataclasses; the JSON carries a "process" tag
    (the registry name of the process the config belongs to)."""

    process: str = ""

    @property
    def adapts_to_losses(self) -> bool:
        """Whether the process's `sample_t` learns from each step's losses (Process.observe_losses):
        such a run needs every loss of every step in one process (no DDP, no stacked sweep)."""
        return False

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


ConfigJson = ProcessConfig  # the name used before the Process interface (kept for readers)


class Process(ABC):
    """A noise process: everything training, sampling, forward-backward and exact inference need.

    Subclasses implement every abstract method, set `name` (their registry key, also the
    "process" tag of their config) and `Config` (their config dataclass), and are listed in
    cgtools.diffusion.registry. Nothing here assumes categorical data: `x` is whatever tensor the
    process corrupts (token ids [B, d] for the categorical processes, floats for a Gaussian one).

    Time: `t` is the process's own time ([B] tensor: long levels for a discrete-time process,
    float64 for a continuous one); networks see `network_time(t)` (float32 in [0, 1]).
    Corruption E(t) in [0, 1] is the fraction of the signal destroyed at t (the probability a
    token was redrawn or masked); `corrupt(x0, E)` draws x_t at exactly E, and the reverse
    process started at `time_for_corruption(E)` denoises it.
    """

    name: ClassVar[str]
    Config: ClassVar[type[ProcessConfig]]
    #: The last reverse step's rule when the caller does not choose ("argmax" or "sample").
    default_final_step: ClassVar[str] = "sample"

    config: ProcessConfig
    device: torch.device

    # ---- construction ------------------------------------------------------------------------
    @abstractmethod
    def to(self, device: torch.device | str) -> "Process":
        """The same process with its tables on `device`."""

    def describe(self) -> dict[str, Any]:
        """The config as a JSON object (with its "process" tag), for metadata."""
        return self.config.to_dict()

    # ---- time ----------------------------------------------------------------------------------
    @abstractmethod
    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times [B]."""

    @abstractmethod
    def corruption(self, t: torch.Tensor) -> torch.Tensor:
        """E(t) [B] float64."""

    @abstractmethod
    def time_for_corruption(self, e: float) -> float | int:
        """The time whose corruption is (closest to) e; 0 means no corruption at all."""

    @abstractmethod
    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The float32 [B] time in [0, 1] a network embeds."""

    @abstractmethod
    def corruption_at_network_time(self, tau: torch.Tensor) -> torch.Tensor:
        """E at the network time τ = network_time(t) [B] (inverse of network_time, then E)."""

    @abstractmethod
    def time_grid(self, steps: int | None = None) -> list:
        """Reverse-process times, descending from the start; the end (0) is implicit."""

    @abstractmethod
    def full_time(self, value, batch: int, device: torch.device | str) -> torch.Tensor:
        """A time tensor [B] holding `value` (a grid point) in this process's time dtype."""

    # ---- forward process -----------------------------------------------------------------------
    @abstractmethod
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_t ~ q(x_t | x0) at times t [B]."""

    @abstractmethod
    def corrupt(self, x0: torch.Tensor, noise: float | torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """x_t at corruption exactly E = `noise` (a float or one value per row [B])."""

    @abstractmethod
    def prior_sample(self, shape: Sequence[int], generator: torch.Generator,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """x at the start of the reverse process."""

    # ---- learning ------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> LossTerms:
        """Per-example losses from the network's prediction."""

    @abstractmethod
    def bound(self, denoiser: Denoiser, x0: torch.Tensor, generator: torch.Generator,
              steps: int | None = None) -> torch.Tensor:
        """Every term of the (respaced) bound, one x_t draw each: [B] nats per example."""

    def denoiser_output(self, prediction: torch.Tensor) -> torch.Tensor:
        """What the samplers take from a network's raw prediction (the denoiser's value): the
        prediction itself in float32 here; token processes return log p̂(x0 | x_t)."""
        return prediction.float()

    # ---- training-time state (importance sampling of t) ---------------------------------------
    def observe_losses(self, t: torch.Tensor, terms: LossTerms) -> None:
        """Called by the training loop after each step with the batch's times [B] and loss terms
        (a process whose `sample_t` adapts to the losses, e.g. importance sampling, records them)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of training-time state that checkpoints keep (exact resume); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""

    # ---- reverse process -----------------------------------------------------------------------
    def check_final_step(self, final_step: str | None) -> str:
        """`final_step`, or this process's default; ConfigError for an unknown rule."""
        if final_step is None:
            return self.default_final_step
        if final_step not in ("argmax", "sample"):
            raise ConfigError(f"final_step must be 'argmax' or 'sample', got {final_step!r}")
        return final_step

    @abstractmethod
    def reverse(self, denoiser: Denoiser, x: torch.Tensor, grid: list, generator: torch.Generator,
                *, final_step: str, cache: bool | None = None, bar=None) -> torch.Tensor:
        """Run the reverse process on one batch from grid[0] through the rest of `grid` to 0.

        cache: skip the denoiser for rows that did not change (only where that is exact; a
        process that cannot do it raises ConfigError when cache is True). bar: a progress bar
        advanced once per step.
        """

    # ---- exact inference (processes whose posterior BP can compute) -----------------------------
    def leaf_evidence(self, x_t: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype = torch.float32,
                      *, symbols_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf likelihoods λ [B, d, v] = p(x_t_i | x0_i = a) of an observation at corruption E
        [B] ([v, d, B] with symbols_first, the layout BP works in), and the constant log term [B]
        float64 they leave out of log P(x_t)."""
        raise ConfigError(f"exact inference (belief propagation) is not available for {self.name} noise")

    def mean_leaf_belief(self, noise: float) -> float:
        """Average BP belief in the clean token at corruption E (mean-field theory)."""
        raise ConfigError(f"the mean-field theory is not available for {self.name} noise")


class DiscreteLevels:
    """The time of a process with levels t = 0..T (T an attribute; 0 = clean data): training times
    are long levels, a network sees t/T, and a grid point is a level. Mixed in before the
    Process base (uniform D3PM, Gaussian DDPM)."""

    T: int

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """t/T as float32 [B] in (0, 1]; round(τ·T) recovers t exactly for any T < 2^23."""
        return t.to(torch.float32) / self.T

    def corruption_at_network_time(self, tau: torch.Tensor) -> torch.Tensor:
        """E at t = round(τ·T), float64 [B]."""
        t = torch.round(torch.as_tensor(tau, dtype=torch.float64) * self.T).long()
        return self.corruption(t.clamp(0, self.T))  # type: ignore[attr-defined]

    def full_time(self, value, batch: int, device: torch.device | str) -> torch.Tensor:
        """Level `value` for every row: long [B]."""
        return torch.full((batch,), int(value), dtype=torch.long, device=device)


class CategoricalProcess(Process):
    """A process on token ids: the denoiser predicts `vocab` symbols; x_t may hold `input_vocab`
    ids (a mask id for absorbing noise)."""

    vocab: int  # K, symbols the denoiser predicts
    input_vocab: int  # ids x_t may hold
    mask_id: int | None = None

    def denoiser_output(self, prediction: torch.Tensor) -> torch.Tensor:
        """Logits [B, d, K] -> log p̂(x0 | x_t) in float32 (float64 kept)."""
        return log_probs_of(prediction)

    def check_observation(self, x_t: torch.Tensor) -> None:
        """InputError for observations that are not [B, d] ids in [0, input_vocab)."""
        if x_t.ndim != 2:
            raise InputError(f"observations must be [B, d] token ids, got shape {tuple(x_t.shape)}")
        if x_t.numel() and (int(x_t.min()) < 0 or int(x_t.max()) >= self.input_vocab):
            what = (f"[0, {self.vocab}] (mask id {self.mask_id})" if self.mask_id is not None
                    else f"[0, {self.vocab})")
            raise InputError(f"token ids must lie in {what}")

    def check_clean(self, x0: torch.Tensor) -> None:
        """ConfigError for clean data that is not long ids in [0, vocab)."""
        check_tokens(x0, self.vocab, "x0")


def noise_vector(noise: float | Sequence[float] | torch.Tensor, batch: int) -> torch.Tensor:
    """Corruption levels E as a float64 CPU tensor [B], checked to lie in [0, 1]."""
    e = torch.as_tensor(noise, dtype=torch.float64).cpu()
    if e.ndim == 0:
        e = e.expand(batch)
    if e.shape != (batch,):
        raise ConfigError(f"noise must be a scalar or have one value per sentence ({batch}), got shape "
                          f"{tuple(e.shape)}")
    if not torch.isfinite(e).all() or (e < 0).any() or (e > 1).any():
        raise ConfigError("noise levels must lie in [0, 1]")
    return e


def logits_denoiser(network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Denoiser:
    """Wrap a network returning logits [B, d, K] as a denoiser (float32 log-softmax)."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(network(x_t, t).float(), dim=-1)

    return denoiser


def network_denoiser(network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     process: Process) -> Denoiser:
    """The usual denoiser of a trained network: process.denoiser_output(network(x_t, τ)) with
    τ = process.network_time(t) (log_softmax of the logits for token processes)."""
    return lambda x_t, t: process.denoiser_output(network(x_t, shared_time(process.network_time(t))))


def shared_time(tau: torch.Tensor) -> torch.Tensor:
    """τ [B] -> τ[:1] when every row has the same time (each sampler step): a network given one
    time embeds it once for the whole batch (the U-Net folds it into its GEMMs)."""
    return tau[:1] if tau.numel() > 1 and bool((tau == tau[0]).all()) else tau


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


def inverse_cdf_weights(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Category of each row at uniform u: weights [..., K] float64 >= 0 (unnormalised), u [...] -> long.

    Category j owns [c_{j-1}, c_j) of the cumulative sums c scaled by u·c_K, so zero-weight
    symbols are never drawn. Everything in float64: low-probability symbols keep their float64
    frequency (float32 Gumbel tricks truncate them: Zheng et al. 2024).
    """
    cdf = torch.cumsum(weights, dim=-1)  # [..., K]
    target = (u * cdf[..., -1]).unsqueeze(-1)  # [..., 1]
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)  # only reachable by rounding at u ≈ 1


def inverse_cdf(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """As inverse_cdf_weights for log-probabilities (any scale; renormalised in float64)."""
    return inverse_cdf_weights(torch.softmax(log_probs.to(torch.float64), dim=-1), u)


def draw_categorical(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One float64 categorical draw per row of log_probs [..., K] -> long [...]."""
    u = uniforms(log_probs.shape[:-1], generator, log_probs.device)
    return inverse_cdf(log_probs, u)
