"""Checkpoints as safetensors: weights, optional optimizer state, and JSON metadata. No pickle.

Layout of the tensors:
* `model.<name>`: the model's state_dict;
* `ema.<name>`: the weight average, when one is kept;
* `optim.<param index>.<key>`: tensors of the optimizer state (momentum buffers, Adam moments).
The metadata key `cgtools` holds a JSON object with `"schema": "checkpoint/2"`, the architecture
name `"arch"` (a key of cgtools.models.registry), the model, process and training configs, the
grammar (null for data without one), provenance, the step, and (for resumable checkpoints) the
optimizer's scalar state and param-group settings, so nothing but this file is needed to rebuild
the model or continue training. Version 1 files (before architectures had names) are read as
`"arch": "unet"`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cgtools.errors import SchemaError
from cgtools.formats import metadata
from cgtools.formats.files import InputFile, atomic_output, file_kind, read_safetensors_metadata

CHECKPOINT_SCHEMA = "checkpoint/2"
READABLE_SCHEMAS = ("checkpoint/1", CHECKPOINT_SCHEMA)


def _optimizer_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: str | Path, model: dict[str, torch.Tensor], meta: dict, *,
                    optimizer: dict | None = None, ema: dict[str, torch.Tensor] | None = None,
                    force: bool = True) -> None:
    """Write a checkpoint atomically. `meta` must be JSON-serialisable and name its "arch"."""
    from safetensors.torch import save

    if "arch" not in meta:
        raise ValueError("checkpoint metadata must name its architecture ('arch')")
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.items()})
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    blob = save(tensors, metadata={metadata.METADATA_KEY: json.dumps({"schema": CHECKPOINT_SCHEMA, **meta})})
    with atomic_output(str(path), force) as f:
        f.write(blob)


class Checkpoint:
    """A loaded checkpoint: `meta` (dict), `model` / `ema` state dicts, `optimizer_state()`."""

    def __init__(self, source: InputFile) -> None:
        from safetensors.torch import load, load_file

        if file_kind(source) != "safetensors":
            raise SchemaError(f"{source.display()}: not a safetensors checkpoint")
        meta = metadata.decode(read_safetensors_metadata(source).get(metadata.METADATA_KEY), source.display())
        if meta.get("schema") not in READABLE_SCHEMAS:
            raise SchemaError(f"{source.display()}: expected a {CHECKPOINT_SCHEMA} file, got {meta.get('schema')!r}")
        meta.setdefault("arch", "unet")  # checkpoint/1 predates named architectures
        self.source, self.meta = source, meta
        tensors = load(source.data) if source.data is not None else load_file(source.name)
        self.model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        self._tensors = tensors

    def optimizer_state(self) -> dict | None:
        """The optimizer state_dict saved with the checkpoint, or None."""
        if "optimizer" not in self.meta:
            return None
        return _optimizer_state(self._tensors, self.meta["optimizer"])
