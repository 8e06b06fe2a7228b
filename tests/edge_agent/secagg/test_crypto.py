"""Key agreement, key derivation, share sealing and the mask PRG."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from edge_agent.errors import ContractViolation, SecAggTampered
from edge_agent.secagg import crypto, prg, ring
from edge_agent.secagg.ring import RingSpec
from tests.edge_agent.secagg.helpers import SeededRandom

SESSION = bytes(range(16))


def _pair(seed: int) -> crypto.KeyPair:
    return crypto.generate_keypair(SeededRandom(seed))


def test_agreement_is_symmetric_and_seeds_are_bound_to_pair_and_session() -> None:
    a, b, c = _pair(1), _pair(2), _pair(3)
    ab, ba = crypto.agree(a, b.public, 2), crypto.agree(b, a.public, 1)
    assert ab == ba and ab != crypto.agree(a, c.public, 3)
    assert crypto.mask_seed(ab, SESSION, 1, 2) == crypto.mask_seed(ba, SESSION, 2, 1)
    assert crypto.mask_seed(ab, SESSION, 1, 2) != crypto.mask_seed(ab, bytes(16), 1, 2)
    assert crypto.mask_seed(ab, SESSION, 1, 2) != crypto.mask_seed(ab, SESSION, 1, 3)
    assert crypto.share_key(ab, SESSION, 1, 2) != crypto.share_key(ab, SESSION, 2, 1)  # one key per direction


def test_keypair_from_private_rebuilds_the_public_key() -> None:
    a = _pair(5)
    assert crypto.keypair_from_private(a.private).public == a.public
    with pytest.raises(SecAggTampered, match="32 bytes"):
        crypto.keypair_from_private(b"\x00" * 31)


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(ContractViolation, match="device 7's X25519 public key"):
        crypto.agree(_pair(1), bytes(32), 7)  # the all-zero point: the shared secret would be zero
    with pytest.raises(ContractViolation, match="device 7"):
        crypto.agree(_pair(1), bytes(31), 7)


def test_sealed_shares_open_only_unaltered_and_on_their_route() -> None:
    key = crypto.share_key(crypto.agree(_pair(1), _pair(2).public, 2), SESSION, 1, 2)
    blob = crypto.seal(key, SESSION, 1, 2, b"s" * 128, SeededRandom(0))
    assert len(blob) == 12 + 128 + 16
    assert crypto.open_sealed(key, SESSION, 1, 2, blob) == b"s" * 128
    flipped = bytearray(blob)
    flipped[40] ^= 1
    for sender, recipient, session, data in [
        (1, 2, SESSION, bytes(flipped)),  # altered ciphertext
        (3, 2, SESSION, blob),  # claimed to come from someone else
        (1, 3, SESSION, blob),  # delivered to someone else
        (1, 2, bytes(16), blob),  # replayed into another session
        (1, 2, SESSION, blob[:20]),  # truncated
    ]:
        with pytest.raises(SecAggTampered):
            crypto.open_sealed(key, session, sender, recipient, data)
    forged = crypto.seal(b"\x00" * 32, SESSION, 1, 2, b"s" * 128, SeededRandom(0))
    with pytest.raises(SecAggTampered, match="failed authentication"):
        crypto.open_sealed(key, SESSION, 1, 2, forged)


@pytest.mark.parametrize("ring_bits", [16, 24, 32, 40, 64])
def test_prg_is_the_aes_ctr_keystream_from_counter_zero(ring_bits: int) -> None:
    """Checked against AES-ECB of the counter blocks 0, 1, 2, ... (big-endian), as the spec says."""
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=ring_bits)
    seed = bytes(range(32))
    words = prg.expand(seed, spec, 10)
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    stream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(5)))
    width = spec.dtype.itemsize
    want = [int.from_bytes(stream[i * width : (i + 1) * width], "little") % (1 << ring_bits) for i in range(10)]
    assert words.tolist() == want


@pytest.mark.parametrize("ring_bits", [17, 24, 32, 48])
def test_pairwise_masks_cancel_exactly(ring_bits: int) -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=ring_bits)
    pairs = [_pair(i) for i in range(1, 6)]
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 255, 1000).astype(spec.dtype) for _ in pairs]
    stream = prg.MaskStream(spec, 1000)
    total = np.zeros(1000, dtype=spec.dtype)
    for u, (mine, x) in enumerate(zip(pairs, inputs, strict=True), start=1):
        y = x.copy()
        for v, theirs in enumerate(pairs, start=1):
            if v != u:
                seed = crypto.mask_seed(crypto.agree(mine, theirs.public, v), SESSION, u, v)
                stream.apply(y, seed, +1 if u < v else -1)
        ring.reduce(y, spec)
        assert (y != x).mean() > 0.99  # each masked input looks nothing like its input
        total += y
    ring.reduce(total, spec)
    np.testing.assert_array_equal(total, sum(x.astype(np.int64) for x in inputs))
