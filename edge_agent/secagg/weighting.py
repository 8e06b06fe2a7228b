"""Example-weighted updates under secure aggregation (FedAvg weights the server cannot apply).

The server can only add masked vectors, so a device weights its own update before quantizing:
with the session's public ``weight_unit`` ``W`` it sends

* ``(nᵢ / W) · xᵢ`` quantized like any update (clip ``c``, :func:`~edge_agent.secagg.ring.quantize`), then
* its example count ``nᵢ`` as :func:`count_words` extra ring words: the base-``(L + 1)`` digits
  ``d_j ∈ [0, L]`` of ``nᵢ``, each sent as the exact code ``d_j`` (shifted to ``d_j + L``; no
  rounding, so the digits' sums are exact).

The sum over the survivors ``U3`` then yields ``Σ nᵢxᵢ / W`` (within the quantization bound) and
``Σ nᵢ`` exactly (:func:`decode_weighted`), so the FedAvg mean ``Σ nᵢxᵢ / Σ nᵢ`` comes out without
any single ``nᵢ`` leaving its device. The clip applies to the *scaled* update: ``W`` should be
about the cohort's typical count (the server takes the mean its devices reported), so that
``nᵢ / W ≈ 1``. Error of the mean: less than ``|U3| · (c / L) · W / Σ nᵢ`` per coordinate
(:func:`weighted_bound`), ``c / L`` when every ``nᵢ = W``.

The flat vector is the manifest's aggregated tensors in order (:func:`flatten`, :func:`unflatten`).
Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_agent.errors import SecAggInputError
from edge_agent.secagg import ring
from edge_agent.secagg.ring import RingSpec

#: the largest example count a device may weigh with (fits the u32 ``num_examples`` of an UPDATE)
MAX_EXAMPLES = 2**31 - 1


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def count_words(spec: RingSpec) -> int:
    """How many ring words carry the example count: base-``(L + 1)`` digits of up to ``MAX_EXAMPLES``."""
    base = spec.levels + 1
    words, capacity = 1, base
    while capacity <= MAX_EXAMPLES:
        words, capacity = words + 1, capacity * base
    return words


def session_length(update_size: int, spec: RingSpec) -> int:
    """The ring words of one weighted update: the update's coordinates plus the count's digits."""
    return update_size + count_words(spec)


def flatten(delta: Mapping[str, np.ndarray], specs: Sequence[_Named]) -> np.ndarray:
    """The tensors of ``specs`` (manifest order) as one float64 vector; SecAggInputError if one is missing."""
    parts = []
    for spec in specs:
        if spec.name not in delta:
            raise SecAggInputError(f"update lacks tensor {spec.name!r}")
        value = np.asarray(delta[spec.name])
        if value.shape != tuple(spec.shape):
            raise SecAggInputError(f"update tensor {spec.name!r} has shape {value.shape}, expected {spec.shape}")
        parts.append(value.reshape(-1).astype(np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, specs: Sequence[_Named]) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten` (float32 tensors, the model's dtype)."""
    out, offset = {}, 0
    for spec in specs:
        size = math.prod(spec.shape)
        out[spec.name] = vector[offset : offset + size].reshape(spec.shape).astype(np.float32)
        offset += size
    if offset != vector.size:
        raise SecAggInputError(f"vector of {vector.size} values does not match tensors of {offset}")
    return out


def encode_weighted(
    update: np.ndarray, num_examples: int, weight_unit: float, spec: RingSpec, rng: np.random.Generator
) -> np.ndarray:
    """``(n / W) · update`` quantized, followed by ``n``'s exact digit codes: ring words to mask."""
    if isinstance(num_examples, bool) or not 1 <= num_examples <= MAX_EXAMPLES:
        raise SecAggInputError(f"num_examples must be in 1..{MAX_EXAMPLES}, got {num_examples!r}")
    if not (math.isfinite(weight_unit) and weight_unit > 0):
        raise SecAggInputError(f"weight_unit must be a finite number > 0, got {weight_unit!r}")
    scaled = np.asarray(update, dtype=np.float64) * (num_examples / weight_unit)
    codes = ring.quantize(scaled, spec, rng)
    digits, base, rest = [], spec.levels + 1, num_examples
    for _ in range(count_words(spec)):
        rest, digit = divmod(rest, base)
        digits.append(digit + spec.levels)
    return np.concatenate([codes, np.asarray(digits, dtype=spec.dtype)])


@dataclass(frozen=True, eq=False)
class WeightedSum:
    """What the server learns from a weighted session: the FedAvg mean and the survivors' total count."""

    mean: np.ndarray
    total_examples: int
    count: int


def decode_weighted(ring_sum: np.ndarray, count: int, spec: RingSpec, weight_unit: float) -> WeightedSum:
    """The example-weighted mean of ``count`` survivors from their ring sum (see the module docstring)."""
    words = count_words(spec)
    if ring_sum.size <= words:
        raise SecAggInputError(f"ring sum of {ring_sum.size} words holds no update besides the count")
    floats = ring.decode_sum(ring_sum, count, spec)  # refuses sums whose masks did not cancel
    digit_sums = ring_sum[-words:].astype(np.int64) - count * spec.levels
    if int(digit_sums.min()) < 0:
        raise SecAggInputError("the count digits sum below zero: not a weighted session's sum")
    total = sum(int(d) * (spec.levels + 1) ** j for j, d in enumerate(digit_sums))
    if total < count:
        raise SecAggInputError(f"{count} survivors reported {total} examples in total")
    return WeightedSum(mean=floats[:-words] * (weight_unit / total), total_examples=total, count=count)


def weighted_bound(count: int, spec: RingSpec, weight_unit: float, total_examples: int) -> float:
    """A strict bound on ``|decoded mean - Σ nᵢxᵢ / Σ nᵢ|`` per coordinate (no coordinate clipped)."""
    return ring.quantization_bound(count, spec) * weight_unit / total_examples
