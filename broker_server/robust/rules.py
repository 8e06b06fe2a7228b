"""Byzantine-robust aggregation rules over an ``[n, d]`` update matrix (pure numpy, no I/O).

* :func:`coordinate_median` — per-coordinate (optionally weighted) median;
* :func:`trimmed_mean` — per coordinate, drop the ``floor(beta * n)`` lowest and highest values;
* :func:`krum` — Krum / Multi-Krum (Blanchard et al., NeurIPS 2017).

Norm clipping lives in :mod:`broker_server.robust.clip`. Every rule returns a
:class:`~broker_server.robust.core.RuleResult`. Weights are the devices' self-reported example
counts (times a trust multiplier), so an attacker controls its own: the robust rules ignore them
unless ``weighted=True``.

Memory: the matrix is read in float64 column blocks of about ``work_bytes``; median and trimmed
mean need nothing else but the O(d) result, Krum adds its ``n x n`` float64 distance matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from broker_server.robust.core import (
    DEFAULT_WORK_BYTES,
    RuleReport,
    RuleResult,
    check_rows,
    column_blocks,
    weighted_row_mean,
)
from broker_server.robust.errors import NotEnoughUpdates


def _weighted_median_block(block: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column, the value where the cumulative weight crosses half the total.

    When the cumulative weight lands exactly on the half (up to rounding) the two neighbours are
    averaged, so equal weights give exactly :func:`numpy.median`.
    """
    order = np.argsort(block, axis=0, kind="stable")
    values = np.take_along_axis(block, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    total = float(weights.sum())
    half, tolerance = 0.5 * total, 1e-12 * total
    lo = np.argmax(cumulative >= half - tolerance, axis=0)
    hi = np.argmax(cumulative > half + tolerance, axis=0)
    columns = np.arange(block.shape[1])
    result: np.ndarray = 0.5 * (values[lo, columns] + values[hi, columns])
    return result


def coordinate_median(
    rows: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    weighted: bool = False,
    row_scale: np.ndarray | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> RuleResult:
    """Coordinate-wise median (Yin et al., 2018); ``weighted=True`` uses the weighted median."""
    n, d, w = check_rows(rows, weights, row_scale)
    out = np.empty(d, dtype=np.float32)
    for columns, block in column_blocks(rows, row_scale, work_bytes, temporaries=6 if weighted else 4):
        out[columns] = _weighted_median_block(block, w) if weighted else np.median(block, axis=0)
    report = RuleReport(rule="weighted-median" if weighted else "median", n=n, selected=tuple(range(n)))
    return RuleResult(out, report)


def trimmed_mean(
    rows: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    beta: float,
    weighted: bool = False,
    row_scale: np.ndarray | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> RuleResult:
    """Per coordinate, the mean of the values left after dropping ``k = floor(beta * n)`` at each end.

    ``weighted=True`` averages the kept values with their rows' weights (trimming is still by
    count; equal values are ordered by weight, so which one is dropped does not depend on row
    order). Tolerates up to ``k`` Byzantine rows per coordinate, so choose ``beta >= f / n``;
    ``beta < 0.5`` always leaves at least one value.
    """
    n, d, w = check_rows(rows, weights, row_scale)
    _check_beta(beta)
    k = math.floor(beta * n)
    out = np.empty(d, dtype=np.float32)
    for columns, block in column_blocks(rows, row_scale, work_bytes, temporaries=6 if weighted else 3):
        if weighted:
            order = np.lexsort((np.broadcast_to(w[:, None], block.shape), block), axis=0)[k : n - k]
            kept = np.take_along_axis(block, order, axis=0)
            kept_weights = w[order]
            out[columns] = (kept * kept_weights).sum(axis=0) / kept_weights.sum(axis=0)
        else:
            block.sort(axis=0)
            out[columns] = block[k : n - k].mean(axis=0)
    report = RuleReport(rule="trimmed-mean", n=n, selected=tuple(range(n)), trimmed_each_side=k)
    return RuleResult(out, report)


def pairwise_sq_distances(
    rows: np.ndarray, row_scale: np.ndarray | None = None, *, work_bytes: int = DEFAULT_WORK_BYTES
) -> np.ndarray:
    """``[n, n]`` float64 squared Euclidean distances, accumulated over column blocks.

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product per block) after centring each block on
    its coordinate-wise median: distances do not change, and honest rows sit near zero, so a few
    enormous rows cannot swamp the honest rows' distances in cancellation error.
    """
    n = rows.shape[0]
    distances = np.zeros((n, n), dtype=np.float64)
    for _, block in column_blocks(rows, row_scale, work_bytes, temporaries=4):
        block -= np.median(block, axis=0)
        squares = np.einsum("ij,ij->i", block, block)
        distances += squares[:, None]
        distances += squares[None, :]
        distances -= 2.0 * (block @ block.T)
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances


def krum(
    rows: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    f: int,
    m: int = 1,
    weighted: bool = False,
    row_scale: np.ndarray | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> RuleResult:
    """Multi-Krum: average the ``m`` rows with the lowest Krum scores (``m=1``: Krum).

    A row's score is the sum of squared distances to its ``n - f - 2`` nearest other rows;
    tolerating ``f`` Byzantine rows needs ``n > 2f + 2`` (:class:`NotEnoughUpdates` otherwise).
    Ties in score go to the lower row index.
    """
    n, _, w = check_rows(rows, weights, row_scale)
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be an int >= 0, got {f!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    if n <= 2 * f + 2:
        raise NotEnoughUpdates(f"Krum with f={f} needs n > 2f + 2 = {2 * f + 2} updates, got {n}")
    if m > n:
        raise NotEnoughUpdates(f"Multi-Krum with m={m} needs at least {m} updates, got {n}")
    neighbours = n - f - 2
    distances = pairwise_sq_distances(rows, row_scale, work_bytes=work_bytes)
    np.fill_diagonal(distances, np.inf)  # a row is not its own neighbour
    nearest = np.partition(distances, neighbours - 1, axis=1)[:, :neighbours]
    scores = np.sort(nearest, axis=1).sum(axis=1)  # sorted first: the sum does not depend on row order
    selected = np.argsort(scores, kind="stable")[:m]
    delta = weighted_row_mean(rows, w if weighted else np.ones(n), row_scale, work_bytes, select=np.sort(selected))
    report = RuleReport(
        rule="krum" if m == 1 else "multi-krum",
        n=n,
        selected=tuple(int(i) for i in selected),
        scores=tuple(float(s) for s in scores),
    )
    return RuleResult(delta, report)


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")


@dataclass(frozen=True, kw_only=True)
class Median:
    """Coordinate-wise median configuration."""

    weighted: bool = False

    def apply(
        self,
        rows: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        row_scale: np.ndarray | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> RuleResult:
        return coordinate_median(rows, weights, weighted=self.weighted, row_scale=row_scale, work_bytes=work_bytes)


@dataclass(frozen=True, kw_only=True)
class TrimmedMean:
    """Trimmed-mean configuration: ``beta`` in [0, 0.5) is the fraction dropped at each end."""

    beta: float = 0.1
    weighted: bool = False

    def __post_init__(self) -> None:
        _check_beta(self.beta)

    def apply(
        self,
        rows: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        row_scale: np.ndarray | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> RuleResult:
        return trimmed_mean(
            rows, weights, beta=self.beta, weighted=self.weighted, row_scale=row_scale, work_bytes=work_bytes
        )


@dataclass(frozen=True, kw_only=True)
class Krum:
    """Krum / Multi-Krum configuration: tolerate ``f`` Byzantine rows, average the ``m`` best."""

    f: int
    m: int = 1
    weighted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ValueError(f"f must be an int >= 0, got {self.f!r}")
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"m must be an int >= 1, got {self.m!r}")

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs for this rule (``2f + 3``, and at least ``m``)."""
        return max(2 * self.f + 3, self.m)

    def apply(
        self,
        rows: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        row_scale: np.ndarray | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> RuleResult:
        return krum(
            rows, weights, f=self.f, m=self.m, weighted=self.weighted, row_scale=row_scale, work_bytes=work_bytes
        )
