"""The dashboard in a real browser: headless Chromium loads it from OpsServer, the JavaScript
fetches /api/status and renders; the test reads the resulting DOM (``--dump-dom``).

Chromium is required (Debian: ``apt-get install chromium``). A missing browser is a test
failure, never a skip: CI must not go green without having run the dashboard's JavaScript.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.web import OpsServer
from tests.broker_server.ops.test_status import round_result, sample_status

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def by_id(self, element_id: str) -> Node:
        (node,) = [n for n in self.iter() if n.attrs.get("id") == element_id]
        return node


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self._open = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self._open)
        self._open.children.append(node)
        if tag not in VOID:
            self._open = node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self._open
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"unbalanced </{tag}>"
        self._open = node.parent

    def handle_data(self, data: str) -> None:
        self._open.children.append(data)


def parse_dom(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        "headless Chromium is not installed (no `chromium` or `chromium-browser` on PATH): "
        "install Debian's package: `apt-get install -y chromium`",
        pytrace=False,
    )


def render_in_chromium(url: str, profile: Path) -> tuple[Node, str]:
    """The DOM after the page's scripts ran (5 s of virtual time), and the browser's console log."""
    command = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    console = "\n".join(line for line in done.stderr.splitlines() if ":CONSOLE" in line)
    return parse_dom(done.stdout), console


@pytest.fixture
def dashboard(tmp_path: Path) -> Callable[[Callable[[], dict[str, Any]]], tuple[Node, str]]:
    def render(status: Callable[[], dict[str, Any]]) -> tuple[Node, str]:
        with OpsServer(metrics=ServerMetrics(), status=status) as ops:
            return render_in_chromium(ops.url + "/", tmp_path / "profile")

    return render


def test_dashboard_renders_devices_rounds_accuracy_plot_and_rollout(dashboard) -> None:
    dom, console = dashboard(sample_status)
    assert "Uncaught" not in console and "Content Security Policy" not in console, console
    assert "hidden" in dom.by_id("error").attrs
    assert dom.by_id("summary").text().startswith("model v3 · fedavg · round 4 of 10 · devices 3 online / 4 known")

    rows = dom.by_id("devices").find_all("tr", **{"class": "device"})
    assert [r.attrs["data-device-id"] for r in rows] == ["dev-<b>x</b>", "dev-a", "dev-b", "dev-c"]
    cells = {r.attrs["data-device-id"]: [c.text() for c in r.find_all("td")] for r in rows}
    assert cells["dev-a"][:4] == ["dev-a", "gateway", "yes", "yes"]
    assert cells["dev-b"][2:5] == ["no", "no", "offline: the device is offline"]
    assert cells["dev-c"][4] == "battery_low: battery 12% < 30%; not_charging: unplugged"
    # device-reported strings are text, never markup
    assert cells["dev-<b>x</b>"][1] == "<i>odd</i>"
    assert not dom.by_id("devices").find_all("b") and not dom.by_id("devices").find_all("i")

    rounds = dom.by_id("rounds").find_all("tr", **{"class": "round"})
    assert [r.attrs["data-round"] for r in rounds] == ["4", "3", "2", "1"]  # newest first
    assert [c.text() for c in rounds[2].find_all("td")][:2] == ["2", "abandoned"]
    assert [c.text() for c in rounds[0].find_all("td")][6] == "0.7300"

    plot = dom.by_id("accuracy-plot")
    (line,) = plot.find_all("polyline", **{"class": "accuracy-line"})
    points = [tuple(map(float, p.split(","))) for p in (line.attrs["points"] or "").split()]
    assert len(points) == 3  # the completed rounds with an accuracy: 1, 3, 4
    xs, ys = zip(*points, strict=True)
    assert xs[0] < xs[1] < xs[2] and ys[0] > ys[1] > ys[2]  # accuracy rose: the line goes up
    top, height = 12, 240 - 12 - 30  # dashboard.js PLOT
    assert ys == pytest.approx([top + (1 - a) * height for a in (0.42, 0.61, 0.73)], abs=0.06)
    assert xs[1] - xs[0] == pytest.approx(2 * (xs[2] - xs[1]), abs=0.2)  # x is the round number
    assert len(plot.find_all("circle")) == 3
    assert "hidden" in dom.by_id("accuracy-empty").attrs

    rollout = dom.by_id("rollout").text()
    for expected in ("r-7", "v3 → v4", "active", "1 of 3 (10% → 50% → 100%)", "1 ok, 1 failed", "need 2"):
        assert expected in rollout


def test_dashboard_without_accuracy_or_rollout(dashboard) -> None:
    rounds = [round_result(1, completed=False), round_result(2, accuracy=None)]
    dom, console = dashboard(lambda: sample_status(rounds=rounds, rollout=None))
    assert "Uncaught" not in console, console
    assert not dom.by_id("accuracy-plot").find_all("polyline")
    assert "hidden" not in dom.by_id("accuracy-empty").attrs
    assert dom.by_id("rollout").text() == "No rollout."
    assert len(dom.by_id("rounds").find_all("tr", **{"class": "round"})) == 2


def test_dashboard_shows_a_failing_status_api(dashboard) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("store unavailable")

    dom, console = dashboard(broken)
    assert "Uncaught" not in console, console
    error = dom.by_id("error")
    assert "hidden" not in error.attrs
    assert error.text() == "status unavailable: RuntimeError: store unavailable"
    assert not dom.by_id("devices").find_all("tr", **{"class": "device"})
