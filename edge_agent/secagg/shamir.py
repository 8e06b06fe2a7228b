"""Shamir t-out-of-n secret sharing of 32-byte secrets over the prime field ``GF(2**31 - 1)``.

**Encoding.** A 32-byte secret is read as 16 little-endian ``u16`` words ``w_0..w_15``. Each word
gets its own independent random polynomial ``f_j(x) = w_j + a_{j,1} x + ... + a_{j,t-1} x**(t-1)``
over ``GF(p)``, ``p = 2**31 - 1``, with the ``a`` uniform in ``[0, p)``. The share of device ``i``
(``1 <= i <= 65535``, its cohort index) is the 16 values ``f_j(i)``, sent as 16 little-endian
``u32`` (64 bytes, :data:`SHARE_BYTES`). Every word is hidden perfectly by any ``t - 1`` shares,
so the secret is too. The small field keeps all arithmetic in 64-bit integers (a product of two
values is below ``2**62``), which is what makes splitting for hundreds of devices cheap in numpy
and trivial in C or Kotlin.

**Reconstruction** is Lagrange interpolation at 0: ``w_j = sum_i lambda_i f_j(i)`` with
``lambda_i = prod_{m != i} x_m / (x_m - x_i) mod p``. Given fewer than ``t`` shares the
interpolated words are uniformly random in ``[0, p)``; they are all below ``2**16`` (a
well-formed secret) with probability about ``2**-240``, so :func:`reconstruct` raises
:class:`~edge_agent.errors.InvalidShares` instead of returning a wrong key in practice.

Randomness comes from a :class:`~edge_agent.secagg.crypto.RandomSource`. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import InvalidShares
from edge_agent.secagg.crypto import RandomSource, SystemRandomSource

PRIME = (1 << 31) - 1
SECRET_BYTES = 32
WORDS = SECRET_BYTES // 2
SHARE_BYTES = WORDS * 4
MAX_INDEX = 0xFFFF


@dataclass(frozen=True)
class Share:
    """Device ``index``'s share of one secret: ``WORDS`` field values as :data:`SHARE_BYTES` bytes."""

    index: int
    data: bytes


def secret_words(secret: bytes) -> np.ndarray:
    if len(secret) != SECRET_BYTES:
        raise InvalidShares(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    return np.frombuffer(secret, dtype="<u2").astype(np.int64)


def share_values(data: bytes) -> np.ndarray:
    """The field values of a share's bytes, validated (:class:`InvalidShares` if not ``WORDS`` values < p)."""
    if len(data) != SHARE_BYTES:
        raise InvalidShares(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    values = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if int(values.max()) >= PRIME:
        raise InvalidShares(f"share value {int(values.max())} is not below the field prime 2**31 - 1")
    return values


def share_bytes(values: np.ndarray) -> bytes:
    return values.astype("<u4").tobytes()


def random_field(rng: RandomSource, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform values in ``[0, p)`` (31 random bits each; the single value ``p`` is redrawn)."""
    count = int(np.prod(shape))
    values = np.frombuffer(rng.token_bytes(4 * count), dtype="<u4").astype(np.int64) & PRIME
    bad = np.flatnonzero(values == PRIME)
    while bad.size:
        fresh = np.frombuffer(rng.token_bytes(4 * bad.size), dtype="<u4").astype(np.int64) & PRIME
        values[bad] = fresh
        bad = bad[fresh == PRIME]
    return values.reshape(shape)


def check_indices(indices: Sequence[int]) -> np.ndarray:
    xs = np.asarray(indices, dtype=np.int64)
    if xs.ndim != 1 or xs.size == 0:
        raise InvalidShares("at least one share index is needed")
    if int(xs.min()) < 1 or int(xs.max()) > MAX_INDEX:
        raise InvalidShares(f"share indices must be in 1..{MAX_INDEX}, got {sorted(set(xs.tolist()))[:5]}...")
    if np.unique(xs).size != xs.size:
        raise InvalidShares("duplicate share index")
    return xs


def split_many(secrets: Sequence[bytes], indices: Sequence[int], threshold: int, rng: RandomSource) -> np.ndarray:
    """Shares of every secret for every index: int64 array ``(len(indices), len(secrets), WORDS)``.

    Horner's rule over all (index, secret, word) lanes at once: ``t - 1`` vector steps.
    """
    xs = check_indices(indices)
    if not 1 <= threshold <= xs.size:
        raise InvalidShares(f"threshold must be in 1..{xs.size} (the number of shares), got {threshold}")
    constant = np.stack([secret_words(s) for s in secrets])
    coefficients = random_field(rng, (threshold - 1, len(secrets), WORDS))
    x = xs[:, None, None]
    acc = np.zeros((xs.size, len(secrets), WORDS), dtype=np.int64)
    for degree in range(threshold - 2, -1, -1):
        acc += coefficients[degree]
        acc *= x
        acc %= PRIME
    acc += constant
    acc %= PRIME
    return acc


def split(secret: bytes, n: int, t: int, rng: RandomSource | None = None) -> list[Share]:
    """``n`` shares (indices ``1..n``) of which any ``t`` reconstruct ``secret`` (``rng``: the OS CSPRNG)."""
    if not 1 <= n <= MAX_INDEX:
        raise InvalidShares(f"n must be in 1..{MAX_INDEX}, got {n}")
    values = split_many([secret], range(1, n + 1), t, SystemRandomSource() if rng is None else rng)
    return [Share(i + 1, share_bytes(values[i, 0])) for i in range(n)]


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """``lambda_i`` for interpolating at 0 from the distinct nonzero points ``xs`` (int64, each < p)."""
    points = [int(x) for x in xs]
    lambdas = []
    for i, xi in enumerate(points):
        numerator, denominator = 1, 1
        for m, xm in enumerate(points):
            if m != i:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xi) % PRIME
        lambdas.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return np.asarray(lambdas, dtype=np.int64)


def combine(xs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Interpolate at 0: ``values`` is ``(len(xs), ...)`` field values; returns ``(...)`` field values."""
    acc = np.zeros(values.shape[1:], dtype=np.int64)
    for lam, row in zip(lagrange_at_zero(xs), values, strict=True):
        acc += row * lam
        acc %= PRIME
    return acc


def words_to_secret(words: np.ndarray) -> bytes:
    if int(words.max()) > 0xFFFF:
        raise InvalidShares("the shares do not reconstruct a valid secret (too few, or inconsistent shares)")
    return words.astype("<u2").tobytes()


def reconstruct_many(indices: Sequence[int], values: np.ndarray) -> list[bytes]:
    """Secrets from the shares of ``len(indices)`` devices: ``values`` as returned by :func:`split_many`."""
    xs = check_indices(indices)
    if values.ndim != 3 or values.shape[0] != xs.size or values.shape[2] != WORDS:
        raise InvalidShares(f"expected share values of shape ({xs.size}, secrets, {WORDS}), got {values.shape}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= PRIME):
        raise InvalidShares("share values must be in [0, 2**31 - 1)")
    words = combine(xs, values.astype(np.int64))
    return [words_to_secret(row) for row in words]


def reconstruct(shares: Sequence[Share]) -> bytes:
    """The secret from ``shares`` (use at least ``t`` of them; with fewer it raises or is wrong)."""
    if not shares:
        raise InvalidShares("no shares given")
    values = np.stack([share_values(s.data) for s in shares])[:, None, :]
    return reconstruct_many([s.index for s in shares], values)[0]
