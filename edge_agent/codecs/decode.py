"""Decoding FFCU payloads: full decode (devices, tests) and the server's two-phase streaming fold.

Phase 1 (:func:`parse_update`) reads and validates the *whole* payload into :class:`Record`
views without materialising any tensor (:func:`prepare_update` adds the accumulator checks);
phase 2 (:func:`fold_updates`) folds one tensor at a time, in cache-sized blocks
(:mod:`edge_agent.codecs.fold`). A bad payload therefore fails before a single accumulator
element has been touched.

``defer_finite=True`` leaves the NaN/Inf pass over fp32 values out of phase 1 (it is one full
read of every fp32 tensor) for a caller that checks the values as it folds them: the server's
group partial (:mod:`edge_agent.codecs.partial`). Such a :class:`PreparedUpdate` lists the
unchecked records in ``unchecked``; :meth:`PreparedUpdate.check_finite` raises exactly the error
the full phase 1 would have raised, and any other error of phase 1 is preceded by that check,
so the error a payload gets does not depend on the deferral.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.codecs.base import Codec, require_finite
from edge_agent.codecs.choose import MILD_CODECS
from edge_agent.codecs.fold import Folder, Term, dense_term
from edge_agent.codecs.quantize import Fp32
from edge_agent.codecs.reader import Reader, Record
from edge_agent.codecs.wire import (
    BODY_LENGTH,
    CODECS,
    DEFAULT_MAX_ELEMENTS,
    FLAG_ZSTD,
    HEADER,
    MAGIC,
    MAX_NDIM,
    MAX_TENSORS,
    VERSION,
    max_body_bytes,
    zstd,
)
from edge_agent.errors import ContractViolation, MalformedMessage, ProtocolError, UnsupportedVersion


@dataclass(frozen=True)
class UpdateInfo:
    """What :func:`accumulate_update` folded in."""

    codec: str  # codec name, e.g. "topk-int8"
    tensors: int
    elements: int  # dense element count of the update (sum of n over tensors)
    payload_bytes: int  # size of the payload as received (compressed, with header)
    zstd: bool = False  # whether the body was zstd-compressed


@dataclass
class ParsedUpdate:
    codec: Codec  # the update's (header) codec; each record has its own ``codec_id``
    records: list[Record]
    info: UpdateInfo
    unchecked: tuple[Record, ...] = ()  # fp32 records whose NaN/Inf pass was deferred (payload order)

    def record_codec(self, record: Record) -> Codec:
        return CODECS[record.codec_id]


def check_finite(records: Sequence[Record]) -> None:
    """Fp32's own NaN/Inf check on deferred records, in payload order: the error phase 1 would raise."""
    for rec in records:
        require_finite(rec.data, rec.name)


def _body(view: memoryview, codec: Codec, flags: int, count: int, max_elements: int) -> bytes | memoryview:
    body = view[HEADER.size :]
    if not flags & FLAG_ZSTD:
        return body
    if zstd is None:
        raise UnsupportedVersion("update body is zstd-compressed but the zstandard module is not installed")
    if len(body) < BODY_LENGTH.size:
        raise MalformedMessage("update truncated in the zstd body length")
    (declared,) = BODY_LENGTH.unpack_from(body, 0)
    limit = max_body_bytes(count, max_elements)
    if declared > limit:
        raise MalformedMessage(
            f"zstd body declares {declared} uncompressed bytes > limit {limit} "
            f"({count} tensors, {codec.name}, max_elements={max_elements})"
        )
    frame = body[BODY_LENGTH.size :]
    try:
        content_size = zstd.frame_content_size(frame)
        if content_size not in (-1, declared):
            raise MalformedMessage(f"zstd frame content size {content_size} != declared body length {declared}")
        out = zstd.ZstdDecompressor().decompress(frame, max_output_size=max(declared, 1), allow_extra_data=False)
    except zstd.ZstdError as exc:
        raise MalformedMessage(f"zstd body does not decompress to {declared} bytes: {exc}") from None
    if len(out) != declared:
        raise MalformedMessage(f"zstd body decompressed to {len(out)} bytes, declared {declared}")
    return bytes(out)


def parse_update(
    payload: bytes | bytearray | memoryview,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    defer_finite: bool = False,
) -> ParsedUpdate:
    """Phase 1: validate the whole payload; returns views (nothing decoded).

    ``defer_finite``: fp32 records skip their NaN/Inf pass and are listed in ``unchecked``. Should
    the payload fail a later check, the deferred records are checked first, so a NaN in an
    earlier tensor is still the error raised.
    """
    view = memoryview(payload).cast("B")
    codec_id, flags, count = _header(view)
    codec = CODECS[codec_id]
    reader = Reader(_body(view, codec, flags, count, max_elements))
    unchecked: list[Record] = []
    try:
        records = _records(reader, codec_id, count, expected, max_elements, unchecked if defer_finite else None)
    except ProtocolError:
        check_finite(unchecked)
        raise
    info = UpdateInfo(codec.name, count, sum(rec.size for rec in records), len(view), bool(flags & FLAG_ZSTD))
    return ParsedUpdate(codec, records, info, tuple(unchecked))


def _records(
    reader: Reader,
    codec_id: int,
    count: int,
    expected: Mapping[str, tuple[int, ...]] | None,
    max_elements: int,
    unchecked: list[Record] | None,
) -> list[Record]:
    """Every record of the body, validated; fp32 records skip their NaN/Inf pass into ``unchecked`` if given."""
    codec = CODECS[codec_id]
    records: list[Record] = []
    seen: set[str] = set()
    total = 0
    order = list(expected) if expected is not None else None
    for index in range(count):
        name, shape, size = _record_head(reader, index, order)
        if name in seen:
            raise MalformedMessage(f"duplicate tensor name {name!r}")
        seen.add(name)
        total += size
        if total > max_elements:
            raise MalformedMessage(
                f"tensor {name!r}: shape {shape} brings the update to {total} elements > max_elements {max_elements}"
            )
        if expected is not None:
            _check_expected(name, shape, expected)
        record_codec = reader.byte(f"tensor {name!r} codec id")
        if record_codec not in CODECS:
            raise UnsupportedVersion(
                f"tensor {name!r}: unknown codec id {record_codec} (this code knows {sorted(CODECS)})"
            )
        if record_codec != codec_id and CODECS[record_codec].name not in MILD_CODECS:
            raise ContractViolation(
                f"tensor {name!r} uses codec {CODECS[record_codec].name!r} inside a {codec.name} update "
                f"(a record may use the update's codec or one of {sorted(MILD_CODECS)})"
            )
        parser = CODECS[record_codec]
        if unchecked is not None and isinstance(parser, Fp32) and parser.name == "fp32":
            record = parser.parse(reader, name, shape, size, finite=False)
            unchecked.append(record)
        else:
            record = parser.parse(reader, name, shape, size)
        record.codec_id = record_codec
        records.append(record)
    if reader.remaining:
        raise MalformedMessage(f"{reader.remaining} trailing bytes after {count} tensors")
    if expected is not None and seen != set(expected):
        missing = sorted(set(expected) - seen)
        raise ContractViolation(f"update lacks tensors {missing}")
    return records


def _header(view: memoryview) -> tuple[int, int, int]:
    if len(view) < HEADER.size:
        raise MalformedMessage(f"update truncated: {len(view)} bytes < {HEADER.size}-byte header")
    magic, version, codec_id, flags, reserved, count = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessage(f"not a compressed update: magic {bytes(magic)!r} != {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersion(f"compressed update version {version} (this code reads {VERSION})")
    if codec_id not in CODECS:
        raise UnsupportedVersion(f"unknown codec id {codec_id} (this code knows {sorted(CODECS)})")
    if flags & ~FLAG_ZSTD:
        raise MalformedMessage(f"unknown flag bits {flags & ~FLAG_ZSTD:#04x} in update header")
    if reserved:
        raise MalformedMessage(f"reserved header byte is {reserved}, must be 0")
    if count > MAX_TENSORS:
        raise MalformedMessage(f"tensor count {count} > {MAX_TENSORS}")
    return codec_id, flags, count


def payload_codec(payload: bytes | bytearray | memoryview) -> str:
    """The codec name an FFCU payload declares (header checks only; the body is not read)."""
    codec_id, _, _ = _header(memoryview(payload).cast("B"))
    return CODECS[codec_id].name


def _record_head(reader: Reader, index: int, order: list[str] | None) -> tuple[str, tuple[int, ...], int]:
    name_len = reader.byte(f"tensor {index} name length")
    if name_len == 0:  # a reference by position in the model's aggregated-tensor list
        position = reader.varint(f"tensor {index} position")
        if order is None:
            raise ContractViolation(f"tensor {index} is referenced by position; decoding needs the model's tensor list")
        if position >= len(order):
            raise ContractViolation(f"tensor {index}: position {position} beyond the model's {len(order)} tensors")
        name = order[position]
    else:
        raw = reader.take(name_len, f"tensor {index} name")
        try:
            name = raw.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage(f"tensor {index}: name is not UTF-8") from None
    ndim = reader.byte(f"tensor {name!r} ndim")
    if ndim > MAX_NDIM:
        raise MalformedMessage(f"tensor {name!r}: ndim {ndim} > {MAX_NDIM}")
    what = f"tensor {name!r} dims"
    shape = tuple(reader.varint(what) for _ in range(ndim))
    return name, shape, math.prod(shape)


def _check_expected(name: str, shape: tuple[int, ...], expected: Mapping[str, tuple[int, ...]]) -> None:
    if name not in expected:
        raise ContractViolation(f"unexpected tensor {name!r} in update")
    want = tuple(expected[name])
    if shape != want:
        raise ContractViolation(f"tensor {name!r}: shape {shape} != expected {want}")


def decode_update(
    payload: bytes | bytearray | memoryview,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, np.ndarray]:
    """Decode a whole update to writable float32 arrays.

    With ``expected`` (name -> shape) the names and shapes must match exactly
    (:class:`ContractViolation`). Malformed payloads raise :class:`MalformedMessage`, unknown
    versions/codecs :class:`UnsupportedVersion`. ``max_elements`` caps the element count summed
    over all tensors (checked from the declared dims before anything is allocated).
    """
    parsed = parse_update(payload, expected, max_elements=max_elements)
    return {rec.name: parsed.record_codec(rec).decode(rec).reshape(rec.shape) for rec in parsed.records}


@dataclass(frozen=True)
class PreparedUpdate:
    """An update validated against checked accumulators: once :attr:`unchecked` is empty (or
    :meth:`check_finite` passed) folding it can no longer fail."""

    parsed: ParsedUpdate
    weight: float
    records: dict[str, Record]
    terms: dict[str, Term | None]  # per tensor: the block kernel's term, or None (the codec's own fold)
    unchecked: tuple[Record, ...] = ()  # fp32 records whose NaN/Inf check is still to be done (payload order)

    @property
    def info(self) -> UpdateInfo:
        return self.parsed.info

    def check_finite(self) -> None:
        """Raise the :class:`MalformedMessage` phase 1 would have raised for a NaN/Inf in a deferred record."""
        check_finite(self.unchecked)

    @property
    def held_bytes(self) -> int:
        """Payload bytes this update keeps alive until folded (its records' data, scales and indices)."""
        return sum(
            rec.data.nbytes
            + (rec.scales.nbytes if rec.scales is not None else 0)
            + (rec.indices.nbytes if rec.indices is not None else 0)
            for rec in self.parsed.records
        )


def prepare_update(
    payload: bytes | bytearray | memoryview,
    into: Mapping[str, np.ndarray],
    weight: float,
    expected: Mapping[str, tuple[int, ...]],
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    defer_finite: bool = False,
) -> PreparedUpdate:
    """Phase 1 of :func:`accumulate_update`: every check, nothing modified (errors as there).

    ``defer_finite``: see :func:`parse_update`; the NaN/Inf check of fp32 records is left to the
    caller (:attr:`PreparedUpdate.unchecked`), except that it still precedes an accumulator error.
    """
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight!r}")
    parsed = parse_update(payload, expected, max_elements=max_elements, defer_finite=defer_finite)
    try:
        _check_accumulators(parsed.records, into)
    except ValueError:
        check_finite(parsed.unchecked)
        raise
    weight = float(weight)
    records = {rec.name: rec for rec in parsed.records}
    terms = {rec.name: dense_term(rec, parsed.record_codec(rec).name, weight) for rec in parsed.records}
    return PreparedUpdate(parsed, weight, records, terms, parsed.unchecked)


def _check_accumulators(records: Sequence[Record], into: Mapping[str, np.ndarray]) -> None:
    for rec in records:
        acc = into.get(rec.name)
        if not isinstance(acc, np.ndarray) or acc.dtype != np.float64 or acc.shape != rec.shape:
            got = f"{acc.dtype}{acc.shape}" if isinstance(acc, np.ndarray) else type(acc).__name__
            raise ValueError(f"accumulator {rec.name!r} must be a float64 array of shape {rec.shape}, got {got}")
        if not acc.flags.writeable:
            raise ValueError(f"accumulator {rec.name!r} is read-only")


def fold_updates(
    updates: Sequence[PreparedUpdate], into: MutableMapping[str, np.ndarray], folder: Folder | None = None
) -> None:
    """Phase 2: ``into[name] += weight * decoded`` for every prepared update, tensor by tensor.

    The updates must have been prepared against these accumulators (same names and shapes). With
    several updates the block kernel folds them together (one pass over each accumulator). Records
    whose NaN/Inf check was deferred are checked first, all of them before anything is folded.
    """
    for update in updates:
        update.check_finite()
    folder = folder if folder is not None else Folder()
    for name, acc in into.items():
        terms: list[Term] = []
        for update in updates:
            term = update.terms.get(name)
            if term is not None and acc.flags.c_contiguous:
                terms.append(term)
            elif name in update.records:  # no block kernel for this codec, or a strided accumulator
                rec = update.records[name]
                update.parsed.record_codec(rec).accumulate(rec, acc, update.weight)
        if terms:
            folder.fold(acc.reshape(-1), terms)


def accumulate_update(
    payload: bytes | bytearray | memoryview,
    into: MutableMapping[str, np.ndarray],
    weight: float,
    expected: Mapping[str, tuple[int, ...]],
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    folder: Folder | None = None,
) -> UpdateInfo:
    """``into[name] += weight * decoded`` for every tensor, all or nothing.

    ``into`` holds float64 accumulators with the ``expected`` shapes. The payload is validated in
    full first (protocol errors as for :func:`decode_update`), then folded in one tensor at a time
    in cache-sized blocks (:mod:`edge_agent.codecs.fold`) without a float copy of the update;
    pass a long-lived ``folder`` to reuse its scratch buffers. ``ValueError`` if ``weight`` is not
    finite or ``into`` does not fit ``expected`` (a caller bug; nothing is modified).
    """
    prepared = prepare_update(payload, into, weight, expected, max_elements=max_elements)
    fold_updates([prepared], into, folder)
    return prepared.info
