"""The training-bundle manifest (``manifest.json``): what a bundle contains and how to run it.

A bundle is a directory::

    manifest.json       this document
    train_step.onnx     one optimizer step: (x, y, lr, tensors...) -> (loss, correct, new tensors...)
    inference.onnx      (x, params, buffers) -> logits, BatchNorm in eval mode
    weights.fft         initial parameters and buffers, tensor-set format (protocol.tensors)

The manifest lists every tensor (parameters, buffers, optimizer state) with its role, and for
each graph the mapping from tensor names to ONNX input/output names, so a runtime never has to
guess names. ``files`` holds the sha256 of every other file in the bundle; the *bundle digest*
(what tasks refer to) is the sha256 of ``manifest.json`` itself, so it pins every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import BundleError, IntegrityError

FORMAT = "fedflock-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

ROLE_PARAMETER = "parameter"
ROLE_BUFFER = "buffer"
ROLE_OPTIMIZER_STATE = "optimizer_state"
ROLES = (ROLE_PARAMETER, ROLE_BUFFER, ROLE_OPTIMIZER_STATE)


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    trainable: bool
    #: True when the server averages this tensor (parameters and float buffers).
    aggregate: bool
    #: For optimizer state: the parameter it belongs to.
    of: str | None = None


@dataclass(frozen=True, kw_only=True)
class GraphSpec:
    file: str
    #: fixed inputs/outputs: logical name ("x", "y", "lr", "loss", ...) -> ONNX name
    inputs: dict[str, str]
    outputs: dict[str, str]
    #: tensor name -> ONNX input / output name
    tensor_inputs: dict[str, str] = field(default_factory=dict)
    tensor_outputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    name: str
    #: ``None`` marks the dynamic batch dimension
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    format_version: int
    name: str
    created_by: str
    opset: int
    input: InputSpec
    label: InputSpec
    num_classes: int
    loss: dict[str, Any]
    optimizer: dict[str, Any]
    tensors: tuple[TensorSpec, ...]
    graphs: dict[str, GraphSpec]
    weights_file: str
    files: dict[str, str]

    def tensors_with_role(self, role: str) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.role == role)

    @property
    def model_tensors(self) -> tuple[TensorSpec, ...]:
        """Parameters and buffers: what a model version consists of."""
        return tuple(t for t in self.tensors if t.role != ROLE_OPTIMIZER_STATE)

    @property
    def aggregated_tensors(self) -> tuple[TensorSpec, ...]:
        """What devices upload and the server averages."""
        return tuple(t for t in self.tensors if t.aggregate)


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    def tensor(t: TensorSpec) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": t.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "role": t.role,
            "trainable": t.trainable,
            "aggregate": t.aggregate,
        }
        if t.of is not None:
            out["of"] = t.of
        return out

    def graph(g: GraphSpec) -> dict[str, Any]:
        return {
            "file": g.file,
            "inputs": dict(g.inputs),
            "outputs": dict(g.outputs),
            "tensor_inputs": dict(g.tensor_inputs),
            "tensor_outputs": dict(g.tensor_outputs),
        }

    def spec(s: InputSpec) -> dict[str, Any]:
        return {"name": s.name, "shape": list(s.shape), "dtype": s.dtype}

    return {
        "format": FORMAT,
        "format_version": manifest.format_version,
        "name": manifest.name,
        "created_by": manifest.created_by,
        "opset": manifest.opset,
        "input": spec(manifest.input),
        "label": spec(manifest.label),
        "num_classes": manifest.num_classes,
        "loss": dict(manifest.loss),
        "optimizer": dict(manifest.optimizer),
        "tensors": [tensor(t) for t in manifest.tensors],
        "graphs": {name: graph(g) for name, g in manifest.graphs.items()},
        "weights_file": manifest.weights_file,
        "files": dict(manifest.files),
    }


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Parse a manifest dict; raises :class:`BundleError` with the offending field."""
    if raw.get("format") != FORMAT:
        raise BundleError(f"not a fedflock bundle manifest (format={raw.get('format')!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format_version {version!r} not supported (expected {FORMAT_VERSION})")
    try:
        tensors = tuple(
            TensorSpec(
                name=str(t["name"]),
                shape=tuple(int(d) for d in t["shape"]),
                dtype=str(t["dtype"]),
                role=str(t["role"]),
                trainable=bool(t["trainable"]),
                aggregate=bool(t["aggregate"]),
                of=t.get("of"),
            )
            for t in raw["tensors"]
        )
        graphs = {
            str(name): GraphSpec(
                file=str(g["file"]),
                inputs={str(k): str(v) for k, v in g["inputs"].items()},
                outputs={str(k): str(v) for k, v in g["outputs"].items()},
                tensor_inputs={str(k): str(v) for k, v in g.get("tensor_inputs", {}).items()},
                tensor_outputs={str(k): str(v) for k, v in g.get("tensor_outputs", {}).items()},
            )
            for name, g in raw["graphs"].items()
        }
        manifest = Manifest(
            format_version=int(version),
            name=str(raw["name"]),
            created_by=str(raw.get("created_by", "")),
            opset=int(raw["opset"]),
            input=_input_spec(raw["input"]),
            label=_input_spec(raw["label"]),
            num_classes=int(raw["num_classes"]),
            loss=dict(raw["loss"]),
            optimizer=dict(raw["optimizer"]),
            tensors=tensors,
            graphs=graphs,
            weights_file=str(raw["weights_file"]),
            files={str(k): str(v) for k, v in raw["files"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"manifest is missing or has a bad field: {exc!r}") from exc
    for t in manifest.tensors:
        if t.role not in ROLES:
            raise BundleError(f"tensor {t.name!r}: unknown role {t.role!r}")
    for required in ("train_step", "inference"):
        if required not in manifest.graphs:
            raise BundleError(f"manifest has no {required!r} graph")
    return manifest


def _input_spec(raw: dict[str, Any]) -> InputSpec:
    return InputSpec(
        name=str(raw["name"]),
        shape=tuple(None if d is None else int(d) for d in raw["shape"]),
        dtype=str(raw["dtype"]),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> str:
    """Write ``manifest.json`` into ``directory``; returns the bundle digest."""
    data = json.dumps(manifest_to_dict(manifest), indent=2, sort_keys=True).encode("utf-8")
    (directory / MANIFEST_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(directory: str | Path, *, verify: bool = True) -> tuple[Manifest, str]:
    """Read and (by default) verify a bundle directory.

    Returns ``(manifest, bundle_digest)``. Raises :class:`IntegrityError` naming the file when a
    file is missing or its sha256 differs from the manifest, :class:`BundleError` otherwise.
    """
    root = Path(directory)
    path = root / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path} is not a JSON object")
    manifest = manifest_from_dict(raw)
    if verify:
        verify_files(root, manifest)
    return manifest, hashlib.sha256(data).hexdigest()


def verify_files(root: Path, manifest: Manifest) -> None:
    referenced = {g.file for g in manifest.graphs.values()} | {manifest.weights_file}
    unlisted = referenced - set(manifest.files)
    if unlisted:
        raise IntegrityError(f"bundle files without a digest in the manifest: {sorted(unlisted)}")
    for name, expected in manifest.files.items():
        if Path(name).name != name:
            raise IntegrityError(f"bundle file name must be a plain file name: {name!r}")
        file_path = root / name
        if not file_path.is_file():
            raise IntegrityError(f"bundle file missing: {file_path}")
        actual = sha256_file(file_path)
        if actual != expected:
            raise IntegrityError(f"bundle file {name} was modified: sha256 {actual[:16]}… != manifest {expected[:16]}…")
