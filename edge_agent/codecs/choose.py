"""Picking the codec for an upload: the server's accepted list meets the device's network preferences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edge_agent.codecs.spec import CodecSpec
from edge_agent.errors import ConfigError, ContractViolation

NETWORK_TYPES: tuple[str, ...] = ("ethernet", "wifi", "cellular", "unknown")

DEFAULT_PREFERENCES: dict[str, tuple[str, ...]] = {
    "ethernet": ("fp16", "fp32"),
    "wifi": ("int8", "fp16", "fp32"),
    "cellular": ("topk-int8:0.01+zstd", "int4+zstd", "int8+zstd", "fp16"),
    "unknown": ("int8", "fp16", "fp32"),
}
"""Device-side preference per network type, strongest compression on cellular. Do not mutate."""


def _device_specs(preferences: Mapping[str, Sequence[str]], network: str) -> list[CodecSpec]:
    if network not in preferences and network not in DEFAULT_PREFERENCES:
        network = "unknown"
    texts = preferences.get(network, DEFAULT_PREFERENCES[network])
    if isinstance(texts, str):
        raise ConfigError(f"codec preferences for {network!r} must be a list of codec specs, got a string")
    specs = []
    for text in texts:
        try:
            specs.append(CodecSpec.parse(text))
        except ConfigError as exc:
            raise ConfigError(f"codec preferences for {network!r}: {exc.reason}") from None
    return specs


def choose_codec(accepted: Sequence[str], preferences: Mapping[str, Sequence[str]], network: str) -> CodecSpec:
    """The codec to upload with.

    1. ``accepted`` empty (the server states no preference): fp32.
    2. The first of the device's preferences for ``network`` whose codec *name* the server
       accepts, with the device's own fraction / zstd setting.
    3. Else the first accepted spec this device can parse, as the server wrote it.

    An unknown ``network`` uses the ``"unknown"`` preferences; a network missing from
    ``preferences`` uses :data:`DEFAULT_PREFERENCES`. Raises :class:`ConfigError` for an
    invalid device preference and :class:`ContractViolation` when the server accepts only
    codecs this device does not know.
    """
    if not accepted:
        return CodecSpec("fp32")
    offered: list[CodecSpec] = []
    for text in accepted:
        try:
            offered.append(CodecSpec.parse(text))
        except ConfigError:
            continue  # a codec newer than this device: not usable, not an error
    names = {spec.name for spec in offered}
    for spec in _device_specs(preferences, network):
        if spec.name in names:
            return spec
    if offered:
        return offered[0]
    raise ContractViolation(f"server accepts only codecs this device does not support: {list(accepted)}")


#: codecs a record may use inside an update of any codec: the mild ones (see :func:`buffer_codec`)
MILD_CODECS = frozenset({"fp32", "fp16", "int8"})


def buffer_codec(spec: CodecSpec) -> CodecSpec:
    """The codec for non-trainable statistics (BatchNorm running mean/var) in an update of ``spec``.

    Sparsifying or 1-2-bit quantizing a running statistic's delta biases it (and error feedback
    replays stale pulls, see :class:`~edge_agent.codecs.feedback.ErrorFeedback`); these tensors
    are tiny, so they go at most as lossy as int8, without feedback.
    """
    if spec.name in MILD_CODECS:
        return spec
    return CodecSpec("int8", zstd=spec.zstd)
