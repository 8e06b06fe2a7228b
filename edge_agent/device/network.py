"""The active network: which interface carries the default route, what kind it is, whether it is
metered and whether its link is up. Paths are read under an injectable ``root``.

Active interface
    The IPv4 default route in ``/proc/net/route`` with the lowest metric (ties: first listed).
    Without one, the IPv6 default in ``/proc/net/ipv6_route`` (IPv6-only cellular). No default
    route gives kind ``"none"``; an unreadable route table gives ``"unknown"``.

Kind (first rule that matches)
    * ``wifi``: ``/sys/class/net/<if>/wireless`` or ``phy80211`` exists, or uevent ``DEVTYPE=wlan``.
    * ``cellular``: uevent ``DEVTYPE=wwan`` (usbnet modems); driver in :data:`CELLULAR_DRIVERS`;
      name prefix in :data:`CELLULAR_PREFIXES`; link type 512 (PPP) or 519 (raw IP). The choice is
      conservative: ``cdc_ether``, ``rndis_host``, ``cdc_ncm`` and ``ipheth`` also drive USB
      Ethernet dongles, Pi gadget links and phone tethering, so they count as ``ethernet``
      (mark a tethered phone metered in :class:`NetworkConfig`). PPP is assumed to be a modem,
      not DSL.
    * ``ethernet``: link type 1 (this includes bridges, VLANs and container veths).
    * ``unknown``: anything else, notably type 65534 without a cellular name or driver, which is
      a VPN (``tun0``, ``wg0``) whose underlying network cannot be seen from here.

Metered (first rule that answers)
    1. :attr:`NetworkConfig.metered`: exact interface name, then ``fnmatch`` globs in order.
    2. NetworkManager: ``nmcli -t -f GENERAL.METERED device show <if>`` when nmcli is on PATH
       (2 s timeout, cached per interface for :attr:`NetworkConfig.nmcli_cache_s`); ``unknown``,
       a failure or a timeout falls through.
    3. Cellular is metered (``True``); anything else is unknown (``None``).

Link up
    ``operstate`` ``up`` is up; ``down``, ``lowerlayerdown``, ``dormant``, ``notpresent`` are not;
    ``unknown`` (PPP, tun) defers to ``carrier``; otherwise ``None``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_agent.device.state import NetworkState
from edge_agent.errors import ConfigError

log = logging.getLogger("fedflock.device")

#: "ww" covers wwan0 and systemd's predictable names (wwp0s20u4i6)
CELLULAR_PREFIXES = ("ww", "rmnet", "ppp", "ccmni", "qmimux", "seth_lte", "v4-rmnet")
CELLULAR_DRIVERS = frozenset(
    {"qmi_wwan", "qmi_wwan_q", "cdc_mbim", "huawei_cdc_ncm", "sierra_net", "GobiNet", "mhi_net", "ipa", "t7xx", "iosm"}
)
_ARPHRD_ETHER = 1
_CELLULAR_LINK_TYPES = frozenset({512, 519})  # ARPHRD_PPP, ARPHRD_RAWIP
_LINK_DOWN_STATES = frozenset({"down", "lowerlayerdown", "dormant", "notpresent"})
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
_NMCLI_FIELD = "GENERAL.METERED"


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    #: interface name or fnmatch glob ("wwan*", "usb0") -> metered; beats NetworkManager
    metered: Mapping[str, bool] = field(default_factory=dict)
    #: ask NetworkManager (nmcli) when no override matches
    use_nmcli: bool = True
    nmcli_timeout_s: float = 2.0
    #: how long one interface's nmcli answer (or failure) is reused
    nmcli_cache_s: float = 60.0

    def __post_init__(self) -> None:
        if self.nmcli_timeout_s <= 0 or self.nmcli_cache_s < 0:
            raise ConfigError("nmcli_timeout_s must be > 0 and nmcli_cache_s >= 0")
        for pattern, value in self.metered.items():
            if not isinstance(value, bool):
                raise ConfigError(f"metered[{pattern!r}] must be true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    returncode: int
    stdout: str


class CommandRunner(Protocol):
    """Runs a command; raises ``OSError`` (``TimeoutError`` on timeout) when it cannot."""

    def __call__(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult: ...


def run_command(argv: Sequence[str], *, timeout_s: float) -> CommandResult:
    """:class:`CommandRunner` over :func:`subprocess.run`, in the C locale (untranslated output)."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{argv[0]} did not answer within {timeout_s} s") from exc
    except subprocess.SubprocessError as exc:
        raise OSError(f"{argv[0]} could not be run: {exc}") from exc
    return CommandResult(returncode=done.returncode, stdout=done.stdout)


def parse_nmcli_metered(output: str) -> bool | None:
    """``GENERAL.METERED:yes (guessed)`` -> True, ``no``/``no (guessed)`` -> False, else None."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    values = [line.partition(":")[2] for line in lines if line.partition(":")[0].strip() == _NMCLI_FIELD]
    if not values and len(lines) == 1 and ":" not in lines[0]:
        values = lines  # `-g GENERAL.METERED` style: the bare value
    words = values[0].split() if values else []
    answer = words[0].lower() if words else ""
    return {"yes": True, "no": False}.get(answer)


class NmcliMetered:
    """NetworkManager's metered flag per interface, cached (it costs a subprocess)."""

    def __init__(
        self,
        *,
        runner: CommandRunner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 2.0,
        cache_s: float = 60.0,
    ) -> None:
        self._runner = runner
        self._which = which
        self._clock = clock
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, bool | None]] = {}

    def metered(self, interface: str) -> bool | None:
        now = self._clock()
        cached = self._cache.get(interface)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        answer = self._ask(interface)
        self._cache[interface] = (now, answer)
        return answer

    def _ask(self, interface: str) -> bool | None:
        nmcli = self._which("nmcli")
        if nmcli is None:
            return None
        argv = (nmcli, "-t", "-f", _NMCLI_FIELD, "device", "show", interface)
        try:
            result = self._runner(argv, timeout_s=self._timeout_s)
        except OSError as exc:
            log.debug("nmcli failed for %s: %s", interface, exc)
            return None
        if result.returncode != 0:  # not managed by NetworkManager, or NM not running
            return None
        return parse_nmcli_metered(result.stdout)


@dataclass(frozen=True, kw_only=True)
class Route:
    interface: str
    metric: int


def parse_ipv4_routes(text: str) -> list[Route]:
    """Default routes (destination and mask 0, RTF_UP) from ``/proc/net/route``, in file order."""
    routes: list[Route] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        try:
            iface, destination, flags, metric, mask = fields[0], fields[1], int(fields[3], 16), fields[6], fields[7]
            if int(destination, 16) == 0 and int(mask, 16) == 0 and flags & _RTF_UP:
                routes.append(Route(interface=iface, metric=int(metric)))
        except (IndexError, ValueError):
            continue
    return routes


def parse_ipv6_routes(text: str) -> list[Route]:
    """Default routes (``::/0``, RTF_UP, not rejecting, not on ``lo``) from ``/proc/net/ipv6_route``."""
    routes: list[Route] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            destination, prefix, metric, flags, iface = fields[0], fields[1], fields[5], int(fields[8], 16), fields[9]
            default = int(destination, 16) == 0 and int(prefix, 16) == 0
            if default and flags & _RTF_UP and not flags & _RTF_REJECT and iface != "lo":
                routes.append(Route(interface=iface, metric=int(metric, 16)))
        except (IndexError, ValueError):
            continue
    return routes


def best_route(routes: Sequence[Route]) -> Route | None:
    """Lowest metric wins; ties go to the first listed (the kernel's order)."""
    return min(routes, key=lambda route: route.metric, default=None)


class NetworkProbe:
    """Reads the active network's :class:`NetworkState`; no I/O until :meth:`read`."""

    def __init__(
        self,
        config: NetworkConfig | None = None,
        *,
        root: Path = Path("/"),
        runner: CommandRunner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``runner``, ``which`` and the monotonic ``clock`` are for the nmcli query and its cache."""
        self._config = config if config is not None else NetworkConfig()
        self._root = root
        self._nmcli: NmcliMetered | None = None
        if self._config.use_nmcli:
            self._nmcli = NmcliMetered(
                runner=runner,
                which=which,
                clock=clock,
                timeout_s=self._config.nmcli_timeout_s,
                cache_s=self._config.nmcli_cache_s,
            )

    def read(self) -> NetworkState:
        route, readable = self._default_route()
        if route is None:
            return NetworkState(kind="none" if readable else "unknown")
        kind = interface_kind(self._root, route.interface)
        return NetworkState(
            interface=route.interface,
            kind=kind,
            metered=self._metered(route.interface, kind),
            link_up=link_up(self._root, route.interface),
        )

    def _default_route(self) -> tuple[Route | None, bool]:
        """The active route and whether the IPv4 table could be read at all."""
        ipv4 = _read_optional(self._root / "proc/net/route")
        route = best_route(parse_ipv4_routes(ipv4)) if ipv4 is not None else None
        if route is None:
            ipv6 = _read_optional(self._root / "proc/net/ipv6_route")
            route = best_route(parse_ipv6_routes(ipv6)) if ipv6 is not None else None
        return route, ipv4 is not None

    def _metered(self, interface: str, kind: str) -> bool | None:
        override = configured_metered(self._config.metered, interface)
        if override is not None:
            return override
        if self._nmcli is not None:
            answer = self._nmcli.metered(interface)
            if answer is not None:
                return answer
        return True if kind == "cellular" else None


def configured_metered(overrides: Mapping[str, bool], interface: str) -> bool | None:
    """The override for ``interface``: an exact name beats globs; globs are tried in order."""
    if interface in overrides:
        return overrides[interface]
    for pattern, metered in overrides.items():
        if fnmatch.fnmatchcase(interface, pattern):
            return metered
    return None


def interface_kind(root: Path, interface: str) -> str:
    """One of ``wifi``, ``cellular``, ``ethernet``, ``unknown`` (rules in the module docstring)."""
    iface = root / "sys/class/net" / interface
    devtype = _uevent(iface).get("DEVTYPE")
    if devtype == "wlan" or (iface / "wireless").exists() or (iface / "phy80211").exists():
        return "wifi"
    if devtype == "wwan" or _driver(iface) in CELLULAR_DRIVERS or interface.startswith(CELLULAR_PREFIXES):
        return "cellular"
    try:
        link_type = int((iface / "type").read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        log.debug("cannot tell the kind of %s: %s", interface, exc)
        return "unknown"
    if link_type in _CELLULAR_LINK_TYPES:
        return "cellular"
    return "ethernet" if link_type == _ARPHRD_ETHER else "unknown"


def link_up(root: Path, interface: str) -> bool | None:
    iface = root / "sys/class/net" / interface
    state = _read_optional(iface / "operstate")
    if state is None:
        return None
    state = state.strip()
    if state == "up":
        return True
    if state in _LINK_DOWN_STATES:
        return False
    carrier = _read_optional(iface / "carrier")  # EINVAL while the interface is admin-down
    return {"1": True, "0": False}.get(carrier.strip()) if carrier is not None else None


def _uevent(iface: Path) -> dict[str, str]:
    text = _read_optional(iface / "uevent") or ""
    pairs = (line.partition("=") for line in text.splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def _driver(iface: Path) -> str | None:
    try:
        return (iface / "device" / "driver").readlink().name
    except OSError:  # virtual interfaces have no device; a missing link is not an error
        return None


def _read_optional(path: Path) -> str | None:
    """The file's text, or ``None`` when it is missing or unreadable."""
    try:
        return path.read_text(encoding="ascii")
    except (OSError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
