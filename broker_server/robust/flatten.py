"""Tensors <-> one flat vector, in the manifest's aggregated-tensor order.

Robust rules work on an ``[n, d]`` matrix: one row per update, ``d`` = the number of aggregated
elements. :class:`Flattener` fixes where each tensor lives in a row so that rows from different
devices line up element for element.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

Tensors = dict[str, np.ndarray]


class _NamedShape(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class Flattener:
    """Maps named tensors to slices of one vector (order = construction order)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]] | Iterable[tuple[str, tuple[int, ...]]]) -> None:
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, shape in items:
            if name in self._shapes:
                raise ValueError(f"tensor {name!r} listed twice")
            shape = tuple(int(dim) for dim in shape)
            if any(dim < 0 for dim in shape):
                raise ValueError(f"tensor {name!r}: negative dimension in {shape}")
            size = math.prod(shape)
            self._shapes[name] = shape
            self._slices[name] = slice(offset, offset + size)
            offset += size
        if not self._shapes:
            raise ValueError("no tensors to flatten")
        self.size = offset

    @classmethod
    def from_specs(cls, specs: Iterable[_NamedShape]) -> Flattener:
        """From ``manifest.aggregated_tensors`` (anything with ``name`` and ``shape``)."""
        return cls([(spec.name, tuple(spec.shape)) for spec in specs])

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        """name -> shape, the ``expected`` argument of the codec functions."""
        return dict(self._shapes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._shapes)

    def slice_of(self, name: str) -> slice:
        return self._slices[name]

    def check(self, tensors: Mapping[str, np.ndarray]) -> None:
        """``ValueError`` unless ``tensors`` has exactly this flattener's names and shapes."""
        if set(tensors) != set(self._shapes):
            missing = sorted(set(self._shapes) - set(tensors))
            extra = sorted(set(tensors) - set(self._shapes))
            raise ValueError(f"tensor names differ from the model's: missing {missing}, unexpected {extra}")
        for name, shape in self._shapes.items():
            got = np.shape(tensors[name])
            if got != shape:
                raise ValueError(f"tensor {name!r}: shape {got} != expected {shape}")

    def flatten(self, tensors: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """One vector (float32 unless ``out`` says otherwise); checks names and shapes first."""
        self.check(tensors)
        if out is None:
            out = np.empty(self.size, dtype=np.float32)
        elif out.shape != (self.size,):
            raise ValueError(f"out has shape {out.shape}, expected ({self.size},)")
        for name, where in self._slices.items():
            out[where] = np.asarray(tensors[name]).reshape(-1)
        return out

    def unflatten(self, vector: np.ndarray, dtype: type[np.floating] = np.float32) -> Tensors:
        """Fresh arrays (never views of ``vector``) with the model's shapes."""
        if vector.shape != (self.size,):
            raise ValueError(f"vector has shape {vector.shape}, expected ({self.size},)")
        return {
            name: vector[where].astype(dtype, copy=True).reshape(self._shapes[name])
            for name, where in self._slices.items()
        }
