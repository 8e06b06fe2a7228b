"""Robust and trust settings, the round state's buffer and weights, and the broker flags (no server).

The server-level behaviour (attacks, quarantine, the buffer cap) is in test_server_robust.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.aggregate import WeightedMean
from broker_server.robust import Flattener, Observation, TrustConfig, UpdateBuffer
from broker_server.robust_config import RobustSettings
from broker_server.rounds import RoundState
from broker_server.safeguards import Quarantined, Safeguards
from broker_server.server import ServerConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError, ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage
from fedflock.broker_cli import robust_table, server_config, trust_table
from fedflock.cli import build_parser

SPECS = tuple(
    TensorSpec(name=name, shape=shape, dtype="float32", role="parameter", trainable=True, aggregate=True)
    for name, shape in (("w", (2, 3)), ("b", (3,)))
)


def update(device: str, task: str, value: float, *, n: int = 10) -> UpdateMessage:
    tensors = {s.name: np.full(s.shape, value, np.float32) for s in SPECS}
    payload = encode_update(tensors, CodecSpec("fp32"), rng=np.random.default_rng(0))
    return UpdateMessage(device_id=device, round=1, task_id=task, model_version=0, num_examples=n, payload=payload)


def config(**kw: object) -> ServerConfig:
    return ServerConfig(**{"clients_per_round": 10, **kw})  # type: ignore[arg-type]


def test_a_full_buffer_refuses_an_update_as_a_contract_violation_and_changes_nothing() -> None:
    state = RoundState(round=1, model_version=0, tasks={"t1": "a", "t2": "b"}, specs=SPECS)
    state.buffer = UpdateBuffer(Flattener.from_specs(SPECS), rows=1)
    assert state.accept_update(update("a", "t1", 1.0))
    with pytest.raises(ContractViolation, match="update buffer full"):
        state.accept_update(update("b", "t2", 2.0))
    assert state.accepted == {"t1"} and state.order == ["a"] and state.num_examples == 10
    assert len(state.buffer) == 1 and state.mean.count == 1  # the mean is the store's checkpoint


def test_a_quarantined_device_is_refused_and_a_zero_trust_weight_never_folded() -> None:
    guard = Safeguards(None, TrustConfig(quarantine_after=1), SPECS)
    assert guard.reputation is not None
    guard.reputation.update(1, {"a": _far(), **{f"h{i}": _near() for i in range(5)}})
    assert guard.excluded(["a", "h0"]) == {"a": guard.reputation.status("a").reason}
    with pytest.raises(Quarantined, match=r"^quarantined: ") as caught:
        guard.admit("a")
    assert caught.value.code == "quarantined"
    guard.admit("h0")
    state = RoundState(round=1, model_version=0, tasks={"t1": "a"}, specs=SPECS, multipliers={"a": 0.0})
    with pytest.raises(ContractViolation, match="trust weight 0"):
        state.accept_update(update("a", "t1", 1.0))
    assert state.mean.count == 0 and not state.accepted


def _far() -> Observation:
    return Observation(distance=100.0, cosine=-1.0)


def _near() -> Observation:
    return Observation(distance=1.0, cosine=0.9)


def test_trust_weights_updates_by_reputation_in_plain_fedavg() -> None:
    """Without a robust rule trust still measures (unclipped) and weights by num_examples × multiplier."""
    state = RoundState(round=1, model_version=0, tasks={"t1": "a", "t2": "b"}, specs=SPECS)
    guard = Safeguards(None, TrustConfig(), SPECS)
    guard.prepare(state)
    assert state.multipliers == {"a": 0.5, "b": 0.5}  # new devices start at initial_score
    state.multipliers = {"a": 1.0, "b": 0.25}
    assert state.accept_update(update("a", "t1", 1.0)) and state.accept_update(update("b", "t2", 1000.0))
    delta, report = guard.aggregate(state)
    assert report is None and state.num_examples == 20 and state.order == ["a", "b"]
    np.testing.assert_allclose(delta["b"], (10 * 1.0 + 2.5 * 1000.0) / 12.5, rtol=1e-6)  # unclipped


def test_a_restored_streaming_round_keeps_its_sums_and_clips_what_arrives_next() -> None:
    sums = {s.name: np.full(s.shape, 30.0) for s in SPECS}  # three updates of 1.0, weight 10 each
    restored = WeightedMean.restore(sums, total_weight=30.0, count=3)
    state = RoundState(round=1, model_version=0, tasks={"t4": "d4"}, specs=SPECS, mean=restored)
    assert state.num_examples == 30
    Safeguards(RobustSettings.parse({"rule": "clip", "clip": 1.0}), None, SPECS).prepare(state)
    assert state.accept_update(update("d4", "t4", 1e3))
    d = 2 * 3 + 3
    assert state.mean.count == 4 and state.mean.total_weight == 40.0 and state.num_examples == 40
    np.testing.assert_allclose(state.mean.result()["b"], (30.0 + 10 * 1e3 / (1e3 * np.sqrt(d))) / 40, rtol=1e-5)


# -- configuration and flags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"robust": {"rule": "mean"}}, "'rule' must be one of median, trimmed_mean, krum, clip"),
        ({"robust": {"rule": "median", "beta": 0.1}}, "unknown key 'beta' for rule 'median'"),
        ({"robust": {"rule": "krum"}}, "rule 'krum' needs 'f'"),
        ({"robust": {"rule": "clip"}}, "rule 'clip' needs 'clip'"),
        ({"robust": {"rule": "clip", "clip": -1}}, "clip must be a positive number"),
        ({"robust": {"rule": "trimmed_mean", "beta": 0.6}}, "beta must be in"),
        ({"robust": {"rule": "median", "max_buffer_mb": 0}}, "max_buffer_mb must be a positive number"),
        ({"robust": {"rule": "median", "dtype": "int8"}}, "dtype must be one of"),
        ({"robust": {"rule": "krum", "f": 4}}, "krum f=4 m=1 needs at least 11 updates per round; clients_per_round"),
        ({"trust": {"quarantine_afterr": 2}}, "trust: unknown key 'quarantine_afterr'"),
        ({"trust": {"alpha": 2.0}}, "trust: alpha must be in"),
    ],
)
def test_bad_robust_and_trust_tables_are_config_errors_naming_the_key(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config(**kw)


def test_min_updates_per_rule() -> None:
    cases = {"median": 3, "trimmed_mean": 10, "clip": 1}
    for rule, n in cases.items():
        table = {"rule": rule, "clip": 1.0} if rule == "clip" else {"rule": rule}
        assert RobustSettings.parse(table).min_updates == n  # type: ignore[union-attr]
    assert RobustSettings.parse({"rule": "trimmed_mean", "beta": 0.3}).min_updates == 4  # type: ignore[union-attr]
    assert RobustSettings.parse({"rule": "krum", "f": 2, "m": 9}).min_updates == 9  # type: ignore[union-attr]
    assert RobustSettings.parse({}) is None


def test_broker_flags_build_the_robust_and_trust_tables() -> None:
    def parsed(*flags: str) -> ServerConfig:
        return server_config(build_parser().parse_args(["broker", "--bundle", "b", *flags]))

    assert parsed("--robust", "krum:2", "--trust").robust == {"rule": "krum", "f": 2}
    assert parsed("--robust", "krum:2", "--trust").trust == {}
    assert parsed().robust == {} and parsed().trust is None
    config_ = parsed(
        "--robust", "trimmed_mean:0.1", "--robust-option", "max_buffer_mb=64", "--robust-option", "dtype=float16"
    )
    assert config_.robust == {"rule": "trimmed_mean", "beta": 0.1, "max_buffer_mb": 64, "dtype": "float16"}
    settings = config_.robust_settings()
    assert settings is not None and settings.buffer.dtype == "float16" and settings.buffer.max_bytes == 64 * 2**20
    assert parsed("--robust", "clip:1.0").robust_settings() == RobustSettings(rule="clip", clip=1.0)
    assert robust_table("median", []) == {"rule": "median"}
    assert trust_table(True, ["quarantine_after=5"]) == {"quarantine_after": 5}
    assert parsed("--trust", "--trust-option", "quarantine_after=5").trust_config().quarantine_after == 5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--robust", "median:3"], "--robust median takes no value"),
        (["--robust", "krum:x"], "f must be an int"),
        (["--robust", "krum"], "needs 'f'"),
        (["--robust-option", "m=2"], "--robust-option needs --robust"),
        (["--robust", "krum:2", "--robust-option", "f=3"], "--robust-option f is given twice"),
        (["--trust-option", "alpha=0.5"], "--trust-option needs --trust"),
        (["--trust", "--trust-option", "alpha"], "KEY=VALUE"),
    ],
)
def test_bad_robust_and_trust_flags_are_config_errors(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        server_config(build_parser().parse_args(["broker", "--bundle", "b", *flags]))
