"""Norm clipping: bound every update's L2 norm by ``clip`` before averaging.

Clipping is per update, so it works in both modes:

* streaming (O(model) memory): :class:`ClippedWeightedMean` is a drop-in
  :class:`~broker_server.aggregate.WeightedMean` that clips each update before folding it in;
* buffered: :func:`clipped_mean` / :class:`ClippedMean` over an ``[n, d]`` matrix.

Either way a clipped update ``u * min(1, clip / |u|)`` has norm at most ``clip``, so one device's
share of the weighted mean is at most ``clip * w_i / sum(w)`` whatever it sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.robust.core import (
    DEFAULT_WORK_BYTES,
    RuleReport,
    RuleResult,
    check_rows,
    finite_float,
    row_norms,
    weighted_row_mean,
)
from edge_agent.codecs import DEFAULT_MAX_ELEMENTS, UpdateInfo, parse_update

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class UpdateStats:
    """One update as the clipper saw it (before clipping)."""

    norm: float
    #: the factor the update was scaled by (1.0 = within the bound)
    factor: float
    #: cosine similarity and L2 distance to the reference, when one was given
    cosine: float | None = None
    distance: float | None = None

    @property
    def clipped(self) -> bool:
        return self.factor < 1.0


def _check_clip(clip: float) -> float:
    value = finite_float(clip, "clip")
    if value <= 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    return value


def clip_factor(norm: float, clip: float) -> float:
    """``min(1, clip / norm)`` (1.0 for a zero update)."""
    return 1.0 if norm <= clip else clip / norm


class _Stats:
    """Running |x|^2 and, against a reference, x.r and |r|^2 (float64, tensor by tensor)."""

    def __init__(self, reference: Mapping[str, np.ndarray] | None) -> None:
        self.reference = reference
        self.squares = self.dot = self.ref_squares = 0.0

    def add(self, name: str, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        self.squares += float(x @ x)
        if self.reference is not None:
            r = np.asarray(self.reference[name], dtype=np.float64).reshape(-1)
            self.dot += float(x @ r)
            self.ref_squares += float(r @ r)

    def result(self, clip: float) -> UpdateStats:
        norm = math.sqrt(self.squares)
        if self.reference is None:
            return UpdateStats(norm, clip_factor(norm, clip))
        ref_norm = math.sqrt(self.ref_squares)
        cosine = self.dot / (norm * ref_norm) if norm > 0 and ref_norm > 0 else 0.0
        distance = math.sqrt(max(0.0, self.squares - 2.0 * self.dot + self.ref_squares))
        return UpdateStats(norm, clip_factor(norm, clip), max(-1.0, min(1.0, cosine)), distance)


def _check_reference(reference: Mapping[str, np.ndarray] | None, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if reference is None:
        return
    for name, shape in shapes.items():
        if name not in reference or np.shape(reference[name]) != tuple(shape):
            raise ValueError(f"reference lacks tensor {name!r} of shape {tuple(shape)}")


def clip_update(
    delta: Mapping[str, np.ndarray], clip: float, *, reference: Mapping[str, np.ndarray] | None = None
) -> tuple[Tensors, UpdateStats]:
    """``delta`` scaled to L2 norm (over all tensors together) at most ``clip``, as float32 copies.

    With ``reference`` (e.g. the previous round's aggregate) the stats also carry the update's
    cosine similarity and distance to it, for :mod:`broker_server.robust.trust`.
    """
    limit = _check_clip(clip)
    _check_reference(reference, {name: np.shape(value) for name, value in delta.items()})
    stats = _Stats(reference)
    for name, value in delta.items():
        stats.add(name, value)
    result = stats.result(limit)
    clipped = {
        name: (np.asarray(value, dtype=np.float64) * result.factor).astype(np.float32) for name, value in delta.items()
    }
    return clipped, result


def clipped_mean(
    rows: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    clip: float,
    weighted: bool = True,
    row_scale: np.ndarray | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> RuleResult:
    """(Weighted) mean of the rows after clipping each to L2 norm ``clip``."""
    n, _, w = check_rows(rows, weights, row_scale)
    limit = _check_clip(clip)
    norms = row_norms(rows, row_scale, work_bytes)
    factors = np.array([clip_factor(float(norm), limit) for norm in norms])
    base = w if weighted else np.ones(n)
    delta = weighted_row_mean(rows, base * factors, row_scale, work_bytes, denominator=float(base.sum()))
    report = RuleReport(
        rule="clipped-mean",
        n=n,
        selected=tuple(range(n)),
        norms=tuple(float(v) for v in norms),
        factors=tuple(float(v) for v in factors),
    )
    return RuleResult(delta, report)


@dataclass(frozen=True, kw_only=True)
class ClippedMean:
    """Norm-clipped mean configuration (``weighted`` by default: FedAvg with clipping)."""

    clip: float
    weighted: bool = True

    def __post_init__(self) -> None:
        _check_clip(self.clip)

    def apply(
        self,
        rows: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        row_scale: np.ndarray | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> RuleResult:
        return clipped_mean(
            rows, weights, clip=self.clip, weighted=self.weighted, row_scale=row_scale, work_bytes=work_bytes
        )


class ClippedWeightedMean(WeightedMean):
    """Streaming FedAvg that clips each update to L2 norm ``clip`` before folding it in.

    Memory stays one float64 accumulator per tensor plus, while an encoded update is folded, one
    decoded tensor at a time (the payload is decoded twice: once for its norm, once to fold).
    ``stats`` lists every folded update's :class:`UpdateStats` in arrival order; with
    ``reference`` they include cosine/distance to it. Clipping scales the update, never its
    weight: ``total_weight`` is still the sum of the example counts.
    """

    def __init__(self, *, clip: float, reference: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.clip = _check_clip(clip)
        self.reference = reference
        self.stats: list[UpdateStats] = []

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        clipped, stats = clip_update(tensors, self.clip, reference=self.reference)
        super().add(clipped, weight)
        self.stats.append(stats)

    def add_encoded(
        self,
        payload: bytes | bytearray | memoryview,
        weight: float,
        expected: Mapping[str, tuple[int, ...]],
        *,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> UpdateInfo:
        """Validate the whole payload, measure its norm, then fold ``factor * update`` in (all or nothing)."""
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if self._sums and set(expected) != set(self._sums):
            raise ValueError("tensor names differ from earlier updates")
        for name, acc in self._sums.items():
            if acc.shape != tuple(expected[name]):
                raise ValueError(f"tensor {name!r}: shape {tuple(expected[name])} != {acc.shape}")
        _check_reference(self.reference, expected)
        parsed = parse_update(payload, expected, max_elements=max_elements)  # raises before any change
        measure = _Stats(self.reference)
        for rec in parsed.records:
            measure.add(rec.name, parsed.record_codec(rec).decode(rec))
        stats = measure.result(self.clip)
        if not self._sums:
            self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in expected.items()}
        for rec in parsed.records:
            parsed.record_codec(rec).accumulate(rec, self._sums[rec.name], float(weight) * stats.factor)
        self.total_weight += weight
        self.count += 1
        self.stats.append(stats)
        return parsed.info
