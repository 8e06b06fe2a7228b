"""The functional train step and inference function that get traced and exported.

A train step is one pure function::

    step(x, y, lr, *params, *buffers, *momentum) -> (loss, correct, *params', *buffers', *momentum')

Parameters, buffers and optimizer state are explicit inputs and their new values explicit outputs,
so the exported graph keeps no state and a device only needs plain onnxruntime to train.
The update reproduces ``torch.optim.SGD`` (dampening 0, maximize False) exactly; the momentum
buffer starts at zeros, and ``momentum * 0 + d_p == d_p`` is what torch's first step stores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from edge_agent.errors import ExportError
from model_export.gradients import forward_backward

SUPPORTED_LOSSES = ("cross_entropy",)
SUPPORTED_OPTIMIZERS = ("sgd",)
MOMENTUM_SUFFIX = ".momentum"

StepFn = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True, kw_only=True)
class SGDConfig:
    """``torch.optim.SGD`` hyper-parameters. ``lr`` is only the default: it is a graph input."""

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def validate(self) -> None:
        if not self.lr > 0.0:
            raise ExportError(f"sgd: lr must be > 0, got {self.lr}")
        if self.momentum < 0.0:
            raise ExportError(f"sgd: momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0.0:
            raise ExportError(f"sgd: weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0.0:
            raise ExportError("sgd: nesterov momentum requires momentum > 0")


@dataclass(frozen=True, kw_only=True)
class TensorLayout:
    """Order of the state tensors in the step's inputs and outputs."""

    parameters: tuple[str, ...]
    #: parameters with ``requires_grad``; only these are updated and get momentum state
    trainable: tuple[str, ...]
    buffers: tuple[str, ...]
    #: parameters that carry a momentum buffer (empty when momentum == 0)
    momentum_of: tuple[str, ...]

    @property
    def model_tensors(self) -> tuple[str, ...]:
        return self.parameters + self.buffers

    @property
    def momentum_names(self) -> tuple[str, ...]:
        return tuple(name + MOMENTUM_SUFFIX for name in self.momentum_of)

    @property
    def all_tensors(self) -> tuple[str, ...]:
        return self.model_tensors + self.momentum_names


def check_loss(loss: str) -> None:
    if loss not in SUPPORTED_LOSSES:
        raise ExportError(f"unsupported loss {loss!r}; supported losses: {', '.join(SUPPORTED_LOSSES)}")


def check_optimizer(optimizer: str) -> None:
    if optimizer not in SUPPORTED_OPTIMIZERS:
        raise ExportError(
            f"unsupported optimizer {optimizer!r}; supported optimizers: {', '.join(SUPPORTED_OPTIMIZERS)}"
        )


def prepare_model(model: nn.Module, *, training: bool) -> nn.Module:
    """Return a deep copy of ``model`` that can be traced functionally.

    BatchNorm layers with a fixed ``momentum`` never read ``num_batches_tracked``; its in-place
    ``add_`` would put an int64 counter (and a mutation) into the graph, so the buffer is removed
    from the copy (set to ``None``, which BatchNorm checks for). With ``momentum=None`` BatchNorm
    uses ``1 / num_batches_tracked`` as a Python float, which cannot be traced: rejected.
    """
    prepared = copy.deepcopy(model)
    for module_name, module in prepared.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if module.momentum is None:
                raise ExportError(
                    f"BatchNorm {module_name or type(module).__name__!r} has momentum=None "
                    "(cumulative average); set a numeric momentum to export it"
                )
            module.num_batches_tracked = None
    for name, tensor in [*prepared.named_parameters(), *prepared.named_buffers()]:
        if tensor.dtype != torch.float32:
            raise ExportError(f"tensor {name!r} has dtype {tensor.dtype}; only float32 models are supported")
    return prepared.train(training)


def tensor_layout(model: nn.Module, sgd: SGDConfig) -> TensorLayout:
    parameters = tuple(name for name, _ in model.named_parameters())
    trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
    buffers = tuple(name for name, _ in model.named_buffers())
    momentum_of = trainable if sgd.momentum != 0.0 else ()
    return TensorLayout(parameters=parameters, trainable=trainable, buffers=buffers, momentum_of=momentum_of)


def initial_tensors(model: nn.Module, layout: TensorLayout) -> dict[str, torch.Tensor]:
    """Initial values of every tensor in ``layout.all_tensors`` (momentum buffers are zeros)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    values = {name: state[name].detach().clone() for name in layout.model_tensors}
    for param, name in zip(layout.momentum_of, layout.momentum_names, strict=True):
        values[name] = torch.zeros_like(values[param])
    return values


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    check_loss(loss)
    return F.cross_entropy  # mean over the batch


def make_train_step(model: nn.Module, layout: TensorLayout, *, loss: str, sgd: SGDConfig) -> StepFn:
    """Build the pure train-step function for a model returned by ``prepare_model(training=True)``."""
    loss_fn = _loss_fn(loss)
    sgd.validate()
    n_params, n_buffers = len(layout.parameters), len(layout.buffers)
    trainable = set(layout.trainable)
    momentum_index = {name: i for i, name in enumerate(layout.momentum_of)}

    def step(x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip(layout.parameters, state[:n_params], strict=True))
        buffers = dict(zip(layout.buffers, state[n_params : n_params + n_buffers], strict=True))
        momentum = list(state[n_params + n_buffers :])
        result = forward_backward(model, params, buffers, trainable, x, y, loss_fn)
        loss_value, logits, grad_of, buffers = result.loss, result.logits, result.grads, result.buffers
        correct = (logits.argmax(dim=1) == y).sum()
        with torch.no_grad():
            new_params = []
            new_momentum = list(momentum)
            for name in layout.parameters:
                param, grad = params[name], grad_of.get(name)
                if grad is None:  # frozen or unused: torch.optim.SGD skips it too
                    new_params.append(param)
                    continue
                d_p = grad
                if sgd.weight_decay != 0.0:
                    d_p = d_p + sgd.weight_decay * param
                if name in momentum_index:
                    i = momentum_index[name]
                    buf = sgd.momentum * momentum[i] + d_p
                    new_momentum[i] = buf
                    d_p = d_p + sgd.momentum * buf if sgd.nesterov else buf
                new_params.append(param - lr * d_p)
        return (
            loss_value.detach(),
            correct,
            *new_params,
            *(buffers[name] for name in layout.buffers),
            *new_momentum,
        )

    return step


def make_inference(model: nn.Module, layout: TensorLayout) -> StepFn:
    """Build ``infer(x, *params, *buffers) -> (logits,)`` for a model in eval mode."""
    names = layout.model_tensors

    def infer(x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = functional_call(model, dict(zip(names, state, strict=True)), (x,))
        return (logits,)

    return infer
