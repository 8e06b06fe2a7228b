"""Backward of CPU scaled-dot-product attention (``nn.MultiheadAttention``, transformer layers).

``F.scaled_dot_product_attention`` dispatches to ``_scaled_dot_product_flash_attention_for_cpu``
on CPU. torch decomposes its forward into math, but autograd records the fused backward op, which
neither torch nor the ONNX exporter can lower. :func:`flash_attention_backward` recomputes the
attention probabilities and applies the softmax-attention gradient with plain MatMuls.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edge_agent.errors import ExportError


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, is_causal: bool, attn_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    scores = (query @ key.transpose(-2, -1)) * scale  # [B, H, L, S]
    if is_causal:
        length, source = int(query.shape[-2]), int(key.shape[-2])
        keep = torch.ones(length, source, dtype=torch.bool).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1)


def flash_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients of ``softmax(q k^T * scale + mask) v`` with respect to q, k and v."""
    del logsumexp  # recomputed: the forward decomposition's value is not guaranteed to be it
    if dropout_p != 0.0:
        raise ExportError(
            f"attention dropout (dropout_p={dropout_p}) inside scaled_dot_product_attention cannot be "
            "seeded from the graph; set the attention module's dropout to 0.0"
        )
    if int(key.shape[1]) != int(query.shape[1]):
        raise ExportError("grouped-query attention (fewer key/value heads than query heads) is not supported")
    factor = scale if scale is not None else 1.0 / math.sqrt(int(query.shape[-1]))
    probs = _probabilities(query, key, is_causal, attn_mask, factor)
    grad_value = probs.transpose(-2, -1) @ grad_out
    grad_probs = grad_out @ value.transpose(-2, -1)
    # softmax backward: p * (dp - sum(dp * p)); sum(dp * p) == sum(grad_out * out), a smaller tensor
    grad_scores = probs * (grad_probs - (grad_out * out).sum(dim=-1, keepdim=True))
    grad_query = (grad_scores @ key) * factor
    grad_key = (grad_scores.transpose(-2, -1) @ query) * factor
    return grad_query, grad_key, grad_value
