"""The ``[policy]`` table of the agent's config: when this device may train, download and upload.

Parsed once at the entry point by :func:`parse_policy` into a frozen :class:`Policy`; the decision
itself is :func:`edge_agent.device.eligibility.decide`. Schema (every key optional)::

    [policy]
    require_charging = false        # never run on battery power
    min_battery_percent = 50        # on battery: eligible when charging OR battery >= this
    max_temperature_c = 70          # hottest thermal zone
    max_cpu_load = 0.2              # idle check before *starting* to train (0..1); omit: no check
    min_free_memory_mb = 128        # left to the rest of the device on top of the model's working set
    min_free_disk_mb = 256          # free space on the state directory's filesystem
    windows = ["23:00-06:00"]       # local time, [start, end), may cross midnight; [] = any time
    windows_for = ["train"]         # phases the windows apply to
    unmetered_for = ["download", "upload"]        # phases that need an unmetered network
    require_network_for = ["download", "upload"]  # phases that need a link

    [policy.unknown]                # an unknown reading counts as passing ("allow") or failing ("deny")
    battery = "allow"               # keys: battery charging cpu_load temperature memory disk metered network

    [policy.budget]                 # participations per sliding window, chosen by device class
    default = { rounds = 3, per = "week" }    # per: "day" | "week" | "month" (30 days) | seconds
    camera = { rounds = 1, per = "month" }
    gateway = "unlimited"

    [policy.load]
    threads = 2                     # onnxruntime intra-op threads; omit: half the cores, at least 1
    cpu_share = 0.5                 # fraction of wall time spent computing, 0 < share <= 1

Phase names in ``*_for`` lists are ``train`` (which also covers ``continue``, the re-check at every
step boundary), ``download`` and ``upload``. MB are 2**20 bytes.

The defaults let a mains-powered Raspberry Pi on ethernet train with no config at all, yet keep a
battery device from draining itself or spending mobile data:

* power: charging, or battery >= 50 %; an unknown battery is allowed (no battery = mains) but an
  unknown charging state is denied, because it only matters when the battery alone does not qualify,
  i.e. when it is known to be low;
* 70 °C: below the 80-85 °C where SoCs such as the Pi's throttle themselves;
* no idle check: gateways and kiosks are never idle; ``load.threads`` (half the cores) and
  ``load.cpu_share`` already bound what training takes from them;
* transfers need an unmetered network (cellular is assumed metered); training itself does not;
* unknown memory is denied (an over-committed device invokes the OOM killer, which may pick another
  process); every other unknown is allowed, since containers and plain Linux boxes lack those sensors;
* no windows and no budget: any time, as often as the server asks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, TypeVar

from edge_agent.errors import ConfigError

#: Phases a policy names in ``windows_for``, ``unmetered_for`` and ``require_network_for``.
POLICY_PHASES = ("train", "download", "upload")
#: Readings whose unknown (``None``) value ``[policy.unknown]`` treats.
UNKNOWN_SENSORS = ("battery", "charging", "cpu_load", "temperature", "memory", "disk", "metered", "network")
#: Named budget periods, in seconds ("month" is 30 days).
PERIODS: Mapping[str, float] = {"day": 86_400.0, "week": 604_800.0, "month": 2_592_000.0}
#: Bytes in the policy's MB.
MB = 1 << 20

Treatment = Literal["allow", "deny"]

_TRANSFERS = frozenset({"download", "upload"})
_TRAIN = frozenset({"train"})
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
_T = TypeVar("_T")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _phase_set(name: str, value: object) -> frozenset[str]:
    if isinstance(value, AbstractSet | list | tuple) and all(p in POLICY_PHASES for p in value):
        return frozenset(str(p) for p in value)
    raise ConfigError(f"{name}: expected a subset of {list(POLICY_PHASES)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Window:
    """A daily local-time window ``[start, end)`` in minutes after midnight; crosses midnight when end < start."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _require(_is_int(self.start) and 0 <= self.start < 1440, "start", "minutes 0..1439", self.start)
        ok = _is_int(self.end) and 0 <= self.end <= 1440 and self.end != self.start
        _require(ok, "end", "minutes 0..1440 other than start", self.end)

    @classmethod
    def parse(cls, text: object) -> Window:
        """``"HH:MM-HH:MM"`` (24 h; the end may be ``24:00``). Raises :class:`ConfigError`."""
        match = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
        h1, m1, h2, m2 = (int(g) for g in match.groups()) if match else (-1, -1, -1, -1)
        valid = 0 <= h1 <= 23 and 0 <= m1 <= 59 and ((0 <= h2 <= 23 and 0 <= m2 <= 59) or (h2, m2) == (24, 0))
        _require(valid, "window", "'HH:MM-HH:MM' (24 h local time)", text)
        start, end = h1 * 60 + m1, h2 * 60 + m2
        _require(start != end, "window", "a non-empty window ('00:00-24:00' is all day)", text)
        return cls(start=start, end=end)

    def contains(self, seconds_of_day: float) -> bool:
        lo, hi = self.start * 60, self.end * 60
        return lo <= seconds_of_day < hi if lo < hi else (seconds_of_day >= lo or seconds_of_day < hi)

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True, kw_only=True)
class Unknowns:
    """How an unknown reading is treated: ``"allow"`` counts it as passing, ``"deny"`` as failing."""

    battery: Treatment = "allow"
    charging: Treatment = "deny"
    cpu_load: Treatment = "allow"
    temperature: Treatment = "allow"
    memory: Treatment = "deny"
    disk: Treatment = "allow"
    metered: Treatment = "allow"
    network: Treatment = "allow"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _require(value in ("allow", "deny"), f.name, "'allow' or 'deny'", value)

    def allows(self, sensor: str) -> bool:
        return bool(getattr(self, sensor) == "allow")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """At most ``rounds`` participations in any sliding window of length ``per``."""

    rounds: int
    #: "day", "week", "month" (30 days) or a number of seconds
    per: str | float = "week"

    def __post_init__(self) -> None:
        _require(_is_int(self.rounds) and self.rounds >= 0, "rounds", "an integer >= 0", self.rounds)
        ok = self.per in PERIODS if isinstance(self.per, str) else _is_number(self.per) and self.per > 0
        _require(ok, "per", f"one of {list(PERIODS)} or a positive number of seconds", self.per)

    @property
    def period_s(self) -> float:
        return PERIODS[self.per] if isinstance(self.per, str) else float(self.per)


@dataclass(frozen=True, kw_only=True)
class LoadLimits:
    """How hard the agent may work while training."""

    #: onnxruntime intra-op threads; ``None``: half the cores, at least 1 (see ``load.ort_threads``)
    threads: int | None = None
    #: fraction of wall time spent computing, 0 < share <= 1 (see ``load.throttle_sleep``)
    cpu_share: float = 1.0

    def __post_init__(self) -> None:
        ok = self.threads is None or (_is_int(self.threads) and self.threads >= 1)
        _require(ok, "threads", "an integer >= 1", self.threads)
        ok = _is_number(self.cpu_share) and 0 < self.cpu_share <= 1
        _require(ok, "cpu_share", "a number 0 < share <= 1", self.cpu_share)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What :func:`~edge_agent.device.eligibility.decide` checks; the module docstring has the defaults' reasons."""

    require_charging: bool = False
    min_battery_percent: float = 50.0
    max_temperature_c: float = 70.0
    max_cpu_load: float | None = None
    min_free_memory_mb: float = 128
    min_free_disk_mb: float = 256
    windows: tuple[Window, ...] = ()
    windows_for: AbstractSet[str] = _TRAIN
    unmetered_for: AbstractSet[str] = _TRANSFERS
    require_network_for: AbstractSet[str] = _TRANSFERS
    unknown: Unknowns = field(default_factory=Unknowns)
    #: this device class's budget, ``None`` = unlimited
    budget: Budget | None = None
    load: LoadLimits = field(default_factory=LoadLimits)

    def __post_init__(self) -> None:
        _require(isinstance(self.require_charging, bool), "require_charging", "true or false", self.require_charging)
        self._number("min_battery_percent", 0, 100)
        self._number("max_temperature_c", 0, 150)
        if self.max_cpu_load is not None:
            ok = _is_number(self.max_cpu_load) and 0 < self.max_cpu_load <= 1
            _require(ok, "max_cpu_load", "a number 0 < load <= 1", self.max_cpu_load)
        self._number("min_free_memory_mb", 0, math.inf)
        self._number("min_free_disk_mb", 0, math.inf)
        ok = isinstance(self.windows, tuple | list) and all(isinstance(w, Window) for w in self.windows)
        _require(ok, "windows", "a list of windows", self.windows)
        object.__setattr__(self, "windows", tuple(self.windows))
        for name in ("windows_for", "unmetered_for", "require_network_for"):
            object.__setattr__(self, name, _phase_set(name, getattr(self, name)))
        _require(isinstance(self.unknown, Unknowns), "unknown", "Unknowns", self.unknown)
        _require(self.budget is None or isinstance(self.budget, Budget), "budget", "a Budget or None", self.budget)
        _require(isinstance(self.load, LoadLimits), "load", "LoadLimits", self.load)

    def _number(self, name: str, lo: float, hi: float) -> None:
        value = getattr(self, name)
        expected = f"a number {lo:g}..{hi:g}" if math.isfinite(hi) else f"a number >= {lo:g}"
        _require(_is_number(value) and lo <= value <= hi, name, expected, value)


def parse_policy(table: Mapping[str, Any], *, device_class: str = "default") -> Policy:
    """The ``[policy]`` table (``{}`` when absent) as a :class:`Policy`.

    ``device_class`` picks this device's entry of ``[policy.budget]``, falling back to ``default``;
    no entry means unlimited. Every entry is validated, whichever class is picked. Raises
    :class:`ConfigError` naming the key path (``policy.unknown.battery: expected ...``).
    """
    if not (isinstance(device_class, str) and device_class):
        raise ConfigError(f"device class: expected a non-empty string, got {device_class!r}")
    converters: dict[str, Callable[[Any, str], Any]] = {
        "windows": _windows,
        "windows_for": _string_list,
        "unmetered_for": _string_list,
        "require_network_for": _string_list,
        "unknown": lambda value, path: _build(Unknowns, value, path),
        "budget": lambda value, path: _budget_for(device_class, value, path),
        "load": lambda value, path: _build(LoadLimits, value, path),
    }
    return _build(Policy, table, "policy", converters)


def _build(
    cls: type[_T], value: object, path: str, converters: Mapping[str, Callable[[Any, str], Any]] | None = None
) -> _T:
    """``cls(**value)`` for a TOML table, with unknown, missing and invalid keys reported by path."""
    table = dict(_table(value, path))
    names = fields(cls)  # type: ignore[arg-type]  # cls is always a dataclass here
    allowed = {f.name for f in names}
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key (expected one of {', '.join(sorted(allowed))})")
    for f in names:
        if f.name not in table and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path}.{f.name}: missing")
    for key, convert in (converters or {}).items():
        if key in table:
            table[key] = convert(table[key], f"{path}.{key}")
    try:
        return cls(**table)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc.reason}") from None


def _table(value: object, path: str) -> Mapping[str, Any]:
    _require(isinstance(value, Mapping), path, "a table", value)
    return value  # type: ignore[return-value]  # checked just above


def _string_list(value: object, path: str) -> list[str]:
    ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    _require(ok, path, "a list of strings", value)
    return value  # type: ignore[return-value]  # checked just above


def _windows(value: object, path: str) -> tuple[Window, ...]:
    windows = []
    for i, text in enumerate(_string_list(value, path)):
        try:
            windows.append(Window.parse(text))
        except ConfigError as exc:
            raise ConfigError(f"{path}[{i}]: {exc.reason.removeprefix('window: ')}") from None
    return tuple(windows)


def _budget_for(device_class: str, value: object, path: str) -> Budget | None:
    budgets: dict[str, Budget | None] = {}
    for name, entry in _table(value, path).items():
        if entry == "unlimited":
            budgets[name] = None
        elif isinstance(entry, Mapping):
            budgets[name] = _build(Budget, entry, f"{path}.{name}")
        else:
            raise ConfigError(f"{path}.{name}: expected {{rounds = N, per = ...}} or 'unlimited', got {entry!r}")
    return budgets[device_class] if device_class in budgets else budgets.get("default")


#: A complete policy for a phone-like device (parsed by the tests, quoted in the docs).
POLICY_EXAMPLE = """\
[policy]
# The battery is the owner's: train only on the charger ...
require_charging = true
# ... (min_battery_percent applies only on battery power, so it is moot here)
# Phones run warm; back off well before the SoC throttles and the owner notices.
max_temperature_c = 45
# Start only when the phone is idle (CPU busy < 15 %); training in progress is not re-checked.
max_cpu_load = 0.15
# Leave the foreground apps room, and never fill the disk.
min_free_memory_mb = 512
min_free_disk_mb = 1024
# At night, local time (crosses midnight); downloads too, uploads whenever the result is ready.
windows = ["23:00-06:00"]
windows_for = ["train", "download"]
# Never spend mobile data, not even on starting a round whose upload would need it.
unmetered_for = ["train", "download", "upload"]
require_network_for = ["download", "upload"]

[policy.unknown]
# A phone knows all of these; if one cannot be read, something is off: do not train.
battery = "deny"
charging = "deny"
cpu_load = "deny"
temperature = "deny"
memory = "deny"
disk = "deny"
metered = "deny"
network = "deny"

[policy.budget]
# Participations per sliding window; the device's class picks the line, else "default".
default = { rounds = 3, per = "week" }
camera = { rounds = 1, per = "month" }

[policy.load]
# Two onnxruntime threads, computing at most half of the wall time.
threads = 2
cpu_share = 0.5
"""
