"""The simulated fleet's data: scikit-learn's digits, non-IID by Dirichlet(alpha) per device (pure
apart from loading the bundled digits).

A fleet can be far larger than the 1,437 training digits, so devices do not get disjoint shards
(``fedflock.datasets.dirichlet_partition``): each device draws its class proportions from
Dirichlet(alpha) and samples its examples (without replacement within the device) from the
training pool. Devices therefore share examples across the fleet, which a disjoint split could
not avoid at this size; the test set stays disjoint from every device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.data import Dataset
from edge_agent.errors import ConfigError
from fedflock.datasets import load_digits_arrays, train_test_split

__all__ = ["dirichlet_samples", "fleet_data", "load_saved_digits", "save_digits"]


def save_digits(path: Path) -> Path:
    """Write the digits arrays to ``path`` (.npz) for the worker processes."""
    x, y = load_digits_arrays()
    np.savez(path, x=x, y=y)
    return path


def load_saved_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["x"], saved["y"]


def dirichlet_samples(
    y: np.ndarray, devices: int, alpha: float, sizes: tuple[int, int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Per device: class shares ~ Dirichlet(alpha), a size uniform in ``sizes``, indices into ``y``."""
    low, high = sizes
    if devices < 1 or alpha <= 0 or not 2 <= low <= high:
        raise ConfigError("need devices >= 1, alpha > 0 and 2 <= examples low <= high")
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    parts = []
    for _ in range(devices):
        shares = rng.dirichlet(np.full(len(by_class), alpha))
        size = int(rng.integers(low, high + 1))
        counts = rng.multinomial(size, shares)
        idx = [
            rng.choice(pool, size=min(int(n), len(pool)), replace=False)
            for pool, n in zip(by_class, counts, strict=True)
            if n
        ]
        parts.append(np.sort(np.concatenate(idx)).astype(np.int64))
    return parts


def fleet_data(
    devices: int,
    alpha: float,
    seed: int,
    sizes: tuple[int, int],
    *,
    arrays: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[list[Dataset], Dataset]:
    """Every device's data and the held-out test set; the same arguments give the same split.

    ``arrays``: the digits as :func:`load_digits_arrays` returns them (workers load the copy the
    coordinator saved with :func:`save_digits` instead of importing scikit-learn again)."""
    x, y = arrays if arrays is not None else load_digits_arrays()
    rng = np.random.default_rng(seed)
    train, test = train_test_split(y, 0.2, rng)
    parts = dirichlet_samples(y[train], devices, alpha, sizes, rng)
    xs, ys = x[train], y[train]
    return [Dataset(xs[idx], ys[idx]) for idx in parts], Dataset(x[test], y[test])
