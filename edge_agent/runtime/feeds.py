"""Feeding a bundle's graphs: hyper-parameters, masks, and name mapping from the manifest.

Everything here reads the manifest's maps (``inputs``, ``tensor_inputs``, ``hyper_inputs``,
``global_inputs``, ``mask_inputs``, ``accumulator_inputs`` and their outputs) and feeds only what
a graph declares, so format-version-1 bundles (``x, y, lr`` + tensors) run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.errors import ContractViolation, TrainingError
from edge_agent.protocol.manifest import GraphSpec, Manifest

if TYPE_CHECKING:
    import onnxruntime as ort

Tensors = dict[str, np.ndarray]
HyperValue = float | Sequence[float]


def resolve_hyperparameters(manifest: Manifest, overrides: Mapping[str, HyperValue] | None) -> Tensors:
    """Manifest defaults overridden by a task's values; raises :class:`ContractViolation`."""
    specs = {h.name: h for h in manifest.hyperparameters}
    unknown = sorted(set(overrides or {}) - set(specs))
    if unknown:
        raise ContractViolation(f"unknown hyper-parameters {unknown}; this bundle takes {sorted(specs)}")
    values: Tensors = {}
    for name, spec in specs.items():
        raw = (overrides or {}).get(name, spec.default)
        flat = np.asarray(raw, dtype=np.float64).reshape(-1)
        size = int(np.prod(spec.shape, dtype=np.int64))
        if flat.size == 1 and size > 1:
            flat = np.repeat(flat, size)  # one number for a per-class vector: broadcast
        if flat.size != size or not np.isfinite(flat).all():
            raise ContractViolation(f"hyper-parameter {name!r} needs {size} finite number(s), got {raw!r}")
        values[name] = flat.astype(np.float32).reshape(spec.shape)
    return values


def mask_values(manifest: Manifest, frozen: Iterable[str]) -> Tensors:
    """1.0 for every masked tensor, 0.0 for the frozen ones; frozen names must have a mask."""
    masked = {name for graph in manifest.graphs.values() for name in graph.mask_inputs}
    frozen = set(frozen)
    unknown = sorted(frozen - masked)
    if unknown:
        hint = "the bundle has no trainable masks" if not masked else f"maskable: {sorted(masked)[:8]}"
        raise ContractViolation(f"cannot freeze {unknown[:5]}: {hint}")
    return {name: np.array(0.0 if name in frozen else 1.0, dtype=np.float32) for name in masked}


@dataclass
class GraphRunner:
    """One onnxruntime session plus its manifest entry."""

    session: ort.InferenceSession
    spec: GraphSpec
    _outputs: list[str] = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self._outputs = [*spec.outputs.values(), *spec.tensor_outputs.values(), *spec.accumulator_outputs.values()]

    def run(
        self,
        fixed: Mapping[str, np.ndarray],
        *,
        tensors: Mapping[str, np.ndarray],
        hyper: Mapping[str, np.ndarray],
        globals_: Mapping[str, np.ndarray] | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
        accumulators: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Tensors, Tensors, Tensors]:
        """Run once; returns (fixed outputs, new tensors, new accumulators) by logical name."""
        spec = self.spec
        feeds = {onnx: fixed[name] for name, onnx in spec.inputs.items()}
        feeds |= {onnx: tensors[name] for name, onnx in spec.tensor_inputs.items()}
        feeds |= {onnx: hyper[name] for name, onnx in spec.hyper_inputs.items()}
        feeds |= {onnx: (globals_ or {})[name] for name, onnx in spec.global_inputs.items()}
        feeds |= {onnx: (masks or {})[name] for name, onnx in spec.mask_inputs.items()}
        feeds |= {onnx: (accumulators or {})[name] for name, onnx in spec.accumulator_inputs.items()}
        try:
            values = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime's errors are untyped; translate at the boundary
            raise TrainingError(f"{spec.file} failed in onnxruntime: {exc}") from exc
        it = iter(values)
        fixed_out = {name: next(it) for name in spec.outputs}
        tensor_out = {name: next(it) for name in spec.tensor_outputs}
        acc_out = {name: next(it) for name in spec.accumulator_outputs}
        return fixed_out, tensor_out, acc_out


def micro_slices(index: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    """Split one batch into ``ceil(B / m)`` near-equal micro-batches, none of size 1 (BatchNorm)."""
    pieces = -(-len(index) // micro_batch)
    while pieces > 1 and len(index) // pieces < 2:
        pieces -= 1
    return [part for part in np.array_split(index, pieces) if len(part)]


def accumulation_scales(
    manifest: Manifest, y: np.ndarray, parts: Sequence[np.ndarray], hyper: Mapping[str, np.ndarray]
) -> list[float]:
    """Weight of each micro-batch's mean loss in the batch loss (so gradients add up exactly)."""
    total = sum(len(p) for p in parts)
    if manifest.loss.get("normalizer") == "class_weights" and "class_weights" in hyper:
        weights = hyper["class_weights"].astype(np.float64)
        sums = [float(weights[y[p]].sum()) for p in parts]
        if sum(sums) > 0:
            return [s / sum(sums) for s in sums]
    return [len(p) / total for p in parts]
