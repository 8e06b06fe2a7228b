"""Decomposition table used to trace train steps into plain, default-domain ONNX ops.

``torch._decomp.core_aten_decompositions()`` lowers most of aten to a small core, but two gaps
matter for on-device training (see FIELD_NOTES, "On-device training with onnxruntime"):

* **BatchNorm in training mode.** Unless the batch-norm ops are decomposed into elementwise ops,
  the ONNX exporter emits a ``BatchNormalization`` node in *inference* mode: the loss is silently
  wrong and running statistics never update. :data:`BATCH_NORM_OPS` lists the ops to decompose.
* **``aten.convolution_backward``** has no decomposition at all. :func:`convolution_backward`
  supplies one built from ops onnxruntime runs fast on CPU:

  - grad-input: a transposed convolution of ``grad_output`` with the same weight (``ConvTranspose``);
  - grad-weight: an im2col made of ``k_h * k_w`` strided slices (no ``Gather``), then one batched
    GEMM per group: ``[G, O/G, N*L] @ [G, N*L, C/G*K]``;
  - grad-bias: a sum over every dimension but the channel one.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions, get_decompositions

from edge_agent.errors import ExportError

aten = torch.ops.aten

DecompositionTable = dict[Any, Callable[..., Any]]

#: BatchNorm variants that must be decomposed so training-mode BatchNorm is traced as math.
BATCH_NORM_OPS = (
    aten.native_batch_norm,
    aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
)


def _as_int(value: Any) -> int:
    # Kernel sizes, strides and spatial sizes are static in every graph we export (only the batch
    # dimension is dynamic), so specialising symbolic ints here is safe.
    return int(value)


def _strided(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    # x[..., ::step, ...] along `dim`; slicing with a step exports to a single ONNX Slice.
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(None, None, step)
    return x[tuple(index)]


def _im2col_sliced(
    inp: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
) -> torch.Tensor:
    """Patches ``[N, C, K, L]`` built from one pad and ``K`` strided slices (``Slice`` + ``Concat``)."""
    if any(padding):
        pads: list[int] = []
        for p in reversed(padding):
            pads += [p, p]
        inp = F.pad(inp, pads)
    batch, channels = inp.shape[0], inp.shape[1]
    patches = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        patch = inp
        for dim, offset in enumerate(offsets):
            start = offset * dilation[dim]
            length = stride[dim] * (out_size[dim] - 1) + 1
            patch = patch.narrow(2 + dim, start, length)
            if stride[dim] != 1:
                patch = _strided(patch, 2 + dim, stride[dim])
        patches.append(patch.reshape(batch, channels, 1, -1))
    return torch.cat(patches, dim=2)


def _grad_weight(
    grad_output: torch.Tensor,
    inp: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    kernel = [_as_int(k) for k in weight_shape[2:]]
    out_size = [_as_int(s) for s in grad_output.shape[2:]]
    out_channels = _as_int(weight_shape[0])
    in_per_group = _as_int(weight_shape[1])
    k = 1
    for size in kernel:
        k *= size
    cols = _im2col_sliced(inp, kernel, stride, padding, dilation, out_size)  # [N, C, K, L]
    batch = cols.shape[0]
    # [N, G, C/G*K, L] -> [G, C/G*K, N*L]
    cols = cols.reshape(batch, groups, in_per_group * k, -1).permute(1, 2, 0, 3)
    cols = cols.reshape(groups, in_per_group * k, -1)
    # [N, O, *out] -> [G, O/G, N*L]
    grad = grad_output.reshape(batch, groups, out_channels // groups, -1).permute(1, 2, 0, 3)
    grad = grad.reshape(groups, out_channels // groups, -1)
    grad_w = torch.bmm(grad, cols.transpose(1, 2))  # [G, O/G, C/G*K]
    return grad_w.reshape(list(weight_shape))


def _grad_input(
    grad_output: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    # A transposed convolution maps an output-sized tensor back to input size; output_padding
    # recovers the rows/columns a strided forward convolution dropped.
    output_padding = []
    for dim in range(len(stride)):
        in_size = _as_int(inp.shape[2 + dim])
        out_size = _as_int(grad_output.shape[2 + dim])
        k = _as_int(weight.shape[2 + dim])
        full = (out_size - 1) * stride[dim] - 2 * padding[dim] + dilation[dim] * (k - 1) + 1
        output_padding.append(in_size - full)
    return aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True, output_padding, groups)


def convolution_backward(
    grad_output: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Decomposition of ``aten.convolution_backward`` for (grouped) non-transposed convolutions."""
    if transposed:
        raise ExportError("transposed convolutions (ConvTranspose layers) are not supported for training export")
    stride = [_as_int(s) for s in stride]
    padding = [_as_int(p) for p in padding]
    dilation = [_as_int(d) for d in dilation]
    groups = _as_int(groups)
    spatial = grad_output.dim() - 2
    if len(stride) == 1 and spatial > 1:  # aten allows a single value for every spatial dim
        stride, padding, dilation = stride * spatial, padding * spatial, dilation * spatial
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = _grad_input(grad_output, inp, weight, stride, padding, dilation, groups)
    if output_mask[1]:
        grad_weight = _grad_weight(grad_output, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2] and bias_sizes is not None:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias


def training_decompositions() -> DecompositionTable:
    """Table for tracing a *training* step: core aten + BatchNorm + convolution_backward."""
    table: DecompositionTable = dict(core_aten_decompositions())
    table.update(get_decompositions(list(BATCH_NORM_OPS)))
    table[aten.convolution_backward.default] = convolution_backward
    return table


def inference_decompositions() -> DecompositionTable:
    """Table for tracing inference: core aten only, so eval-mode BatchNorm stays one fused op."""
    return dict(core_aten_decompositions())
