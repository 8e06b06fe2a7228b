"""The max-pool decompositions against aten's own kernels (float64, no tracing)."""

from __future__ import annotations

import pytest
import torch

from model_export.decompositions import training_decompositions
from model_export.pooling import (
    adaptive_avg_pool2d_backward,
    avg_pool2d_backward,
    max_pool2d_with_indices,
    max_pool2d_with_indices_backward,
)

aten = torch.ops.aten


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0  # a window of four equal maxima
    x[-1] = x[-1].round()  # many ties: aten routes the gradient to the first maximum only
    x[0, 1] = 0.0  # all-zero windows, as after a ReLU
    return x


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "ceil_mode"),
    [
        ((3, 4, 8, 8), [2, 2], [2, 2], False),
        ((2, 3, 8, 8), [2, 2], [], False),  # stride defaults to the kernel
        ((2, 3, 9, 7), [2, 2], [2, 2], False),  # floor mode drops the last row/column
        ((2, 3, 9, 9), [3, 3], [3, 3], True),  # ceil mode without partial windows
        ((2, 3, 6, 6), [2, 3], [2, 3], False),  # rectangular windows
        ((1, 2, 4, 4), [1, 1], [1, 1], False),
    ],
)
def test_non_overlapping_matches_aten(
    shape: tuple[int, ...], kernel: list[int], stride: list[int], ceil_mode: bool
) -> None:
    x = _input(shape)
    expected = aten.max_pool2d_with_indices(x, kernel, stride, [0, 0], [1, 1], ceil_mode)
    actual = max_pool2d_with_indices(x, kernel, stride, [0, 0], [1, 1], ceil_mode)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    grad = torch.randn_like(expected[0])
    args = (kernel, stride, [0, 0], [1, 1], ceil_mode, expected[1])
    expected_grad = aten.max_pool2d_with_indices_backward(grad, x, *args)
    assert torch.equal(max_pool2d_with_indices_backward(grad, x, *args), expected_grad)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    [
        ([3, 3], [2, 2], [0, 0], [1, 1], False),  # overlapping windows
        ([2, 2], [2, 2], [1, 1], [1, 1], False),  # padding
        ([2, 2], [2, 2], [0, 0], [2, 2], False),  # dilation
        ([2, 2], [2, 2], [0, 0], [1, 1], True),  # ceil mode with a partial window (9 % 2)
    ],
)
def test_other_pools_fall_back(
    kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool
) -> None:
    x = _input((2, 3, 9, 9))
    assert max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode) is NotImplemented
    out, indices = aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    args = (kernel, stride, padding, dilation, ceil_mode, indices)
    assert max_pool2d_with_indices_backward(torch.ones_like(out), x, *args) is NotImplemented


@pytest.mark.parametrize("kernel", [2, 3])
def test_traced_pool_step_matches_eager(kernel: int) -> None:
    """Overlapping (fallback) and non-overlapping pools both trace and give aten's gradients."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        out = torch.nn.functional.max_pool2d(torch.relu(x), kernel, stride=2)
        (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), [x])
        return out, grad

    x = _input((2, 3, 8, 8))
    traced = make_fx(step, decomposition_table=training_decompositions())(x)
    for actual, expected in zip(traced(x), step(x), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    [
        (2, 2, 0, False, True, None),  # tiling: Expand path
        (3, 2, 1, False, True, None),  # overlapping + padding: ConvTranspose path
        (3, 2, 1, True, False, None),
        (2, 2, 0, True, True, None),  # ceil mode: a partial last window
        (3, 1, 1, False, False, None),
        (2, 2, 1, True, True, 3),
        (3, 3, 0, True, True, None),
    ],
)
def test_avg_pool_backward_matches_aten(
    kernel: int, stride: int, padding: int, ceil_mode: bool, count_include_pad: bool, divisor: int | None
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    args = ([kernel] * 2, [stride] * 2, [padding] * 2, ceil_mode, count_include_pad, divisor)
    grad = torch.randn_like(aten.avg_pool2d(x, *args))
    expected = aten.avg_pool2d_backward(grad, x, *args)
    torch.testing.assert_close(avg_pool2d_backward(grad, x, *args), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out", [(1, 1), (2, 3), (3, 3), (7, 8)])
def test_adaptive_avg_pool_backward_matches_aten(out: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    grad = torch.randn_like(aten._adaptive_avg_pool2d(x, list(out)))
    expected = aten._adaptive_avg_pool2d_backward(grad, x)
    torch.testing.assert_close(adaptive_avg_pool2d_backward(grad, x), expected, rtol=1e-12, atol=1e-12)


def test_avg_pool_backwards_are_in_the_table() -> None:
    table = training_decompositions()
    assert table[aten.avg_pool2d_backward.default] is avg_pool2d_backward
    assert table[aten._adaptive_avg_pool2d_backward.default] is adaptive_avg_pool2d_backward
