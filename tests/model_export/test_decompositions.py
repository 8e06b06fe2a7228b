"""The convolution_backward decomposition against aten's own kernel (float64, no tracing)."""

from __future__ import annotations

import pytest
import torch

from edge_agent.errors import ExportError
from model_export.decompositions import (
    BATCH_NORM_OPS,
    convolution,
    convolution_backward,
    threshold_backward,
    training_decompositions,
)

aten = torch.ops.aten


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [(1, 0, 1, 1), (1, 1, 1, 1), (2, 1, 1, 1), (3, 2, 2, 1), (1, 1, 1, 2), (2, 0, 1, 4), (2, 1, 2, 4)],
)
def test_matches_aten(spatial: int, stride: int, padding: int, dilation: int, groups: int) -> None:
    torch.manual_seed(0)
    size = 9 if spatial < 3 else 6
    x = torch.randn([3, 4] + [size] * spatial, dtype=torch.float64)
    w = torch.randn([8, 4 // groups] + [3] * spatial, dtype=torch.float64)
    args = ([stride] * spatial, [padding] * spatial, [dilation] * spatial, False, [0] * spatial, groups)
    out = aten.convolution(x, w, None, *args)
    grad = torch.randn_like(out)
    expected = aten.convolution_backward(grad, x, w, [8], *args, [True, True, True])
    actual = convolution_backward(grad, x, w, [8], *args, [True, True, True])
    for name, e, a in zip(("input", "weight", "bias"), expected, actual, strict=True):
        assert a is not None, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"grad_{name}")


def test_output_mask_skips_work() -> None:
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    grad = torch.randn(2, 4, 3, 3)
    result = convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
    assert result[0] is None and result[1] is not None and result[2] is None


def test_transposed_convolution_is_rejected() -> None:
    x, w = torch.randn(2, 3, 5, 5), torch.randn(3, 4, 3, 3)
    with pytest.raises(ExportError, match="transposed"):
        convolution_backward(x, x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1, [True, True, True])


def test_table_covers_training_gaps() -> None:
    table = training_decompositions()
    assert table[aten.convolution_backward.default] is convolution_backward
    for packet in BATCH_NORM_OPS:
        assert any(getattr(packet, overload) in table for overload in packet.overloads()), packet


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (1, 1, 1), (2, 1, 1), (3, 2, 2), (1, 2, 1)])
def test_forward_convolution_matches_aten(spatial: int, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    size = 9 if spatial < 3 else 6
    x = torch.randn([3, 4] + [size] * spatial, dtype=torch.float64)
    w = torch.randn([5, 4] + [3] * spatial, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    args = ([stride] * spatial, [padding] * spatial, [dilation] * spatial, False, [0] * spatial, 1)
    for bias in (b, None):
        expected = aten.convolution(x, w, bias, *args)
        torch.testing.assert_close(convolution(x, w, bias, *args), expected, rtol=1e-10, atol=1e-10)


def test_grouped_or_transposed_forward_keeps_aten_op() -> None:
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 2, 3, 3)
    assert convolution(x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 2) is NotImplemented
    assert convolution(x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1) is NotImplemented


def test_threshold_backward_matches_aten() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    x[0, :3] = 0.0  # ReLU's boundary: aten passes no gradient at x == threshold
    grad = torch.randn_like(x)
    for threshold in (0.0, 0.5):
        expected = aten.threshold_backward(grad, x, threshold)
        assert torch.equal(threshold_backward(grad, x, threshold), expected)
