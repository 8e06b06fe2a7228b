"""Pure-Python Ed25519 verification (edge_agent.crypto.ed25519) against RFC 8032's test vectors and
against the ``cryptography`` package's signer and verifier (the dev environment has it; devices do not)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.crypto.ed25519 import is_weak_public_key, point_decode, verify

# RFC 8032 §7.1, TEST 1, 2, 3 and TEST SHA(abc): (secret key, public key, message, signature)
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]
L = 2**252 + 27742317777372353535851937790883648493


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def cryptography_verifies(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors_verify_and_any_flipped_bit_fails(secret: str, public: str, message: str, signature: str):
    pk, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    # the vectors are what they claim: cryptography derives the same key and (deterministic) signature
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert raw_public(private) == pk and private.sign(msg) == sig
    assert verify(pk, msg, sig)
    for bit in (0, 100, 255, 256, 300, 511):  # in R and in S
        flipped = bytearray(sig)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not verify(pk, msg, bytes(flipped))
    assert not verify(pk, msg + b"\x00", sig)


def test_malleable_and_malformed_inputs_are_refused() -> None:
    private = Ed25519PrivateKey.generate()
    public, message = raw_public(private), b"release"
    signature = private.sign(message)
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + L).to_bytes(32, "little")  # same point equation, S >= L
    assert not verify(public, message, malleated)
    assert not cryptography_verifies(public, message, malleated)  # the same answer
    assert not verify(public[:31], message, signature) and not verify(public, message, signature[:63])
    not_canonical_y = (2**255 - 19 + 1).to_bytes(32, "little")  # y >= p does not decode (RFC 8032 §5.1.3)
    assert point_decode(not_canonical_y) is None and not verify(not_canonical_y, message, signature)


def test_weak_public_keys_are_recognised() -> None:
    identity = (1).to_bytes(32, "little")
    order_two = (2**255 - 19 - 1).to_bytes(32, "little")  # (0, -1)
    assert is_weak_public_key(identity) and is_weak_public_key(order_two)
    assert is_weak_public_key(bytes(31)) and is_weak_public_key((2**255 - 19 + 1).to_bytes(32, "little"))
    assert not is_weak_public_key(raw_public(Ed25519PrivateKey.generate()))
    # why: with the identity as the key, R = identity and S = 0 "sign" every message
    forged = identity + bytes(32)
    assert verify(identity, b"anything", forged) and verify(identity, b"anything else", forged)


@settings(max_examples=40, deadline=None)
@given(message=st.binary(max_size=300), seed=st.binary(min_size=32, max_size=32), bit=st.integers(0, 511))
def test_agrees_with_cryptography_on_valid_tampered_and_wrong_key_signatures(message: bytes, seed: bytes, bit: int):
    private = Ed25519PrivateKey.from_private_bytes(seed)
    other = Ed25519PrivateKey.from_private_bytes(bytes(reversed(seed)) if seed != bytes(reversed(seed)) else bytes(32))
    public, signature = raw_public(private), private.sign(message)
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    cases = [
        (public, message, signature),
        (public, message, bytes(flipped)),
        (public, message + b"!", signature),
        (raw_public(other), message, signature),
    ]
    answers = [verify(*case) for case in cases]
    assert answers == [cryptography_verifies(*case) for case in cases]
    assert answers[0] is True and answers[2] is False
    assert answers[3] is (raw_public(other) == public)
