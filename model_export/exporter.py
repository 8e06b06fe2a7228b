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

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from edge_agent.errors import ConfigError, ExportError, FedflockError
from edge_agent.protocol.manifest import (
    FORMAT_VERSION,
    ROLE_BUFFER,
    ROLE_OPTIMIZER_STATE,
    ROLE_PARAMETER,
    GraphSpec,
    InputSpec,
    Manifest,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from edge_agent.protocol.tensors import write_tensor_file
from model_export.decompositions import DecompositionTable, inference_decompositions, training_decompositions
from model_export.onnx_checks import check_graph, strip_debug_metadata
from model_export.train_step import (
    SGDConfig,
    TensorLayout,
    check_loss,
    check_optimizer,
    initial_tensors,
    make_inference,
    make_train_step,
    prepare_model,
    tensor_layout,
)

log = logging.getLogger(__name__)

TRAIN_FILE = "train_step.onnx"
INFERENCE_FILE = "inference.onnx"
WEIGHTS_FILE = "weights.fft"
OUTPUT_PREFIX = "new."
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
    loss: str = "cross_entropy",
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    opset: int = 18,
    name: str | None = None,
) -> Path:
    """Export ``model`` as a training bundle into ``out_dir`` (created if needed); returns it.

    ``input_shape`` is the shape of one example, without the batch dimension (e.g. ``(1, 8, 8)``).
    Raises :class:`ExportError` for unsupported losses, optimizers, layers or a failed export.
    """
    check_loss(loss)
    check_optimizer(optimizer)
    sgd = SGDConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    sgd.validate()
    input_shape = tuple(int(d) for d in input_shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    train_model = prepare_model(model, training=True)
    eval_model = prepare_model(model, training=False)
    layout = tensor_layout(train_model, sgd)
    initial = initial_tensors(train_model, layout)
    _check_names(layout)
    batch = _example_batch_size(input_shape, initial.values())
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))
    _check_logits(eval_model, layout, initial, x, num_classes)

    train_step = make_train_step(train_model, layout, loss=loss, sgd=sgd)
    train_args = (x, y, torch.tensor(lr, dtype=torch.float32), *(initial[n] for n in layout.all_tensors))
    train_inputs = ["x", "y", "lr", *layout.all_tensors]
    train_outputs = ["loss", "correct", *(OUTPUT_PREFIX + n for n in layout.all_tensors)]
    _export_graph(
        train_step,
        train_args,
        training_decompositions(),
        out / TRAIN_FILE,
        train_inputs,
        train_outputs,
        opset,
    )
    check_graph(out / TRAIN_FILE, train_inputs, train_outputs, forbid_ops=("BatchNormalization",))

    infer = make_inference(eval_model, layout)
    infer_args = (x, *(initial[n] for n in layout.model_tensors))
    infer_inputs = ["x", *layout.model_tensors]
    _export_graph(infer, infer_args, inference_decompositions(), out / INFERENCE_FILE, infer_inputs, ["logits"], opset)
    check_graph(out / INFERENCE_FILE, infer_inputs, ["logits"], forbid_ops=())

    write_tensor_file(out / WEIGHTS_FILE, {n: initial[n].numpy() for n in layout.model_tensors})
    manifest = _manifest(
        model_name=name or type(model).__name__.lower(),
        layout=layout,
        initial=initial,
        input_shape=input_shape,
        num_classes=num_classes,
        loss=loss,
        sgd=sgd,
        opset=opset,
        files={f: sha256_file(out / f) for f in (TRAIN_FILE, INFERENCE_FILE, WEIGHTS_FILE)},
    )
    digest = write_manifest(out, manifest)
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


def _check_names(layout: TensorLayout) -> None:
    reserved = {"x", "y", "lr", "loss", "correct", "logits"}
    names = set(layout.all_tensors)
    clash = sorted(reserved & names) + sorted(n for n in names if OUTPUT_PREFIX + n in names)
    if clash or len(names) != len(layout.all_tensors):
        raise ExportError(f"tensor names clash with graph input/output names: {clash}")


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
        with _quiet():
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
    except FedflockError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {path.name} failed: {type(exc).__name__}: {exc}") from exc
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
    num_classes: int,
    loss: str,
    sgd: SGDConfig,
    opset: int,
    files: dict[str, str],
) -> Manifest:
    trainable = set(layout.trainable)

    def spec(name: str, role: str, **kw: Any) -> TensorSpec:
        value = initial[name]
        dtype = str(np.dtype(str(value.dtype).removeprefix("torch.")))
        return TensorSpec(name=name, shape=tuple(value.shape), dtype=dtype, role=role, **kw)

    tensors = (
        *(spec(n, ROLE_PARAMETER, trainable=n in trainable, aggregate=True) for n in layout.parameters),
        *(spec(n, ROLE_BUFFER, trainable=False, aggregate=True) for n in layout.buffers),
        *(
            spec(n, ROLE_OPTIMIZER_STATE, trainable=False, aggregate=False, of=p)
            for p, n in zip(layout.momentum_of, layout.momentum_names, strict=True)
        ),
    )
    train_graph = GraphSpec(
        file=TRAIN_FILE,
        inputs={"x": "x", "y": "y", "lr": "lr"},
        outputs={"loss": "loss", "correct": "correct"},
        tensor_inputs={n: n for n in layout.all_tensors},
        tensor_outputs={n: OUTPUT_PREFIX + n for n in layout.all_tensors},
    )
    inference_graph = GraphSpec(
        file=INFERENCE_FILE,
        inputs={"x": "x"},
        outputs={"logits": "logits"},
        tensor_inputs={n: n for n in layout.model_tensors},
    )
    return Manifest(
        format_version=FORMAT_VERSION,
        name=model_name,
        created_by=_created_by(),
        opset=opset,
        input=InputSpec(name="x", shape=(None, *input_shape), dtype="float32"),
        label=InputSpec(name="y", shape=(None,), dtype="int64"),
        num_classes=num_classes,
        loss={"type": loss},
        optimizer={
            "type": "sgd",
            "lr": sgd.lr,
            "momentum": sgd.momentum,
            "weight_decay": sgd.weight_decay,
            "nesterov": sgd.nesterov,
        },
        tensors=tensors,
        graphs={"train_step": train_graph, "inference": inference_graph},
        weights_file=WEIGHTS_FILE,
        files=files,
    )
