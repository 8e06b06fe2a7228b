"""The functional train step and inference function that get traced and exported.

A train step is one pure function of named tensors (ONNX input names) returning named tensors::

    train_step(x, y, seed, lr, step, *hyper, *params, *buffers, *optimizer_state, *global.<p>, *mask.<p>)
        -> (loss, correct, *new.<params>, *new.<buffers>, *new.<optimizer_state>)

Parameters, buffers and optimizer state are explicit inputs and their new values explicit outputs,
so the exported graph keeps no state and a device only needs plain onnxruntime to train. The
loss (:mod:`model_export.losses`), the optimizer (:mod:`model_export.optimizers`) and the
federated terms (:mod:`model_export.federated`) are pluggable; ``hyper`` holds their graph-input
hyper-parameters. Forward + backward goes through :func:`model_export.gradients.forward_backward`
(the precision seam) inside :func:`model_export.rng.seed_scope` (the seeded-layers seam).
Micro-batch accumulation graphs are built in :mod:`model_export.accumulation`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from edge_agent.errors import ExportError
from model_export.federated import GLOBAL_PREFIX, MASK_PREFIX, MU_NAME, FederatedSpec, personal_names
from model_export.gradients import forward_backward
from model_export.losses import ResolvedLoss
from model_export.optimizers import Optimizer
from model_export.precision import FINITE, LOSS_SCALE, forward_backward_fp16
from model_export.rng import seed_scope

OUTPUT_PREFIX = "new."
MOMENTUM_SUFFIX = ".momentum"

StepFn = Callable[..., tuple[torch.Tensor, ...]]
Named = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GraphFn:
    """A traceable function with positional inputs/outputs named by their ONNX names."""

    fn: StepFn
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def named_graph(body: Callable[[Named], Named], inputs: Sequence[str], outputs: Sequence[str]) -> GraphFn:
    in_names, out_names = tuple(inputs), tuple(outputs)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = body(dict(zip(in_names, args, strict=True)))
        return tuple(result[name] for name in out_names)

    return GraphFn(fn, in_names, out_names)


@dataclass(frozen=True, kw_only=True)
class TensorLayout:
    """Names and order of every tensor the graphs take and return."""

    parameters: tuple[str, ...]
    #: parameters with ``requires_grad``; only these are updated and get optimizer state
    trainable: tuple[str, ...]
    buffers: tuple[str, ...]
    #: optimizer state suffixes per trainable parameter (``momentum``, ``exp_avg``, ...)
    state_suffixes: tuple[str, ...] = ()
    #: parameters and buffers that never leave the device
    personal: tuple[str, ...] = ()
    #: trainable shared parameters with a FedProx term (empty: FedProx not in the graph)
    prox: tuple[str, ...] = ()
    #: trainable parameters with a mask input (empty: no masks)
    masked: tuple[str, ...] = ()

    @property
    def model_tensors(self) -> tuple[str, ...]:
        return self.parameters + self.buffers

    @property
    def state_of(self) -> tuple[tuple[str, str], ...]:
        """``(state name, parameter)`` for every optimizer state tensor, parameter-major."""
        return tuple((f"{p}.{suffix}", p) for p in self.trainable for suffix in self.state_suffixes)

    @property
    def optimizer_state(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.state_of)

    @property
    def all_tensors(self) -> tuple[str, ...]:
        return self.model_tensors + self.optimizer_state

    @property
    def global_inputs(self) -> tuple[str, ...]:
        return tuple(GLOBAL_PREFIX + p for p in self.prox)

    @property
    def mask_inputs(self) -> tuple[str, ...]:
        return tuple(MASK_PREFIX + p for p in self.masked)


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


def tensor_layout(model: nn.Module, optimizer: Optimizer, federated: FederatedSpec) -> TensorLayout:
    parameters = tuple(name for name, _ in model.named_parameters())
    trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
    buffers = tuple(name for name, _ in model.named_buffers())
    personal = personal_names(federated.personal, parameters + buffers) if federated.personal else ()
    prox = tuple(p for p in trainable if p not in personal) if federated.fedprox_mu is not None else ()
    if federated.fedprox_mu is not None and not prox:
        raise ExportError("fedprox: the model has no shared trainable parameter to pull towards the global model")
    if federated.trainable_masks and not trainable:
        raise ExportError("trainable masks: the model has no trainable parameter")
    return TensorLayout(
        parameters=parameters,
        trainable=trainable,
        buffers=buffers,
        state_suffixes=optimizer.state_suffixes,
        personal=personal,
        prox=prox,
        masked=trainable if federated.trainable_masks else (),
    )


def initial_tensors(model: nn.Module, layout: TensorLayout) -> dict[str, torch.Tensor]:
    """Initial values of every tensor in ``layout.all_tensors`` (optimizer state is zeros)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    values = {name: state[name].detach().clone() for name in layout.model_tensors}
    for name, param in layout.state_of:
        values[name] = torch.zeros_like(values[param])
    return values


def hyper_names(loss: ResolvedLoss, optimizer: Optimizer, layout: TensorLayout) -> tuple[str, ...]:
    """Graph-input hyper-parameters of the train step, in input order."""
    return optimizer_hyper_names(optimizer, layout) + tuple(h.name for h in loss.hyper)


def optimizer_hyper_names(optimizer: Optimizer, layout: TensorLayout) -> tuple[str, ...]:
    return tuple(h.name for h in optimizer.hyper) + ((MU_NAME,) if layout.prox else ())


def optimizer_update(
    optimizer: Optimizer,
    layout: TensorLayout,
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    v: Named,
) -> Named:
    """New trainable parameters and optimizer state (``new.`` names) from gradients.

    ``v`` holds the step's named inputs: ``lr``, ``step``, optimizer state, and when present
    ``fedprox_mu``, ``global.<p>`` and ``mask.<p>``. A parameter without a gradient (unused in
    the forward pass) is left alone with its state, like ``torch.optim`` does.
    """
    out: Named = {}
    prox, masked = set(layout.prox), set(layout.masked)
    with torch.no_grad():
        for name in layout.trainable:
            param, grad = params[name], grads.get(name)
            state_names = [f"{name}.{suffix}" for suffix in layout.state_suffixes]
            state = tuple(v[n] for n in state_names)
            if grad is None:
                new_param, new_state = param, state
            else:
                if name in prox:
                    grad = grad + v[MU_NAME] * (param - v[GLOBAL_PREFIX + name])
                new_param, new_state = optimizer.update(param, grad, state, v)
                if name in masked:
                    train = v[MASK_PREFIX + name] != 0
                    new_param = torch.where(train, new_param, param)
                    new_state = tuple(torch.where(train, n, o) for n, o in zip(new_state, state, strict=True))
            out[OUTPUT_PREFIX + name] = new_param
            out.update({OUTPUT_PREFIX + n: t for n, t in zip(state_names, new_state, strict=True)})
    return out


def make_train_step(
    model: nn.Module, layout: TensorLayout, loss: ResolvedLoss, optimizer: Optimizer, *, precision: str = "fp32"
) -> GraphFn:
    """Build the pure train step for a model returned by ``prepare_model(training=True)``.

    ``precision="fp16"`` computes forward and backward in fp16 (:mod:`model_export.precision`):
    the step also takes ``loss_scale`` and returns ``finite``; the update itself stays fp32.
    """
    fp16 = precision == "fp16"
    scaled_in, scaled_out = ((LOSS_SCALE,), (FINITE,)) if fp16 else ((), ())
    trainable = set(layout.trainable)
    hyper = tuple(h.name for h in loss.hyper)
    inputs = (
        "x",
        "y",
        "seed",
        "lr",
        "step",
        *scaled_in,
        *hyper_names(loss, optimizer, layout),
        *layout.all_tensors,
        *layout.global_inputs,
        *layout.mask_inputs,
    )
    outputs = ("loss", "correct", *scaled_out, *(OUTPUT_PREFIX + n for n in layout.all_tensors))

    def body(v: Named) -> Named:
        params = {name: v[name] for name in layout.parameters}
        buffers = {name: v[name] for name in layout.buffers}
        values = {name: v[name] for name in hyper}

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss.fn(logits, y, values)

        with seed_scope(v["seed"]):
            if fp16:
                result = forward_backward_fp16(
                    model, params, buffers, trainable, v["x"], v["y"], loss_fn, loss_scale=v[LOSS_SCALE]
                )
            else:
                result = forward_backward(model, params, buffers, trainable, v["x"], v["y"], loss_fn)
        out: Named = {"loss": result.loss, "correct": loss.correct(result.logits, v["y"])}
        if result.finite is not None:
            out[FINITE] = result.finite
        out.update({OUTPUT_PREFIX + n: params[n] for n in layout.parameters})  # frozen ones pass through
        out.update({OUTPUT_PREFIX + n: result.buffers[n] for n in layout.buffers})
        out.update(optimizer_update(optimizer, layout, params, result.grads, v))
        return out

    return named_graph(body, inputs, outputs)


def make_inference(model: nn.Module, layout: TensorLayout) -> StepFn:
    """Build ``infer(x, *params, *buffers) -> (logits,)`` for a model in eval mode."""
    names = layout.model_tensors

    def infer(x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = functional_call(model, dict(zip(names, state, strict=True)), (x,))
        return (logits,)

    return infer
