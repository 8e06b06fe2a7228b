"""Update-compression codecs: model deltas as compact FFCU payloads (pure numpy).

* :func:`encode_update` / :func:`decode_update`: float32 tensors <-> one FFCU payload;
* :func:`accumulate_update`: the server's all-or-nothing streaming fold into float64 sums;
* :class:`ErrorFeedback`, :func:`save_residual`, :func:`load_residual`: EF residual memory;
* :func:`choose_codec`: the server's accepted codecs vs the device's network preferences.

The wire format is documented in :mod:`edge_agent.codecs.wire`.
"""

from edge_agent.codecs.choose import DEFAULT_PREFERENCES, MILD_CODECS, NETWORK_TYPES, buffer_codec, choose_codec
from edge_agent.codecs.decode import UpdateInfo, accumulate_update, decode_update, parse_update, payload_codec
from edge_agent.codecs.feedback import ErrorFeedback, load_residual, save_residual
from edge_agent.codecs.spec import CODEC_IDS, CODEC_NAMES, CodecSpec
from edge_agent.codecs.wire import DEFAULT_MAX_ELEMENTS, encode_update

__all__ = [
    "CODEC_IDS",
    "CODEC_NAMES",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_PREFERENCES",
    "MILD_CODECS",
    "NETWORK_TYPES",
    "CodecSpec",
    "ErrorFeedback",
    "UpdateInfo",
    "accumulate_update",
    "buffer_codec",
    "choose_codec",
    "decode_update",
    "encode_update",
    "load_residual",
    "parse_update",
    "payload_codec",
    "save_residual",
]
