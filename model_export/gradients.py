"""Forward + backward of one (micro-)batch inside a traced train step.

:func:`forward_backward` is the fp32 path. ``model_export.precision`` provides the fp16
mixed-precision path with the same signature, so the step builder picks one by precision and
never cares which. Both return *unscaled* fp32 gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ForwardBackward:
    #: fp32 scalar, not scaled
    loss: torch.Tensor
    logits: torch.Tensor
    #: parameter name -> fp32 gradient (``None`` when the parameter did not take part)
    grads: dict[str, torch.Tensor | None]
    #: new values of the buffers (BatchNorm running statistics), fp32
    buffers: dict[str, torch.Tensor]
    #: bool scalar: every gradient is finite (``None`` on the fp32 path, which does not check)
    finite: torch.Tensor | None = None


def forward_backward(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    trainable: set[str],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    loss_scale: torch.Tensor | None = None,
) -> ForwardBackward:
    """fp32 forward and backward; ``loss_scale`` is accepted for signature parity and ignored."""
    # BatchNorm updates running stats in place: give it copies, never the graph inputs.
    new_buffers = {name: t.clone() for name, t in buffers.items()}
    leaves = {name: p.detach().requires_grad_(name in trainable) for name, p in params.items()}
    logits = functional_call(model, {**leaves, **new_buffers}, (x,))
    loss = loss_fn(logits, y)
    wrt = [name for name in params if name in trainable]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True) if wrt else ()
    grad_of: dict[str, torch.Tensor | None] = dict(zip(wrt, grads, strict=True))
    return ForwardBackward(loss=loss.detach(), logits=logits.detach(), grads=grad_of, buffers=new_buffers)
