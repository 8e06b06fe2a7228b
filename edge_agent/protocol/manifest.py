"""The training-bundle manifest (``manifest.json``): what a bundle contains and how to run it.

A bundle is a directory::

    manifest.json       this document
    train_step.onnx     one optimizer step: (x, y, lr, tensors...) -> (loss, correct, new tensors...)
    inference.onnx      (x, params, buffers) -> logits, BatchNorm in eval mode
    weights.fft         initial parameters and buffers, tensor-set format (protocol.tensors)
    accumulate.onnx     optional (micro-batching): forward+backward of one micro-batch into gradient sums
    apply.onnx          optional (micro-batching): the optimizer step from the gradient sums

The manifest lists every tensor (parameters, buffers, optimizer state) with its role, and for
each graph the mapping from tensor names to ONNX input/output names, so a runtime never has to
guess names. Format version 2 adds graph-input hyper-parameters with defaults (loss options,
FedProx μ), the task kind, personal tensors, FedProx global-weight and trainable-mask inputs,
the accumulation graphs and the compute precision (fp16: ``loss_scale`` in, ``finite`` out);
version 1 manifests still load (all of that absent). ``files`` holds the sha256 of every other
file in the bundle; the *bundle digest*
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
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"

ROLE_PARAMETER = "parameter"
ROLE_BUFFER = "buffer"
ROLE_OPTIMIZER_STATE = "optimizer_state"
ROLES = (ROLE_PARAMETER, ROLE_BUFFER, ROLE_OPTIMIZER_STATE)
TASK_KINDS = ("classification", "binary", "regression")
#: "fp16": the train step computes in fp16 with fp32 master tensors; it takes an fp32 scalar
#: ``loss_scale`` input and returns a bool ``finite`` output (runtime: ``edge_agent.runtime.loss_scale``)
PRECISIONS = ("fp32", "fp16")
LOSS_SCALE_INPUT = "loss_scale"
FINITE_OUTPUT = "finite"


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
    #: Trained on the device, never uploaded and never aggregated (the device keeps its own copy).
    personal: bool = False


@dataclass(frozen=True, kw_only=True)
class GraphSpec:
    file: str
    #: fixed inputs/outputs: logical name ("x", "y", "lr", "loss", ...) -> ONNX name
    inputs: dict[str, str]
    outputs: dict[str, str]
    #: tensor name -> ONNX input / output name
    tensor_inputs: dict[str, str] = field(default_factory=dict)
    tensor_outputs: dict[str, str] = field(default_factory=dict)
    #: hyper-parameter name (see ``Manifest.hyperparameters``) -> ONNX input name
    hyper_inputs: dict[str, str] = field(default_factory=dict)
    #: FedProx: parameter name -> ONNX input taking its global (received) value
    global_inputs: dict[str, str] = field(default_factory=dict)
    #: trainable masks: parameter name -> ONNX input (float32 scalar, 0 = frozen)
    mask_inputs: dict[str, str] = field(default_factory=dict)
    #: gradient accumulators (zeros at the start of each effective batch): parameter name -> ONNX name
    accumulator_inputs: dict[str, str] = field(default_factory=dict)
    accumulator_outputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class HyperParamSpec:
    """A float32 graph input a task may set (``hyperparameters`` in TASK); ``default`` is row-major."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    default: tuple[float, ...]


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
    #: classification (int64 labels), binary (float32 0/1 labels like the logits) or regression
    task: str = "classification"
    #: False for regression: ``correct`` is always 0 and accuracy is not reported
    accuracy_defined: bool = True
    hyperparameters: tuple[HyperParamSpec, ...] = ()
    #: default micro-batch size when the bundle has ``accumulate``/``apply`` graphs
    micro_batch: int | None = None
    #: compute precision of the training graphs (tensors on the wire are always float32)
    precision: str = "fp32"

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

    @property
    def personal_tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.personal)

    @property
    def shared_model_tensors(self) -> tuple[TensorSpec, ...]:
        """Parameters and buffers a TASK carries: every model tensor except personal ones."""
        return tuple(t for t in self.model_tensors if not t.personal)


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
        if t.personal:
            out["personal"] = True
        return out

    def graph(g: GraphSpec) -> dict[str, Any]:
        return {
            "file": g.file,
            "inputs": dict(g.inputs),
            "outputs": dict(g.outputs),
            "tensor_inputs": dict(g.tensor_inputs),
            "tensor_outputs": dict(g.tensor_outputs),
            **{key: dict(getattr(g, key)) for key in _OPTIONAL_MAPS if getattr(g, key)},
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
        **_v2_fields(manifest),
    }


_OPTIONAL_MAPS = ("hyper_inputs", "global_inputs", "mask_inputs", "accumulator_inputs", "accumulator_outputs")


def _v2_fields(manifest: Manifest) -> dict[str, Any]:
    if manifest.format_version < 2:
        return {}
    return {
        "task": manifest.task,
        "accuracy_defined": manifest.accuracy_defined,
        "hyperparameters": [
            {"name": h.name, "shape": list(h.shape), "dtype": h.dtype, "default": list(h.default)}
            for h in manifest.hyperparameters
        ],
        "micro_batch": manifest.micro_batch,
        "precision": manifest.precision,
    }


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Parse a manifest dict; raises :class:`BundleError` with the offending field."""
    if raw.get("format") != FORMAT:
        raise BundleError(f"not a fedflock bundle manifest (format={raw.get('format')!r})")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise BundleError(
            f"bundle format_version {version!r} not supported (this code reads {list(SUPPORTED_FORMAT_VERSIONS)})"
        )
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
                personal=_bool(t.get("personal", False), "personal"),
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
                **{key: {str(k): str(v) for k, v in g.get(key, {}).items()} for key in _OPTIONAL_MAPS},
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
            task=str(raw.get("task", "classification")),
            accuracy_defined=_bool(raw.get("accuracy_defined", True), "accuracy_defined"),
            hyperparameters=tuple(_hyper_spec(h) for h in raw.get("hyperparameters", [])),
            micro_batch=None if raw.get("micro_batch") is None else int(raw["micro_batch"]),
            precision=str(raw.get("precision", "fp32")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"manifest is missing or has a bad field: {exc!r}") from exc
    for t in manifest.tensors:
        if t.role not in ROLES:
            raise BundleError(f"tensor {t.name!r}: unknown role {t.role!r}")
    for required in ("train_step", "inference"):
        if required not in manifest.graphs:
            raise BundleError(f"manifest has no {required!r} graph")
    _check_v2(manifest)
    return manifest


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise BundleError(f"manifest field {key!r} must be a boolean, got {value!r}")
    return value


def _hyper_spec(raw: dict[str, Any]) -> HyperParamSpec:
    shape = tuple(int(d) for d in raw["shape"])
    default = tuple(float(v) for v in raw["default"])
    size = 1
    for dim in shape:
        size *= dim
    if len(default) != size or str(raw["dtype"]) != "float32":
        raise BundleError(f"hyper-parameter {raw.get('name')!r}: default does not fit float32{list(shape)}")
    return HyperParamSpec(name=str(raw["name"]), shape=shape, dtype="float32", default=default)


def _check_v2(manifest: Manifest) -> None:
    _check_precision(manifest)
    if manifest.task not in TASK_KINDS:
        raise BundleError(f"unknown task kind {manifest.task!r}; expected one of {list(TASK_KINDS)}")
    hyper = {h.name for h in manifest.hyperparameters}
    names = {t.name for t in manifest.tensors}
    for graph_name, graph in manifest.graphs.items():
        unknown = sorted(set(graph.hyper_inputs) - hyper) + sorted(
            (set(graph.global_inputs) | set(graph.mask_inputs) | set(graph.accumulator_inputs)) - names
        )
        if unknown:
            raise BundleError(f"graph {graph_name!r} refers to unknown hyper-parameters or tensors: {unknown[:5]}")
    accumulation = {"accumulate", "apply"} & set(manifest.graphs)
    if accumulation and len(accumulation) != 2:
        raise BundleError("manifest has only one of the 'accumulate' and 'apply' graphs")
    if manifest.micro_batch is not None and (not accumulation or manifest.micro_batch < 1):
        raise BundleError("micro_batch needs the 'accumulate' and 'apply' graphs and must be >= 1")
    for t in manifest.tensors:
        if t.personal and t.aggregate:
            raise BundleError(f"tensor {t.name!r} is personal, so it cannot be aggregated")


def _check_precision(manifest: Manifest) -> None:
    if manifest.precision not in PRECISIONS:
        raise BundleError(f"unknown precision {manifest.precision!r}; expected one of {list(PRECISIONS)}")
    train = manifest.graphs["train_step"]
    scaled = LOSS_SCALE_INPUT in train.inputs and FINITE_OUTPUT in train.outputs
    if (manifest.precision == "fp16") != scaled:
        raise BundleError(
            f"precision {manifest.precision!r}: the train step must have the {LOSS_SCALE_INPUT!r} input and "
            f"{FINITE_OUTPUT!r} output exactly when precision is 'fp16'"
        )


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
