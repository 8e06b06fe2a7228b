"""What every robust rule shares: input checks, column-blocked reads, the result and its report.

Rules read the ``[n, d]`` update matrix a block of columns at a time, upcast to float64, so their
working memory is about ``work_bytes`` (plus O(d) for the result and O(n^2) for Krum's distances)
however large ``d`` is. A block always holds at least one column, so a tiny budget with a huge
``n`` can exceed it by up to ``n * 8 * temporaries`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: Default working-memory budget of one rule evaluation (float64 column blocks).
DEFAULT_WORK_BYTES = 64 * 2**20


@dataclass(frozen=True, kw_only=True)
class RuleReport:
    """What a rule did, by row index (map rows to devices with :meth:`ids`)."""

    rule: str
    n: int
    #: rows the aggregate is computed from: all rows for coordinate-wise rules, the picks
    #: (best score first) for Krum
    selected: tuple[int, ...]
    #: Krum: each row's score (sum of squared distances to its n - f - 2 nearest rows)
    scores: tuple[float, ...] = ()
    #: norm clipping: each row's L2 norm before clipping, and the factor applied (1.0 = untouched)
    norms: tuple[float, ...] = ()
    factors: tuple[float, ...] = ()
    #: trimmed mean: values dropped at each end of every coordinate
    trimmed_each_side: int = 0

    @property
    def clipped(self) -> tuple[int, ...]:
        """Rows that norm clipping scaled down."""
        return tuple(i for i, factor in enumerate(self.factors) if factor < 1.0)

    def ids(self, rows: Sequence[int], device_ids: Sequence[str]) -> tuple[str, ...]:
        return tuple(device_ids[i] for i in rows)


@dataclass(frozen=True)
class RuleResult:
    """The aggregate delta (flat float32, length d) and the rule's report."""

    delta: np.ndarray
    report: RuleReport


class RowRule(Protocol):
    """A rule configuration that aggregates an ``[n, d]`` matrix (see the rule dataclasses)."""

    def apply(
        self,
        rows: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        row_scale: np.ndarray | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> RuleResult: ...


def check_rows(
    rows: np.ndarray, weights: np.ndarray | None, row_scale: np.ndarray | None
) -> tuple[int, int, np.ndarray]:
    """``(n, d, weights as float64)``; ``ValueError`` on any inconsistency.

    ``row_scale`` (one float per row, e.g. float16 storage's per-row scale) multiplies each stored
    row when it is read; ``None`` means the rows are the values.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows must be an [n, d] matrix, got shape {rows.shape}")
    if not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"rows must be floating point, got {rows.dtype}")
    n, d = rows.shape
    if n == 0:
        raise ValueError("no updates to aggregate")
    if weights is None:
        w = np.ones(n, dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights have shape {w.shape}, expected ({n},)")
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("weights must be finite and positive")
    if row_scale is not None and (row_scale.shape != (n,) or not np.isfinite(row_scale).all()):
        raise ValueError(f"row_scale must be {n} finite values, got shape {row_scale.shape}")
    return n, d, w


def check_work_bytes(work_bytes: int) -> None:
    if isinstance(work_bytes, bool) or not isinstance(work_bytes, int) or work_bytes <= 0:
        raise ValueError(f"work_bytes must be a positive int, got {work_bytes!r}")


def column_blocks(
    rows: np.ndarray,
    row_scale: np.ndarray | None,
    work_bytes: int,
    *,
    temporaries: int,
    select: np.ndarray | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """``(columns, float64 copy of those columns)`` covering all ``d`` columns in order.

    ``temporaries``: how many ``[n, block]`` float64-sized arrays are alive at the peak of one
    block's processing (the block, the caller's temporaries, numpy's internal copies, and the
    previous block, which the caller's loop variable keeps alive while the next one is read), so
    that together they stay within ``work_bytes``; the counts are measured with ``tracemalloc``
    (tests/broker_server/robust/test_rules.py). ``select`` restricts to those rows.
    """
    check_work_bytes(work_bytes)
    n, d = rows.shape
    height = n if select is None else len(select)
    width = max(1, work_bytes // (max(height, 1) * 8 * temporaries))
    scale = None
    if row_scale is not None:
        scale = (row_scale if select is None else row_scale[select]).astype(np.float64)[:, None]
    for start in range(0, d, width):
        columns = slice(start, min(d, start + width))
        block = rows[:, columns] if select is None else rows[select, columns]
        block = block.astype(np.float64)  # always a copy: callers may modify it in place
        if scale is not None:
            block *= scale
        yield columns, block


def weighted_row_mean(
    rows: np.ndarray,
    coefficients: np.ndarray,
    row_scale: np.ndarray | None,
    work_bytes: int,
    select: np.ndarray | None = None,
    *,
    denominator: float | None = None,
) -> np.ndarray:
    """``sum_i c_i * row_i / sum_i c_i`` over ``select`` (all rows if None), as float32.

    ``denominator`` replaces ``sum_i c_i`` (clipping: coefficients are weight x factor, the
    denominator is the weights' sum).
    """
    coeff = coefficients if select is None else coefficients[select]
    total = float(coeff.sum()) if denominator is None else denominator
    out = np.empty(rows.shape[1], dtype=np.float32)
    for columns, block in column_blocks(rows, row_scale, work_bytes, temporaries=3, select=select):
        out[columns] = (coeff @ block) / total
    return out


def row_norms(rows: np.ndarray, row_scale: np.ndarray | None, work_bytes: int) -> np.ndarray:
    """L2 norm of every row (float64, accumulated block by block)."""
    squares = np.zeros(rows.shape[0], dtype=np.float64)
    for _, block in column_blocks(rows, row_scale, work_bytes, temporaries=2):
        squares += np.einsum("ij,ij->i", block, block)
    return np.sqrt(squares)


def finite_float(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)
