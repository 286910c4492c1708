"""JSON of the network configs that checkpoints store: one encoder and one checked decoder for
every architecture's frozen config dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, Sequence

from cgtools.errors import ConfigError


def config_to_json(config: Any, schema: str) -> str:
    """The config's fields and its schema tag as compact, sorted JSON."""
    return json.dumps({"schema": schema, **asdict(config)}, sort_keys=True, separators=(",", ":"))


def config_fields_from_json(cls: type, raw: str | bytes | dict, schema: str, what: str,
                            required: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of `cls` saved by :func:`config_to_json`; ConfigError (naming `what`,
    e.g. "U-Net") for invalid JSON, another schema, unknown keys or a missing required key."""
    try:
        data = dict(raw) if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{what} config is not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} config JSON must be an object")
    found = data.pop("schema", schema)
    if found != schema:
        raise ConfigError(f"{what} config schema {found!r} is not {schema!r}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {', '.join(unknown)}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{what} config has no {', '.join(repr(m) for m in missing)}")
    return data
