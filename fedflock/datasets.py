"""Demo and simulation data: scikit-learn's bundled digits, split non-IID across devices.

Pure functions apart from :func:`load_digits_arrays` (which reads the copy shipped inside
scikit-learn; nothing is downloaded).
"""

from __future__ import annotations

import numpy as np


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit images as float32 ``[N, 1, 8, 8]`` in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits  # the `demo` extra; imported here only

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, digits.target.astype(np.int64)


def train_test_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: index arrays ``(train, test)`` with ``test_fraction`` of every class in test."""
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def dirichlet_partition(
    y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 2, max_tries: int = 100
) -> list[np.ndarray]:
    """Split indices of ``y`` across clients, each class by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` gives each client few classes (strongly non-IID); large ``alpha`` tends to IID.
    Redraws until every client has at least ``min_size`` examples.
    """
    if num_clients < 1 or alpha <= 0:
        raise ValueError("num_clients must be >= 1 and alpha > 0")
    if len(y) < num_clients * min_size:
        raise ValueError(f"{len(y)} examples cannot give {num_clients} clients {min_size} each")
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gave every client {min_size} examples in {max_tries} tries")
