"""Maximal-update parameterisation (μP) in the authors' group convention, and its optimiser groups.

Convention (reference/diffusion.md §4.2, the pcsl-epfl RHM code): every weight is stored as
N(0, 1) and the *forward* pass multiplies it by a constant that depends on the config only:

=================  =========================  ======================  =========================
class              examples                   forward multiplier      fan_in
=================  =========================  ======================  =========================
``input``          embedding, time projection 1/sqrt(fan_in)          finite (v, time_dim)
``hidden``         encoder / decoder convs    1/sqrt(fan_in)          ∝ width (s·n, n, 2n, ...)
``output``         readout (unembedding)      1/fan_in                ∝ width (n or 2n)
``vector``         biases, LayerNorm gains    1                       (1)
``output_vector``  readout bias               1                       (1)
=================  =========================  ======================  =========================

"lr" passed to :func:`param_groups` is in μP units: the optimal value does not depend on the
width n, and ``lr = 1`` with SGD is the paper's "SGD with a learning rate of 1" read in the group
convention (raw step size ``lr·n`` on every width-sized tensor, their ``lr *= width``).
Raw learning rates handed to torch (``scheme="mup"``):

* SGD (momentum does not change the scaling):  ``lr·n`` for input, hidden, output and vector
  parameters; ``lr`` for ``output_vector`` (its fan-in and fan-out are both finite, so μP keeps
  its step width-independent; ``lr·n`` would move the logits by O(n)).
  Effective steps: hidden ΔW_eff = lr·n/fan_in · ∇ (width-independent), input ΔW_eff ∝ n,
  output ΔW_eff = lr/n · ∇ with effective init variance 1/n²: the μP table for SGD.
* Adam: ``lr / (fan_in · multiplier)`` for weights, i.e. the *effective* weight moves by about
  ``lr / fan_in`` per entry and step (input: lr/sqrt(v); hidden: lr/sqrt(fan_in); readout: lr),
  and ``lr`` for vectors. This is the μP table for Adam (hidden and readout steps ∝ 1/n, input and
  biases constant). Adam's eps is not rescaled; keep it well below the gradient scale
  (gradients of hidden weights shrink like n^-3/2).

``scheme="global"`` gives every parameter the raw rate ``lr`` (the authors' public code).
``scheme="standard"`` is the standard parameterisation (SP): the same network stored the PyTorch
way (weights N(0, 1/fan_in), multiplier 1) trained with one rate ``lr`` — raw rate
``lr / multiplier²`` (SGD) or ``lr / multiplier`` (Adam). Combined with ``readout="standard"`` it is
the negative control of the coordinate check: its activations grow with width.
Everything here is a function of the parameter's :class:`ParamInfo`, which the model computes from
its config: nothing has to be stored besides the weights and the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from torch import nn

from cgtools.errors import ConfigError

ParamKind = Literal["input", "hidden", "output", "vector", "output_vector"]
Optimizer = Literal["sgd", "adam"]
Scheme = Literal["mup", "global", "standard"]

KINDS: tuple[str, ...] = ("input", "hidden", "output", "vector", "output_vector")


@dataclass(frozen=True)
class ParamInfo:
    """μP class of one parameter tensor.

    fan_in: number of inputs summed into one output unit (1 for vectors); multiplier: the constant
    the forward pass applies to the N(0, 1)-initialised tensor.
    """

    kind: ParamKind
    fan_in: int
    multiplier: float


class HasParamInfo(Protocol):
    def param_info(self) -> dict[str, ParamInfo]: ...

    def named_parameters(self): ...

    @property
    def width(self) -> int: ...


def raw_learning_rate(info: ParamInfo, lr: float, width: int, optimizer: Optimizer = "sgd",
                      scheme: Scheme = "mup") -> float:
    """Torch learning rate of one parameter for μP-unit `lr` at width `width` (see module doc)."""
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"unknown optimizer {optimizer!r} (use 'sgd' or 'adam')")
    if scheme == "global":
        return lr
    if scheme == "standard":
        # Effective step of W_eff = multiplier·W is multiplier²·raw·∇ (SGD), multiplier·raw (Adam).
        return lr / info.multiplier**2 if optimizer == "sgd" else lr / info.multiplier
    if scheme != "mup":
        raise ConfigError(f"unknown parameterisation scheme {scheme!r} "
                          "(use 'mup', 'global' or 'standard')")
    if optimizer == "sgd":
        return lr if info.kind == "output_vector" else lr * width
    if info.kind in ("vector", "output_vector"):  # Adam
        return lr
    return lr / (info.fan_in * info.multiplier)


def raw_learning_rates(model: HasParamInfo, lr: float, optimizer: Optimizer = "sgd",
                       scheme: Scheme = "mup") -> dict[str, float]:
    """{parameter name: torch learning rate}; see :func:`raw_learning_rate`."""
    infos = model.param_info()
    return {name: raw_learning_rate(infos[name], lr, model.width, optimizer, scheme)
            for name, _ in model.named_parameters()}


def param_groups(model: HasParamInfo, lr: float, optimizer: Optimizer = "sgd",
                 scheme: Scheme = "mup") -> list[dict]:
    """torch optimiser parameter groups with per-layer learning rates.

    One group per (μP class, raw lr); each dict holds ``params``, ``lr`` (raw), ``kind`` and
    ``names`` (extra keys are kept by torch optimisers and are only informative). Pass the list to
    ``torch.optim.SGD(groups, lr=..., momentum=0.9)`` or ``torch.optim.Adam(groups, ...)``.
    Every trainable parameter appears exactly once.
    """
    if not lr > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    if not hasattr(model, "param_info"):
        # A network without μP classes can still train with one raw rate for every parameter.
        if scheme != "global":
            raise ConfigError(f"{type(model).__name__} has no μP parameter classes; train it with "
                              f"--lr-scheme global")
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "kind": "global", "names": names}]
    infos = model.param_info()
    groups: dict[tuple[str, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in infos:
            raise ValueError(f"parameter {name!r} has no μP class in model.param_info()")
        info = infos[name]
        raw = raw_learning_rate(info, lr, model.width, optimizer, scheme)
        group = groups.setdefault((info.kind, raw),
                                  {"params": [], "lr": raw, "kind": info.kind, "names": []})
        group["params"].append(p)
        group["names"].append(name)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(groups.values(), key=lambda g: (order[g["kind"]], g["lr"]))


def check_param_info(model: nn.Module, infos: dict[str, ParamInfo]) -> None:
    """Raise ValueError unless `infos` covers exactly the model's parameters with valid classes."""
    names = {name for name, _ in model.named_parameters()}
    if names != set(infos):
        raise ValueError(f"param_info mismatch: missing {sorted(names - set(infos))}, "
                         f"extra {sorted(set(infos) - names)}")
    for name, info in infos.items():
        if info.kind not in KINDS or info.fan_in < 1 or not info.multiplier > 0:
            raise ValueError(f"invalid μP class for {name!r}: {info}")
