"""The mask PRG: a 32-byte seed expanded to ``length`` ring words with AES-256-CTR.

``PRG(seed)`` is the AES-256-CTR keystream under key ``seed`` with the 16-byte initial counter
block all zero (a 128-bit big-endian counter starting at 0), i.e. the encryption of
``length * w`` zero bytes, read as ``length`` little-endian words of ``w`` bytes: ``w = 4`` for
rings of up to 32 bits, ``w = 8`` above. Words are reduced mod ``2**k`` only at the end of a sum
(``2**k`` divides ``2**(8w)``, so the reduction commutes with wrapping word arithmetic); a word
mod ``2**k`` is uniform because ``2**k`` divides ``2**(8w)``.

:class:`MaskStream` keeps one scratch buffer so adding a mask allocates nothing; it holds no
secrets between calls beyond the last keystream. Pure; no I/O.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from edge_agent.secagg.ring import RingSpec

_ZERO_COUNTER = bytes(16)


class MaskStream:
    """Adds or subtracts ``PRG(seed)`` to/from ring accumulators of one length."""

    def __init__(self, spec: RingSpec, length: int) -> None:
        self.spec = spec
        self.length = length
        self._zeros = bytes(length * spec.dtype.itemsize)
        self._scratch = bytearray(len(self._zeros) + 16)  # update_into wants block-size slack

    def expand(self, seed: bytes) -> np.ndarray:
        """``PRG(seed)`` as a view of the scratch buffer (valid until the next call)."""
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
        encryptor.update_into(self._zeros, self._scratch)
        return np.frombuffer(self._scratch, dtype=self.spec.dtype, count=self.length)

    def add(self, acc: np.ndarray, seed: bytes) -> None:
        acc += self.expand(seed)

    def subtract(self, acc: np.ndarray, seed: bytes) -> None:
        acc -= self.expand(seed)

    def apply(self, acc: np.ndarray, seed: bytes, sign: int) -> None:
        """``acc += sign * PRG(seed)`` for ``sign`` in ``{+1, -1}`` (wrapping)."""
        if sign > 0:
            self.add(acc, seed)
        else:
            self.subtract(acc, seed)


def expand(seed: bytes, spec: RingSpec, length: int) -> np.ndarray:
    """A fresh copy of ``PRG(seed) mod 2**k`` (for tests and one-off use)."""
    words = MaskStream(spec, length).expand(seed).copy()
    if spec.ring_bits < spec.dtype.itemsize * 8:
        words &= spec.dtype.type(spec.modulus - 1)
    return words
