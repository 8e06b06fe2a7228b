"""Train/validation splits (pure functions, no I/O).

Two ways to choose the validation rows, both reproducible from ``seed``:

* in-memory sources (npz, callable) use a seeded permutation: exactly ``round(n * fraction)`` rows;
* streaming sources (npy, csv, images) decide row by row from a seeded hash of the row's number
  (:func:`validation_mask`), so a row's side is known the moment it is read, the two parts go to
  separate files, and appending rows to a source never moves an existing row to the other side.
  The validation share is then ``fraction`` on average, not exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.data import Dataset
from edge_agent.errors import ConfigError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True, kw_only=True)
class DataSplit:
    """``validation`` is ``None`` when no rows are held out (``val_fraction = 0``); it may be empty."""

    train: Dataset
    validation: Dataset | None


def validation_mask(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the row numbers (int ``[n]``) that belong to validation.

    SplitMix64 of ``row + seed * golden ratio``: cheap, vectorised, and well mixed even for
    consecutive row numbers.
    """
    if fraction <= 0.0:
        return np.zeros(len(rows), dtype=bool)
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    uniform = (z >> np.uint64(11)).astype(np.float64) / float(2**53)
    return uniform < fraction


def split_in_memory(data: Dataset, fraction: float, seed: int, *, source: str) -> DataSplit:
    """Hold out ``round(len(data) * fraction)`` rows chosen by a seeded permutation.

    Both parts keep the source's row order. Raises :class:`ConfigError` for empty data or when
    nothing would be left to train on.
    """
    n = len(data)
    if n == 0:
        raise ConfigError(f"{source}: no data rows")
    if fraction <= 0.0:
        return DataSplit(train=data, validation=None)
    held_out = round(n * fraction)
    if held_out >= n:
        raise ConfigError(f"{source}: val_fraction {fraction} of {n} rows leaves none to train on")
    order = np.random.default_rng(seed).permutation(n)
    validation, train = np.sort(order[:held_out]), np.sort(order[held_out:])
    return DataSplit(
        train=Dataset(data.x[train], data.y[train]),
        validation=Dataset(data.x[validation], data.y[validation]),
    )
