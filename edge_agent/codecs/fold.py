"""The server's blocked fold: ``acc += sum_j factor_j * values_j`` without full-size temporaries.

Phase 2 of :func:`edge_agent.codecs.decode.accumulate_update`. By the time a :class:`Term` exists
its payload has been validated in full (finite values, valid codes and scales), so nothing here
can fail half-way: the accumulator is only ever touched by a fold that runs to the end.

Why blocks: the old fold decoded a whole tensor into a float64 temporary (8 MB for a 1M-element
tensor, written to memory and read back by ``acc +=``). Here a tensor is walked in blocks through
scratch buffers allocated once and reused for every update, so a block's working set stays in
the L2 cache and no full-size temporary is ever made.

Two kernels, chosen per block:

* one term: ``scratch = float64(values)``, ``scratch *= factor``, ``acc += scratch``: the same
  operations, and so the same bits, as the old whole-tensor fold, on a reused scratch block;
* several terms (a group of updates folded together, see
  :class:`broker_server.aggregate.WeightedMean`): the rows are cast into a ``(G, BLOCK)`` float64
  scratch matrix and folded with one BLAS ``gemv`` (``coefficients @ rows``) and one ``acc +=``,
  so the accumulator streams through the cache once per group instead of once per update.

Accumulation stays in float64 in both kernels: every product ``value * factor`` of a float32 or
int8 value (24 significant bits at most) with a float64 factor is formed in float64, and the sums
are float64; only the order of the float64 additions differs between the two kernels (the
difference is a few float64 ulps of the sum, far below the float32 result's resolution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_agent.codecs.reader import Record

BLOCK = 32_768  # elements per group-fold block: 256 KiB of float64 scratch per row (a few % faster than 16K)
# G x block <= this keeps OpenBLAS's gemv on one thread (measured: 8 x 32K is single-threaded;
# 8 x 64K spawns threads that cost 5-30x more CPU on a busy 2-core machine)
GEMV_ELEMENTS = 262_144
SINGLE_BLOCK = 65_536  # elements per block of a one-update fold: 512 KiB of float64 scratch, fewer numpy calls


@dataclass(frozen=True)
class Term:
    """One validated tensor of one update, ready to fold as ``factors * values``.

    ``values`` is the flat wire array (``'<f4'``, ``'<f2'`` or ``'i1'`` codes, a view into the
    payload). ``factors`` is one float (weight times the tensor's scale) or, for per-channel codecs,
    a float64 array with one factor per equal-length row of ``values``.
    """

    values: np.ndarray
    factors: float | np.ndarray
    row: int = field(init=False)  # elements per factor with several factors, else 0

    def __post_init__(self) -> None:
        count = len(self.factors) if isinstance(self.factors, np.ndarray) else 1
        object.__setattr__(self, "row", self.values.size // count if count > 1 else 0)


DENSE_FLOAT = frozenset({"fp32", "fp16"})  # values are the wire floats; factor = weight
DENSE_INT8 = frozenset({"int8", "int8-channel"})  # values are int8 codes; factors = weight * scales


def dense_term(record: Record, codec_name: str, weight: float) -> Term | None:
    """The :class:`Term` of a validated record, or None for codecs without a block kernel.

    Those (packed int4/int2/sign, sparse top-k) keep their codec's own ``accumulate``.
    """
    values = record.data.reshape(-1)
    if codec_name in DENSE_FLOAT:
        return Term(values, float(weight))
    if codec_name in DENSE_INT8 and record.scales is not None:
        factors = record.scales.astype(np.float64) * float(weight)
        return Term(values, factors if len(factors) > 1 else float(factors[0]))
    return None


def block_length(terms: list[Term], block: int = BLOCK) -> int:
    """Block length for one tensor's terms: ``block``, or a multiple of the per-channel row length."""
    rows = {term.row for term in terms} - {0}
    if not rows:
        return block
    if len(rows) > 1:  # same tensor, same shape: the per-channel row length cannot differ
        raise ValueError(f"terms of one tensor disagree on the per-channel row length: {sorted(rows)}")
    (row,) = rows
    return row * max(1, block // row)


class Folder:
    """Scratch buffers for the blocked fold, allocated on first use and reused across updates.

    A one-update fold uses ``single_block`` float64 values (512 KiB); a group fold of G updates a
    ``(G, block)`` float64 matrix (2 MiB for G = 8) and one block-sized row. A per-channel tensor
    whose rows are longer than a block is walked one row at a time, so its scratch is row-sized.
    """

    def __init__(self, *, block: int = BLOCK, single_block: int = SINGLE_BLOCK) -> None:
        if block < 1 or single_block < 1:
            raise ValueError(f"block sizes must be >= 1, got block={block}, single_block={single_block}")
        self.block = block
        self.single_block = single_block
        self._one = np.empty(0, dtype=np.float64)
        self._rows = np.empty((0, 0), dtype=np.float64)
        self._sum = np.empty(0, dtype=np.float64)

    def fold(self, acc: np.ndarray, terms: list[Term]) -> None:
        """``acc += sum(factors_j * values_j)`` in place; ``acc`` is a flat, contiguous float64 array."""
        if not terms or acc.size == 0:
            return
        if len(terms) == 1:
            self._fold_single(acc, terms[0])
            return
        length = min(block_length(terms, max(1, min(self.block, GEMV_ELEMENTS // len(terms)))), acc.size)
        if self._rows.shape[0] < len(terms) or self._rows.shape[1] < length:
            self._rows = np.empty((max(len(terms), self._rows.shape[0]), max(length, self._rows.shape[1])))
            self._sum = np.empty(self._rows.shape[1])
        coefficients = np.array([_coefficient(term) for term in terms], dtype=np.float64)
        for start in range(0, acc.size, length):
            stop = min(start + length, acc.size)
            matrix = self._rows[: len(terms), : stop - start]
            for index, term in enumerate(terms):
                _load_row(matrix[index], term, start, stop)
            partial = self._sum[: stop - start]
            np.dot(coefficients, matrix, out=partial)
            acc[start:stop] += partial

    def _fold_single(self, acc: np.ndarray, term: Term) -> None:
        length = min(block_length([term], self.single_block), acc.size)
        if len(self._one) < length:
            self._one = np.empty(length)
        for start in range(0, acc.size, length):
            stop = min(start + length, acc.size)
            scratch = self._one[: stop - start]
            _scaled(scratch, term, start, stop)
            acc[start:stop] += scratch


def _coefficient(term: Term) -> float:
    """The gemv coefficient: the scalar factor, or 1.0 when per-channel factors scale the row itself."""
    if isinstance(term.factors, np.ndarray):
        return 1.0 if len(term.factors) > 1 else float(term.factors[0])
    return float(term.factors)


def _load_row(row: np.ndarray, term: Term, start: int, stop: int) -> None:
    """``row = values[start:stop]`` in float64, times the per-channel factors if there are several."""
    np.copyto(row, term.values[start:stop])
    if term.row:
        channels = row.reshape(-1, term.row)
        channels *= np.asarray(term.factors)[start // term.row : stop // term.row, None]


def _scaled(out: np.ndarray, term: Term, start: int, stop: int) -> None:
    """``out = values[start:stop] * factors`` in float64: an exact cast, then one rounding per product.

    A cast then an in-place multiply measured faster than one casting multiply (numpy buffers
    the casting ufunc), and gives the same bits.
    """
    np.copyto(out, term.values[start:stop])
    if term.row:
        channels = out.reshape(-1, term.row)
        channels *= np.asarray(term.factors)[start // term.row : stop // term.row, None]
    else:
        out *= _coefficient(term)
