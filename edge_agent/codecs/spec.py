"""Codec specifications: which codec an update uses, as a value and as text.

Text form (config files, server task offers)::

    NAME[":"FRACTION]["+zstd"]      e.g. "int8", "int4+zstd", "topk-int8:0.01", "topk:0.05+zstd"

``FRACTION`` (0 < f <= 1) is only allowed for the top-k codecs and defaults to 0.01.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_agent.errors import ConfigError

CODEC_NAMES: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-channel", "int4", "int2", "sign", "topk", "topk-int8")
"""Every codec this module speaks, in wire-id order (id = position + 1)."""

CODEC_IDS: dict[str, int] = {name: index + 1 for index, name in enumerate(CODEC_NAMES)}
"""Codec name -> the id byte written at offset 5 of an FFCU payload."""

TOPK_NAMES = frozenset({"topk", "topk-int8"})
DEFAULT_FRACTION = 0.01
_ZSTD_SUFFIX = "+zstd"


def _valid_names() -> str:
    return ", ".join(CODEC_NAMES)


@dataclass(frozen=True)
class CodecSpec:
    """One codec choice: ``name`` from :data:`CODEC_NAMES`, top-k ``fraction``, optional zstd."""

    name: str
    fraction: float = DEFAULT_FRACTION
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODEC_IDS:
            raise ConfigError(f"unknown codec {self.name!r}; valid codecs: {_valid_names()}")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(f"codec {self.name}: fraction must be a number, got {fraction!r}")
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ConfigError(f"codec {self.name}: fraction must be in (0, 1], got {fraction!r}")
        if self.name not in TOPK_NAMES and fraction != DEFAULT_FRACTION:
            raise ConfigError(f"codec {self.name}: fraction only applies to top-k codecs (topk, topk-int8)")
        object.__setattr__(self, "fraction", float(fraction))
        if not isinstance(self.zstd, bool):
            raise ConfigError(f"codec {self.name}: zstd must be a bool, got {self.zstd!r}")

    @property
    def codec_id(self) -> int:
        return CODEC_IDS[self.name]

    @property
    def is_topk(self) -> bool:
        return self.name in TOPK_NAMES

    def topk_count(self, size: int) -> int:
        """k for a tensor of ``size`` elements: ``max(1, ceil(fraction * size))``, and 0 for an empty tensor."""
        if size == 0:
            return 0
        return min(size, max(1, math.ceil(self.fraction * size)))

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse ``NAME[:FRACTION][+zstd]``; :class:`ConfigError` (listing the valid names) otherwise."""
        if not isinstance(text, str):
            raise ConfigError(f"codec spec must be a string, got {type(text).__name__}")
        body = text.strip()
        zstd = body.endswith(_ZSTD_SUFFIX)
        if zstd:
            body = body[: -len(_ZSTD_SUFFIX)]
        name, sep, fraction_text = body.partition(":")
        if name not in CODEC_IDS:
            raise ConfigError(
                f"codec spec {text!r}: unknown codec {name!r}; valid codecs: {_valid_names()}"
                " (optionally ':FRACTION' for topk/topk-int8 and '+zstd')"
            )
        if not sep:
            return cls(name, zstd=zstd)
        if name not in TOPK_NAMES:
            raise ConfigError(f"codec spec {text!r}: a ':FRACTION' only applies to topk and topk-int8")
        try:
            fraction = float(fraction_text)
        except ValueError:
            raise ConfigError(f"codec spec {text!r}: fraction {fraction_text!r} is not a number") from None
        if fraction_text.strip() != fraction_text:
            raise ConfigError(f"codec spec {text!r}: fraction {fraction_text!r} is not a number")
        return cls(name, fraction=fraction, zstd=zstd)

    def __str__(self) -> str:
        text = self.name
        if self.is_topk:
            text += f":{self.fraction!r}"
        if self.zstd:
            text += _ZSTD_SUFFIX
        return text
