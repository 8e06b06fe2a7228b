"""Statement expiry (issue #7): the v2 release statement on the wire, the device's freshness check,
and the server's signer that stamps, renews and schedules expiries.

Pure pieces with an explicit time; the device end to end (real updater, store and staging) is
tests/edge_agent/ota/test_statement_expiry.py, the re-signing of retained statements
tests/edge_agent/ota/test_statement_refresh.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from broker_server.pki.release_signer import DEFAULT_STATEMENT_LIFETIME_S, ReleaseSigner, parse_statement_lifetime
from edge_agent.crypto.freshness import (
    FreshnessPolicy,
    StatementExpired,
    StatementNotYetValid,
    StatementWithoutExpiry,
    check_freshness,
)
from edge_agent.crypto.signing import SigningKey, sign_release
from edge_agent.crypto.trust import SignatureError, TrustedKeys
from edge_agent.errors import ConfigError, IntegrityError
from edge_agent.protocol.messages import decode_message, encode_message
from edge_agent.protocol.model_messages import ModelMessage, release_statement

KEY = SigningKey.generate()
TRUSTED = TrustedKeys((KEY.public_key,))
HOUR_MS = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MODEL = ModelMessage(channel="current", version=3, bundle_digest="ab" * 32, archive_sha256="cd" * 32, archive_size=4096)
DEFAULT = FreshnessPolicy()


def fresh(issued: int, expires: int, now: int, policy: FreshnessPolicy = DEFAULT) -> None:
    check_freshness(issued_at=issued, expires_at=expires, now_ms=now, policy=policy, what="MODEL v3")


def test_the_v2_statement_adds_the_expiry_line_and_v1_is_unchanged() -> None:
    stamped = dataclasses.replace(MODEL, issued_at=T0, expires_at=T0 + 24 * HOUR_MS)
    assert release_statement(stamped) == (
        "fedflock release statement v2\n"
        "channel=current\n"
        "version=3\n"
        f"bundle_digest={'ab' * 32}\n"
        f"archive_sha256={'cd' * 32}\n"
        "archive_size=4096\n"
        "rollout_id=\n"
        "issued_at=1767225600000\n"
        "expires_at=1767312000000\n"
    ).encode("ascii")
    v1 = release_statement(dataclasses.replace(stamped, expires_at=0))
    assert v1.startswith(b"fedflock release statement v1\n") and v1.endswith(b"issued_at=1767225600000\n")


def test_expires_at_travels_in_the_header_and_is_omitted_when_zero() -> None:
    signed = sign_release(MODEL, KEY, issued_at=T0, expires_at=T0 + HOUR_MS)
    assert decode_message(encode_message(signed)) == signed
    assert b'"expires_at"' in encode_message(signed)
    assert b'"expires_at"' not in encode_message(sign_release(MODEL, KEY, issued_at=T0))


def test_a_statement_holds_inside_its_window_give_or_take_the_skew() -> None:
    issued, expires, skew = T0, T0 + 24 * HOUR_MS, 300_000
    for now in (issued, issued - skew, expires - 1, expires + skew - 1):
        fresh(issued, expires, now)  # no error
    with pytest.raises(StatementExpired, match=r"expired at 2026-01-02T00:00:00Z, 300 s before .*300 s of clock skew"):
        fresh(issued, expires, expires + skew)
    with pytest.raises(
        StatementNotYetValid, match=r"issued at 2026-01-01T00:00:00Z, 301 s after .*device clock is behind"
    ):
        fresh(issued, expires, issued - skew - 1_000)
    with pytest.raises(StatementExpired, match="never valid"):
        fresh(issued, issued, issued)


def test_the_skew_tolerance_is_configurable() -> None:
    issued, expires = T0, T0 + HOUR_MS
    strict, lenient = FreshnessPolicy(max_clock_skew_s=0), FreshnessPolicy(max_clock_skew_s=1800)
    with pytest.raises(StatementExpired):
        fresh(issued, expires, expires, strict)
    fresh(issued, expires, expires + 29 * 60_000, lenient)
    with pytest.raises(StatementNotYetValid):
        fresh(issued, expires, issued - 1, strict)
    fresh(issued, expires, issued - 29 * 60_000, lenient)


def test_a_statement_without_expiry_is_refused_only_when_required() -> None:
    fresh(T0, 0, T0 + 10_000 * HOUR_MS)  # v1: accepted by default, however old
    with pytest.raises(StatementWithoutExpiry, match=r"no expiry .*\[ota\] require_expiry"):
        fresh(T0, 0, T0, FreshnessPolicy(require_expiry=True))


def test_stale_statements_are_signature_errors_with_their_own_codes() -> None:
    codes = {cls.code for cls in (StatementExpired, StatementNotYetValid, StatementWithoutExpiry)}
    assert codes == {"statement_expired", "statement_not_yet_valid", "statement_without_expiry"}
    assert issubclass(StatementExpired, SignatureError) and issubclass(SignatureError, IntegrityError)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_clock_skew_s": -1}, "ota.max_clock_skew_s: must be between"),
        ({"max_clock_skew_s": 7200}, "ota.max_clock_skew_s: must be between"),
        ({"max_clock_skew_s": "5m"}, "ota.max_clock_skew_s: expected a number"),
        ({"max_clock_skew_s": float("nan")}, "ota.max_clock_skew_s: expected a number"),
        ({"require_expiry": "yes"}, "ota.require_expiry: expected true or false"),
    ],
)
def test_bad_policies_name_the_key(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        FreshnessPolicy(**fields)  # type: ignore[arg-type]


def test_the_device_checks_the_signature_before_the_expiry() -> None:
    signed = sign_release(MODEL, KEY, issued_at=T0, expires_at=T0 + HOUR_MS)
    assert TRUSTED.check_statement(signed, now_ms=T0) == KEY.key_id
    with pytest.raises(StatementExpired):
        TRUSTED.check_statement(signed, now_ms=T0 + 2 * HOUR_MS)
    # a later expiry (or none) without the signer's key: the signature no longer matches
    for tampered in (
        dataclasses.replace(signed, expires_at=T0 + 100 * HOUR_MS),
        dataclasses.replace(signed, expires_at=0),
        dataclasses.replace(signed, issued_at=T0 + HOUR_MS),
    ):
        with pytest.raises(SignatureError, match="does not match") as caught:
            TRUSTED.check_statement(tampered, now_ms=T0 + 2 * HOUR_MS)
        assert type(caught.value) is SignatureError
    # an expired statement by an untrusted key reports the key, not the expiry
    rogue = sign_release(MODEL, SigningKey.generate(), issued_at=T0, expires_at=T0 + 1)
    with pytest.raises(SignatureError, match="not trusted"):
        TRUSTED.check_statement(rogue, now_ms=T0 + 2 * HOUR_MS)


def test_sign_release_refuses_an_empty_validity_window() -> None:
    with pytest.raises(ConfigError, match="must be after issued_at"):
        sign_release(MODEL, KEY, issued_at=T0, expires_at=T0)


class WallClock:
    def __init__(self, seconds: float) -> None:
        self.now = seconds

    def __call__(self) -> float:
        return self.now


def test_the_signer_stamps_a_lifetime_and_renews_it_keeping_issued_at() -> None:
    clock = WallClock(T0 / 1000)
    signer = ReleaseSigner(KEY, clock=clock, lifetime_s=DEFAULT_STATEMENT_LIFETIME_S)
    first = signer.sign(MODEL)
    assert (first.issued_at, first.expires_at) == (T0, T0 + 24 * HOUR_MS)
    assert signer.refresh_at(first) == T0 + 18 * HOUR_MS  # a quarter of the lifetime left
    clock.now += 20 * 3600
    renewed = signer.resign(first)
    assert renewed.issued_at == T0 and renewed.expires_at == T0 + 44 * HOUR_MS
    assert dataclasses.replace(renewed, expires_at=0, signature="") == dataclasses.replace(
        first, expires_at=0, signature=""
    )
    assert TRUSTED.check_statement(renewed, now_ms=T0 + 40 * HOUR_MS) == KEY.key_id
    with pytest.raises(StatementExpired):
        TRUSTED.check_statement(first, now_ms=T0 + 40 * HOUR_MS)
    # another key's statement, or one without expiry, is never this signer's to renew
    other = ReleaseSigner(SigningKey.generate(), clock=clock, lifetime_s=3600).sign(MODEL)
    assert signer.refresh_at(other) is None and signer.refresh_at(dataclasses.replace(first, expires_at=0)) is None


def test_a_signer_without_lifetime_makes_v1_statements() -> None:
    signer = ReleaseSigner(KEY, clock=WallClock(T0 / 1000))
    model = signer.sign(MODEL)
    assert model.expires_at == 0 and release_statement(model).startswith(b"fedflock release statement v1\n")
    assert signer.refresh_at(model) is None
    with pytest.raises(ConfigError, match="nothing to renew"):
        signer.resign(model)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("24h", 86400.0), ("7d", 604800.0), ("90m", 5400.0), ("3600s", 3600.0), (7200, 7200.0), ("none", None)],
)
def test_statement_lifetimes_parse(value: object, seconds: float | None) -> None:
    assert parse_statement_lifetime(value) == seconds


@pytest.mark.parametrize("value", ["", "1w", "-1h", "10m", "91d", True, [1], float("inf"), "0"])
def test_bad_statement_lifetimes_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"ota\.statement_lifetime"):
        parse_statement_lifetime(value)
