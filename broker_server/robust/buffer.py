"""A round's decoded updates, kept for the rules that need all of them at once.

:class:`UpdateBuffer` stores one row per update in a single ``[rows, d]`` matrix preallocated
from the round's size, with the row's weight and device id alongside. Its memory is fixed when it
is built and never grows:

    nbytes = rows * (d * itemsize + 8 [weight] + 4 [row scale, float16 only]) + 4 * d [float16 staging]

and the constructor refuses a ``rows`` whose ``nbytes`` exceeds ``BufferConfig.max_bytes``
(``BufferConfig.max_rows(d)`` says how many fit, so the server can select at most that many
devices). Rules evaluated over the buffer add about ``BufferConfig.work_bytes`` of float64 column
blocks (plus ``8 n^2`` bytes for Krum).

**Policy when full: refuse, never evict.** An update beyond the last row raises
:class:`BufferFull` and the buffer keeps exactly what it held. Eviction or a random reservoir
would drop updates the server has already accepted, make the aggregate depend on arrival order or
a random draw, and let a flood of (Sybil) updates push honest ones out; a refusal is visible,
deterministic, and the server prevents it anyway by issuing no more tasks than there are rows.

**float16 storage** halves the matrix. Each row is stored divided by its own max ``|x|`` (kept as a
float32 row scale) so the float16 range can never overflow and a row's large elements keep float16's
11-bit precision: an element comes back within ``2^-11 |x| + 2^-25 max|x|`` of what was sent
(relative error <= 0.05 % for elements above ``6.1e-5 * max|x|``, float16's smallest normal; smaller
ones are subnormal and carry an absolute error of at most ``3e-8 * max|x|``). Krum's distances
and the trust statistics see that error; with float32 storage rows are exactly the decoded values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from broker_server.robust.core import DEFAULT_WORK_BYTES, RowRule, RuleResult, check_work_bytes, finite_float
from broker_server.robust.errors import BufferFull
from broker_server.robust.flatten import Flattener, Tensors
from edge_agent.codecs import DEFAULT_MAX_ELEMENTS, parse_update

StorageDtype = Literal["float32", "float16"]
_ITEMSIZE = {"float32": 4, "float16": 2}


@dataclass(frozen=True, kw_only=True)
class BufferConfig:
    """Memory limits of the robust path (parsed once, at the server's entry point)."""

    #: hard cap on the buffer's own arrays (see the module docstring for the formula)
    max_bytes: int = 512 * 2**20
    dtype: StorageDtype = "float32"
    #: working memory of one rule evaluation over the buffer
    work_bytes: int = DEFAULT_WORK_BYTES
    #: element cap passed to the decoder
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {self.max_bytes!r}")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {self.dtype!r}")
        check_work_bytes(self.work_bytes)

    def nbytes(self, rows: int, dim: int) -> int:
        """Bytes a buffer of ``rows`` updates of ``dim`` elements holds."""
        half = self.dtype == "float16"
        return rows * (dim * _ITEMSIZE[self.dtype] + 8 + (4 if half else 0)) + (4 * dim if half else 0)

    def max_rows(self, dim: int) -> int:
        """The most updates of ``dim`` elements that fit in ``max_bytes`` (select at most this many)."""
        fixed = self.nbytes(0, dim)
        return max(0, (self.max_bytes - fixed) // (self.nbytes(1, dim) - fixed))


class UpdateBuffer:
    """Up to ``rows`` flattened updates with their weights and device ids (see the module docstring)."""

    def __init__(self, flattener: Flattener, *, rows: int, config: BufferConfig | None = None) -> None:
        self.config = config if config is not None else BufferConfig()
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        dim = flattener.size
        need = self.config.nbytes(rows, dim)
        if need > self.config.max_bytes:
            raise ValueError(
                f"{rows} updates of {dim} {self.config.dtype} elements need {need} bytes > max_bytes "
                f"{self.config.max_bytes}; at most {self.config.max_rows(dim)} fit (select fewer devices"
                f"{', or store float16' if self.config.dtype == 'float32' else ''})"
            )
        self.flattener = flattener
        self.capacity = rows
        self.nbytes = need
        # np.empty reserves address space; pages become resident only as rows are written
        self._data = np.empty((rows, dim), dtype=np.dtype(self.config.dtype))
        self._weights = np.zeros(rows, dtype=np.float64)
        half = self.config.dtype == "float16"
        self._scale = np.ones(rows, dtype=np.float32) if half else None
        self._staging = np.empty(dim, dtype=np.float32) if half else None
        self._ids: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def dim(self) -> int:
        return self.flattener.size

    @property
    def matrix(self) -> np.ndarray:
        """The filled ``[n, d]`` rows (a read-only view; multiply by :attr:`row_scale` if set)."""
        view = self._data[: len(self)]
        view.flags.writeable = False
        return view

    @property
    def row_scale(self) -> np.ndarray | None:
        """float16 storage: each row's scale (stored row * scale = update); None for float32."""
        return None if self._scale is None else self._scale[: len(self)].copy()

    @property
    def weights(self) -> np.ndarray:
        return self._weights[: len(self)].copy()

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    def row(self, index: int) -> np.ndarray:
        """Update ``index`` as a float32 vector (a copy)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        values = self._data[index].astype(np.float32)
        if self._scale is not None:
            values *= self._scale[index]
        return values

    def tensors(self, index: int) -> Tensors:
        return self.flattener.unflatten(self.row(index))

    def _admit(self, device_id: str, weight: float) -> float:
        if not isinstance(device_id, str) or not device_id:
            raise ValueError(f"device_id must be a non-empty str, got {device_id!r}")
        if device_id in self._index:
            raise ValueError(f"device {device_id!r} already has an update in this buffer")
        if finite_float(weight, "weight") <= 0:
            raise ValueError(f"weight must be positive, got {weight!r}")
        if len(self) >= self.capacity:
            raise BufferFull(
                f"update buffer full: {self.capacity} of {self.capacity} rows ({self.nbytes} bytes, "
                f"max_bytes {self.config.max_bytes}); update from {device_id!r} refused"
            )
        return float(weight)

    def _target(self) -> np.ndarray:
        return self._staging if self._staging is not None else self._data[len(self)]

    def _commit(self, device_id: str, weight: float) -> int:
        index = len(self)
        if self._staging is not None and self._scale is not None:
            # max |x| without an O(d) temporary
            amax = max(float(self._staging.max()), -float(self._staging.min())) if self.dim else 0.0
            scale = amax if amax > 0 else 1.0
            np.divide(self._staging, np.float32(scale), out=self._staging)
            self._data[index] = self._staging  # float32 -> float16, round to nearest
            self._scale[index] = scale
        self._weights[index] = weight
        self._ids.append(device_id)
        self._index[device_id] = index
        return index

    def add(self, device_id: str, tensors: Mapping[str, np.ndarray], weight: float) -> int:
        """Store decoded tensors; returns the row. Checks everything before writing a byte."""
        w = self._admit(device_id, weight)
        self.flattener.check(tensors)
        for name, value in tensors.items():
            if not np.isfinite(np.asarray(value)).all():
                raise ValueError(f"tensor {name!r} holds NaN/Inf")
        self.flattener.flatten(tensors, out=self._target())
        return self._commit(device_id, w)

    def add_encoded(self, device_id: str, payload: bytes | bytearray | memoryview, weight: float) -> int:
        """Decode an FFCU payload straight into the next row, one tensor at a time.

        The whole payload is validated first (protocol errors from :mod:`edge_agent.codecs`), so a
        bad update, like a refused one, leaves the buffer as it was.
        """
        w = self._admit(device_id, weight)
        parsed = parse_update(payload, self.flattener.expected, max_elements=self.config.max_elements)
        target = self._target()
        for rec in parsed.records:
            target[self.flattener.slice_of(rec.name)] = parsed.record_codec(rec).decode(rec)
        return self._commit(device_id, w)

    def aggregate(self, rule: RowRule) -> RuleResult:
        """Apply ``rule`` to the stored rows (report rows index :attr:`device_ids`)."""
        if not len(self):
            raise ValueError("the update buffer is empty")
        return rule.apply(self.matrix, self.weights, row_scale=self.row_scale, work_bytes=self.config.work_bytes)

    def ids(self, rows: Sequence[int]) -> tuple[str, ...]:
        return tuple(self._ids[i] for i in rows)

    def clear(self) -> None:
        """Forget every update (the memory stays allocated for the next round)."""
        self._ids.clear()
        self._index.clear()
