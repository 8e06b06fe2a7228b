"""Opening a training bundle: verify its files, then create onnxruntime sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.errors import BundleError
from edge_agent.protocol.manifest import ROLE_OPTIMIZER_STATE, Manifest, load_manifest
from edge_agent.protocol.tensors import read_tensor_file

if TYPE_CHECKING:
    import onnxruntime as ort

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. ``digest`` is the sha256 of its manifest."""

    directory: Path
    manifest: Manifest
    digest: str

    @classmethod
    def open(cls, directory: str | Path) -> Bundle:
        """Load and verify every file's sha256; raises :class:`IntegrityError` on tampering."""
        root = Path(directory)
        manifest, digest = load_manifest(root, verify=True)
        return cls(directory=root, manifest=manifest, digest=digest)

    def initial_weights(self) -> Tensors:
        """Parameters and buffers as exported (optimizer state is not part of a model)."""
        weights = read_tensor_file(self.directory / self.manifest.weights_file)
        check_tensors(self.manifest, weights, names=[t.name for t in self.manifest.model_tensors])
        return weights

    def zero_optimizer_state(self) -> Tensors:
        return {
            t.name: np.zeros(t.shape, dtype=t.dtype) for t in self.manifest.tensors if t.role == ROLE_OPTIMIZER_STATE
        }

    def session(self, graph: str, *, threads: int = 1) -> ort.InferenceSession:
        import onnxruntime as ort  # here, not at import time: an idle agent never loads it

        spec = self.manifest.graphs[graph]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(
                str(self.directory / spec.file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors; translate them here
            raise BundleError(f"onnxruntime cannot load {spec.file}: {exc}") from exc


def check_tensors(manifest: Manifest, tensors: Tensors, *, names: list[str]) -> None:
    """Raise :class:`BundleError` unless ``tensors`` has exactly ``names`` with manifest shapes."""
    specs = {t.name: t for t in manifest.tensors}
    missing = [n for n in names if n not in tensors]
    extra = [n for n in tensors if n not in names]
    if missing or extra:
        raise BundleError(f"tensor set does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name in names:
        spec, value = specs[name], tensors[name]
        if tuple(value.shape) != spec.shape or value.dtype.name != spec.dtype:
            raise BundleError(
                f"tensor {name!r} is {value.dtype.name}{list(value.shape)}, "
                f"model expects {spec.dtype}{list(spec.shape)}"
            )
