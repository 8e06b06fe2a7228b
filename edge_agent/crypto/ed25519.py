"""Ed25519 signature verification in pure Python (RFC 8032 §5.1), for devices without ``cryptography``.

Only verification: devices check signatures, they never make them (signing happens on the export
machine and the server, which have ``cryptography``). Verification handles no secret, so it need
not be constant-time; it takes a few milliseconds per signature (``benchmarks/ed25519.py``).

:func:`verify` follows RFC 8032 §5.1.7 with the group equation checked *without* the cofactor,
``[S]B = R + [k]A``, as the RFC allows ("sufficient, but not required") and as OpenSSL, libsodium
and the ``cryptography`` package do: ``R' = [S]B - [k]A`` is computed and its canonical encoding
compared with the signature's ``R`` bytes. Rejected before any point arithmetic:

* a public key or signature of the wrong length;
* ``S >= L`` (a malleable, non-canonical scalar; RFC 8032 §5.1.7 step 1);
* a public key that does not decode (``y >= p`` or no square root; §5.1.3).

:func:`is_weak_public_key` tells a key of small order (the identity and the other 7 torsion
points), for which signatures prove nothing; a device refuses such a key as a trusted key.
Points are in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, xy = T/Z (RFC 8032 §5.1.4).
"""

from __future__ import annotations

import hashlib

__all__ = ["PUBLIC_KEY_BYTES", "SIGNATURE_BYTES", "is_weak_public_key", "point_decode", "verify"]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

Point = tuple[int, int, int, int]

_IDENTITY: Point = (0, 1, 1, 0)


def _add(p: Point, q: Point) -> Point:
    """Point addition (RFC 8032 §5.1.4, "add-2008-hwcd-3"); also correct for doubling."""
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p: Point) -> Point:
    """Point doubling (RFC 8032 §5.1.4, "dbl-2008-hwcd")."""
    a = p[0] * p[0] % _P
    b = p[1] * p[1] % _P
    c = 2 * p[2] * p[2] % _P
    h = a + b
    e = h - (p[0] + p[1]) ** 2
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _multiply(scalar: int, p: Point) -> Point:
    """``[scalar]p`` by double-and-add from the top bit (variable time: public inputs only)."""
    result = _IDENTITY
    for bit in bin(scalar)[2:] if scalar else "":
        result = _double(result)
        if bit == "1":
            result = _add(result, p)
    return result


def _negate(p: Point) -> Point:
    return (_P - p[0]) % _P, p[1], p[2], (_P - p[3]) % _P


def _recover_x(y: int, sign: int) -> int | None:
    """The x with x^2 = (y^2 - 1) / (d y^2 + 1) and parity ``sign`` (RFC 8032 §5.1.3), or None."""
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def point_decode(data: bytes) -> Point | None:
    """A 32-byte point encoding as an extended point, or None when it does not decode."""
    if len(data) != PUBLIC_KEY_BYTES:
        return None
    value = int.from_bytes(data, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    x = _recover_x(y, sign)
    if x is None:
        return None
    return x, y, 1, x * y % _P


def _encode(p: Point) -> bytes:
    z_inv = pow(p[2], _P - 2, _P)
    x, y = p[0] * z_inv % _P, p[1] * z_inv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_G_Y = 4 * pow(5, _P - 2, _P) % _P
_G_X = _recover_x(_G_Y, 0)
assert _G_X is not None
_BASE: Point = (_G_X, _G_Y, 1, _G_X * _G_Y % _P)


def _is_identity(p: Point) -> bool:
    return p[0] % _P == 0 and (p[1] - p[2]) % _P == 0


def is_weak_public_key(public_key: bytes) -> bool:
    """True when ``public_key`` does not decode or is a point of small order ([8]A = identity)."""
    point = point_decode(public_key)
    return point is None or _is_identity(_multiply(8, point))


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    a = point_decode(public_key)
    if a is None:
        return False
    r_bytes = signature[:32]
    k = int.from_bytes(hashlib.sha512(r_bytes + public_key + message).digest(), "little") % _L
    check = _add(_multiply(s, _BASE), _negate(_multiply(k, a)))
    return _encode(check) == r_bytes
