"""The secure-aggregation messages as frozen dataclasses (their bytes: :mod:`edge_agent.secagg.wire`).

Flow of one session (S = server, C = each device; ``U1 ⊇ U2 ⊇ U3`` are the devices still in):

====  ==============  =====================================================================
dir   message         meaning
====  ==============  =====================================================================
S→C   Setup           the session parameters and this device's index
C→S   AdvertiseKeys   the device's two X25519 public keys (share encryption, masking)
S→C   KeyList         the keys of every device that advertised (``U1``, at least ``t``)
C→S   EncryptedShares one AES-GCM blob per other member of ``U1``: Shamir shares of the
                      sender's mask private key and self-mask seed
S→C   ShareBundle     the blobs addressed to this device from every member of ``U2``
C→S   MaskedInput     ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2**k``
S→C   UnmaskRequest   survivors ``U3`` (sent ``y``) and dropped ``U2 \\ U3``
C→S   UnmaskResponse  seed shares of every survivor, key shares of every dropped device
S→C   Abort           the session is over without a result (optional courtesy)
====  ==============  =====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from edge_agent.secagg.params import SecAggParams


class ShareKind(IntEnum):
    """Which secret of its owner an unmasking share belongs to."""

    SELF_MASK_SEED = 1  # b_u: revealed only for survivors
    MASK_KEY = 2  # s_u^SK: revealed only for dropped devices


@dataclass(frozen=True)
class Setup:
    params: SecAggParams
    index: int


@dataclass(frozen=True)
class DeviceKeys:
    index: int
    enc_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class AdvertiseKeys:
    session: bytes
    keys: DeviceKeys


@dataclass(frozen=True)
class KeyList:
    session: bytes
    devices: tuple[DeviceKeys, ...]


@dataclass(frozen=True)
class EncryptedShares:
    """``blobs[recipient]``: the sender's shares for ``recipient``, sealed (see :mod:`.crypto`)."""

    session: bytes
    sender: int
    blobs: Mapping[int, bytes]


@dataclass(frozen=True)
class ShareBundle:
    """``blobs[sender]``: what each member of ``U2`` sealed for ``recipient``."""

    session: bytes
    recipient: int
    blobs: Mapping[int, bytes]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """``values``: ``length`` ring words (dtype per :func:`edge_agent.secagg.ring.word_dtype`)."""

    session: bytes
    sender: int
    ring_bits: int
    values: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    session: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """``shares[owner] = (kind, 64-byte Shamir share held by sender)``."""

    session: bytes
    sender: int
    shares: Mapping[int, tuple[ShareKind, bytes]]


@dataclass(frozen=True)
class Abort:
    session: bytes
    reason: str


Message = (
    Setup
    | AdvertiseKeys
    | KeyList
    | EncryptedShares
    | ShareBundle
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
    | Abort
)
