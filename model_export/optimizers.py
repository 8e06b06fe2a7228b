"""Optimizers written into the graph: ``torch.optim`` semantics, state as inputs and outputs.

Each optimizer is a small strategy: the state tensors it keeps per trainable parameter (named
``<param>.<suffix>``, zeros initially) and one ``update`` that maps ``(param, grad, state, lr,
step)`` to the new parameter and state. ``lr`` and ``step`` are graph inputs: ``step`` is the
float32 1-based number of the step being taken (torch increments its counter *before* using it),
so the device can run its own schedules (warm-up, cosine) and Adam's bias correction is exact.

The formulas are those of the single-tensor ``torch.optim`` implementations (maximize=False,
dampening=0, amsgrad=False); tests compare against ``torch.optim`` over several steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from edge_agent.errors import ExportError
from model_export.losses import HyperParam

#: Adam's eps is a graph input: exported as a constant, onnxscript's optimizer folds ``x + 1e-8``
#: into ``x`` (it treats the constant as zero), and an exactly-zero gradient then gives 0/0 = NaN.
EPS_NAME = "adam_eps"

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """Optimizer and hyper-parameters. ``lr`` is only the default: it is a graph input."""

    kind: str = "sgd"
    lr: float = 0.05
    #: sgd only
    momentum: float = 0.0
    nesterov: bool = False
    #: sgd and adam: L2 added to the gradient; adamw: decoupled decay ``p *= 1 - lr * wd``
    weight_decay: float = 0.0
    #: adam / adamw only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def validate(self) -> None:
        kind = self.kind
        if kind not in OPTIMIZERS:
            raise ExportError(f"unsupported optimizer {kind!r}; supported optimizers: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0.0:
            raise ExportError(f"{kind}: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0.0:
            raise ExportError(f"{kind}: weight_decay must be >= 0, got {self.weight_decay}")
        default = OptimizerSpec()
        if kind == "sgd":
            if self.momentum < 0.0:
                raise ExportError(f"sgd: momentum must be >= 0, got {self.momentum}")
            if self.nesterov and self.momentum == 0.0:
                raise ExportError("sgd: nesterov momentum requires momentum > 0")
            if self.betas != default.betas or self.eps != default.eps:
                raise ExportError("sgd does not take betas or eps (they are adam/adamw options)")
            return
        if self.momentum != 0.0 or self.nesterov:
            raise ExportError(f"{kind} does not take momentum or nesterov (they are sgd options)")
        beta1, beta2 = self.betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ExportError(f"{kind}: betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0.0:
            raise ExportError(f"{kind}: eps must be > 0, got {self.eps}")

    def manifest_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {"type": self.kind, "lr": self.lr, "weight_decay": self.weight_decay}
        if self.kind == "sgd":
            entry |= {"momentum": self.momentum, "nesterov": self.nesterov}
        else:
            entry |= {"betas": list(self.betas), "eps": self.eps}
        return entry


State = tuple[torch.Tensor, ...]


class Optimizer(Protocol):
    @property
    def state_suffixes(self) -> tuple[str, ...]:
        """Suffixes of the state tensors kept per trainable parameter (may be empty)."""

    @property
    def hyper(self) -> tuple[HyperParam, ...]:
        """Graph-input hyper-parameters besides ``lr`` and ``step``."""

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: State, v: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, State]:
        """One step; ``v`` holds ``lr``, ``step`` and the :attr:`hyper` inputs."""


@dataclass(frozen=True)
class SGD:
    spec: OptimizerSpec

    @property
    def state_suffixes(self) -> tuple[str, ...]:
        return ("momentum",) if self.spec.momentum != 0.0 else ()

    @property
    def hyper(self) -> tuple[HyperParam, ...]:
        return ()

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: State, v: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, State]:
        s, lr = self.spec, v["lr"]
        d_p = grad + s.weight_decay * param if s.weight_decay != 0.0 else grad
        if not state:
            return param - lr * d_p, ()
        # torch stores d_p itself on the first step; with a zero buffer momentum * 0 + d_p is the same.
        buf = s.momentum * state[0] + d_p
        d_p = d_p + s.momentum * buf if s.nesterov else buf
        return param - lr * d_p, (buf,)


@dataclass(frozen=True)
class Adam:
    spec: OptimizerSpec
    decoupled: bool

    @property
    def state_suffixes(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @property
    def hyper(self) -> tuple[HyperParam, ...]:
        return (HyperParam(name=EPS_NAME, shape=(), default=(self.spec.eps,)),)

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: State, v: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, State]:
        s, lr, step = self.spec, v["lr"], v["step"]
        beta1, beta2 = s.betas
        exp_avg, exp_avg_sq = state
        if s.weight_decay != 0.0:
            if self.decoupled:
                param = param * (1.0 - lr * s.weight_decay)
            else:
                grad = grad + s.weight_decay * param
        exp_avg = exp_avg + (grad - exp_avg) * (1.0 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        step_size = lr / bias_correction1
        denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + v[EPS_NAME]
        return param - step_size * (exp_avg / denom), (exp_avg, exp_avg_sq)


def make_optimizer(spec: OptimizerSpec) -> Optimizer:
    spec.validate()
    if spec.kind == "sgd":
        return SGD(spec)
    return Adam(spec, decoupled=spec.kind == "adamw")
