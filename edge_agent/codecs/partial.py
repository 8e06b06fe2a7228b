"""The server's group fold: fp32 tensors folded into a float32 partial on arrival, the rest at commit.

:class:`GroupSum` holds the updates of one group (at most ``group`` of them,
:class:`broker_server.aggregate.WeightedMean`) until :meth:`GroupSum.commit` adds the group into
the float64 sums, which so stream through memory once per group, not once per update.

**fp32 tensors** are folded into one float32 partial sum as soon as their update arrives, block
by block while the payload is still in the CPU cache (it was just received): per block one copy
into an L1/L2-resident scratch block (fp32 values on the wire are usually misaligned, which
makes numpy's own reductions over them slow), one scale, one dot product, one add. The dot
product of the weighted block with itself is the NaN/Inf check of the values (their validation
was deferred: :func:`edge_agent.codecs.decode.prepare_update` with ``defer_finite``): it is finite
only if every value is finite and ``|factor * value| < 2**64``. A block that fails it (a *hit*)
rebuilds the partial from the group's other members, then either raises the exact
:class:`~edge_agent.errors.MalformedMessage` the full validation would have raised (the first
non-finite tensor in payload order: the update is rejected, the group loses nothing), or, all
values being finite (a weighted value of 2**64 or more, which float32 could overflow), leaves
the update to the exact fold. One read of the payload replaces a validation pass plus a fold
that, eight updates later, had to fetch the payload again from memory.

**Every other tensor** (int8 and int8-channel codes, fp16, packed and sparse codecs), and the fp32
tensors of a group with one member, are folded at commit by the exact float64 fold of
:mod:`edge_agent.codecs.fold` (int8: a group's codes cast into one cache-sized float64 matrix per
block and folded with one ``gemv``): int8 codes are small to fetch again, and were validated in
phase 1 (a cheap pass over single bytes).

**Precision.** Within a group an fp32 tensor's sum is float32: each term ``f32(w) * x`` is rounded
once and each of the at most ``group - 1`` additions once, so per element
``|partial - sum(w_i x_i)| <= (group + 1) * 2**-24 * sum(|w_i x_i|)`` to first order (5.4e-7 of
the summed magnitudes for a group of 8); across groups the sums are float64. (Flower sums all K
updates in float32: ``K * 2**-24``.) A group of one member takes the exact fold, so a single
update gives exactly ``float64(x) * w``. Weights outside ``[2**-60, 2**60]`` take it too.

**Threads.** The partial is cut into ``workers.count`` contiguous runs of blocks and a thread
folds one run (numpy and BLAS release the GIL); the exact fold splits its blocks the same way.
Every element sees the same operations in the same order whatever the thread count, so the result
does not depend on it, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from edge_agent.codecs.decode import PreparedUpdate
from edge_agent.codecs.fold import Folder, Term
from edge_agent.codecs.workers import FoldWorkers

PARTIAL_BLOCK = 65_536  # elements per block: 256 KiB of float32 scratch per worker, L2-resident
CHECK_LIMIT = 2.0**128  # dot(block, block) below this (and finite): every |f32(w) * x| < 2**64
TERM_LIMIT = 2.0**64  # the largest |factor * value| a float32 group sum takes
FACTOR_MIN, FACTOR_MAX = 2.0**-60, 2.0**60  # factors float32 carries with full precision, far from overflow
F32 = np.dtype("<f4")
VALUE_BOUND = {np.dtype("i1"): 127.0, np.dtype("<f2"): 65504.0}  # the largest |value| of a validated record


@dataclass(frozen=True)
class _Block:
    tensor: int  # index into the layout's tensors
    start: int
    stop: int


class _Layout:
    """Block boundaries of every tensor and the runs of blocks the workers share out, balanced by size."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], block: int, workers: int) -> None:
        self.names = list(shapes)
        sizes = [math.prod(shape) for shape in shapes.values()]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        blocks = [
            _Block(index, start, min(start + block, size))
            for index, size in enumerate(sizes)
            for start in range(0, size, block)
        ]
        self.block = max((blk.stop - blk.start for blk in blocks), default=0)
        total = self.offsets[-1]
        parts = max(1, min(workers, total // block))
        runs: list[list[_Block]] = [[] for _ in range(parts)]
        done = 0
        for blk in blocks:
            runs[min(parts - 1, done * parts // max(total, 1))].append(blk)
            done += blk.stop - blk.start
        self.runs = [run for run in runs if run]


@dataclass(frozen=True)
class _Plan:
    """Per tensor: the fp32 values an update folds into the partial (None: left to the exact fold)
    and their float32 weight."""

    values: list[np.ndarray | None]
    factor: np.float32

    @property
    def empty(self) -> bool:
        return all(values is None for values in self.values)


def _plan(update: PreparedUpdate, names: list[str]) -> _Plan:
    weight = update.weight
    if weight != 0 and not FACTOR_MIN <= abs(weight) <= FACTOR_MAX:
        return _Plan([None] * len(names), np.float32(0))
    values = []
    for name in names:
        term = update.terms.get(name)
        dense_fp32 = term is not None and term.values.dtype == F32 and not isinstance(term.factors, np.ndarray)
        values.append(term.values if dense_fp32 and term is not None else None)
    return _Plan(values, np.float32(weight))


def _fold_run(
    run: list[_Block], partial: list[np.ndarray], scratch: np.ndarray, plan: _Plan, fresh: list[bool]
) -> bool:
    """Fold ``plan``'s blocks of one run into the partial; True at the first block failing the check.

    A tensor's first contribution (``fresh``) is cast straight into the partial; later ones go
    through the scratch block and one add.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or NaN is what the check looks for
        return _fold_blocks(run, partial, scratch, plan, fresh)


def _fold_blocks(
    run: list[_Block], partial: list[np.ndarray], scratch: np.ndarray, plan: _Plan, fresh: list[bool]
) -> bool:
    factor = plan.factor
    for blk in run:
        values = plan.values[blk.tensor]
        if values is None:
            continue
        target = partial[blk.tensor][blk.start : blk.stop]
        first = fresh[blk.tensor]
        work = target if first else scratch[: blk.stop - blk.start]
        np.copyto(work, values[blk.start : blk.stop])
        work *= factor
        if not float(np.dot(work, work)) < CHECK_LIMIT:  # NaN, Inf, or a term of 2**64 or more
            return True
        if not first:
            target += work
    return False


def _commit_run(
    run: list[_Block], partial: list[np.ndarray], into: list[np.ndarray], summed: list[bool], wide: np.ndarray
) -> None:
    for blk in run:
        if summed[blk.tensor]:
            block = wide[: blk.stop - blk.start]
            np.copyto(block, partial[blk.tensor][blk.start : blk.stop])  # cast, then a same-type add
            into[blk.tensor][blk.start : blk.stop] += block


def _gemv_safe(term: Term) -> bool:
    """Whether the float32 group fold may take ``term`` (int8 codes or fp16 values, moderate factors)."""
    bound = VALUE_BOUND.get(term.values.dtype)
    if bound is None:
        return False
    if isinstance(term.factors, np.ndarray):
        magnitudes = np.abs(term.factors)
        largest = float(magnitudes.max(initial=0.0))
        smallest = float(magnitudes.min(initial=np.inf, where=magnitudes > 0)) if largest > 0 else 0.0
    else:
        largest = smallest = abs(term.factors)
    in_range = smallest == 0.0 or smallest >= FACTOR_MIN
    return in_range and largest <= FACTOR_MAX and bound * largest < TERM_LIMIT


class GroupSum:
    """One group of prepared updates (see the module docstring).

    :meth:`add` takes an update in (or raises, the group as it was); :meth:`commit` adds the group
    into float64 accumulators and empties it; :meth:`discard` empties it.
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], *, workers: FoldWorkers, block: int = PARTIAL_BLOCK
    ) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.workers = workers
        self._block = block
        self._layout: _Layout | None = None
        self._partial: list[np.ndarray] = []
        self._scratch: list[np.ndarray] = []
        self._wide: list[np.ndarray] = []
        self._live = [0] * len(self.shapes)  # per tensor: members whose values are in the partial
        self.members: list[PreparedUpdate] = []  # arrival order
        self._plans: list[_Plan] = []

    def __len__(self) -> int:
        return len(self.members)

    def add(self, update: PreparedUpdate) -> None:
        """Take ``update`` in; for a NaN/Inf raise the validation error, the group unchanged."""
        layout = self._ensure_layout()
        plan = _plan(update, layout.names)
        covered = {name for name, values in zip(layout.names, plan.values, strict=True) if values is not None}
        if any(rec.name not in covered for rec in update.unchecked):  # a weight float32 cannot carry
            update.check_finite()
        if not plan.empty and self._fold(plan):
            self._rebuild()
            update.check_finite()  # raises for a NaN/Inf; else some |w * x| >= 2**64: the exact fold takes it
            plan = _Plan([None] * len(layout.names), np.float32(0))
        self.members.append(update)
        self._plans.append(plan)

    def commit(self, into: MutableMapping[str, np.ndarray], folder: Folder) -> None:
        """``into[name] += the group's sum`` for every tensor, then empty the group."""
        layout = self._ensure_layout()
        summed = [live >= 2 for live in self._live]  # one member's values go to the exact fold instead
        if any(summed):
            if not self._wide:
                self._wide = [np.empty(layout.block) for _ in layout.runs]
            accs = [into[name] for name in layout.names]
            flats = [acc.reshape(-1) if acc.flags.c_contiguous else np.zeros(acc.size) for acc in accs]
            runs = zip(layout.runs, self._wide, strict=True)
            self.workers.run([_bind_commit(run, self._partial, flats, summed, wide) for run, wide in runs])
            for acc, flat, added in zip(accs, flats, summed, strict=True):
                if added and not acc.flags.c_contiguous:  # a strided accumulator: the partial went to a buffer
                    acc += flat.reshape(acc.shape)
        for index, name in enumerate(layout.names):
            in_partial = [summed[index] and plan.values[index] is not None for plan in self._plans]
            self._fold_rest(name, into[name], in_partial, folder)
        self.discard()

    def discard(self) -> None:
        self.members, self._plans = [], []
        self._live = [0] * len(self.shapes)

    def _fold_rest(self, name: str, acc: np.ndarray, in_partial: list[bool], folder: Folder) -> None:
        """The members' terms for ``name`` not summed in the partial: int8/fp16 by the float32 group
        fold when two or more can take it, the others by the exact float64 fold."""
        grouped: list[Term] = []
        exact: list[Term] = []
        for member, done in zip(self.members, in_partial, strict=True):
            if done or name not in member.records:
                continue
            term = member.terms.get(name)
            if term is not None and acc.flags.c_contiguous:
                (grouped if len(self.members) > 1 and _gemv_safe(term) else exact).append(term)
            else:  # a codec without a block kernel, or a strided accumulator
                rec = member.records[name]
                member.parsed.record_codec(rec).accumulate(rec, acc, member.weight)
        if len(grouped) == 1:
            exact.extend(grouped)
        elif grouped:
            folder.fold32(acc.reshape(-1), grouped)
        if exact:
            folder.fold(acc.reshape(-1), exact)

    def _ensure_layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _Layout(self.shapes, self._block, self.workers.count)
            storage = np.empty(self._layout.offsets[-1], dtype=np.float32)
            bounds = zip(self._layout.offsets[:-1], self._layout.offsets[1:], strict=True)
            self._partial = [storage[start:stop] for start, stop in bounds]
            self._scratch = [np.empty(self._layout.block, dtype=np.float32) for _ in self._layout.runs]
        return self._layout

    def _fold(self, plan: _Plan) -> bool:
        """Fold one plan into the partial on the workers; True if a block failed the check."""
        layout = self._ensure_layout()
        fresh = [live == 0 for live in self._live]
        runs = zip(layout.runs, self._scratch, strict=True)
        if any(self.workers.run([_bind_fold(run, self._partial, scratch, plan, fresh) for run, scratch in runs])):
            return True
        self._live = [live + (values is not None) for live, values in zip(self._live, plan.values, strict=True)]
        return False

    def _rebuild(self) -> None:
        """The partial of the members alone (they passed the check before, so they pass again)."""
        self._live = [0] * len(self.shapes)
        for plan in self._plans:
            if not plan.empty and self._fold(plan):  # pragma: no cover - the same values pass the same check
                raise AssertionError("a group member failed its re-fold")


def _bind_fold(
    run: list[_Block], partial: list[np.ndarray], scratch: np.ndarray, plan: _Plan, fresh: list[bool]
) -> Callable[[], bool]:
    return lambda: _fold_run(run, partial, scratch, plan, fresh)


def _bind_commit(
    run: list[_Block], partial: list[np.ndarray], into: list[np.ndarray], summed: list[bool], wide: np.ndarray
) -> Callable[[], None]:
    return lambda: _commit_run(run, partial, into, summed, wide)
