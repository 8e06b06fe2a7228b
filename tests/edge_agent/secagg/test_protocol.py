"""The client and server state machines end to end (every message through its bytes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import pytest

from edge_agent.errors import (
    ContractViolation,
    InvalidShares,
    SecAggAbort,
    SecAggPhaseError,
    SecAggRefused,
    SecAggTampered,
)
from edge_agent.secagg import (
    SecAggClient,
    SecAggResult,
    SecAggServer,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
    quantization_bound,
    shamir,
)
from tests.edge_agent.secagg.helpers import SeededRandom, Session, make_params, mask_all, start_session, wire

COHORT, LENGTH = 20, 300


def _finish(session: Session, responders: Iterable[int] | None = None) -> SecAggResult:
    request = wire(session.server.unmask_request())
    for index in request.survivors if responders is None else responders:
        assert session.server.receive_unmask(wire(session.clients[index].unmask(request)))
    return session.server.result()


@pytest.mark.parametrize("seed", [0, 1])
def test_thirty_percent_dropouts_sum_is_exact(seed: int) -> None:
    session = start_session(COHORT, LENGTH, seed=seed)
    dropped = [{2, 5, 9, 12, 16, 19}, {1, 2, 3, 18, 19, 20}][seed]  # 6 of 20 = 30%
    mask_all(session, dropped)
    result = _finish(session)
    survivors = sorted(set(session.clients) - dropped)
    assert result.survivors == tuple(survivors) and result.dropped == tuple(sorted(dropped))
    exact = sum(session.codes[i].astype(np.int64) for i in survivors)
    np.testing.assert_array_equal(result.ring_sum, exact)
    floats = sum(np.clip(session.updates[i], -0.1, 0.1) for i in survivors)
    error = np.abs(result.sum() - floats).max()
    assert error < quantization_bound(len(survivors), session.params.ring)
    np.testing.assert_allclose(result.mean(), result.sum() / len(survivors))
    assert session.server.phase == "done"


def test_no_dropouts_and_only_t_responders() -> None:
    session = start_session(COHORT, LENGTH, seed=3)
    mask_all(session)
    t = session.params.threshold
    result = _finish(session, responders=range(1, t + 1))
    np.testing.assert_array_equal(result.ring_sum, sum(c.astype(np.int64) for c in session.codes.values()))


def test_dropouts_below_threshold_abort_before_any_share_is_revealed() -> None:
    session = start_session(COHORT, LENGTH, seed=4)
    dropped = set(range(1, 8))  # 7 of 20: 13 survivors < t = 14
    mask_all(session, dropped)
    with pytest.raises(SecAggAbort, match="only 13 devices sent masked inputs; the threshold is 14"):
        session.server.unmask_request()
    assert session.server.phase == "aborted"
    with pytest.raises(SecAggPhaseError):
        session.server.result()
    # a (lying) server asking anyway gets nothing from the devices either
    survivors = tuple(sorted(set(session.clients) - dropped))
    lie = UnmaskRequest(session.params.session, survivors, tuple(sorted(dropped)))
    with pytest.raises(SecAggRefused, match="below the threshold"):
        session.clients[survivors[0]].unmask(lie)


def test_too_few_unmasking_responses_abort() -> None:
    session = start_session(COHORT, LENGTH, seed=5)
    mask_all(session, {1, 2})
    with pytest.raises(SecAggAbort, match="answered the unmasking request"):
        _finish(session, responders=range(3, 3 + session.params.threshold - 1))
    assert session.server.phase == "aborted"


def test_too_few_keys_or_shares_abort() -> None:
    params = make_params(COHORT, LENGTH)
    clients = [SecAggClient(params, i, rng=SeededRandom(i)) for i in range(1, COHORT + 1)]
    short = SecAggServer(params)
    for client in clients[: params.threshold - 1]:
        short.receive_keys(client.advertise())
    with pytest.raises(SecAggAbort, match="only 13 devices advertised keys"):
        short.key_list()
    server = SecAggServer(params)
    for client in clients:
        server.receive_keys(client.advertise())
    keys = server.key_list()
    for client in clients[: params.threshold - 1]:
        server.receive_shares(client.share_keys(keys))
    with pytest.raises(SecAggAbort, match="only 13 devices shared keys"):
        server.share_bundles()
    with pytest.raises(SecAggPhaseError):
        server.receive_shares(clients[-1].share_keys(keys))


def test_client_refuses_to_reveal_both_secrets_of_a_device() -> None:
    session = start_session(COHORT, LENGTH, seed=6)
    mask_all(session, {20})
    request = session.server.unmask_request()
    client = session.clients[1]
    both = UnmaskRequest(request.session, (*request.survivors, 20), request.dropped)
    with pytest.raises(SecAggRefused, match=r"both secrets of devices \[20\]"):
        client.unmask(both)
    answer = client.unmask(request)
    assert answer.shares[20][0] == ShareKind.MASK_KEY and answer.shares[1][0] == ShareKind.SELF_MASK_SEED
    assert client.unmask(request) == answer  # an identical retry gets the same answer
    flipped = UnmaskRequest(request.session, tuple(sorted((*request.survivors[1:], 20))), (request.survivors[0],))
    with pytest.raises(SecAggRefused, match="already answered a different"):
        client.unmask(flipped)  # asking again with the kinds swapped would reveal both secrets


def test_client_refuses_requests_not_splitting_u2() -> None:
    session = start_session(COHORT, LENGTH, seed=7)
    mask_all(session)
    client = session.clients[2]
    everyone = tuple(range(1, COHORT + 1))
    with pytest.raises(SecAggRefused, match="exactly the devices"):
        client.unmask(UnmaskRequest(session.params.session, everyone[:-1], ()))
    with pytest.raises(SecAggRefused, match="twice"):
        client.unmask(UnmaskRequest(session.params.session, (*everyone, 1), ()))
    with pytest.raises(ContractViolation, match="another secure-aggregation session"):
        client.unmask(UnmaskRequest(bytes(16), everyone, ()))
    assert client.phase == "masked"  # refusals change nothing


def test_tampered_or_forged_shares_are_rejected_by_the_client() -> None:
    session = start_session(5, 10, seed=8)
    bundles = session.server.share_bundles()
    blob = bytearray(bundles[1].blobs[2])
    blob[-1] ^= 0x80
    tampered = dataclasses.replace(bundles[1], blobs={**bundles[1].blobs, 2: bytes(blob)})
    with pytest.raises(SecAggTampered, match="from device 2 to 1"):
        session.clients[1].mask(tampered, session.codes[1])
    assert session.clients[1].phase == "aborted"
    swapped = dataclasses.replace(bundles[3], blobs={**bundles[3].blobs, 2: bundles[3].blobs[4]})
    with pytest.raises(SecAggTampered):
        session.clients[3].mask(swapped, session.codes[3])


def test_client_checks_the_key_list_and_bundle() -> None:
    session = start_session(5, 10, seed=9)
    bundles = session.server.share_bundles()
    with pytest.raises(ContractViolation, match="delivered to 2"):
        session.clients[2].mask(bundles[1], session.codes[2])
    outsider = dataclasses.replace(bundles[2], blobs={**bundles[2].blobs, 9: bundles[2].blobs[1]})
    with pytest.raises(ContractViolation, match="outside the key list"):
        session.clients[2].mask(outsider, session.codes[2])
    few = dataclasses.replace(bundles[2], blobs={1: bundles[2].blobs[1]})
    with pytest.raises(SecAggAbort, match="only 2 devices shared keys"):
        session.clients[2].mask(few, session.codes[2])
    with pytest.raises(SecAggPhaseError):
        session.clients[2].advertise()
    assert session.clients[2].phase == "shared"


def test_server_validates_messages_and_ignores_identical_repeats() -> None:
    session = start_session(5, 10, seed=10)
    bundles = session.server.share_bundles()
    masked = session.clients[1].mask(bundles[1], session.codes[1])
    assert session.server.receive_masked(wire(masked))
    assert not session.server.receive_masked(wire(masked))  # QoS 1 duplicate
    other = session.clients[2].mask(bundles[2], session.codes[2])
    with pytest.raises(ContractViolation, match="already sent a different"):
        session.server.receive_masked(dataclasses.replace(other, sender=1))
    with pytest.raises(ContractViolation, match="10 values of 16 bits"):
        session.server.receive_masked(dataclasses.replace(other, ring_bits=40))
    with pytest.raises(ContractViolation, match="another secure-aggregation session"):
        session.server.receive_masked(dataclasses.replace(other, session=bytes(16)))
    with pytest.raises(ContractViolation, match="not below 2\\*\\*16"):
        session.server.receive_masked(dataclasses.replace(other, values=other.values + np.uint32(1 << 16)))
    with pytest.raises(SecAggPhaseError, match="phase 'masked'"):
        session.server.receive_keys(session.clients[2].advertise())
    assert session.server.receive_masked(other)


def test_server_rejects_malformed_unmask_responses() -> None:
    session = start_session(COHORT, LENGTH, seed=11)
    mask_all(session, {4})
    request = session.server.unmask_request()
    answer = session.clients[1].unmask(request)
    wrong_kind = dict(answer.shares)
    wrong_kind[4] = (ShareKind.SELF_MASK_SEED, wrong_kind[4][1])
    with pytest.raises(ContractViolation, match="do not answer"):
        session.server.receive_unmask(dataclasses.replace(answer, shares=wrong_kind))
    bad_value = {**answer.shares, 4: (ShareKind.MASK_KEY, b"\xff" * 64)}
    with pytest.raises(ContractViolation, match="field prime"):
        session.server.receive_unmask(dataclasses.replace(answer, shares=bad_value))
    assert session.server.receive_unmask(answer)


def _answers(session: Session, request: UnmaskRequest, corrupt: Callable[[UnmaskResponse], UnmaskResponse]) -> None:
    """Every survivor answers; ``corrupt(answer)`` may alter the first responder's answer."""
    for index in request.survivors:
        answer = session.clients[index].unmask(request)
        if index == request.survivors[0]:
            answer = corrupt(answer)
        session.server.receive_unmask(answer)


def test_inconsistent_shares_abort_the_reconstruction() -> None:
    session = start_session(COHORT, LENGTH, seed=12)
    mask_all(session, {4})
    request = session.server.unmask_request()
    _answers(
        session, request, lambda a: dataclasses.replace(a, shares={**a.shares, 4: (ShareKind.MASK_KEY, bytes(64))})
    )
    with pytest.raises(InvalidShares, match="do not reconstruct a valid secret"):
        session.server.result()
    assert session.server.phase == "aborted"


def test_wrong_but_well_formed_key_share_is_caught_by_the_public_key() -> None:
    session = start_session(COHORT, LENGTH, seed=13)
    mask_all(session, {4})
    request = session.server.unmask_request()
    first = request.survivors[0]
    lam = int(shamir.lagrange_at_zero(np.array(request.survivors[: session.params.threshold]))[0])
    nudge = pow(lam, -1, shamir.PRIME)  # adds exactly 1 to a word of the rebuilt key
    # (word 5, bytes 10-11: X25519 clamping ignores some bits of bytes 0 and 31, so not word 0)

    def corrupt(answer: UnmaskResponse) -> UnmaskResponse:
        values = shamir.share_values(answer.shares[4][1]).copy()
        values[5] = (values[5] + nudge) % shamir.PRIME
        return dataclasses.replace(
            answer, shares={**answer.shares, 4: (ShareKind.MASK_KEY, shamir.share_bytes(values))}
        )

    assert first == 1
    _answers(session, request, corrupt)
    with pytest.raises(SecAggTampered, match="rebuilt mask key of device 4"):
        session.server.result()


def test_fedbuff_buffers_are_independent_sessions() -> None:
    """Two open buffers, one session each: each sums its own cohort; nothing crosses between them."""
    first = start_session(10, 50, seed=20, session=b"\x01" * 16)
    second = start_session(10, 50, seed=21, session=b"\x02" * 16)
    first_bundles, second_bundles = first.server.share_bundles(), second.server.share_bundles()
    stray = first.clients[1].mask(first_bundles[1], first.codes[1])
    with pytest.raises(ContractViolation, match="another secure-aggregation session"):
        second.server.receive_masked(stray)
    with pytest.raises(ContractViolation, match="another secure-aggregation session"):
        second.clients[1].mask(first_bundles[1], second.codes[1])
    first.server.receive_masked(stray)
    for session, bundles, dropped in ((first, first_bundles, {3, 7}), (second, second_bundles, {10})):
        for index, client in session.clients.items():
            if index not in dropped and not (session is first and index == 1):
                session.server.receive_masked(client.mask(bundles[index], session.codes[index]))
        result = _finish(session)
        want = sum(session.codes[i].astype(np.int64) for i in session.clients if i not in dropped)
        np.testing.assert_array_equal(result.ring_sum, want)
