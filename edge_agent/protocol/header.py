"""Typed, validating access to an envelope's JSON header fields (errors name the field)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from edge_agent.errors import MalformedMessage
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

#: transfer ids and codec names: short, printable, safe in logs and file names
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")


def parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a JSON object")
    return header


class Header:
    """Typed access to header fields with errors that name the field."""

    def __init__(self, raw: dict[str, Any], type_name: str) -> None:
        self.raw = raw
        self.type_name = type_name

    def _get(self, key: str, types: type | tuple[type, ...]) -> Any:
        if key not in self.raw:
            raise MalformedMessage(f"{self.type_name} header lacks field {key!r}")
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise MalformedMessage(f"{self.type_name} field {key!r} has wrong type bool")
        if not isinstance(value, types):
            raise MalformedMessage(f"{self.type_name} field {key!r} has wrong type {type(value).__name__}")
        return value

    def str_field(self, key: str) -> str:
        return str(self._get(key, str))

    def int_field(self, key: str, *, minimum: int | None = None) -> int:
        value = int(self._get(key, int))
        if minimum is not None and value < minimum:
            raise MalformedMessage(f"{self.type_name} field {key!r} = {value} < {minimum}")
        return value

    def float_field(self, key: str) -> float:
        value = float(self._get(key, (int, float)))
        if not math.isfinite(value):
            raise MalformedMessage(f"{self.type_name} field {key!r} is not finite")
        return value

    def bool_field(self, key: str) -> bool:
        return bool(self._get(key, bool))

    def dict_field(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, dict))

    def token_field(self, key: str) -> str:
        """A short identifier (transfer id, codec name): 1..64 of ``[A-Za-z0-9_.:+-]``."""
        value = self.str_field(key)
        if not TOKEN_PATTERN.match(value):
            raise MalformedMessage(f"{self.type_name} field {key!r} is not a valid identifier: {value[:70]!r}")
        return value

    def device_id(self) -> str:
        device_id = self.str_field("device_id")
        if not DEVICE_ID_PATTERN.match(device_id):
            raise MalformedMessage(f"invalid device_id {device_id!r}")
        return device_id
