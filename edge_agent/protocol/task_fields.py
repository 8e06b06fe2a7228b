"""Optional TASK header fields (absent in older servers' tasks): parsing with limits."""

from __future__ import annotations

import math

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.header import TOKEN_PATTERN, Header

#: the smallest chunk a device may be asked to use (a CHUNK header alone is ~250 bytes)
MIN_CHUNK_BYTES = 1024
MAX_CODECS = 32


def task_codecs(h: Header) -> tuple[str, ...]:
    if "codecs" not in h.raw:
        return ()
    names = h.raw["codecs"]
    if not isinstance(names, list) or not 0 < len(names) <= MAX_CODECS:
        raise MalformedMessage(f"TASK field 'codecs' must be a list of 1..{MAX_CODECS} codec names")
    if not all(isinstance(n, str) and TOKEN_PATTERN.match(n) for n in names):
        raise MalformedMessage("TASK field 'codecs' holds an invalid codec name")
    return tuple(names)


#: Caps on the optional TASK fields (the header itself is capped at 64 KiB).
MAX_HYPERPARAMETER_VALUES = 4096


def task_hyperparameters(h: Header) -> dict[str, float | tuple[float, ...]]:
    if "hyperparameters" not in h.raw:
        return {}
    out: dict[str, float | tuple[float, ...]] = {}
    for key, value in h.dict_field("hyperparameters").items():
        if not key:
            raise MalformedMessage("TASK hyperparameters has an empty name")
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > MAX_HYPERPARAMETER_VALUES or not all(_finite_number(v) for v in items):
            raise MalformedMessage(f"TASK hyperparameter {key!r} must be a finite number or a list of them")
        out[key] = tuple(float(v) for v in items) if isinstance(value, list) else float(value)
    return out


def task_frozen(h: Header) -> tuple[str, ...]:
    if "frozen" not in h.raw:
        return ()
    names = h.raw["frozen"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MalformedMessage("TASK field 'frozen' must be a list of tensor names")
    if len(set(names)) != len(names):
        raise MalformedMessage("TASK field 'frozen' names a tensor twice")
    return tuple(names)


def _finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
