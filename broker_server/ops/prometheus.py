"""Thread-safe counters, gauges and histograms, rendered in the Prometheus text format 0.0.4.

A small stdlib-only subset of what ``prometheus_client`` offers, enough for one process that is
scraped over HTTP (:class:`~broker_server.ops.web.OpsServer`):

* :class:`Counter` — only goes up; its name must end in ``_total``;
* :class:`Gauge` — set to any value; a label set that was never set is not exposed;
* :class:`Histogram` — cumulative ``_bucket{le="..."}`` samples (``+Inf`` last, equal to
  ``_count``), then ``_sum`` and ``_count``.

Each family guards its samples with its own lock, so one family's samples (a histogram's buckets,
sum and count in particular) are always rendered consistently; different families are not
rendered atomically together, which Prometheus does not expect either.

:func:`render` writes, per family, ``# HELP`` (with ``\\`` and newlines escaped), ``# TYPE``, then
its samples, sorted by label values for a stable output. Label values escape ``\\``, ``"`` and
newlines. Values are Go-style floats: ``+Inf``, ``-Inf``, ``NaN``, integers without a fraction.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import ClassVar

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "MetricFamily", "escape_label_value", "render"]

#: the Content-Type of :func:`render`'s output
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus (Go's ParseFloat) reads it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


class MetricFamily:
    """One metric name with its help text, type and label names; subclasses hold the samples."""

    TYPE: ClassVar[str] = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}: {labelnames}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {sorted(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def samples(self) -> list[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]]:
        """``(sample name, label values, extra label pairs, value)`` for every exposed sample."""
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.TYPE}"]
        for sample_name, values, extra, value in self.samples():
            pairs = [*zip(self.labelnames, values, strict=True), *extra]
            lines.append(f"{sample_name}{_labels_text(pairs)} {format_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(MetricFamily):
    TYPE = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total, got {name!r}")
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"{self.name} only goes up by a finite amount, got {amount!r}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def declare(self, **labels: str) -> None:
        """Expose this label set at 0 before it is first incremented."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def samples(self) -> list[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, key, (), value) for key, value in items]


class Gauge(MetricFamily):
    TYPE = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: str) -> float | None:
        """The current value, or None if this label set was never set."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key)

    def samples(self) -> list[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, key, (), value) for key, value in items]


class _Buckets:
    __slots__ = ("count", "counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0
        self.count = 0


class Histogram(MetricFamily):
    TYPE = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets]
        if math.inf in bounds:
            bounds.remove(math.inf)
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: give at least one finite bucket bound")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must increase strictly, got {bounds}")
        self.bounds = (*bounds, math.inf)
        self._series: dict[LabelValues, _Buckets] = {}
        if not self.labelnames:
            self._series[()] = _Buckets(len(self.bounds))

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        key = self._key(labels)
        index = next(i for i, bound in enumerate(self.bounds) if value <= bound)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Buckets(len(self.bounds))
            series.counts[index] += 1
            series.sum += value
            series.count += 1

    def snapshot(self, **labels: str) -> tuple[int, float]:
        """``(count, sum)`` of this label set's observations."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return (series.count, series.sum) if series is not None else (0, 0.0)

    def samples(self) -> list[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]]:
        with self._lock:
            copies = sorted((key, list(s.counts), s.sum, s.count) for key, s in self._series.items())
        out: list[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]] = []
        for key, counts, total, count in copies:
            cumulative = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                cumulative += n
                out.append((f"{self.name}_bucket", key, (("le", format_value(bound)),), float(cumulative)))
            out.append((f"{self.name}_sum", key, (), total))
            out.append((f"{self.name}_count", key, (), float(count)))
        return out


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition of ``families``, in the order given (names must be unique)."""
    seen: set[str] = set()
    parts = []
    for family in families:
        if family.name in seen:
            raise ValueError(f"metric {family.name} given twice")
        seen.add(family.name)
        parts.append(family.render())
    return "".join(parts)
