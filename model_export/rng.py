"""A per-step random seed that layers traced into a train step can read.

ONNX's random ops cannot be seeded from a graph input (FIELD_NOTES: Dropout exports as
``RandomUniformLike``), so the train step takes an int64 ``seed`` input and opens
:func:`seed_scope` around the forward pass; seeded layers (``model_export.dropout``) derive
their masks from :func:`current_seed` with integer arithmetic that ONNX reproduces exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_SEED: list[torch.Tensor] = []


@contextlib.contextmanager
def seed_scope(seed: torch.Tensor) -> Iterator[None]:
    _SEED.append(seed)
    try:
        yield
    finally:
        _SEED.pop()


def current_seed() -> torch.Tensor | None:
    """The innermost step seed, or ``None`` outside a train step (eager PyTorch, inference)."""
    return _SEED[-1] if _SEED else None
