"""The server's blocked fold: ``acc += sum_j factor_j * values_j`` without full-size temporaries.

Phase 2 of :func:`edge_agent.codecs.decode.accumulate_update`. A :class:`Term` reaches
:meth:`Folder.fold` only once its payload has been validated in full (finite values, valid codes
and scales; :func:`~edge_agent.codecs.decode.fold_updates` and :class:`~edge_agent.codecs.partial.GroupSum`
finish a deferred NaN/Inf check first), so nothing here can fail half-way: the accumulator is only
ever touched by a fold that runs to the end.

Why blocks: the old fold decoded a whole tensor into a float64 temporary (8 MB for a 1M-element
tensor, written to memory and read back by ``acc +=``). Here a tensor is walked in blocks through
scratch buffers allocated once and reused for every update, so a block's working set stays in
the L2 cache and no full-size temporary is ever made.

Kernels, chosen per call:

* one term (:meth:`Folder.fold`): ``scratch = float64(values)``, ``scratch *= factor``,
  ``acc += scratch``: the same operations, and so the same bits, as the old whole-tensor fold,
  on a reused scratch block;
* several terms (:meth:`Folder.fold`): the rows are cast into a ``(G, BLOCK)`` float64 scratch
  matrix and folded with one BLAS ``gemv`` (``coefficients @ rows``) and one ``acc +=``, so the
  accumulator streams through the cache once per group instead of once per update;
* several terms in float32 (:meth:`Folder.fold32`, the server's int8/fp16 groups,
  :mod:`edge_agent.codecs.partial`): the same with a float32 matrix and ``sgemv``.

:meth:`Folder.fold` accumulates in float64: every product ``value * factor`` of a float32 or
int8 value (24 significant bits at most) with a float64 factor is formed in float64, and the sums
are float64; only the order of the float64 additions differs between its two kernels (the
difference is a few float64 ulps of the sum, far below the float32 result's resolution).
:meth:`Folder.fold32` states its float32 bound in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge_agent.codecs.reader import Record
from edge_agent.codecs.workers import FoldWorkers

BLOCK = 32_768  # elements per group-fold block: 256 KiB of float64 scratch per row (a few % faster than 16K)
# G x block <= this keeps OpenBLAS's gemv on one thread (measured: 8 x 32K is single-threaded;
# 8 x 64K spawns threads that cost 5-30x more CPU on a busy 2-core machine)
GEMV_ELEMENTS = 262_144
SINGLE_BLOCK = 65_536  # elements per block of a one-update fold: 512 KiB of float64 scratch, fewer numpy calls
BLOCK32 = 32_768  # elements per block of the float32 group fold: 8 x 32K float32 is 1 MiB (one L2)


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


class _Scratch:
    """One thread's scratch: the one-update block, the group matrix and its gemv output."""

    def __init__(self) -> None:
        self.one = np.empty(0, dtype=np.float64)
        self.rows = np.empty((0, 0), dtype=np.float64)
        self.sum = np.empty(0, dtype=np.float64)
        self.rows32 = np.empty((0, 0), dtype=np.float32)
        self.sum32 = np.empty(0, dtype=np.float32)

    def ensure(self, count: int, length: int) -> None:
        if self.rows.shape[0] < count or self.rows.shape[1] < length:
            self.rows = np.empty((max(count, self.rows.shape[0]), max(length, self.rows.shape[1])))
            self.sum = np.empty(self.rows.shape[1])

    def ensure32(self, count: int, length: int) -> None:
        if self.rows32.shape[0] < count or self.rows32.shape[1] < length:
            shape = (max(count, self.rows32.shape[0]), max(length, self.rows32.shape[1]))
            self.rows32 = np.empty(shape, dtype=np.float32)
            self.sum32 = np.empty(shape[1], dtype=np.float32)
        if len(self.sum) < length:
            self.sum = np.empty(length)


class Folder:
    """Scratch buffers for the blocked fold, allocated on first use and reused across updates.

    A one-update fold uses ``single_block`` float64 values (512 KiB); a group fold of G updates a
    ``(G, block)`` float64 matrix (2 MiB for G = 8) and one block-sized row. A per-channel tensor
    whose rows are longer than a block is walked one row at a time, so its scratch is row-sized.
    With ``workers`` (:class:`~edge_agent.codecs.workers.FoldWorkers`) a tensor's blocks are shared
    out in contiguous runs, one scratch set per thread; the blocks, and so the result, are the same.
    """

    def __init__(
        self, *, block: int = BLOCK, single_block: int = SINGLE_BLOCK, workers: FoldWorkers | None = None
    ) -> None:
        if block < 1 or single_block < 1:
            raise ValueError(f"block sizes must be >= 1, got block={block}, single_block={single_block}")
        self.block = block
        self.single_block = single_block
        self.workers = workers if workers is not None else FoldWorkers(1)
        self._scratch = [_Scratch()]

    @property
    def _rows(self) -> np.ndarray:  # the calling thread's group matrix (tests look at its size)
        return self._scratch[0].rows

    def fold(self, acc: np.ndarray, terms: list[Term]) -> None:
        """``acc += sum(factors_j * values_j)`` in place; ``acc`` is a flat, contiguous float64 array."""
        if not terms or acc.size == 0:
            return
        if len(terms) == 1:
            length = min(block_length(terms, self.single_block), acc.size)
            self._run(acc.size, length, lambda scratch, starts: _fold_single(acc, terms[0], length, scratch, starts))
            return
        length = min(block_length(terms, max(1, min(self.block, GEMV_ELEMENTS // len(terms)))), acc.size)
        coefficients = np.array([_coefficient(term) for term in terms], dtype=np.float64)
        self._run(
            acc.size, length, lambda scratch, starts: _fold_group(acc, terms, coefficients, length, scratch, starts)
        )

    def fold32(self, acc: np.ndarray, terms: list[Term]) -> None:
        """Like :meth:`fold`, with the group's sum in float32: one float32 ``gemv`` per block.

        The rows are cast to float32 (exact for int8 codes, fp16 and fp32 values) and the factors
        rounded to float32, so per element the group sum is within ``(len(terms) + 1) * 2**-24 *
        sum(|factor * value|)`` of the exact one; the caller keeps each ``|factor * value|`` far
        below the float32 range (:mod:`edge_agent.codecs.partial`). Half the bytes of the float64
        group fold per row, and 15 % less time for int8 codes (docs/benchmarks.md).
        """
        if not terms or acc.size == 0:
            return
        length = min(block_length(terms, max(1, min(BLOCK32, GEMV_ELEMENTS // len(terms)))), acc.size)
        coefficients = np.array([_coefficient(term) for term in terms], dtype=np.float32)
        self._run(
            acc.size, length, lambda scratch, starts: _fold_group32(acc, terms, coefficients, length, scratch, starts)
        )

    def _run(self, size: int, length: int, kernel: Callable[[_Scratch, range], None]) -> None:
        """``kernel(scratch, block starts)`` over runs of blocks, one run per worker."""
        blocks = range(0, size, length)
        parts = max(1, min(self.workers.count, len(blocks)))
        while len(self._scratch) < parts:
            self._scratch.append(_Scratch())
        runs = [blocks[part * len(blocks) // parts : (part + 1) * len(blocks) // parts] for part in range(parts)]
        self.workers.run([_bind(kernel, scratch, run) for scratch, run in zip(self._scratch, runs, strict=False)])


def _bind(kernel: Callable[[_Scratch, range], None], scratch: _Scratch, run: range) -> Callable[[], None]:
    return lambda: kernel(scratch, run)


def _fold_group(
    acc: np.ndarray, terms: list[Term], coefficients: np.ndarray, length: int, scratch: _Scratch, starts: range
) -> None:
    scratch.ensure(len(terms), length)
    for start in starts:
        stop = min(start + length, acc.size)
        matrix = scratch.rows[: len(terms), : stop - start]
        for index, term in enumerate(terms):
            _load_row(matrix[index], term, start, stop)
        partial = scratch.sum[: stop - start]
        np.dot(coefficients, matrix, out=partial)
        acc[start:stop] += partial


def _fold_group32(
    acc: np.ndarray, terms: list[Term], coefficients: np.ndarray, length: int, scratch: _Scratch, starts: range
) -> None:
    scratch.ensure32(len(terms), length)
    for start in starts:
        stop = min(start + length, acc.size)
        matrix = scratch.rows32[: len(terms), : stop - start]
        for index, term in enumerate(terms):
            _load_row(matrix[index], term, start, stop)
        partial = scratch.sum32[: stop - start]
        np.dot(coefficients, matrix, out=partial)
        wide = scratch.sum[: stop - start]
        np.copyto(wide, partial)  # a cast, then a same-type add: faster than numpy's buffered mixed add
        acc[start:stop] += wide


def _fold_single(acc: np.ndarray, term: Term, length: int, scratch: _Scratch, starts: range) -> None:
    if len(scratch.one) < length:
        scratch.one = np.empty(length)
    for start in starts:
        stop = min(start + length, acc.size)
        block = scratch.one[: stop - start]
        _scaled(block, term, start, stop)
        acc[start:stop] += block


def _coefficient(term: Term) -> float:
    """The gemv coefficient: the scalar factor, or 1.0 when per-channel factors scale the row itself."""
    if isinstance(term.factors, np.ndarray):
        return 1.0 if len(term.factors) > 1 else float(term.factors[0])
    return float(term.factors)


def _load_row(row: np.ndarray, term: Term, start: int, stop: int) -> None:
    """``row = values[start:stop]`` in the row's float type, times the per-channel factors if there are several."""
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
