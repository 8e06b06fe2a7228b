"""The server side of secure aggregation: one :class:`SecAggServer` per session, a state machine.

Phases, each opened by the previous ``close`` call (``receive_*`` before or after its phase
raises :class:`~edge_agent.errors.SecAggPhaseError`)::

    keys    receive_keys(AdvertiseKeys)*       key_list()       -> KeyList for every member of U1
    shares  receive_shares(EncryptedShares)*   share_bundles()  -> {index: ShareBundle} for U2
    masked  receive_masked(MaskedInput)*       unmask_request() -> UnmaskRequest for U2
    unmask  receive_unmask(UnmaskResponse)*    result()         -> SecAggResult (the sum over U3)

A ``close`` call with fewer than ``t`` participants raises :class:`~edge_agent.errors.SecAggAbort`
and ends the session: everything received is dropped (the masked sum without the unmasking
shares, or fewer than ``t`` shares of any secret, reveal nothing about any device's input).
The caller decides when a phase closes (all expected messages in, or its deadline).

``receive_*`` returns ``True`` for a new message and ``False`` for an identical repeat (MQTT QoS 1
may deliver twice); a different message from the same device, a device outside the phase's
cohort, the wrong session or wrong sizes raise :class:`~edge_agent.errors.ContractViolation` and
change nothing. Masked inputs are folded into one running sum as they arrive (O(length) memory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import ContractViolation, InvalidShares, SecAggAbort, SecAggError, SecAggPhaseError
from edge_agent.secagg import recover, ring, shamir
from edge_agent.secagg.messages import (
    Abort,
    AdvertiseKeys,
    DeviceKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    Setup,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_agent.secagg.params import SecAggParams


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The ring sum of the survivors' inputs; :meth:`sum` / :meth:`mean` decode it to floats."""

    ring_sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    spec: ring.RingSpec

    @property
    def count(self) -> int:
        return len(self.survivors)

    def sum(self) -> np.ndarray:
        return ring.decode_sum(self.ring_sum, self.count, self.spec)

    def mean(self) -> np.ndarray:
        return ring.decode_mean(self.ring_sum, self.count, self.spec)


class SecAggServer:
    """The aggregator's run of one session. Not thread-safe: drive it from one thread."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.phase = "keys"
        self._keys: dict[int, DeviceKeys] = {}
        self._shares: dict[int, EncryptedShares] = {}
        self._masked_sum = np.zeros(0, dtype=params.ring.dtype)
        self._masked_digests: dict[int, bytes] = {}
        self._request: UnmaskRequest | None = None
        self._responses: dict[int, UnmaskResponse] = {}

    def setup(self, index: int) -> Setup:
        """The SETUP message for device ``index``."""
        self.params.check_index(index)
        return Setup(self.params, index)

    def abort_message(self, reason: str) -> Abort:
        return Abort(self.params.session, reason)

    # -- phase keys ------------------------------------------------------------------------------
    def receive_keys(self, message: AdvertiseKeys) -> bool:
        self._expect("keys", message.session)
        index = message.keys.index
        if not 1 <= index <= self.params.cohort:
            raise ContractViolation(f"device {index} is not in the cohort 1..{self.params.cohort}")
        return self._store(self._keys, index, message.keys)

    def key_list(self) -> KeyList:
        self._expect("keys")
        self._at_least(len(self._keys), "devices advertised keys")
        self.phase = "shares"
        return KeyList(self.params.session, tuple(self._keys[i] for i in sorted(self._keys)))

    # -- phase shares ----------------------------------------------------------------------------
    def receive_shares(self, message: EncryptedShares) -> bool:
        self._expect("shares", message.session)
        self._member(message.sender, self._keys, "advertised keys")
        expected = set(self._keys) - {message.sender}
        if set(message.blobs) != expected:
            raise ContractViolation(f"device {message.sender} must send one blob to each other member of U1")
        return self._store(self._shares, message.sender, message)

    def share_bundles(self) -> dict[int, ShareBundle]:
        self._expect("shares")
        self._at_least(len(self._shares), "devices shared keys")
        u2 = sorted(self._shares)
        self._masked_sum = np.zeros(self.params.length, dtype=self.params.ring.dtype)
        self.phase = "masked"
        return {v: ShareBundle(self.params.session, v, {u: self._shares[u].blobs[v] for u in u2 if u != v}) for v in u2}

    # -- phase masked ----------------------------------------------------------------------------
    def receive_masked(self, message: MaskedInput) -> bool:
        self._expect("masked", message.session)
        self._member(message.sender, self._shares, "shared keys")
        if message.ring_bits != self.params.ring.ring_bits or message.values.shape != (self.params.length,):
            raise ContractViolation(
                f"device {message.sender}: masked input must be {self.params.length} values of "
                f"{self.params.ring.ring_bits} bits"
            )
        values = np.asarray(message.values, dtype=self.params.ring.dtype)
        if int(values.max()) >= self.params.ring.modulus:
            raise ContractViolation(f"device {message.sender}: masked value not below 2**{self.params.ring.ring_bits}")
        digest = hashlib.sha256(values.tobytes()).digest()
        if not self._store(self._masked_digests, message.sender, digest):
            return False
        self._masked_sum += values
        return True

    def unmask_request(self) -> UnmaskRequest:
        self._expect("masked")
        self._at_least(len(self._masked_digests), "devices sent masked inputs")
        survivors = tuple(sorted(self._masked_digests))
        dropped = tuple(sorted(set(self._shares) - set(survivors)))
        self._request = UnmaskRequest(self.params.session, survivors, dropped)
        self.phase = "unmask"
        return self._request

    # -- phase unmask ----------------------------------------------------------------------------
    def receive_unmask(self, message: UnmaskResponse) -> bool:
        self._expect("unmask", message.session)
        self._member(message.sender, self._shares, "shared keys")
        assert self._request is not None
        wanted = {o: ShareKind.SELF_MASK_SEED for o in self._request.survivors}
        wanted |= {o: ShareKind.MASK_KEY for o in self._request.dropped}
        if {o: kind for o, (kind, _) in message.shares.items()} != wanted:
            raise ContractViolation(f"device {message.sender}: the shares do not answer the unmasking request")
        try:
            for _, share in message.shares.values():
                shamir.share_values(share)
        except InvalidShares as exc:
            raise ContractViolation(f"device {message.sender}: {exc.reason}") from exc
        return self._store(self._responses, message.sender, message)

    def result(self) -> SecAggResult:
        """Rebuild the secrets from ``t`` responses and unmask the sum (at least ``t`` must have answered)."""
        self._expect("unmask")
        self._at_least(len(self._responses), "devices answered the unmasking request")
        assert self._request is not None
        survivors, dropped = self._request.survivors, self._request.dropped
        chosen = sorted(self._responses)[: self.params.threshold]
        shares = {r: {o: share for o, (_, share) in self._responses[r].shares.items()} for r in chosen}
        try:
            secrets = recover.rebuild_secrets(shares, survivors + dropped)
            plain = recover.remove_masks(
                self.params,
                self._masked_sum,
                self._keys,
                {u: secrets[u] for u in survivors},
                {v: secrets[v] for v in dropped},
            )
        except SecAggError:
            self._drop("aborted")
            raise
        self._drop("done")
        return SecAggResult(plain, survivors, dropped, self.params.ring)

    # -- helpers ---------------------------------------------------------------------------------
    def _expect(self, phase: str, session: bytes | None = None) -> None:
        if self.phase != phase:
            raise SecAggPhaseError(f"secure aggregation is in phase {self.phase!r}, not {phase!r}")
        if session is not None and session != self.params.session:
            raise ContractViolation("message belongs to another secure-aggregation session")

    def _member(self, index: int, members: Mapping[int, object], what: str) -> None:
        if index not in members:
            raise ContractViolation(f"device {index} is not among the devices that {what}")

    def _store(self, table: dict[int, Any], index: int, value: object) -> bool:
        if index in table:
            if table[index] == value:
                return False
            raise ContractViolation(f"device {index} already sent a different message in this phase")
        table[index] = value
        return True

    def _at_least(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            self._drop("aborted")
            raise SecAggAbort(f"only {count} {what}; the threshold is {self.params.threshold}")

    def _drop(self, phase: str) -> None:
        """Forget everything received (secrets and masked data) and end the session."""
        self._shares.clear()
        self._responses.clear()
        self._masked_sum = np.zeros(0, dtype=self.params.ring.dtype)
        self.phase = phase
