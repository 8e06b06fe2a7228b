"""Which graphs a bundle holds, their example inputs, and how the manifest describes them.

The exporter traces and writes each :class:`PlannedGraph`; this module decides what they are
(train step, inference, and with micro-batching ``accumulate`` + ``apply``), builds the example
tensor for every ONNX input name, and maps each input/output name to its manifest role (fixed
input, hyper-parameter, model/optimizer tensor, FedProx global, trainable mask, accumulator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edge_agent.errors import ExportError
from edge_agent.protocol.manifest import (
    ROLE_BUFFER,
    ROLE_OPTIMIZER_STATE,
    ROLE_PARAMETER,
    GraphSpec,
    HyperParamSpec,
    TensorSpec,
)
from model_export.accumulation import GRAD_PREFIX, make_accumulate_step, make_apply_step
from model_export.federated import GLOBAL_PREFIX, MASK_PREFIX, MU_NAME, FederatedSpec
from model_export.losses import TASK_BINARY, TASK_CLASSIFICATION, HyperParam, ResolvedLoss
from model_export.optimizers import Optimizer
from model_export.precision import EXAMPLE_LOSS_SCALE, FINITE, LOSS_SCALE
from model_export.train_step import OUTPUT_PREFIX, GraphFn, TensorLayout, make_inference, make_train_step

TRAIN_FILE = "train_step.onnx"
INFERENCE_FILE = "inference.onnx"
ACCUMULATE_FILE = "accumulate.onnx"
APPLY_FILE = "apply.onnx"
FIXED_INPUTS = ("x", "y", "seed", "lr", "step", "scale", LOSS_SCALE)
FIXED_OUTPUTS = ("loss", "correct", "logits", FINITE)


@dataclass(frozen=True)
class PlannedGraph:
    key: str
    file: str
    graph: GraphFn
    #: trace with the training decompositions (and forbid BatchNormalization nodes)
    training: bool


def plan_graphs(
    train_model: nn.Module,
    eval_model: nn.Module,
    layout: TensorLayout,
    loss: ResolvedLoss,
    optimizer: Optimizer,
    *,
    micro_batch: int | None,
    precision: str = "fp32",
) -> list[PlannedGraph]:
    if precision != "fp32" and micro_batch is not None:
        raise ExportError(f"precision {precision!r} with micro_batch is not supported yet; export one or the other")
    infer = make_inference(eval_model, layout)
    train = make_train_step(train_model, layout, loss, optimizer, precision=precision)
    graphs = [
        PlannedGraph("train_step", TRAIN_FILE, train, True),
        PlannedGraph("inference", INFERENCE_FILE, GraphFn(infer, ("x", *layout.model_tensors), ("logits",)), False),
    ]
    if micro_batch is not None:
        accumulate = make_accumulate_step(train_model, layout, loss)
        graphs.append(PlannedGraph("accumulate", ACCUMULATE_FILE, accumulate, True))
        graphs.append(PlannedGraph("apply", APPLY_FILE, make_apply_step(layout, optimizer), True))
    for planned in graphs:
        for names, kind in ((planned.graph.inputs, "input"), (planned.graph.outputs, "output")):
            clash = sorted({n for n in names if names.count(n) > 1})
            if clash:
                raise ExportError(f"{planned.file}: tensor names clash with generated {kind} names: {clash}")
    return graphs


def hyper_params(
    loss: ResolvedLoss, optimizer: Optimizer, layout: TensorLayout, federated: FederatedSpec
) -> tuple[HyperParam, ...]:
    extra: tuple[HyperParam, ...] = ()
    if layout.prox:
        extra = (HyperParam(name=MU_NAME, shape=(), default=(float(federated.fedprox_mu or 0.0),)),)
    hyper = optimizer.hyper + extra + loss.hyper
    clash = sorted({h.name for h in hyper} & (set(layout.model_tensors) | set(FIXED_INPUTS)))
    if clash:
        raise ExportError(f"tensor names clash with hyper-parameter input names: {clash}")
    return hyper


def example_label(loss: ResolvedLoss, batch: int, num_outputs: int) -> torch.Tensor:
    if loss.task == TASK_CLASSIFICATION:
        return torch.randint(0, num_outputs, (batch,))
    if loss.task == TASK_BINARY:
        return torch.randint(0, 2, (batch, num_outputs)).float()
    return torch.randn(batch, num_outputs)


def example_values(
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    hyper: tuple[HyperParam, ...],
    layout: TensorLayout,
    initial: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """An example tensor for every input name any planned graph can have."""
    values = {
        "x": x,
        "y": y,
        "seed": torch.tensor(0, dtype=torch.int64),
        "lr": torch.tensor(lr, dtype=torch.float32),
        "step": torch.tensor(1.0, dtype=torch.float32),
        "scale": torch.tensor(1.0, dtype=torch.float32),
        LOSS_SCALE: torch.tensor(EXAMPLE_LOSS_SCALE, dtype=torch.float32),
    }
    values.update({h.name: h.tensor() for h in hyper})
    values.update(initial)
    values.update({GLOBAL_PREFIX + p: initial[p].clone() for p in layout.prox})
    values.update({MASK_PREFIX + p: torch.tensor(1.0) for p in layout.masked})
    values.update({GRAD_PREFIX + p: torch.zeros_like(initial[p]) for p in layout.trainable})
    return values


def graph_spec(planned: PlannedGraph, layout: TensorLayout, hyper: tuple[HyperParam, ...]) -> GraphSpec:
    """The manifest entry: every ONNX input/output name filed under its role."""
    hyper_names = {h.name for h in hyper}
    globals_ = {GLOBAL_PREFIX + p: p for p in layout.prox}
    masks = {MASK_PREFIX + p: p for p in layout.masked}
    accumulators = (
        {GRAD_PREFIX + p: p for p in layout.trainable}
        if planned.key == "accumulate" or (planned.key == "apply")
        else {}
    )
    tensors = set(layout.all_tensors)
    maps: dict[str, dict[str, str]] = {
        key: {}
        for key in (
            "inputs",
            "outputs",
            "tensor_inputs",
            "tensor_outputs",
            "hyper_inputs",
            "global_inputs",
            "mask_inputs",
            "accumulator_inputs",
            "accumulator_outputs",
        )
    }
    for name in planned.graph.inputs:
        if name in FIXED_INPUTS:
            maps["inputs"][name] = name
        elif name in hyper_names:
            maps["hyper_inputs"][name] = name
        elif name in globals_:
            maps["global_inputs"][globals_[name]] = name
        elif name in masks:
            maps["mask_inputs"][masks[name]] = name
        elif name in accumulators:
            maps["accumulator_inputs"][accumulators[name]] = name
        elif name in tensors:
            maps["tensor_inputs"][name] = name
        else:  # pragma: no cover - the step builders only produce the names above
            raise ExportError(f"{planned.file}: input {name!r} has no manifest role")
    for name in planned.graph.outputs:
        bare = name.removeprefix(OUTPUT_PREFIX)
        if name in FIXED_OUTPUTS:
            maps["outputs"][name] = name
        elif bare in accumulators:
            maps["accumulator_outputs"][accumulators[bare]] = name
        elif bare in tensors:
            maps["tensor_outputs"][bare] = name
        else:  # pragma: no cover
            raise ExportError(f"{planned.file}: output {name!r} has no manifest role")
    return GraphSpec(file=planned.file, **maps)


def tensor_specs(layout: TensorLayout, initial: dict[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    trainable, personal = set(layout.trainable), set(layout.personal)

    def spec(name: str, role: str, *, trainable: bool, of: str | None = None) -> TensorSpec:
        value = initial[name]
        dtype = str(value.dtype).removeprefix("torch.")
        mine = (of or name) in personal
        shared = role != ROLE_OPTIMIZER_STATE and not mine
        return TensorSpec(
            name=name,
            shape=tuple(value.shape),
            dtype=dtype,
            role=role,
            trainable=trainable,
            aggregate=shared,
            of=of,
            personal=mine and role != ROLE_OPTIMIZER_STATE,
        )

    return (
        *(spec(n, ROLE_PARAMETER, trainable=n in trainable) for n in layout.parameters),
        *(spec(n, ROLE_BUFFER, trainable=False) for n in layout.buffers),
        *(spec(n, ROLE_OPTIMIZER_STATE, trainable=False, of=p) for n, p in layout.state_of),
    )


def hyper_specs(hyper: tuple[HyperParam, ...]) -> tuple[HyperParamSpec, ...]:
    return tuple(HyperParamSpec(name=h.name, shape=h.shape, dtype="float32", default=h.default) for h in hyper)
