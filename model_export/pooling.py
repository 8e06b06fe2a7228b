"""Pooling decompositions: fast max pools for non-overlapping windows, and the average-pool backwards.

**Max pool, non-overlapping windows** (``kernel == stride``), the common CNN case.

onnxruntime's ``MaxPool`` with an ``Indices`` output takes a slow generic path, the exporter adds a
second ``MaxPool`` to convert the indices, and the backward becomes a ``ScatterElements``. When
windows do not overlap (stride equal to kernel, no padding, no dilation) every input element lies in
at most one window, so both directions are reshapes and reductions:

* forward: view the input as ``[N, C, Ho, Wo, kh*kw]`` windows; ``amax`` gives the output and
  ``argmax`` (first maximum, like aten) the position in the window, mapped to aten's flat
  ``h * W + w`` index;
* backward: compare each index with every position of its window (a broadcast ``Equal`` on the
  ``[N, C, Ho, kh, Wo, kw]`` view) and route the gradient there with one ``Where``; no scatter.

Other max-pool configurations (overlapping windows, padding, dilation) return ``NotImplemented``
so the exporter's own lowering (``MaxPool`` with indices, ``ScatterElements`` backward) is used.

**Average pools.** Neither ``avg_pool2d_backward`` nor ``_adaptive_avg_pool2d_backward`` has a
decomposition or an ONNX translation. Both are linear maps with static coefficients:

* ``avg_pool2d_backward`` divides the gradient by each window's divisor (aten's rules for padding,
  ``ceil_mode``, ``count_include_pad`` and ``divisor_override``, evaluated at trace time) and spreads
  it over the window: an ``Expand`` when windows tile the input, else a depthwise ``ConvTranspose``
  with an all-ones kernel, cropped to the input;
* ``_adaptive_avg_pool2d_backward`` is ``A_h^T @ grad @ A_w`` with the constant averaging matrices
  of each axis (an ``Expand`` for global pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

aten = torch.ops.aten


def _pair(value: Any, default: Sequence[int] | None = None) -> list[int] | None:
    if isinstance(value, int | torch.SymInt):
        return [int(value)] * 2
    values = [int(v) for v in value]
    if not values:
        return list(default) if default is not None else None
    return values * 2 if len(values) == 1 else values


def _window(
    x: torch.Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool
) -> tuple[int, int, int, int] | None:
    """``(kh, kw, Ho, Wo)`` if the pool tiles ``x`` with non-overlapping windows, else ``None``."""
    kernel = _pair(kernel_size)
    if x.dim() != 4 or kernel is None or len(kernel) != 2:
        return None
    steps = _pair(stride, kernel)
    if steps != kernel or _pair(padding) != [0, 0] or _pair(dilation) != [1, 1]:
        return None
    kh, kw = kernel
    h, w = int(x.shape[2]), int(x.shape[3])
    if h < kh or w < kw or (ceil_mode and (h % kh or w % kw)):  # ceil_mode adds partial windows
        return None
    return kh, kw, h // kh, w // kw


def _base(kh: int, kw: int, ho: int, wo: int, width: int) -> torch.Tensor:
    """Flat index of every window's top-left element: ``[Ho, Wo]``."""
    rows = torch.arange(ho, dtype=torch.int64) * (kh * width)
    cols = torch.arange(wo, dtype=torch.int64) * kw
    return rows.unsqueeze(1) + cols


def max_pool2d_with_indices(
    x: torch.Tensor,
    kernel_size: Any,
    stride: Any = (),
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
) -> Any:
    window = _window(x, kernel_size, stride, padding, dilation, ceil_mode)
    if window is None:
        return NotImplemented
    kh, kw, ho, wo = window
    width = int(x.shape[3])
    # One strided slice per window position (row-major, the order aten scans a window in).
    parts = [x[:, :, i : ho * kh : kh, j : wo * kw : kw] for i in range(kh) for j in range(kw)]
    out = parts[0]
    for part in parts[1:]:
        out = torch.maximum(out, part)
    # Flat offset of the first maximum in each window: positions are visited in order and a hit
    # only counts while no earlier position has hit (`free` is 1 until then). Float 0/1 masks
    # and Mul/Add, because onnxruntime's Where is an order of magnitude slower.
    free = torch.ones_like(out)
    offset = torch.zeros_like(out)
    for k, part in enumerate(parts):
        hit = (part == out).to(out.dtype) * free
        offset = offset + hit * float((k // kw) * width + k % kw)
        free = free - hit
    return out, offset.to(torch.int64) + _base(kh, kw, ho, wo, width)


def max_pool2d_with_indices_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    ceil_mode: bool,
    indices: torch.Tensor,
) -> Any:
    window = _window(x, kernel_size, stride, padding, dilation, ceil_mode)
    if window is None:
        return NotImplemented
    kh, kw, ho, wo = window
    height, width = int(x.shape[2]), int(x.shape[3])
    local = indices - _base(kh, kw, ho, wo, width)  # offset of the chosen element in its window
    rows = []
    for i in range(kh):
        # [N, C, Ho, Wo, kw] -> [N, C, Ho, Wo * kw]: row i of every window, interleaved by column
        cols = [grad_output * (local == i * width + j).to(grad_output.dtype) for j in range(kw)]
        rows.append(torch.stack(cols, dim=-1).flatten(-2))
    grad = torch.stack(rows, dim=3).flatten(2, 3)  # [N, C, Ho, kh, W'] -> [N, C, H', W']
    if ho * kh != height or wo * kw != width:  # floor mode dropped the last rows/columns
        grad = torch.nn.functional.pad(grad, [0, width - wo * kw, 0, height - ho * kh])
    return grad


def _divisors(
    size: int, out: int, kernel: int, stride: int, padding: int, count_include_pad: bool
) -> list[tuple[int, int]]:
    """Per output position along one axis: (window size incl. padding, window size inside the input)."""
    result = []
    for o in range(out):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        with_pad = end - start
        inside = min(end, size) - max(start, 0)
        result.append((with_pad, inside) if count_include_pad else (inside, inside))
    return result


def _fit(x: torch.Tensor, padding: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop ``padding`` from the front of the two spatial axes, then crop or zero-pad to ``size``."""
    for axis, (pad, want) in enumerate(zip(padding, size, strict=True)):
        dim = 2 + axis
        x = x.narrow(dim, pad, min(int(x.shape[dim]) - pad, want))
        short = want - int(x.shape[dim])
        if short > 0:
            pads = [0, 0, 0, 0]
            pads[2 * (1 - axis) + 1] = short
            x = torch.nn.functional.pad(x, pads)
    return x


def avg_pool2d_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    kernel = _pair(kernel_size)
    steps = _pair(stride, kernel)
    pads = _pair(padding)
    assert kernel is not None and steps is not None and pads is not None
    size = [int(x.shape[-2]), int(x.shape[-1])]
    out = [int(grad_output.shape[-2]), int(grad_output.shape[-1])]
    if divisor_override:
        scale = torch.full(out, 1.0 / divisor_override, dtype=grad_output.dtype)
    else:
        rows = _divisors(size[0], out[0], kernel[0], steps[0], pads[0], count_include_pad)
        cols = _divisors(size[1], out[1], kernel[1], steps[1], pads[1], count_include_pad)
        # aten: (hend - hstart) * (wend - wstart), both including padding or both excluding it
        scale = torch.tensor([[1.0 / (r[0] * c[0]) for c in cols] for r in rows], dtype=grad_output.dtype)
    grad = grad_output * scale
    squeeze = grad.dim() == 3  # unbatched [C, H, W]
    if squeeze:
        grad = grad.unsqueeze(0)
    n, channels = grad.shape[0], int(grad.shape[1])
    kh, kw = kernel
    if steps == kernel:
        # Windows tile the (padded) input: every element receives the gradient of its one window.
        spread = grad.reshape(n, channels, out[0], 1, out[1], 1).expand(n, channels, out[0], kh, out[1], kw)
        spread = spread.reshape(n, channels, out[0] * kh, out[1] * kw)
    else:
        ones = torch.ones(channels, 1, kh, kw, dtype=grad.dtype)
        spread = torch.ops.aten.convolution.default(grad, ones, None, steps, [0, 0], [1, 1], True, [0, 0], channels)
    result = _fit(spread, pads, size)
    return result.squeeze(0) if squeeze else result


def _averaging_matrix(size: int, out: int, dtype: torch.dtype) -> torch.Tensor:
    """``[out, size]``: row ``i`` averages aten's adaptive window ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    rows = []
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    return torch.tensor(rows, dtype=dtype)


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    height, width = int(x.shape[-2]), int(x.shape[-1])
    out_h, out_w = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    if out_h == 1 and out_w == 1:  # global average pooling
        return (grad_output / float(height * width)).expand(x.shape)
    rows = _averaging_matrix(height, out_h, grad_output.dtype)
    cols = _averaging_matrix(width, out_w, grad_output.dtype)
    return rows.t() @ grad_output @ cols
