"""FP16 mixed precision for traced train steps, and checks of the exported fp16 graph.

:func:`forward_backward_fp16` is the fp16 twin of :func:`model_export.gradients.forward_backward`
(same signature, same result type). Recipe (FIELD_NOTES, "FP16 on the CPU execution provider"):

* **fp32 master tensors.** Parameters, buffers and optimizer state stay fp32 graph inputs and
  outputs; the optimizer update after this function is fp32.
* **fp16 compute.** The forward runs under ``torch.autocast("cpu", float16)``, which casts the
  input and the parameters to fp16 at every matmul/linear/convolution (PyTorch's own op policy, so
  the model needs no changes); activations stay fp16 between those ops and the backward mirrors the
  forward, so activation gradients are fp16 and each parameter gradient is cast to fp32 once, by
  the backward of its autocast cast.
* **fp32 where precision or kernels demand it.** The loss is computed on ``logits.float()``, so
  log-softmax and every loss reduction are fp32 and the loss is an fp32 scalar. BatchNorm,
  LayerNorm, GroupNorm, softmax and log-softmax are traced through decompositions that upcast
  fp16 to fp32 internally (statistics and running-stat updates are fp32). :data:`FP32_OPS`, applied
  below autograd by :class:`_Fp32Ops`, also runs sums/means and the scatter-style backward ops
  (embedding, overlapping max-pool, ``index_put`` with accumulation) in fp32: onnxruntime's
  ``ScatterElements``/``ScatterND`` with ``reduction='add'`` fail at run time in fp16, and large
  fp16 sums lose the small terms. :func:`check_fp16_graph` verifies the exported file.
* **Loss scaling.** The fp32 loss is multiplied by ``loss_scale`` (an fp32 scalar graph input)
  before the backward; gradients are divided by it in fp32. ``finite`` is a bool scalar: every
  gradient is finite. The graph never skips anything itself; the runtime keeps or discards the
  step's outputs and adapts the scale (``edge_agent.runtime.loss_scale``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from edge_agent.errors import ExportError
from edge_agent.protocol.manifest import FINITE_OUTPUT, LOSS_SCALE_INPUT, PRECISIONS
from model_export.gradients import ForwardBackward, LossFn
from model_export.onnx_checks import iter_nodes

if TYPE_CHECKING:  # train_step imports this module
    from model_export.train_step import GraphFn

aten = torch.ops.aten

#: ONNX names (and manifest keys) of the fp16 train step's extra input and output
LOSS_SCALE = LOSS_SCALE_INPUT
FINITE = FINITE_OUTPUT
#: loss scale fed to the fp16 step when the exporter checks it against the fp32 step
EXAMPLE_LOSS_SCALE = 1024.0
#: export-time divergence limits of the fp16 step vs the fp32 eager step. fp16 rounds to 11 bits
#: after every layer and max-pool routing flips on near-ties, so per-element limits do not work;
#: limits are norm-wise on each tensor's *update* (new - old):
#: ||Δ_fp16 - Δ_fp32|| <= FP16_RTOL * ||Δ_fp32|| + FP16_ATOL * max|Δ_fp32 of any tensor| * sqrt(n)
#: (the second term is fp16 noise on gradients that are ~0 in fp32, e.g. conv biases before
#: BatchNorm). Measured on the digits CNN's tiny random example batch: <= 0.14 norm-wise on conv
#: layers, < 1e-3 elsewhere; a wrong op gives ~1.
FP16_RTOL = 0.25
FP16_ATOL = 1e-3
#: the loss is fp32 from fp16 logits
FP16_LOSS_RTOL = 1e-2

#: Ops (as autograd dispatches them) that run in fp32 when they get fp16 tensors. Their first
#: output (the activation or input gradient) is cast back to fp16 so the surrounding graph keeps
#: its dtypes; further outputs (normalisation statistics, weight/bias gradients) stay fp32.
FP32_OPS = frozenset(
    {
        aten.sum.default,
        aten.sum.dim_IntList,
        aten.mean.default,
        aten.mean.dim,
        aten.index_put.default,
        aten._unsafe_index_put.default,
        aten.index_add.default,
        aten.scatter_add.default,
        aten.scatter_reduce.two,
        aten.embedding_dense_backward.default,
        aten.max_pool2d_with_indices_backward.default,
        aten.max_pool3d_with_indices_backward.default,
        aten.avg_pool2d_backward.default,
        # BatchNorm: torch's decompositions compute in fp32 but round the saved mean/rstd to the
        # input dtype on CPU, and the backward recomputes x̂ from them; run forward and backward
        # on fp32 inputs so statistics and running-stat updates never pass through fp16.
        aten._batch_norm_with_update.default,
        aten.native_batch_norm.default,
        aten._native_batch_norm_legit.default,
        aten._native_batch_norm_legit_functional.default,
        aten.batch_norm_backward.default,
        aten.native_batch_norm_backward.default,
        # not decomposed: exported as one LayerNormalization/GroupNorm node, whose input and
        # weight types must agree (autocast hands them an fp16 input and fp32 weights)
        aten.native_layer_norm.default,
        aten.native_layer_norm_backward.default,
        aten.native_group_norm.default,
        aten.native_group_norm_backward.default,
    }
)

#: ONNX ops that must not see fp16 data when they reduce (no fp16 kernel on the CPU provider)
_REDUCING_SCATTERS = ("ScatterElements", "ScatterND")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision {precision!r}; supported: {', '.join(PRECISIONS)}")


class _Fp32Ops(TorchDispatchMode):
    """Below autograd: run :data:`FP32_OPS` in fp32 when any input is fp16 (see there)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in FP32_OPS:
            return func(*args, **kwargs)
        found_half = False

        def up(value: Any) -> Any:
            nonlocal found_half
            if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
                found_half = True
                return value.float()
            return value

        args32, kwargs32 = tree_map(up, args), tree_map(up, kwargs)
        if not found_half:
            return func(*args, **kwargs)
        result = func(*args32, **kwargs32)
        if isinstance(result, tuple):
            return (_to_half(result[0]), *result[1:])
        return _to_half(result)


def _to_half(value: Any) -> Any:
    return value.half() if isinstance(value, torch.Tensor) and value.dtype == torch.float32 else value


def _all_finite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    # inf * 0 and NaN * 0 are NaN, anything finite * 0 is 0: one Mul + ReduceSum per gradient,
    # and the total equals 0 exactly when every element of every gradient is finite.
    total = torch.zeros((), dtype=torch.float32)
    for grad in grads:
        total = total + (grad * 0.0).sum()
    return total == 0.0


def forward_backward_fp16(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    trainable: set[str],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    loss_scale: torch.Tensor | None = None,
) -> ForwardBackward:
    """fp16 forward and backward with loss scaling; fp32 in (master tensors) and out (unscaled grads)."""
    if loss_scale is None:
        raise ExportError("the fp16 train step needs a loss_scale input")
    new_buffers = {name: t.clone() for name, t in buffers.items()}
    leaves = {name: p.detach().requires_grad_(name in trainable) for name, p in params.items()}
    with _Fp32Ops():
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            logits16 = functional_call(model, {**leaves, **new_buffers}, (x,))
        logits = logits16.float()
        loss = loss_fn(logits, y)
        wrt = [name for name in params if name in trainable]
        scaled = loss * loss_scale
        grads = torch.autograd.grad(scaled, [leaves[n] for n in wrt], allow_unused=True) if wrt else ()
    unscaled = [None if g is None else g.float() / loss_scale for g in grads]
    grad_of: dict[str, torch.Tensor | None] = dict(zip(wrt, unscaled, strict=True))
    finite = _all_finite([g for g in unscaled if g is not None]) & torch.isfinite(loss)
    return ForwardBackward(
        loss=loss.detach(), logits=logits.detach(), grads=grad_of, buffers=new_buffers, finite=finite
    )


def check_fp16_step(
    path: Path, fp16_step: GraphFn, fp32_step: GraphFn, examples: dict[str, torch.Tensor]
) -> PrecisionReport:
    """Refuse an fp16 train step that diverges from the fp32 step or cannot run on the CPU provider.

    Runs ``path`` in onnxruntime and ``fp32_step`` eagerly on ``examples`` and compares the loss
    and every tensor's update within :data:`FP16_RTOL`/:data:`FP16_ATOL` (the fp32 step is the
    reference: eager PyTorch fp16 kernels round differently from onnxruntime's, which compute most
    fp16 ops in fp32 behind Casts). Deletes ``path`` and raises :class:`ExportError` naming the
    outputs that differ.
    """
    import onnxruntime as ort

    problems = []
    try:
        report = check_fp16_graph(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {name: examples[name].detach().numpy() for name in fp16_step.inputs}
        actual = dict(zip(fp16_step.outputs, session.run(None, feeds), strict=True))
    except Exception as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path.name} does not run in onnxruntime: {type(exc).__name__}: {str(exc)[:300]}") from exc
    expected = dict(zip(fp32_step.outputs, fp32_step.fn(*(examples[n] for n in fp32_step.inputs)), strict=True))
    if not bool(actual[FINITE]):
        problems.append(f"{FINITE} is False on the example batch (loss scale {EXAMPLE_LOSS_SCALE:g})")
    loss, want_loss = float(actual["loss"]), float(expected["loss"])
    if not abs(loss - want_loss) <= FP16_LOSS_RTOL * abs(want_loss):
        problems.append(f"loss {loss:.6g} != fp32 loss {want_loss:.6g}")
    deltas = {}
    for name, value in expected.items():
        old = examples.get(name.removeprefix("new."))
        if name not in ("loss", "correct") and old is not None:
            want = (value.detach() - old).double().numpy()
            deltas[name] = (np.asarray(actual[name], dtype=np.float64) - old.double().numpy(), want)
    scale = max((float(np.max(np.abs(want), initial=0.0)) for _, want in deltas.values()), default=0.0)
    for name, (got, want) in deltas.items():
        err = float(np.linalg.norm(got - want))
        limit = FP16_RTOL * float(np.linalg.norm(want)) + FP16_ATOL * scale * want.size**0.5
        if not err <= limit:
            problems.append(f"{name} update differs: |error| {err:.1e} > {limit:.1e}")
    if problems:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{path.name}: the fp16 step diverges from the fp32 step on the example batch, bundle not written: "
            + "; ".join(problems)
        )
    return report


# --- checks of the exported graph -------------------------------------------------------------

_ELEM = onnx.TensorProto
_COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True, kw_only=True)
class PrecisionReport:
    """Facts about one exported graph: node counts and the dtypes its heavy ops compute in."""

    nodes: int
    op_counts: dict[str, int]
    #: Cast nodes by target type ("float16", "float", ...)
    casts_to: dict[str, int]
    #: (op, dtype of its first input) -> count, for MatMul/Gemm/Conv/ConvTranspose
    compute_dtypes: dict[tuple[str, str], int]
    #: reducing scatters whose data input is fp16 (fails at run time on the CPU provider)
    fp16_scatters: tuple[str, ...]

    @property
    def fp16_compute(self) -> int:
        return sum(n for (_, dtype), n in self.compute_dtypes.items() if dtype == "float16")

    @property
    def fp32_compute(self) -> int:
        return sum(n for (_, dtype), n in self.compute_dtypes.items() if dtype == "float")


def precision_report(model: onnx.ModelProto | str | Path) -> PrecisionReport:
    """Count ops, Casts and the element types of MatMul/Gemm/Conv inputs (after shape inference)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    nodes = list(iter_nodes(inferred))
    casts: Counter[str] = Counter()
    compute: Counter[tuple[str, str]] = Counter()
    scatters = []
    for node in nodes:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            casts[onnx.helper.tensor_dtype_to_np_dtype(to).name.replace("float32", "float")] += 1
        elif node.op_type in _COMPUTE_OPS:
            elem = types.get(node.input[0], _ELEM.UNDEFINED)
            compute[(node.op_type, _type_name(elem))] += 1
        elif node.op_type in _REDUCING_SCATTERS:
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none" and types.get(node.input[0]) == _ELEM.FLOAT16:
                scatters.append(f"{node.op_type}({node.name or node.output[0]}, reduction={reduction})")
    return PrecisionReport(
        nodes=len(nodes),
        op_counts=dict(Counter(n.op_type for n in nodes)),
        casts_to=dict(casts),
        compute_dtypes=dict(compute),
        fp16_scatters=tuple(scatters),
    )


def _type_name(elem: int) -> str:
    if elem == _ELEM.UNDEFINED:
        return "unknown"
    return "float" if elem == _ELEM.FLOAT else onnx.helper.tensor_dtype_to_np_dtype(elem).name


def check_fp16_graph(path: Path) -> PrecisionReport:
    """Raise :class:`ExportError` unless an fp16 train-step graph computes in fp16 and runs on CPU.

    Fails when a reducing ``ScatterElements``/``ScatterND`` gets fp16 data (onnxruntime's CPU
    provider has no such kernel and fails at run time) or when no MatMul/Gemm/Conv is fp16
    (autocast did not take effect, e.g. a model without linear or convolution layers).
    """
    report = precision_report(path)
    if report.fp16_scatters:
        raise ExportError(
            f"{path.name}: fp16 scatter with reduction has no onnxruntime CPU kernel: {list(report.fp16_scatters)}"
        )
    if report.fp16_compute == 0:
        raise ExportError(f"{path.name}: precision fp16 requested but no MatMul/Gemm/Conv computes in fp16")
    return report
