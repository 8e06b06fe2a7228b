"""Training-mode BatchNorm forward and backward with fewer passes over the activation.

torch's decompositions compute the batch mean twice (``var_mean`` and a separate sum), subtract it
three times (variance, output, backward) and apply ``rstd``, weight and bias as three broadcast
passes. On onnxruntime's CPU provider each broadcast op over an ``[N, C, H, W]`` tensor costs about
as much as a small GEMM, so here:

* forward: ``mean`` (one reduction), ``xc = x - mean`` (one pass), ``var = mean(xc * xc)``
  (two-pass, numerically the same as torch), then ``y = xc * (rstd * weight) + bias``: the
  per-channel factors are folded on ``[C]`` vectors, the activation sees one ``Mul`` and one ``Add``;
* backward: ``xc`` is rebuilt from the saved mean with exactly the forward's ops, so onnxruntime's
  common-subexpression elimination shares it with the forward; then the two per-channel sums
  (``sum(dy)``, ``sum(dy * xc)``) and ``dx = (dy - xc * proj - mean(dy)) * (rstd * weight)`` with
  ``proj`` folded per channel.

Running statistics follow torch exactly (momentum, unbiased variance ``var * n / (n - 1)``).
Inference mode (``training=False``) and eval-mode backward use torch's own decompositions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._decomp import decompositions as torch_decomps
from torch._prims_common import get_computation_dtype

aten = torch.ops.aten

BatchNormOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, int(x.shape[1])] + [1] * (x.dim() - 2)


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[C]`` -> ``[1, C, 1, ...]`` broadcastable against ``x`` (a single ``Reshape``)."""
    return v.reshape(_channel_shape(x))


def _reduction_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _centered(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Built identically in forward and backward so that onnxruntime's CSE computes it once.
    return x - _per_channel(mean, x)


def _training_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> BatchNormOut:
    dims = _reduction_dims(x)
    x_acc = x.to(get_computation_dtype(x.dtype))
    mean = x_acc.mean(dim=dims)  # [C]
    xc = _centered(x_acc, mean)
    var = (xc * xc).mean(dim=dims)  # biased, [C]
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.flatten()
    out = xc * _per_channel(scale, x)
    if bias is not None:
        out = out + _per_channel(bias.flatten(), x)
    new_mean, new_var = running_mean, running_var
    if running_mean is not None:
        new_mean = momentum * mean + (1 - momentum) * running_mean
    if running_var is not None:
        n = x.numel() / x.shape[1]
        new_var = momentum * (var * (n / (n - 1))) + (1 - momentum) * running_var
    return out.to(x.dtype), mean.to(x.dtype), rstd.to(x.dtype), new_mean, new_var


def native_batch_norm_legit_functional(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> Any:
    if not training:
        return NotImplemented
    out, mean, rstd, new_mean, new_var = _training_forward(x, weight, bias, running_mean, running_var, momentum, eps)
    assert new_mean is not None and new_var is not None
    return out, mean, rstd, new_mean, new_var


def native_batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: list[bool],
) -> Any:
    if not train or save_mean is None or save_invstd is None or x.dim() < 2:
        return torch_decomps.native_batch_norm_backward(
            grad_out, x, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask
        )
    dtype = get_computation_dtype(x.dtype)
    dy = grad_out.to(dtype)
    x_acc = x.to(dtype)
    mean, rstd = save_mean.to(dtype), save_invstd.to(dtype)
    dims = _reduction_dims(x)
    norm = 1.0 / (x.numel() / x.shape[1])
    xc = _centered(x_acc, mean)
    grad_sum = dy.sum(dim=dims)  # [C]
    dot = (dy * xc).sum(dim=dims)  # [C]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        scale = rstd if weight is None else rstd * weight.to(dtype).flatten()
        proj = dot * norm * rstd * rstd
        grad_input = (dy - xc * _per_channel(proj, x) - _per_channel(grad_sum * norm, x)) * _per_channel(scale, x)
        grad_input = grad_input.to(x.dtype)
    if output_mask[1]:
        grad_weight = dot * rstd
    if output_mask[2]:
        grad_bias = grad_sum
    weight_dtype = x.dtype if weight is None else weight.dtype
    return (
        grad_input,
        None if grad_weight is None else grad_weight.to(weight_dtype),
        None if grad_bias is None else grad_bias.to(weight_dtype),
    )


def native_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Any:
    """``native_batch_norm`` / ``_native_batch_norm_legit``: updates the running stats in place, like torch."""
    if not training:
        return NotImplemented
    out, mean, rstd, new_mean, new_var = _training_forward(x, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is not None and new_mean is not None:
        running_mean.copy_(new_mean)
    if running_var is not None and new_var is not None:
        running_var.copy_(new_var)
    return out, mean, rstd


def native_batch_norm_legit_no_stats(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float, eps: float
) -> Any:
    """``_native_batch_norm_legit.no_stats`` (``track_running_stats=False``)."""
    if not training:
        return NotImplemented
    out, mean, rstd, _, _ = _training_forward(x, weight, bias, None, None, momentum, eps)
    return out, mean, rstd
