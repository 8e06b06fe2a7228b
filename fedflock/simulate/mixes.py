"""Fleet mixes: which device profiles a simulated fleet holds, in what shares; drawn by seed.

A mix is a table (named mixes below, or a TOML file given to ``--profile FILE.toml``)::

    name = "my-fleet"
    alpha = 0.5                      # Dirichlet alpha of the digits split (small: non-IID)
    horizon_days = 2                 # simulated days the outage schedule covers

    [profiles.phone]
    share = 0.7                      # fraction of the fleet (shares are normalised)
    device_class = "phone"
    mains = false                    # true: no battery, always powered
    start_percent = [20, 100]        # a number, or [low, high] drawn per device
    drain_per_hour = [3, 8]          # % per hour off the charger
    charge_per_hour = 40             # % per hour on it
    charge_windows = ["22:00-07:00"] # daily, local time
    charge_shift_h = 2               # each device's windows shift by uniform(-2, 2) hours
    network = "wifi"                 # ethernet | wifi | cellular
    away = "cellular"                # the link inside away_windows
    away_windows = ["08:00-18:00"]
    outages_per_day = 1              # no link at all, at random times ...
    outage_minutes = 30              # ... for this long
    base_c = 33                      # temperature; daily_swing_c, charging_c
    memory_mb = [1024, 4096]
    compute_factor = [1, 4]          # >= 1: times slower than this host
    dropout = 0.05                   # drops off mid-task with this probability ...
    dropout_hold_s = 10              # ... for this many real seconds
    [profiles.phone.policy]          # the agent's [policy] table (edge_agent.device.policy)
    min_battery_percent = 50

Every error is a :class:`ConfigError` naming the key (``profiles.phone.dropout: ...``). Drawing
(:func:`draw_fleet`) is pure: the same mix, size and seed give the same fleet.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.device.policy import Policy, Window, parse_policy
from edge_agent.errors import ConfigError
from fedflock.simulate.profiles import DAY_S, Battery, DeviceProfile, HourWindow, Network, Thermal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["MIXES", "Mix", "ProfileSpec", "SimDeviceSpec", "draw_fleet", "load_mix", "parse_mix"]

Range = tuple[float, float]
_PROFILE_KEYS = {
    "share": 1.0,
    "device_class": "default",
    "mains": False,
    "start_percent": (20.0, 100.0),
    "drain_per_hour": 5.0,
    "charge_per_hour": 40.0,
    "charge_windows": ("22:00-07:00",),
    "charge_shift_h": 0.0,
    "network": "wifi",
    "metered": False,
    "away": "cellular",
    "away_windows": (),
    "outages_per_day": 0.0,
    "outage_minutes": 30.0,
    "base_c": 35.0,
    "daily_swing_c": 0.0,
    "charging_c": 0.0,
    "memory_mb": 2048.0,
    "compute_factor": 1.0,
    "dropout": 0.0,
    "dropout_hold_s": 10.0,
    "policy": {},
}
_RANGED = {
    "start_percent",
    "drain_per_hour",
    "charge_per_hour",
    "charge_shift_h",
    "base_c",
    "memory_mb",
    "compute_factor",
    "dropout",
}


@dataclass(frozen=True, kw_only=True)
class ProfileSpec:
    """One ``[profiles.NAME]`` table, validated: fixed values and ``(low, high)`` ranges."""

    name: str
    values: Mapping[str, Any]
    policy: Policy

    @property
    def share(self) -> float:
        return float(self.values["share"])


@dataclass(frozen=True, kw_only=True)
class Mix:
    name: str
    alpha: float = 0.5
    horizon_days: float = 2.0
    profiles: tuple[ProfileSpec, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SimDeviceSpec:
    """One drawn device: its id, profile name, sensor models and agent policy."""

    index: int
    device_id: str
    profile_name: str
    profile: DeviceProfile
    policy: Policy = field(default_factory=Policy)


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _range(value: object, key: str) -> Range:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ConfigError(f"{key}: expected a number or [low, high], got {value!r}")
        low, high = _number(value[0], key), _number(value[1], key)
        if low > high:
            raise ConfigError(f"{key}: low {low:g} > high {high:g}")
        return low, high
    number = _number(value, key)
    return number, number


def _windows(value: object, key: str) -> tuple[HourWindow, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list of 'HH:MM-HH:MM' windows, got {value!r}")
    windows = []
    for text in value:
        try:
            window = Window.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc.reason}") from exc
        windows.append((window.start / 60.0, window.end / 60.0))
    return tuple(windows)


def _profile(name: str, table: object, prefix: str) -> ProfileSpec:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {table!r}")
    unknown = sorted(set(table) - set(_PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (expected some of {', '.join(_PROFILE_KEYS)})")
    values: dict[str, Any] = {}
    for key, default in _PROFILE_KEYS.items():
        raw, path = table.get(key, default), f"{prefix}.{key}"
        if key in _RANGED:
            values[key] = _range(raw, path)
        elif key in ("charge_windows", "away_windows"):
            values[key] = _windows(raw, path)
        elif isinstance(default, bool):
            if not isinstance(raw, bool):
                raise ConfigError(f"{path}: expected true or false, got {raw!r}")
            values[key] = raw
        elif isinstance(default, str):
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"{path}: expected a non-empty string, got {raw!r}")
            values[key] = raw
        elif key != "policy":
            values[key] = _number(raw, path)
    if values["share"] < 0:
        raise ConfigError(f"{prefix}.share: expected a number >= 0")
    policy_table = table.get("policy", {})
    if not isinstance(policy_table, Mapping):
        raise ConfigError(f"{prefix}.policy: expected a table")
    try:
        policy = parse_policy(policy_table, device_class=values["device_class"])
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc.reason}") from exc
    spec = ProfileSpec(name=name, values=values, policy=policy)
    _build(spec, random.Random(0), 0, 1.0)  # the models' own checks, with a key path
    return spec


def parse_mix(table: Mapping[str, Any], *, default_name: str = "custom") -> Mix:
    """A mix from a parsed TOML document; :class:`ConfigError` naming the key on any problem."""
    unknown = sorted(set(table) - {"name", "alpha", "horizon_days", "profiles"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (expected name, alpha, horizon_days, profiles)")
    name = table.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    alpha = _number(table.get("alpha", 0.5), "alpha")
    horizon = _number(table.get("horizon_days", 2.0), "horizon_days")
    if alpha <= 0 or horizon <= 0:
        raise ConfigError("alpha and horizon_days must be > 0")
    profiles = table.get("profiles")
    if not isinstance(profiles, Mapping) or not profiles:
        raise ConfigError("profiles: expected at least one [profiles.NAME] table")
    specs = tuple(_profile(str(key), value, f"profiles.{key}") for key, value in profiles.items())
    if sum(s.share for s in specs) <= 0:
        raise ConfigError("profiles: the shares add up to 0")
    return Mix(name=name, alpha=alpha, horizon_days=horizon, profiles=specs)


def load_mix(name_or_path: str) -> Mix:
    """A named mix (:data:`MIXES`) or a TOML file."""
    if name_or_path in MIXES:
        return parse_mix(MIXES[name_or_path], default_name=name_or_path)
    path = Path(name_or_path)
    if path.suffix != ".toml":
        raise ConfigError(f"--profile: expected one of {', '.join(MIXES)} or a .toml file, got {name_or_path!r}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read profile mix {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"profile mix {path} is not valid TOML: {exc}") from exc
    return parse_mix(table, default_name=path.stem)


def _draw(value: Range, rng: random.Random) -> float:
    low, high = value
    return low if low == high else rng.uniform(low, high)


def _shift(windows: tuple[HourWindow, ...], hours: float) -> tuple[HourWindow, ...]:
    return tuple(((s + hours) % 24.0, (e + hours) % 24.0 or 24.0) for s, e in windows)


def _outages(
    rate_per_day: float, minutes: float, horizon_s: float, rng: random.Random
) -> tuple[tuple[float, float], ...]:
    """Poisson outage starts over the horizon (simulated seconds), each ``minutes`` long."""
    outages, t = [], 0.0
    while rate_per_day > 0:
        t += rng.expovariate(rate_per_day / DAY_S)
        if t >= horizon_s:
            break
        outages.append((t, t + minutes * 60.0))
    return tuple(outages)


def _build(spec: ProfileSpec, rng: random.Random, index: int, horizon_days: float) -> DeviceProfile:
    v = spec.values
    try:
        shift = _draw(v["charge_shift_h"], rng) if v["charge_shift_h"] != (0.0, 0.0) else 0.0
        shift = rng.uniform(-shift, shift) if shift else 0.0
        battery = Battery(
            mains=v["mains"],
            start_percent=_draw(v["start_percent"], rng),
            drain_per_hour=_draw(v["drain_per_hour"], rng),
            charge_per_hour=_draw(v["charge_per_hour"], rng),
            charge_windows=_shift(v["charge_windows"], shift),
        )
        network = Network(
            kind=v["network"],
            metered=v["metered"],
            away_kind=v["away"],
            away_windows=v["away_windows"],
            outages=_outages(v["outages_per_day"], v["outage_minutes"], horizon_days * DAY_S, rng),
        )
        thermal = Thermal(base_c=_draw(v["base_c"], rng), daily_swing_c=v["daily_swing_c"], charging_c=v["charging_c"])
        return DeviceProfile(
            kind=spec.name,
            battery=battery,
            network=network,
            thermal=thermal,
            memory_mb=_draw(v["memory_mb"], rng),
            compute_factor=_draw(v["compute_factor"], rng),
            dropout=_draw(v["dropout"], rng),
            dropout_hold_s=v["dropout_hold_s"],
            device_class=v["device_class"],
        )
    except ConfigError as exc:
        raise ConfigError(f"profiles.{spec.name}.{exc.reason}") from exc


def draw_fleet(mix: Mix, devices: int, seed: int) -> list[SimDeviceSpec]:
    """``devices`` devices, profiles assigned by share (largest remainder), parameters drawn from
    ``random.Random(seed)``: the same arguments always give the same fleet."""
    if devices < 1:
        raise ConfigError(f"--devices: expected >= 1, got {devices}")
    total = sum(p.share for p in mix.profiles)
    quotas = [p.share / total * devices for p in mix.profiles]
    counts = [math.floor(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])[: devices - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    kinds = [spec for spec, count in zip(mix.profiles, counts, strict=True) for _ in range(count)]
    rng.shuffle(kinds)
    return [
        SimDeviceSpec(
            index=i,
            device_id=f"sim-{i:05d}",
            profile_name=spec.name,
            profile=_build(spec, random.Random(rng.getrandbits(64)), i, mix.horizon_days),
            policy=spec.policy,
        )
        for i, spec in enumerate(kinds)
    ]


#: Named mixes (``--profile NAME``), in the TOML schema above.
MIXES: dict[str, dict[str, Any]] = {
    "phones": {
        "alpha": 0.3,
        "profiles": {
            "phone": {
                "device_class": "phone",
                "start_percent": [15, 100],
                "drain_per_hour": [3, 8],
                "charge_windows": ["22:00-07:00"],
                "charge_shift_h": 2,
                "away_windows": ["08:00-18:00"],
                "outages_per_day": 1,
                "outage_minutes": 20,
                "base_c": [30, 38],
                "charging_c": 6,
                "memory_mb": [1024, 4096],
                "compute_factor": [1, 3],
                "dropout": 0.05,
                "policy": {"min_battery_percent": 50},
            }
        },
    },
    "gateways": {
        "alpha": 1.0,
        "profiles": {
            "gateway": {
                "device_class": "gateway",
                "mains": True,
                "network": "ethernet",
                "base_c": [40, 55],
                "daily_swing_c": 15,
                "memory_mb": [512, 2048],
                "compute_factor": [1, 2],
                "dropout": 0.01,
            }
        },
    },
    "hospital": {
        "alpha": 0.5,
        "profiles": {
            "workstation": {
                "share": 0.7,
                "device_class": "workstation",
                "mains": True,
                "network": "ethernet",
                "memory_mb": [4096, 16384],
                "policy": {"windows": ["19:00-07:00"]},
            },
            "tablet": {
                "share": 0.3,
                "device_class": "tablet",
                "start_percent": [30, 100],
                "drain_per_hour": [8, 15],
                "charge_windows": ["12:00-13:00", "20:00-06:00"],
                "charge_shift_h": 1,
                "memory_mb": [2048, 4096],
                "compute_factor": [1, 2],
                "dropout": 0.03,
                "policy": {"require_charging": True},
            },
        },
    },
}
MIXES["mixed"] = {
    "alpha": 0.5,
    "profiles": {
        "phone": {**MIXES["phones"]["profiles"]["phone"], "share": 0.5},
        "gateway": {**MIXES["gateways"]["profiles"]["gateway"], "share": 0.3},
        "tablet": {**MIXES["hospital"]["profiles"]["tablet"], "share": 0.2},
    },
}
