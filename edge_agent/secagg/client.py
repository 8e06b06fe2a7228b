"""The device side of secure aggregation: one :class:`SecAggClient` per session, a state machine.

``advertise → share_keys → mask → unmask``, each call taking the server's previous message and
returning the device's next one (messages: :mod:`edge_agent.secagg.messages`). The client never
reveals both secrets of one device: it answers at most one unmasking request per session (an
identical retry gets the identical answer), and only a request that splits ``U2`` into disjoint
survivors (self-mask seed shares) and dropped devices (mask-key shares) with at least ``t``
survivors. Anything else raises :class:`~edge_agent.errors.SecAggRefused`.

Any failure leaves the client in the phase it was in, except a failed share decryption
(:class:`~edge_agent.errors.SecAggTampered`), which ends the session for this client before it
sent its masked input. The constructor does no work; keys are drawn in :meth:`advertise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.errors import ContractViolation, FedflockError, SecAggAbort, SecAggPhaseError, SecAggRefused
from edge_agent.secagg import crypto, ring, shamir
from edge_agent.secagg.crypto import KeyPair, RandomSource, SystemRandomSource
from edge_agent.secagg.messages import (
    AdvertiseKeys,
    DeviceKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_agent.secagg.params import SecAggParams
from edge_agent.secagg.prg import MaskStream


@dataclass(frozen=True)
class HeldShares:
    """This device's shares of one owner's secrets: mask private key and self-mask seed."""

    mask_key: bytes
    self_seed: bytes


class SecAggClient:
    """One device's run of one session. Not thread-safe: drive it from one thread."""

    def __init__(self, params: SecAggParams, index: int, *, rng: RandomSource | None = None) -> None:
        params.check_index(index)
        self.params = params
        self.index = index
        self._rng = rng if rng is not None else SystemRandomSource()
        self.phase = "new"
        self._enc: KeyPair | None = None
        self._mask: KeyPair | None = None
        self._seed = b""
        self._u1: dict[int, DeviceKeys] = {}
        self._enc_secrets: dict[int, bytes] = {}
        self._held: dict[int, HeldShares] = {}
        self._u2: frozenset[int] = frozenset()
        self._answer: tuple[UnmaskRequest, UnmaskResponse] | None = None

    # -- round 0 ---------------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        """Draw this session's two key pairs and publish their public halves (a retry repeats them)."""
        if self.phase not in ("new", "advertised"):
            raise SecAggPhaseError(f"advertise() in phase {self.phase!r}")
        if self._enc is None or self._mask is None:
            self._enc, self._mask = crypto.generate_keypair(self._rng), crypto.generate_keypair(self._rng)
        self.phase = "advertised"
        return AdvertiseKeys(self.params.session, self._own_keys())

    # -- round 1 ---------------------------------------------------------------------------------
    def share_keys(self, key_list: KeyList) -> EncryptedShares:
        """Check ``U1``, Shamir-share the mask key and a fresh self-mask seed, seal one blob per peer."""
        enc, mask = self._require("advertised", "share_keys")
        self._check_session(key_list.session)
        u1 = self._check_key_list(key_list)
        self._seed = self._rng.token_bytes(shamir.SECRET_BYTES)
        indices = sorted(u1)
        values = shamir.split_many([mask.private, self._seed], indices, self.params.threshold, self._rng)
        blobs: dict[int, bytes] = {}
        for row, peer in enumerate(indices):
            plaintext = shamir.share_bytes(values[row, 0]) + shamir.share_bytes(values[row, 1])
            if peer == self.index:
                self._held[peer] = HeldShares(plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :])
                continue
            secret = crypto.agree(enc, u1[peer].enc_public, peer)
            self._enc_secrets[peer] = secret
            key = crypto.share_key(secret, self.params.session, self.index, peer)
            blobs[peer] = crypto.seal(key, self.params.session, self.index, peer, plaintext, self._rng)
        self._u1 = u1
        self.phase = "shared"
        return EncryptedShares(self.params.session, self.index, blobs)

    # -- round 2 ---------------------------------------------------------------------------------
    def mask(self, bundle: ShareBundle, values: np.ndarray) -> MaskedInput:
        """Open the peers' shares, then mask ``values`` (ring words, see :func:`.ring.quantize`)."""
        _, mask = self._require("shared", "mask")
        self._check_session(bundle.session)
        if bundle.recipient != self.index:
            raise ContractViolation(f"share bundle for device {bundle.recipient} delivered to {self.index}")
        unknown = set(bundle.blobs) - (set(self._u1) - {self.index})
        if unknown:
            raise ContractViolation(f"share bundle from devices outside the key list: {sorted(unknown)[:10]}")
        u2 = frozenset(bundle.blobs) | {self.index}
        if len(u2) < self.params.threshold:
            raise SecAggAbort(f"only {len(u2)} devices shared keys; the threshold is {self.params.threshold}")
        vector = ring.check_ring_vector(values, self.params.ring, self.params.length)
        try:
            for peer, blob in bundle.blobs.items():
                self._held[peer] = self._open(peer, blob)
        except FedflockError:
            self._forget("aborted")
            raise
        stream = MaskStream(self.params.ring, self.params.length)
        stream.add(vector, self._seed)
        for peer in sorted(u2 - {self.index}):
            secret = crypto.agree(mask, self._u1[peer].mask_public, peer)
            seed = crypto.mask_seed(secret, self.params.session, self.index, peer)
            stream.apply(vector, seed, +1 if self.index < peer else -1)
        ring.reduce(vector, self.params.ring)
        self._u2 = u2
        self.phase = "masked"
        return MaskedInput(self.params.session, self.index, self.params.ring.ring_bits, vector)

    # -- round 4 ---------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of survivors and key shares of dropped devices, once per session."""
        if self._answer is not None:
            if request == self._answer[0]:
                return self._answer[1]
            raise SecAggRefused("already answered a different unmasking request in this session")
        self._require("masked", "unmask")
        self._check_session(request.session)
        self._check_request(request)
        shares: dict[int, tuple[ShareKind, bytes]] = {}
        for owner in request.survivors:
            shares[owner] = (ShareKind.SELF_MASK_SEED, self._held[owner].self_seed)
        for owner in request.dropped:
            shares[owner] = (ShareKind.MASK_KEY, self._held[owner].mask_key)
        response = UnmaskResponse(self.params.session, self.index, shares)
        self._answer = (request, response)
        self._forget("done")
        return response

    def abort(self) -> None:
        """The session ended without us (e.g. an Abort message): drop every secret."""
        self._forget("aborted")

    # -- helpers ---------------------------------------------------------------------------------
    def _own_keys(self) -> DeviceKeys:
        assert self._enc is not None and self._mask is not None
        return DeviceKeys(self.index, self._enc.public, self._mask.public)

    def _require(self, phase: str, operation: str) -> tuple[KeyPair, KeyPair]:
        if self.phase != phase or self._enc is None or self._mask is None:
            raise SecAggPhaseError(f"{operation}() in phase {self.phase!r} (expected {phase!r})")
        return self._enc, self._mask

    def _check_session(self, session: bytes) -> None:
        if session != self.params.session:
            raise ContractViolation("message belongs to another secure-aggregation session")

    def _check_key_list(self, key_list: KeyList) -> dict[int, DeviceKeys]:
        u1 = {d.index: d for d in key_list.devices}
        if len(u1) != len(key_list.devices):
            raise ContractViolation("key list names a device twice")
        outside = [i for i in u1 if not 1 <= i <= self.params.cohort]
        if outside:
            raise ContractViolation(f"key list names devices outside the cohort: {outside[:10]}")
        if u1.get(self.index) != self._own_keys():
            raise ContractViolation("key list does not carry this device's advertised keys")
        publics = [d.enc_public for d in u1.values()] + [d.mask_public for d in u1.values()]
        if len(set(publics)) != len(publics):
            raise ContractViolation("key list repeats a public key")
        if len(u1) < self.params.threshold:
            raise SecAggAbort(f"only {len(u1)} devices advertised keys; the threshold is {self.params.threshold}")
        return u1

    def _open(self, peer: int, blob: bytes) -> HeldShares:
        key = crypto.share_key(self._enc_secrets[peer], self.params.session, peer, self.index)
        plaintext = crypto.open_sealed(key, self.params.session, peer, self.index, blob)
        if len(plaintext) != 2 * shamir.SHARE_BYTES:
            raise ContractViolation(f"shares from device {peer} have {len(plaintext)} bytes")
        for part in (plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :]):
            shamir.share_values(part)
        return HeldShares(plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :])

    def _check_request(self, request: UnmaskRequest) -> None:
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggRefused("unmasking request lists a device twice")
        both = survivors & dropped
        if both:
            raise SecAggRefused(f"unmasking request asks for both secrets of devices {sorted(both)[:10]}")
        if survivors | dropped != self._u2:
            raise SecAggRefused("unmasking request does not split exactly the devices that shared keys")
        if len(survivors) < self.params.threshold:
            raise SecAggRefused(
                f"only {len(survivors)} survivors; revealing shares below the threshold "
                f"{self.params.threshold} is refused"
            )

    def _forget(self, phase: str) -> None:
        self._enc = self._mask = None
        self._seed = b""
        self._enc_secrets.clear()
        self._held.clear()
        self.phase = phase
