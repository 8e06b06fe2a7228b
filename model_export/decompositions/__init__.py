"""Decomposition table used to trace train steps into plain, default-domain ONNX ops.

``torch._decomp.core_aten_decompositions()`` lowers most of aten to a small core; what it leaves
out, or lowers to something onnxruntime cannot run or runs slowly, is filled in here (see
FIELD_NOTES, "On-device training with onnxruntime"):

* **BatchNorm in training mode.** Unless the batch-norm ops are decomposed into elementwise ops,
  the ONNX exporter emits a ``BatchNormalization`` node in *inference* mode: the loss is silently
  wrong and running statistics never update. :data:`BATCH_NORM_OPS` lists the ops to decompose.
* **Convolutions** (:mod:`.conv`): ``aten.convolution_backward`` has no decomposition at all
  (plain, grouped, depthwise and transposed supported); forward and grad-input are batch-wide
  GEMMs where that is faster and the patch matrix is small enough.
* **Attention** (:mod:`.attention`): the backward of CPU flash attention.
* **LSTM**: nothing here; the exporter traces with oneDNN disabled (it would pick ``mkldnn_rnn_layer``).
* **Pooling** (:mod:`model_export.pooling`): non-overlapping max pools without indices/scatter,
  average-pool backwards (no ONNX translation exists).
* ``threshold_backward`` (ReLU) multiplies by a 0/1 mask instead of using ``Where``.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

from model_export import pooling
from model_export.decompositions import batch_norm
from model_export.decompositions.attention import flash_attention_backward
from model_export.decompositions.conv import GEMM_PATCH_LIMIT, convolution, convolution_backward

__all__ = [
    "BATCH_NORM_OPS",
    "GEMM_PATCH_LIMIT",
    "DecompositionTable",
    "convolution",
    "convolution_backward",
    "flash_attention_backward",
    "inference_decompositions",
    "threshold_backward",
    "training_decompositions",
]

aten = torch.ops.aten

DecompositionTable = dict[Any, Callable[..., Any]]

#: BatchNorm variants that must be decomposed so training-mode BatchNorm is traced as math.
BATCH_NORM_OPS = (
    aten.native_batch_norm,
    aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
)


def threshold_backward(grad_output: torch.Tensor, inp: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward as ``grad * (inp > threshold)``: a ``Mul`` by a 0/1 mask instead of ``Where``.

    onnxruntime's ``Where`` is about ten times slower than ``Greater`` + ``Cast`` + ``Mul``. Equal to
    aten's ``where(inp <= threshold, 0, grad)`` for finite gradients (an inf/NaN gradient at a
    masked position gives NaN instead of 0; the trainer stops on a non-finite loss anyway).
    """
    return grad_output * (inp > threshold).to(grad_output.dtype)


def training_decompositions() -> DecompositionTable:
    """Table for tracing a *training* step: core aten + the gaps and fast paths listed above."""
    table: DecompositionTable = dict(core_aten_decompositions())
    table.update(get_decompositions(list(BATCH_NORM_OPS)))
    table[aten.native_batch_norm.default] = batch_norm.native_batch_norm
    table[aten._native_batch_norm_legit.default] = batch_norm.native_batch_norm
    table[aten._native_batch_norm_legit.no_stats] = batch_norm.native_batch_norm_legit_no_stats
    table[aten._native_batch_norm_legit_functional.default] = batch_norm.native_batch_norm_legit_functional
    table[aten.native_batch_norm_backward.default] = batch_norm.native_batch_norm_backward
    table[aten.convolution.default] = convolution
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.max_pool2d_with_indices.default] = pooling.max_pool2d_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = pooling.max_pool2d_with_indices_backward
    table[aten.avg_pool2d_backward.default] = pooling.avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = pooling.adaptive_avg_pool2d_backward
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = flash_attention_backward
    return table


def inference_decompositions() -> DecompositionTable:
    """Table for tracing inference: core aten only, so eval-mode BatchNorm stays one fused op."""
    return dict(core_aten_decompositions())
