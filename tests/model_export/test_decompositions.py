"""The decompositions against aten's own kernels or autograd (float64, no tracing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_agent.errors import ExportError
from model_export.decompositions import (
    BATCH_NORM_OPS,
    batch_norm,
    conv,
    convolution,
    convolution_backward,
    flash_attention_backward,
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


@pytest.mark.parametrize(
    ("stride", "padding", "output_padding", "dilation", "groups"),
    [(1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (2, 1, 0, 2, 2), (3, 0, 2, 1, 4), (1, 1, 0, 1, 4)],
)
def test_transposed_matches_aten(stride: int, padding: int, output_padding: int, dilation: int, groups: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 8 // groups, 3, 3, dtype=torch.float64)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, True, [output_padding] * 2, groups)
    grad = torch.randn_like(aten.convolution(x, w, None, *args))
    expected = aten.convolution_backward(grad, x, w, [8], *args, [True, True, True])
    actual = convolution_backward(grad, x, w, [8], *args, [True, True, True])
    for name, e, a in zip(("input", "weight", "bias"), expected, actual, strict=True):
        assert a is not None, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"grad_{name}")


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 1, 1, 1), (3, 2, 2, 2), (2, 0, 1, 4)]
)
def test_oversized_patches_fall_back(
    monkeypatch: pytest.MonkeyPatch, stride: int, padding: int, dilation: int, groups: int
) -> None:
    monkeypatch.setattr(conv, "GEMM_PATCH_LIMIT", 0)  # every patch matrix is "too big"
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups)
    assert convolution(x, w, None, *args) is NotImplemented  # forward stays an ONNX Conv
    grad = torch.randn_like(aten.convolution(x, w, None, *args))
    expected = aten.convolution_backward(grad, x, w, [8], *args, [True, True, True])
    actual = convolution_backward(grad, x, w, [8], *args, [True, True, True])
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_patch_size_guard() -> None:
    x = torch.randn(2, 64, 32, 32)
    assert conv.patch_elements(x, [3, 3], [1, 1], [1, 1], [1, 1]) == 32 * 32 * 9 * 64 > conv.GEMM_PATCH_LIMIT
    assert conv.patch_elements(x, [1, 1], [1, 1], [0, 0], [1, 1]) == 0  # 1x1: the input itself
    assert conv.patch_elements(torch.randn(2, 16, 4, 4), [3, 3], [1, 1], [1, 1], [1, 1]) <= conv.GEMM_PATCH_LIMIT


@pytest.mark.parametrize(("causal", "mask"), [(False, None), (True, None), (False, "bool"), (False, "float")])
def test_attention_backward_matches_autograd(causal: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(5, 5) > 0.3
        attn_mask[:, 0] = True
    elif mask == "float":
        attn_mask = torch.randn(5, 5, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad)
    actual = flash_attention_backward(
        grad, q.detach(), k.detach(), v.detach(), out.detach(), out, 0.0, causal, attn_mask=attn_mask
    )
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_attention_dropout_is_refused() -> None:
    q = torch.randn(1, 1, 2, 2)
    with pytest.raises(ExportError, match="attention dropout"):
        flash_attention_backward(q, q, q, q, q, q, 0.1, False)


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


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 4, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stats", [True, False])
def test_batch_norm_training_matches_aten(shape: tuple[int, ...], affine: bool, stats: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    channels = shape[1]
    w = torch.randn(channels, dtype=torch.float64) if affine else None
    b = torch.randn(channels, dtype=torch.float64) if affine else None
    rm = torch.randn(channels, dtype=torch.float64) if stats else None
    rv = torch.rand(channels, dtype=torch.float64) + 0.5 if stats else None
    ours_rm, ours_rv = (rm.clone(), rv.clone()) if rm is not None and rv is not None else (None, None)
    ref_rm, ref_rv = (rm.clone(), rv.clone()) if rm is not None and rv is not None else (None, None)
    expected = aten.native_batch_norm(x, w, b, ref_rm, ref_rv, True, 0.1, 1e-5)
    got = batch_norm.native_batch_norm(x, w, b, ours_rm, ours_rv, True, 0.1, 1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    if stats:
        torch.testing.assert_close(ours_rm, ref_rm, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours_rv, ref_rv, rtol=1e-10, atol=1e-10)  # unbiased variance
        functional = batch_norm.native_batch_norm_legit_functional(x, w, b, rm, rv, True, 0.1, 1e-5)
        for g, e in zip(functional, (*expected, ref_rm, ref_rv), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    else:
        no_stats = batch_norm.native_batch_norm_legit_no_stats(x, w, b, True, 0.1, 1e-5)
        for g, e in zip(no_stats, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    _, mean, rstd = expected
    grad = torch.randn_like(x)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        if not affine and mask[1]:
            mask = [mask[0], False, False]
        ref = aten.native_batch_norm_backward(grad, x, w, rm, rv, mean, rstd, True, 1e-5, mask)
        ours = batch_norm.native_batch_norm_backward(grad, x, w, rm, rv, mean, rstd, True, 1e-5, mask)
        for g, e in zip(ours, ref, strict=True):
            if e is None:
                assert g is None
            else:
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_batch_norm_eval_uses_torch() -> None:
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    assert batch_norm.native_batch_norm(x, None, None, rm, rv, False, 0.1, 1e-5) is NotImplemented
    table = training_decompositions()
    assert table[aten.native_batch_norm.default] is batch_norm.native_batch_norm
    assert table[aten.native_batch_norm_backward.default] is batch_norm.native_batch_norm_backward
    grad = torch.randn_like(x)
    ref = aten.native_batch_norm_backward(grad, x, None, rm, rv, None, None, False, 1e-5, [True, False, False])
    ours = batch_norm.native_batch_norm_backward(grad, x, None, rm, rv, None, None, False, 1e-5, [True, False, False])
    torch.testing.assert_close(ours[0], ref[0])
