"""The Prometheus text format 0.0.4, read back by a strict parser; thread-safe exact totals.

:func:`parse_exposition` (also used by the other ops tests) rejects anything the format or
Prometheus' own conventions forbid: a sample before its TYPE, a family's samples interleaved with
another's, duplicate series, bad escapes, counters not ending in ``_total`` or going negative, and
histograms whose buckets are not cumulative or whose ``+Inf`` bucket differs from ``_count``.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from broker_server.ops.prometheus import Counter, Gauge, Histogram, format_value, render

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def value(self, sample: str | None = None, **labels: str) -> float:
        return self.samples[(sample or self.name, tuple(sorted(labels.items())))]


def _unescape(text: str, allowed: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            assert i + 1 < len(text) and text[i + 1] in allowed, f"bad escape in {text!r}"
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
        else:
            assert ch != "\n"
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(text: str, pos: int) -> tuple[Labels, int]:
    """Parse ``{a="x",b="y"}`` starting at ``text[pos] == "{"``; return labels and the index after ``}``."""
    labels: dict[str, str] = {}
    pos += 1
    while text[pos] != "}":
        match = _LABEL.match(text, pos)
        assert match, f"bad label name at {text[pos:]!r}"
        name, pos = match.group(), match.end()
        assert text[pos : pos + 2] == '="', f'expected =" after {name} in {text!r}'
        pos += 2
        start = pos
        while text[pos] != '"':
            pos += 2 if text[pos] == "\\" else 1
        assert name not in labels, f"label {name} twice in {text!r}"
        labels[name] = _unescape(text[start:pos], '\\"n')
        pos += 1
        if text[pos] == ",":
            pos += 1
        else:
            assert text[pos] == "}", f"expected , or }} in {text!r}"
    return tuple(sorted(labels.items())), pos + 1


def _family_of(sample: str, families: dict[str, Family]) -> Family:
    if sample in families:
        return families[sample]
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and base in families and families[base].type == "histogram":
            return families[base]
    raise AssertionError(f"sample {sample} has no TYPE line before it")


def parse_exposition(text: str) -> dict[str, Family]:
    """Strictly parse the text format 0.0.4 (as much of it as an exporter should emit)."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, rest = line[2:6], line[7:]
            name, _, arg = rest.partition(" ")
            assert _NAME.fullmatch(name), f"bad metric name {name!r}"
            family = families.setdefault(name, Family(name))
            assert not family.samples, f"{kind} for {name} after its samples"
            if kind == "HELP":
                assert family.help is None, f"HELP for {name} twice"
                family.help = _unescape(arg, "\\n")
            else:
                assert arg in _TYPES, f"bad type {arg!r}"
                assert family.type == "untyped", f"TYPE for {name} twice"
                family.type = arg
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        match = _NAME.match(line)
        assert match, f"bad sample line {line!r}"
        sample, pos = match.group(), match.end()
        labels: Labels = ()
        if line[pos] == "{":
            labels, pos = _parse_labels(line, pos)
        assert line[pos] == " ", f"expected a space before the value in {line!r}"
        value_text, *timestamp = line[pos + 1 :].split(" ")
        assert len(timestamp) <= 1
        assert re.fullmatch(r"[+-]?Inf|NaN|[+-]?[0-9.]+(e[+-]?[0-9]+)?", value_text), f"bad value in {line!r}"
        family = _family_of(sample, families)
        if family.name != current:
            assert family.name not in finished, f"samples of {family.name} are not contiguous"
            if current is not None:
                finished.add(current)
            current = family.name
        assert (sample, labels) not in family.samples, f"duplicate series {sample}{labels}"
        family.samples[(sample, labels)] = float(value_text)
    for family in families.values():
        _check_family(family)
    return families


def _check_family(family: Family) -> None:
    if family.type == "counter":
        assert family.name.endswith("_total"), f"counter {family.name} must end in _total"
        assert all(v >= 0 for v in family.samples.values()), f"negative counter {family.name}"
    if family.type != "histogram":
        return
    series: dict[Labels, list[tuple[float, float]]] = {}
    for (sample, labels), value in family.samples.items():
        if sample.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = tuple(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((float(le), value))
    assert series, f"histogram {family.name} has no buckets"
    for rest, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{family.name}: le not ascending to +Inf"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{family.name}: buckets are not cumulative"
        assert counts[-1] == family.samples[(f"{family.name}_count", rest)], f"{family.name}: +Inf != _count"
        assert (f"{family.name}_sum", rest) in family.samples


# -- the format ------------------------------------------------------------------------------------


def test_counter_help_type_and_samples() -> None:
    c = Counter("jobs_total", "Jobs done.", ["queue"])
    c.inc(queue="a")
    c.inc(2.5, queue="b")
    c.inc(queue="a")
    text = render([c])
    assert text.splitlines()[:2] == ["# HELP jobs_total Jobs done.", "# TYPE jobs_total counter"]
    fam = parse_exposition(text)["jobs_total"]
    assert fam.type == "counter"
    assert fam.value(queue="a") == 2 and fam.value(queue="b") == 2.5


def test_label_values_and_help_are_escaped_and_read_back() -> None:
    nasty = 'a"b\\c\nd}e,f="g"'
    c = Counter("odd_total", "Help with a backslash \\ and\na newline.", ["path"])
    c.inc(path=nasty)
    text = render([c])
    assert "\n" not in text.split("\n")[0]  # the help stayed on one line
    fam = parse_exposition(text)["odd_total"]
    assert fam.help == "Help with a backslash \\ and\na newline."
    assert fam.value(path=nasty) == 1


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    h = Histogram("latency_seconds", "Latency.", [0.1, 1.0, 10.0])
    for value in (0.05, 0.1, 0.5, 3.0, 100.0):
        h.observe(value)
    fam = parse_exposition(render([h]))["latency_seconds"]
    assert fam.type == "histogram"
    bucket = "latency_seconds_bucket"
    assert [fam.value(bucket, le=le) for le in ("0.1", "1", "10", "+Inf")] == [2, 3, 4, 5]
    assert fam.value("latency_seconds_count") == 5
    assert fam.value("latency_seconds_sum") == pytest.approx(103.65)


def test_labelled_histogram_series_are_separate() -> None:
    h = Histogram("size_bytes", "Sizes.", [10, 100], labelnames=["kind"])
    h.observe(5, kind="x")
    h.observe(50, kind="y")
    h.observe(500, kind="y")
    fam = parse_exposition(render([h]))["size_bytes"]
    assert fam.value("size_bytes_bucket", kind="x", le="10") == 1
    assert fam.value("size_bytes_bucket", kind="y", le="100") == 1
    assert fam.value("size_bytes_count", kind="y") == 2


def test_gauge_is_absent_until_set_then_exposed() -> None:
    g = Gauge("temp_celsius", "Temperature.")
    assert parse_exposition(render([g]))["temp_celsius"].samples == {}
    g.set(21.5)
    g.set(-3)
    assert parse_exposition(render([g]))["temp_celsius"].value() == -3


def test_values_are_go_floats() -> None:
    assert [format_value(v) for v in (3.0, 0.25, math.inf, -math.inf, 1e20)] == ["3", "0.25", "+Inf", "-Inf", "1e+20"]
    assert format_value(math.nan) == "NaN"


@pytest.mark.parametrize(
    "make",
    [
        lambda: Counter("no_suffix", "x"),
        lambda: Counter("bad-name_total", "x"),
        lambda: Counter("x_total", "x", ["le"]),
        lambda: Counter("x_total", "x", ["a", "a"]),
        lambda: Gauge("x", "x", ["__reserved"]),
        lambda: Histogram("x", "x", [1.0, 1.0]),
        lambda: Histogram("x", "x", []),
    ],
)
def test_invalid_definitions_are_refused(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_misuse_is_refused() -> None:
    c = Counter("x_total", "x", ["a"])
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, a="1")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(b="1")
    with pytest.raises(ValueError, match="NaN"):
        Histogram("h", "h", [1.0]).observe(math.nan)
    with pytest.raises(ValueError, match="twice"):
        render([c, Counter("x_total", "again")])


def test_the_parser_rejects_what_it_should() -> None:
    """The strict parser is only worth something if it fails on broken output."""
    good = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
    parse_exposition(good)
    broken = [
        good.rstrip("\n"),  # no final newline
        "a_total 1\n# TYPE a_total counter\n",  # sample before TYPE
        '# TYPE a_total counter\na_total{x="\\t"} 1\n',  # bad escape
        "# TYPE a_total counter\na_total 1\na_total 2\n",  # duplicate series
        "# TYPE a counter\na 1\n",  # counter without _total
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',  # +Inf != count
        '# TYPE a_total counter\n# TYPE b gauge\na_total 1\nb 1\na_total{x="y"} 1\n',  # interleaved
    ]
    for text in broken:
        with pytest.raises(AssertionError):
            parse_exposition(text)


# -- concurrency -----------------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads very often, so a missing lock loses increments instead of hiding."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_increments_are_exact_and_renders_consistent() -> None:
    c = Counter("hits_total", "Hits.", ["kind"])
    h = Histogram("work_seconds", "Work.", [0.5, 1.5])
    threads, per_thread = 8, 3000
    stop = threading.Event()
    problems: list[BaseException] = []

    def work(index: int) -> None:
        for i in range(per_thread):
            c.inc(kind="even" if i % 2 == 0 else "odd")
            h.observe(float(index % 3))

    def scrape() -> None:
        while not stop.is_set():
            try:
                parse_exposition(render([c, h]))  # +Inf bucket == _count in every snapshot
            except BaseException as exc:
                problems.append(exc)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    scraper.join()
    assert not problems, problems[0]
    assert c.value(kind="even") == c.value(kind="odd") == threads * per_thread / 2
    count, total = h.snapshot()
    assert count == threads * per_thread
    assert total == per_thread * sum(float(n % 3) for n in range(threads))
