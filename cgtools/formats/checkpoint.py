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

Integrity: `"integrity": {"algorithm": "crc32", "tensors": {name: checksum}}` holds a CRC-32 of
every tensor's bytes, written with the file and verified on every load, so a flipped byte inside a
weight tensor is an error naming the file and the tensor instead of a silently wrong model (files
written before integrity checks carry no such entry and load unchecked).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

from cgtools.errors import InputError, SchemaError
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
                    process_state: dict[str, torch.Tensor] | None = None, force: bool = True) -> None:
    """Write a checkpoint atomically. `meta` must be JSON-serialisable and name its "arch".
    process_state: the noise process's training-time tensors (Process.state_dict), if any."""
    from safetensors.torch import save

    if "arch" not in meta:
        raise ValueError("checkpoint metadata must name its architecture ('arch')")
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.items()})
    if process_state:
        tensors.update({f"process.{k}": v.detach().contiguous().cpu() for k, v in process_state.items()})
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    meta["integrity"] = {"algorithm": "crc32", "tensors": {k: tensor_checksum(v) for k, v in tensors.items()}}
    blob = save(tensors, metadata={metadata.METADATA_KEY: json.dumps({"schema": CHECKPOINT_SCHEMA, **meta})})
    with atomic_output(str(path), force) as f:
        f.write(blob)


class Checkpoint:
    """A loaded checkpoint: `meta` (dict), `model` / `ema` state dicts, `process_state` (the noise
    process's training-time tensors; {} for most), `optimizer_state()`."""

    def __init__(self, source: InputFile) -> None:
        from safetensors.torch import load, load_file

        if file_kind(source) != "safetensors":
            raise SchemaError(f"{source.display()}: not a safetensors checkpoint")
        meta = metadata.decode(read_safetensors_metadata(source).get(metadata.METADATA_KEY), source.display())
        if meta.get("schema") not in READABLE_SCHEMAS:
            raise SchemaError(f"{source.display()}: expected a {CHECKPOINT_SCHEMA} file, got {meta.get('schema')!r}")
        meta.setdefault("arch", "unet")  # checkpoint/1 predates named architectures
        self.source, self.meta = source, meta
        try:
            tensors = load(source.data) if source.data is not None else load_file(source.name)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{source.display()}: damaged checkpoint, cannot read its tensors ({first})") from None
        verify_checksums(tensors, meta.get("integrity"), source.display())
        self.model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        self.process_state = {k[8:]: v for k, v in tensors.items() if k.startswith("process.")}
        self._tensors = tensors

    def optimizer_state(self) -> dict | None:
        """The optimizer state_dict saved with the checkpoint, or None."""
        if "optimizer" not in self.meta:
            return None
        return _optimizer_state(self._tensors, self.meta["optimizer"])


def tensor_checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in memory order (any dtype; CPU)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().data) if flat.numel() else 0


def verify_checksums(tensors: dict[str, torch.Tensor], integrity: dict | None, where: str) -> None:
    """InputError naming the first tensor whose bytes do not match the recorded checksum."""
    if not integrity:
        return
    recorded = integrity.get("tensors", {})
    if set(recorded) != set(tensors):
        raise InputError(f"{where}: damaged checkpoint: the tensors are not the ones it was written with")
    for name in sorted(tensors):
        if tensor_checksum(tensors[name]) != recorded[name]:
            raise InputError(f"{where}: damaged checkpoint: the data of tensor {name!r} does not match its "
                             f"checksum (the file was modified or corrupted after it was written)")
