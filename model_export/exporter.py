"""Write a training bundle (see ``edge_agent.protocol.manifest``) for a PyTorch model.

Recipe (FIELD_NOTES, "On-device training with onnxruntime"): write the step as a pure function
(:mod:`model_export.train_step`), trace it with ``make_fx(tracing_mode="symbolic")`` and our
decomposition table, wrap the GraphModule in an ``nn.Module`` and export that with
``torch.onnx.export(dynamo=True)`` and a dynamic batch dimension. The resulting graphs are checked
for non-default-domain ops and (train step only) leftover ``BatchNormalization`` nodes.

ONNX names: ``x``, ``y``, ``lr`` in; ``loss``, ``correct`` / ``logits`` out; every state tensor is
an input under its own name (``conv1.weight``, ``conv1.weight.momentum``, ...) and, in the train
step, an output named ``new.<name>``. The manifest carries this mapping.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from edge_agent.errors import ConfigError, ExportError
from edge_agent.protocol.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    GraphSpec,
    InputSpec,
    Manifest,
    sha256_file,
    write_manifest,
)
from edge_agent.protocol.tensors import write_tensor_file
from model_export.bundle_plan import (
    INFERENCE_FILE,
    TRAIN_FILE,
    PlannedGraph,
    example_label,
    example_values,
    graph_spec,
    hyper_params,
    hyper_specs,
    plan_graphs,
    tensor_specs,
)
from model_export.decompositions import DecompositionTable, inference_decompositions, training_decompositions
from model_export.federated import FederatedSpec
from model_export.losses import (
    TASK_CLASSIFICATION,
    TASK_REGRESSION,
    HyperParam,
    LossSpec,
    ResolvedLoss,
    resolve_loss,
)
from model_export.onnx_checks import check_graph, strip_debug_metadata
from model_export.optimizers import OptimizerSpec, make_optimizer
from model_export.precision import check_fp16_step, check_precision
from model_export.train_step import (
    OUTPUT_PREFIX,
    TensorLayout,
    initial_tensors,
    make_inference,
    make_train_step,
    prepare_model,
    tensor_layout,
)
from model_export.verify import check_against_eager, example_input, explain_failure, prepare_for_export

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.fft"
#: Written when ``export_bundle(signer=...)`` is given; devices with trusted keys verify it (issue #7).
SIGNATURE_FILE = "manifest.sig"
#: manifest.json bytes -> the ``manifest.sig`` content: use
#: ``edge_agent.crypto.signing.bundle_signer(SigningKey.load(path))`` (docs/protocol.md §8.5)
Signer = Callable[[bytes], bytes]
__all__ = ["INFERENCE_FILE", "OUTPUT_PREFIX", "TRAIN_FILE", "WEIGHTS_FILE", "export_bundle", "load_factory"]
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


class _GraphModuleWrapper(nn.Module):
    """``torch.onnx.export`` wants an ``nn.Module``; this one just calls the traced graph."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args: torch.Tensor) -> Any:
        return self.graph_module(*args)


def export_bundle(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    out_dir: str | Path,
    input_dtype: str = "float32",
    loss: str | LossSpec = "cross_entropy",
    optimizer: str | OptimizerSpec = "sgd",
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    nesterov: bool | None = None,
    federated: FederatedSpec | None = None,
    micro_batch: int | None = None,
    precision: str = "fp32",
    opset: int = 18,
    name: str | None = None,
    signer: Signer | None = None,
) -> Path:
    """Export ``model`` as a training bundle into ``out_dir`` (created if needed); returns it.

    ``input_shape`` is the shape of one example, without the batch dimension (e.g. ``(1, 8, 8)``).
    ``input_dtype`` is ``"float32"`` (features) or ``"int64"`` (token ids for ``nn.Embedding`` models).
    ``num_classes`` is the width of the model output ``[N, num_classes]`` (classes, binary logits
    or regression targets). ``loss``/``optimizer`` are names (``"adamw"``) or full specs
    (:class:`LossSpec`, :class:`OptimizerSpec`); ``lr``/``momentum``/``weight_decay``/``nesterov``
    are shorthands for a named optimizer (SGD default: lr 0.05, momentum 0.9). ``federated`` adds
    FedProx, trainable masks and personal tensors; ``micro_batch`` adds the ``accumulate`` and
    ``apply`` graphs for gradient accumulation and is the default micro-batch size.
    ``precision="fp16"`` computes the train step in fp16 with fp32 master tensors and a dynamic
    loss scale (:mod:`model_export.precision`); not combinable with ``micro_batch`` yet.
    ``signer`` (manifest bytes -> ``manifest.sig`` content, e.g. ``bundle_signer(key)``) signs the bundle.
    Raises :class:`ExportError` for unsupported losses, optimizers, layers or a failed export.
    """
    resolved = resolve_loss(loss, num_classes)
    opt_spec = _optimizer_spec(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    opt = make_optimizer(opt_spec)
    federated = federated or FederatedSpec()
    federated.validate()
    if micro_batch is not None and micro_batch < 1:
        raise ExportError(f"micro_batch must be >= 1, got {micro_batch}")
    check_precision(precision)
    input_shape = tuple(int(d) for d in input_shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    train_model = prepare_model(model, training=True)
    prepare_for_export(train_model)  # refuse unsupported layers, seed nn.Dropout
    eval_model = prepare_model(model, training=False)
    layout = tensor_layout(train_model, opt, federated)
    initial = initial_tensors(train_model, layout)
    hyper = hyper_params(resolved, opt, layout, federated)
    batch = _example_batch_size(input_shape, initial.values())
    x = example_input(train_model, (batch, *input_shape), input_dtype)
    y = example_label(resolved, batch, num_classes)
    _check_logits(eval_model, layout, initial, x, num_classes)

    planned = plan_graphs(train_model, eval_model, layout, resolved, opt, micro_batch=micro_batch, precision=precision)
    examples = example_values(x, y, opt_spec.lr, hyper, layout, initial)
    for graph in planned:
        _export_planned(graph, examples, out, opset)
    # fp16: the train step is checked against the fp32 step with fp16 tolerances instead
    fp16_step = next((g for g in planned if g.key == "train_step"), None) if precision == "fp16" else None
    check_against_eager([g for g in planned if g is not fp16_step], examples, out)
    if fp16_step is not None:
        reference = make_train_step(train_model, layout, resolved, opt)
        check_fp16_step(out / fp16_step.file, fp16_step.graph, reference, examples)

    write_tensor_file(out / WEIGHTS_FILE, {n: initial[n].numpy() for n in layout.model_tensors})
    manifest = _manifest(
        model_name=name or type(model).__name__.lower(),
        layout=layout,
        initial=initial,
        input_shape=input_shape,
        input_dtype=input_dtype,
        num_classes=num_classes,
        loss=resolved,
        optimizer=opt_spec.manifest_entry(),
        graphs={g.key: graph_spec(g, layout, hyper) for g in planned},
        hyper=hyper,
        micro_batch=micro_batch,
        precision=precision,
        opset=opset,
        files={f: sha256_file(out / f) for f in (*(g.file for g in planned), WEIGHTS_FILE)},
    )
    digest = write_manifest(out, manifest)
    if signer is not None:  # the manifest pins every file's sha256: one signature covers the bundle
        (out / SIGNATURE_FILE).write_bytes(signer((out / MANIFEST_FILE).read_bytes()))
    log.info("exported bundle %s (%s) in %.1f s", out, digest[:12], time.monotonic() - started)
    return out


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:function"`` to a callable (for the command line)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model factory must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for model factory {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _optimizer_spec(
    optimizer: str | OptimizerSpec,
    *,
    lr: float | None,
    momentum: float | None,
    weight_decay: float | None,
    nesterov: bool | None,
) -> OptimizerSpec:
    shorthands = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
    given = {key: value for key, value in shorthands.items() if value is not None}
    if isinstance(optimizer, OptimizerSpec):
        if given:
            raise ExportError(f"give {sorted(given)} inside the OptimizerSpec, not next to it")
        spec = optimizer
    elif optimizer == "sgd":
        spec = OptimizerSpec(kind="sgd", **({"lr": 0.05, "momentum": 0.9} | given))  # type: ignore[arg-type]
    else:
        spec = OptimizerSpec(kind=optimizer, **given)  # type: ignore[arg-type]
    spec.validate()
    return spec


def _export_planned(planned: PlannedGraph, examples: dict[str, torch.Tensor], out: Path, opset: int) -> None:
    graph = planned.graph
    args = tuple(examples[name] for name in graph.inputs)
    decompositions = training_decompositions() if planned.training else inference_decompositions()
    _export_graph(graph.fn, args, decompositions, out / planned.file, graph.inputs, graph.outputs, opset)
    forbid = ("BatchNormalization",) if planned.training else ()
    check_graph(out / planned.file, graph.inputs, graph.outputs, forbid_ops=forbid)


def _example_batch_size(input_shape: Sequence[int], tensors: Any) -> int:
    # make_fx's symbolic tracing gives equal input sizes the same symbol ("duck sizing"); an example
    # batch size equal to some other dimension could tie the batch to it. Pick one nobody uses.
    used = set(input_shape)
    for tensor in tensors:
        used.update(tensor.shape)
    batch = 3
    while batch in used:
        batch += 1
    return batch


def _check_logits(
    model: nn.Module,
    layout: TensorLayout,
    initial: dict[str, torch.Tensor],
    x: torch.Tensor,
    num_classes: int,
) -> None:
    try:
        with torch.no_grad():
            logits = make_inference(model, layout)(x, *(initial[n] for n in layout.model_tensors))[0]
    except Exception as exc:
        raise ExportError(f"model fails on an input of shape {tuple(x.shape)}: {exc}") from exc
    expected = (x.shape[0], num_classes)
    if tuple(logits.shape) != expected:
        raise ExportError(
            f"model output has shape {tuple(logits.shape)}, expected [batch, num_classes] = "
            f"{list(expected)}; check input_shape (one example, no batch dimension) and num_classes"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings; they are re-raised as errors if fatal."""
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_graph(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    args: tuple[torch.Tensor, ...],
    decompositions: DecompositionTable,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> None:
    batch = torch.export.Dim("batch", min=1)
    # x and y carry the batch dimension; lr and all state tensors are static.
    dynamic_shapes = tuple({0: batch} if name in ("x", "y") else None for name in input_names)
    try:
        # oneDNN off: without autograd (inference) torch lowers LSTM to mkldnn_rnn_layer, which has no ONNX form
        with _quiet(), torch.backends.mkldnn.flags(enabled=False):
            graph_module = make_fx(fn, decomposition_table=decompositions, tracing_mode="symbolic")(*args)
            torch.onnx.export(
                _GraphModuleWrapper(graph_module),
                args,
                str(path),
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=(dynamic_shapes,),  # forward(*args): one entry holding all args
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise explain_failure(exc, fn, args, decompositions, path.name) from exc
    strip_debug_metadata(path)


def _created_by() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        fedflock_version = version("fedflock")
    except PackageNotFoundError:
        fedflock_version = "dev"
    return f"fedflock {fedflock_version} model_export (torch {torch.__version__})"


def _manifest(
    *,
    model_name: str,
    layout: TensorLayout,
    initial: dict[str, torch.Tensor],
    input_shape: tuple[int, ...],
    input_dtype: str,
    num_classes: int,
    loss: ResolvedLoss,
    optimizer: dict[str, Any],
    graphs: dict[str, GraphSpec],
    hyper: tuple[HyperParam, ...],
    micro_batch: int | None,
    precision: str,
    opset: int,
    files: dict[str, str],
) -> Manifest:
    if loss.task == TASK_CLASSIFICATION:
        label = InputSpec(name="y", shape=(None,), dtype="int64")
    else:
        label = InputSpec(name="y", shape=(None, num_classes), dtype="float32")
    return Manifest(
        format_version=FORMAT_VERSION,
        name=model_name,
        created_by=_created_by(),
        opset=opset,
        input=InputSpec(name="x", shape=(None, *input_shape), dtype=input_dtype),
        label=label,
        num_classes=num_classes,
        loss=loss.manifest_entry(),
        optimizer=optimizer,
        tensors=tensor_specs(layout, initial),
        graphs=graphs,
        weights_file=WEIGHTS_FILE,
        files=files,
        task=loss.task,
        accuracy_defined=loss.task != TASK_REGRESSION,
        hyperparameters=hyper_specs(hyper),
        micro_batch=micro_batch,
        precision=precision,
    )
