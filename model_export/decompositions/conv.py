"""Convolution forward and backward built from ops onnxruntime runs fast on CPU.

``aten.convolution_backward`` has no decomposition in torch; :func:`convolution_backward`
supplies one for plain, grouped (incl. depthwise) and transposed convolutions of any rank.

Speed (measured with onnxruntime's profiler on DigitsCNN; ``benchmarks/train_step.py``):
ungrouped convolutions (forward, and grad-input when stride is 1) are one batch-wide GEMM over
an im2col of a spatial-major ``[*spatial, N, C]`` view (:func:`_gemm_conv`): onnxruntime's
``Conv``/``ConvTranspose`` run one tiny GEMM per example, and its multi-threaded ``Transpose``
is only fast for 2-D permutations. grad-weight is ``grad_out^T @ cols`` on the same patches
(shared with the forward by common-subexpression elimination). Grouped convolutions and strided
grad-input keep ``Conv``/``ConvTranspose`` and a per-group batched GEMM.

**Size guard.** An im2col patch matrix is ``K`` (kernel positions) times the activation. Above
:data:`GEMM_PATCH_LIMIT` elements per example the GEMM paths are skipped: the forward stays an
ONNX ``Conv`` and grad-weight becomes a convolution over batch/channel-swapped tensors
(:func:`_grad_weight_conv`), neither of which materialises the patches for the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten

#: Largest im2col patch matrix per example (elements) for which the GEMM paths are used:
#: 2**18 floats = 1 MiB per example, 128 MiB for a batch of 128. Small on-device CNNs are far
#: below (DigitsCNN's biggest is 2,304); a 3x3 conv with 64 channels on 32x32 maps is above.
GEMM_PATCH_LIMIT = 1 << 18

Convolution = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _as_int(value: Any) -> int:
    # Kernel sizes, strides and spatial sizes are static in every graph we export (only the batch
    # dimension is dynamic), so specialising symbolic ints here is safe.
    return int(value)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _strided(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    # x[..., ::step, ...] along `dim`; slicing with a step exports to a single ONNX Slice.
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(None, None, step)
    return x[tuple(index)]


def _out_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def patch_elements(
    x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> int:
    """Elements of one example's im2col patch matrix (``L * K * C``); 0 when it is the input itself."""
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding):
        return 0  # a 1x1 convolution's patches are a reshape of the input
    spatial = [_as_int(s) for s in x.shape[2:]]
    out = [_out_size(spatial[d], kernel[d], stride[d], padding[d], dilation[d]) for d in range(len(kernel))]
    return _prod(out) * _prod(kernel) * _as_int(x.shape[1])


def _gemm_fits(
    x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> bool:
    return patch_elements(x, kernel, stride, padding, dilation) <= GEMM_PATCH_LIMIT


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


def _spatial_major(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[*spatial, N, C]`` with a single 2-D ``Transpose``.

    onnxruntime's multi-threaded ``Transpose`` is fast for 2-D and slow (5-10x) for 3-D/4-D
    permutations that move the innermost axis, e.g. NCHW -> NHWC; ``[N*C, L] -> [L, N*C]`` is 2-D.
    Slices and pads of the result copy whole ``N*C`` blocks.
    """
    channels, spatial = _as_int(x.shape[1]), [_as_int(s) for s in x.shape[2:]]
    return x.reshape(-1, _prod(spatial)).t().reshape(*spatial, -1, channels)


def _patches(
    x_sm: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """im2col of a spatial-major ``[*spatial, N, C]`` tensor: ``[L * N, K * C]`` (kernel offset major)."""
    spatial = x_sm.dim() - 2
    if any(padding):
        pads: list[int] = [0, 0, 0, 0]
        for p in reversed(padding):
            pads += [p, p]
        x_sm = F.pad(x_sm, pads)
    sizes = [_as_int(x_sm.shape[d]) for d in range(spatial)]
    out = [_out_size(sizes[d], kernel[d], stride[d], 0, dilation[d]) for d in range(spatial)]
    patches = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        patch = x_sm
        for dim, offset in enumerate(offsets):
            patch = patch.narrow(dim, offset * dilation[dim], stride[dim] * (out[dim] - 1) + 1)
            if stride[dim] != 1:
                patch = _strided(patch, dim, stride[dim])
        patches.append(patch)
    cols = torch.cat(patches, dim=-1) if len(patches) > 1 else patches[0]
    return cols.reshape(-1, _as_int(cols.shape[-1]))


def _weight_cols(weight: torch.Tensor) -> torch.Tensor:
    """``[O, C, *k]`` -> ``[O, K * C]`` in the column order of :func:`_patches` (tiny tensor)."""
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(_as_int(weight.shape[0]), -1)


def _gemm_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """Ungrouped convolution as one GEMM over the whole batch: ``[L*N, K*C] @ [K*C, O]``.

    onnxruntime's ``Conv`` runs one small GEMM per example; for the small feature maps of
    on-device models a single batch-wide GEMM is several times faster.
    """
    kernel = [_as_int(k) for k in weight.shape[2:]]
    out_channels = _as_int(weight.shape[0])
    spatial = [_as_int(s) for s in x.shape[2:]]
    out = [_out_size(spatial[d], kernel[d], stride[d], padding[d], dilation[d]) for d in range(len(kernel))]
    cols = _patches(_spatial_major(x), kernel, stride, padding, dilation)
    w_cols = _weight_cols(weight)
    y = cols @ w_cols.t() if bias is None else torch.addmm(bias, cols, w_cols.t())  # [L*N, O]
    return y.reshape(_prod(out), -1).t().reshape(-1, out_channels, *out)


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """A forward (non-transposed) convolution: batch-wide GEMM when it applies and fits, else ``Conv``."""
    kernel = [_as_int(k) for k in weight.shape[2:]]
    if groups == 1 and x.dim() >= 3 and _gemm_fits(x, kernel, stride, padding, dilation):
        return _gemm_conv(x, weight, bias, stride, padding, dilation)
    zeros = [0] * len(kernel)
    return aten.convolution.default(x, weight, bias, stride, padding, dilation, False, zeros, groups)


def _conv_params(
    stride: Sequence[Any], padding: Sequence[Any], dilation: Sequence[Any], spatial: int
) -> tuple[list[int], list[int], list[int]]:
    s, p, d = ([_as_int(v) for v in values] for values in (stride, padding, dilation))
    if len(s) == 1 and spatial > 1:  # aten allows a single value for every spatial dim
        s, p, d = s * spatial, p * spatial, d * spatial
    return s, p, d


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> Any:
    """Forward convolution as a batch-wide GEMM; grouped/transposed/oversized ones stay ``Conv``/``ConvTranspose``."""
    if _as_int(groups) != 1 or transposed or x.dim() < 3:
        return NotImplemented
    stride, padding, dilation = _conv_params(stride, padding, dilation, x.dim() - 2)
    if not _gemm_fits(x, [_as_int(k) for k in weight.shape[2:]], stride, padding, dilation):
        return NotImplemented
    return _gemm_conv(x, weight, bias, stride, padding, dilation)


def _grad_weight_conv(
    grad_output: torch.Tensor,
    inp: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """grad-weight as one convolution, without patches: batch and channels swap roles.

    ``grad_w[o, c, a] = sum_{n, i} grad[n, o, i] * x_pad[n, c, i * stride + a * dilation]`` is a
    convolution of ``x`` (batch ``C/G``, channels ``G*N``) with ``grad`` as the kernel, stride and
    dilation exchanged; the result is cut to the kernel size.
    """
    kernel = [_as_int(k) for k in weight_shape[2:]]
    batch, channels = inp.shape[0], _as_int(inp.shape[1])
    spatial = [_as_int(s) for s in inp.shape[2:]]
    rank = len(kernel)
    xt = inp.reshape(batch, groups, channels // groups, *spatial).permute(2, 1, 0, *range(3, 3 + rank))
    xt = xt.reshape(channels // groups, -1, *spatial)
    gt = grad_output.transpose(0, 1)  # [O, N, *out]
    out = aten.convolution.default(xt, gt, None, dilation, padding, stride, False, [0] * rank, groups)
    for dim, k in enumerate(kernel):
        out = out.narrow(2 + dim, 0, k)
    return out.transpose(0, 1)


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
    if not _gemm_fits(inp, kernel, stride, padding, dilation):
        return _grad_weight_conv(grad_output, inp, weight_shape, stride, padding, dilation, groups)
    out_channels = _as_int(weight_shape[0])
    if groups == 1:
        # Same patches as the forward GEMM (onnxruntime's common-subexpression elimination
        # shares them): grad_w = grad_out^T @ cols, a single [O, L*N] @ [L*N, K*C].
        cols = _patches(_spatial_major(inp), kernel, stride, padding, dilation)
        grad = _spatial_major(grad_output).reshape(-1, out_channels)
        grad_w = grad.t() @ cols  # [O, K * C]
        spatial = len(kernel)
        return grad_w.reshape(out_channels, *kernel, -1).permute(0, spatial + 1, *range(1, spatial + 1))
    out_size = [_as_int(s) for s in grad_output.shape[2:]]
    in_per_group = _as_int(weight_shape[1])
    k = _prod(kernel)
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
    kernel = [_as_int(k) for k in weight.shape[2:]]
    full_pad = [dilation[d] * (kernel[d] - 1) for d in range(len(kernel))]
    if groups == 1 and all(s == 1 for s in stride) and all(p <= f for p, f in zip(padding, full_pad, strict=True)):
        # Stride 1: the transposed convolution is a plain convolution of grad_output with the
        # spatially flipped, in/out-swapped weight, padded by dilation * (k - 1) - padding.
        flipped = weight.flip(list(range(2, weight.dim()))).transpose(0, 1)
        pad = [f - p for f, p in zip(full_pad, padding, strict=True)]
        return _conv(grad_output, flipped, None, stride, pad, dilation, 1)
    # A transposed convolution maps an output-sized tensor back to input size; output_padding
    # recovers the rows/columns a strided forward convolution dropped.
    output_padding = []
    for dim in range(len(stride)):
        in_size = _as_int(inp.shape[2 + dim])
        out_size = _as_int(grad_output.shape[2 + dim])
        full = (out_size - 1) * stride[dim] - 2 * padding[dim] + dilation[dim] * (kernel[dim] - 1) + 1
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
) -> Convolution:
    """Decomposition of ``aten.convolution_backward`` for plain, grouped and transposed convolutions.

    A transposed convolution ``y = conv_transpose(x, w)`` is the adjoint of ``conv(., w)``, so its
    grad-input is the forward convolution ``conv(grad_y, w)`` and its grad-weight is the
    grad-weight of that convolution with ``grad_y`` as input and ``x`` as output gradient.
    """
    stride, padding, dilation = _conv_params(stride, padding, dilation, grad_output.dim() - 2)
    groups = _as_int(groups)
    grad_input = grad_weight = grad_bias = None
    if transposed:
        if output_mask[0]:
            grad_input = _conv(grad_output, weight, None, stride, padding, dilation, groups)
        if output_mask[1]:
            grad_weight = _grad_weight(inp, grad_output, weight.shape, stride, padding, dilation, groups)
    else:
        if output_mask[0]:
            grad_input = _grad_input(grad_output, inp, weight, stride, padding, dilation, groups)
        if output_mask[1]:
            grad_weight = _grad_weight(grad_output, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2] and bias_sizes is not None:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias
