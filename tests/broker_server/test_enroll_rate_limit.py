"""Rate limits of the enrollment endpoint (issue #7): token buckets per client address and global,
refused tokens costing more, 429 with Retry-After that never uses up the request's token.

The bucket arithmetic and the limiter run on a fake clock with hand-computed values; one test
runs the real HTTPS endpoint (``EnrollmentServer`` on a free port, the PKI's server certificate)
and the real client (``edge_agent.enroll``), whose waits advance the server's fake clock.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker_server.pki.enroll_server import EnrollmentConfig, EnrollmentServer
from broker_server.pki.rate_limit import Bucket, EnrollmentLimiter, RateLimits, charge, take
from broker_server.pki.store import PkiStore
from edge_agent.enroll import EnrollRequest, enroll
from edge_agent.errors import ConfigError, TransportError

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_take_refills_at_the_rate_up_to_the_burst() -> None:
    bucket = Bucket(tokens=1.0, at=0.0)
    after, wait = take(bucket, 0.0, rate=0.5, burst=3.0)
    assert (after, wait) == (Bucket(0.0, 0.0), 0.0)
    after, wait = take(after, 1.0, rate=0.5, burst=3.0)  # 0.5 tokens: half a token short
    assert (after, wait) == (Bucket(0.5, 1.0), 1.0)
    assert take(after, 100.0, rate=0.5, burst=3.0) == (Bucket(2.0, 100.0), 0.0)  # refilled to 3, one taken
    assert take(Bucket(2.0, 10.0), 5.0, rate=1.0, burst=3.0) == (Bucket(1.0, 10.0), 0.0)  # clock back: no refill


def test_charge_can_go_into_debt_down_to_minus_the_burst() -> None:
    assert charge(Bucket(2.0, 0.0), 0.0, rate=1.0, burst=3.0, cost=4.0) == Bucket(-2.0, 0.0)
    assert charge(Bucket(-2.0, 0.0), 0.0, rate=1.0, burst=3.0, cost=9.0) == Bucket(-3.0, 0.0)
    assert take(Bucket(-3.0, 0.0), 0.0, rate=0.5, burst=3.0)[1] == 8.0  # (1 + 3) / 0.5


def test_a_client_gets_its_burst_then_waits_and_refused_tokens_cost_more() -> None:
    clock = Clock()
    limiter = EnrollmentLimiter(RateLimits(client_rate=0.5, client_burst=2, failure_cost=2), clock=clock)
    assert limiter.admit("10.0.0.1") is None and limiter.admit("10.0.0.1") is None
    assert limiter.admit("10.0.0.1") == 2  # one token at 0.5/s
    assert limiter.admit("10.0.0.2") is None  # another address has its own bucket
    clock.now += 2
    assert limiter.admit("10.0.0.1") is None
    limiter.failed("10.0.0.1")  # a refused token costs 2 in all: 0 - 1 = -1
    assert limiter.admit("10.0.0.1") == 4  # (1 + 1) / 0.5
    clock.now += 3.5
    assert limiter.admit("10.0.0.1") == 1  # half a second short: Retry-After is rounded up, never 0
    clock.now += 0.5
    assert limiter.admit("10.0.0.1") is None
    for _ in range(3):
        limiter.failed("10.0.0.1")  # -1, -2, then no deeper than -burst
    assert limiter.admit("10.0.0.1") == 6  # (1 + 2) / 0.5


def test_the_global_bucket_limits_all_clients_and_a_refusal_costs_nobody() -> None:
    clock = Clock()
    limits = RateLimits(client_rate=1, client_burst=5, global_rate=2, global_burst=3)
    limiter = EnrollmentLimiter(limits, clock=clock)
    assert [limiter.admit(f"10.0.0.{i}") for i in range(4)] == [None, None, None, 1]
    clock.now += 0.5  # one global token back
    assert limiter.admit("10.0.0.9") is None
    # the refused client kept its own tokens: five in a row once the global bucket allows
    clock.now += 10
    assert [limiter.admit("10.0.0.3") for _ in range(3)] == [None, None, None]


def test_the_per_client_table_is_bounded() -> None:
    clock = Clock()
    limiter = EnrollmentLimiter(RateLimits(client_rate=0.01, client_burst=1, max_clients=2), clock=clock)
    assert limiter.admit("a") is None and limiter.admit("a") == 100
    assert limiter.admit("b") is None and limiter.admit("c") is None  # "a" is the least recently used: dropped
    assert limiter.admit("a") is None


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"client_rate": 0}, "--client-rate"),
        ({"global_rate": float("inf")}, "--global-rate"),
        ({"client_burst": 0.5}, "--client-burst"),
        ({"global_burst": -1}, "--global-burst"),
        ({"failure_cost": 0.5}, "--failed-token-cost"),
    ],
)
def test_bad_limits_name_the_flag(fields: dict[str, float], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RateLimits(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    store = PkiStore(tmp_path_factory.mktemp("ratelimit") / "pki")
    store.init("rate limit CA", 30)
    store.issue_server(["127.0.0.1"], 30)
    return store


def _post(url: str, ca: Path, body: dict[str, str]) -> tuple[int, dict[str, str], dict[str, object]]:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_the_endpoint_answers_429_with_retry_after_and_keeps_the_token(pki: PkiStore, tmp_path: Path) -> None:
    clock = Clock()
    limits = RateLimits(client_rate=0.1, client_burst=2, failure_cost=5)
    config = EnrollmentConfig(
        host="127.0.0.1",
        port=0,
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        password_file=tmp_path / "passwords",
        limits=limits,
    )
    token = pki.issue_token("dev-limited", 3600)
    with EnrollmentServer(pki, config, clock=clock) as server:
        status, _, body = _post(server.url, pki.ca_cert, {"token": "guess-1", "credential": "password"})
        assert status == 403 and "token refused" in str(body["error"])  # admitted (1 left), then 1 - 4 -> -2 (floor)
        status, headers, body = _post(server.url, pki.ca_cert, {"token": token, "credential": "password"})
        assert status == 429 and headers["Retry-After"] == "30" and "retry after 30 s" in str(body["error"])
        # the real client waits Retry-After (here: advances the server's clock) and enrolls with the same token
        waits: list[float] = []

        def wait(seconds: float) -> None:
            waits.append(seconds)
            clock.now += seconds

        request = EnrollRequest(
            url=server.url, token=token, ca_file=pki.ca_cert, out_dir=tmp_path / "creds", credential="certificate"
        )
        result = enroll(request, sleep=wait)
        assert waits == [30.0] and result.device_id == "dev-limited"
        assert (tmp_path / "creds" / "device.crt").is_file()
        # a client that will not wait that long is told when to come back; nothing was used up
        other = pki.issue_token("dev-patient", 3600)
        impatient = EnrollRequest(
            url=server.url, token=other, ca_file=pki.ca_cert, out_dir=tmp_path / "o", max_retry_wait_s=5
        )
        with pytest.raises(TransportError, match=r"rate limiting .*try again in 10 s"):
            enroll(impatient, sleep=wait)
        assert waits == [30.0]
        pending = [r for r in pki.tokens().records().values() if r.device_id == "dev-patient"]
        assert len(pending) == 1 and pending[0].used_at is None
