"""Reconnect backoff: full jitter, the legacy added jitter, none; the [mqtt] reconnect keys."""

from __future__ import annotations

import random

import pytest

from edge_agent.errors import ConfigError
from edge_agent.transport.backoff import (
    Backoff,
    ReconnectSettings,
    backoff_delay,
    full_jitter_delay,
    parse_reconnect_table,
)
from edge_agent.transport.mqtt_config import MqttConfig


def test_full_jitter_stays_inside_the_doubling_window_and_fills_it() -> None:
    rng = random.Random(1)
    for attempt, window in enumerate([1.0, 2.0, 4.0, 8.0, 8.0]):
        delays = [full_jitter_delay(attempt, min_delay=1.0, max_delay=8.0, rng=rng) for _ in range(2000)]
        assert min(delays) >= 0.0 and max(delays) <= window
        assert min(delays) < 0.05 * window and max(delays) > 0.95 * window  # spread over the whole window
        assert abs(sum(delays) / len(delays) - window / 2) < 0.05 * window


def test_no_jitter_is_plain_capped_doubling_and_identical_across_devices() -> None:
    delays = {
        backoff_delay("none", 3, min_delay=1.0, max_delay=60.0, jitter=1.0, rng=random.Random(d)) for d in range(50)
    }
    assert delays == {8.0}
    assert backoff_delay("none", 40, min_delay=1.0, max_delay=60.0, jitter=1.0, rng=random.Random(0)) == 60.0


def test_backoff_resets_after_a_connect_and_defaults_to_full_jitter() -> None:
    config = MqttConfig(host="h", client_id="c", reconnect_min_delay=1.0, reconnect_max_delay=4.0)
    assert config.reconnect_jitter_mode == "full"
    backoff = Backoff(config, random.Random(3))
    first = [backoff.next_delay() for _ in range(4)]
    assert backoff.attempt == 4 and all(0 <= d <= w for d, w in zip(first, [1, 2, 4, 4], strict=True))
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 1.0
    replay = Backoff(config, random.Random(3))
    assert [replay.next_delay() for _ in range(4)] == first  # injected randomness: reproducible


def test_reconnect_table_is_parsed_and_feeds_mqtt_config() -> None:
    settings = parse_reconnect_table({"reconnect_min_s": 2, "reconnect_max_s": 30, "reconnect_jitter": "added"})
    assert settings == ReconnectSettings(min_s=2.0, max_s=30.0, jitter="added")
    config = MqttConfig(host="h", client_id="c", **settings.config_fields())
    assert (config.reconnect_min_delay, config.reconnect_max_delay, config.reconnect_jitter_mode) == (
        2.0,
        30.0,
        "added",
    )
    assert parse_reconnect_table({}) == ReconnectSettings()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"reconnect_min_s": 0}, "mqtt.reconnect_min_s"),
        ({"reconnect_max_s": "1m"}, "mqtt.reconnect_max_s"),
        ({"reconnect_jitter": "some"}, "mqtt.reconnect_jitter"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 5}, "mqtt.reconnect_min_s"),
    ],
)
def test_bad_reconnect_keys_are_config_errors_naming_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_reconnect_table(table)


def test_mqtt_config_refuses_an_unknown_jitter_mode() -> None:
    with pytest.raises(ConfigError, match="jitter mode"):
        MqttConfig(host="h", client_id="c", reconnect_jitter_mode="random")
