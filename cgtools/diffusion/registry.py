"""The noise processes by name: the one list every command and checkpoint resolves names in.

A new process is one module implementing :class:`cgtools.diffusion.base.Process` plus one line in
:data:`PROCESSES` (docs/CONTRIBUTING.md shows the steps).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cgtools.diffusion.base import Process, ProcessConfig
from cgtools.diffusion.gaussian import GaussianDiffusion
from cgtools.diffusion.masked import MaskedDiffusion
from cgtools.diffusion.uniform import UniformDiffusion
from cgtools.errors import ConfigError

#: name -> Process subclass (its `Config` is the config dataclass, tagged with the same name).
PROCESSES: dict[str, type[Process]] = {
    UniformDiffusion.name: UniformDiffusion,
    MaskedDiffusion.name: MaskedDiffusion,
    GaussianDiffusion.name: GaussianDiffusion,
}


def process_names() -> tuple[str, ...]:
    return tuple(PROCESSES)


def process_class(name: str) -> type[Process]:
    """The Process subclass registered as `name`; ConfigError naming the choices otherwise."""
    if name not in PROCESSES:
        raise ConfigError(f"unknown diffusion process {name!r}; expected one of {', '.join(PROCESSES)}")
    return PROCESSES[name]


def make_config(name: str, settings: dict[str, Any] | None = None) -> ProcessConfig:
    """The config of process `name` from settings (unknown settings are a ConfigError naming them)."""
    cls = process_class(name).Config
    return cls.from_json({"process": name, **(settings or {})})


def config_from_json(text: str | dict[str, Any]) -> ProcessConfig:
    """The process config saved by ``config.to_json()``, dispatched on its "process" tag."""
    obj = json.loads(text) if isinstance(text, str) else dict(text)
    return process_class(obj.get("process")).Config.from_json(obj)


def make_process(config: ProcessConfig, vocab: int, device: torch.device | str = "cpu") -> Process:
    """The process object for a config and a vocabulary of `vocab` real symbols."""
    if not isinstance(config, ProcessConfig):
        raise ConfigError(f"not a diffusion config: {type(config).__name__}")
    return process_class(config.process)(config, vocab, device)


def process_from_json(obj: str | dict[str, Any], vocab: int, device: torch.device | str = "cpu") -> Process:
    """Rebuild a process from its saved config (e.g. a checkpoint's "process" metadata)."""
    return make_process(config_from_json(obj), vocab, device)
