"""Max-pool decompositions for non-overlapping windows (``kernel == stride``), the common CNN case.

onnxruntime's ``MaxPool`` with an ``Indices`` output takes a slow generic path, the exporter adds a
second ``MaxPool`` to convert the indices, and the backward becomes a ``ScatterElements``. When
windows do not overlap (stride equal to kernel, no padding, no dilation) every input element lies in
at most one window, so both directions are reshapes and reductions:

* forward: view the input as ``[N, C, Ho, Wo, kh*kw]`` windows; ``amax`` gives the output and
  ``argmax`` (first maximum, like aten) the position in the window, mapped to aten's flat
  ``h * W + w`` index;
* backward: compare each index with every position of its window (a broadcast ``Equal`` on the
  ``[N, C, Ho, kh, Wo, kw]`` view) and route the gradient there with one ``Where``; no scatter.

Other configurations return ``NotImplemented`` so the exporter's own lowering is used unchanged.
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
