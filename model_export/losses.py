"""Losses a train step can be exported with, and what each needs from the graph and the device.

Every loss is reduced to a mean (a scalar), is written with plain tensor ops so its
hyper-parameters can be **graph inputs** (each device may set its own class weights or focal
alpha), and declares:

* the *task kind* (``classification``: ``y`` int64 ``[N]``, ``correct`` = argmax hits;
  ``binary``: ``y`` float32 like the logits, ``correct`` = examples whose every
  ``(logit > 0) == (y > 0.5)``; ``regression``: ``y`` float32 like the output, ``correct`` is 0
  and the manifest says accuracy is not defined);
* its extra graph inputs with their defaults (:class:`HyperParam`);
* how a batch loss splits over micro-batches (``normalizer``): ``count`` when it is a plain mean
  over examples, ``class_weights`` for weighted cross-entropy (normalised by ``sum(w[y])``).

Formulas (``N`` examples, ``C`` outputs, ``log p = log_softmax(z)``, ``σ`` the sigmoid):

* ``cross_entropy`` — exactly ``F.cross_entropy(z, y, weight=w, label_smoothing=ε)``:
  ``(1-ε)·Σ_i w[y_i]·(-log p_i[y_i]) / Σ_i w[y_i]  +  ε/C·Σ_i Σ_c w_c·(-log p_ic) / Σ_i w[y_i]``
  (``w`` = 1 without class weights).
* ``focal``, multi-class (softmax): ``mean_i  -α[y_i]·(1 - p_i[y_i])^γ·log p_i[y_i]`` with ``α`` a
  per-class vector (default all ones; a scalar is broadcast). ``γ = 0, α = 1`` is plain CE.
* ``focal``, binary (sigmoid, torchvision's ``sigmoid_focal_loss`` with mean reduction):
  ``p_t = σ(z)·y + (1-σ(z))·(1-y)``, ``α_t = α·y + (1-α)·(1-y)``,
  ``mean over all elements of  α_t·(1 - p_t)^γ·BCEWithLogits(z, y)``; ``α`` is a scalar (default
  0.25). For fraud-like imbalance (< 0.5 % positives) set ``α`` close to 1 and ``γ`` ≈ 2.
* ``bce``: ``F.binary_cross_entropy_with_logits(z, y, pos_weight=pw)``, ``pw`` per output.
* ``mse``, ``l1``: ``F.mse_loss``, ``F.l1_loss``; ``huber``: ``F.huber_loss(z, y, delta=δ)``.
* ``custom``: a user callable ``(logits, y) -> scalar``; it must be traceable and should be a mean
  over examples (micro-batch accumulation assumes so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_agent.errors import ExportError

TASK_CLASSIFICATION = "classification"
TASK_BINARY = "binary"
TASK_REGRESSION = "regression"
TASKS = (TASK_CLASSIFICATION, TASK_BINARY, TASK_REGRESSION)
LOSSES = ("cross_entropy", "focal", "bce", "mse", "l1", "huber", "custom")

UserLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HyperValues = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class HyperParam:
    """A float32 graph input with its default (a scalar when ``shape == ()``)."""

    name: str
    shape: tuple[int, ...]
    default: tuple[float, ...]

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.default, dtype=torch.float32).reshape(self.shape)


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Which loss to export and its defaults (the graph-input ones can be changed per device/task)."""

    kind: str = "cross_entropy"
    #: cross_entropy: per-class weights (graph input ``class_weights``)
    class_weights: tuple[float, ...] | None = None
    #: cross_entropy: ε in [0, 1) (graph input ``label_smoothing``)
    label_smoothing: float = 0.0
    #: focal: α (graph input ``focal_alpha``); scalar for binary, per class (or broadcast) for softmax
    focal_alpha: float | tuple[float, ...] | None = None
    #: focal: γ >= 0 (graph input ``focal_gamma``)
    focal_gamma: float = 2.0
    #: focal: sigmoid (binary / multi-label) instead of softmax
    binary: bool = False
    #: bce: weight of positive examples per output, or one for all (graph input ``pos_weight``)
    pos_weight: float | tuple[float, ...] | None = None
    #: huber: δ > 0 (graph input ``huber_delta``)
    huber_delta: float = 1.0
    #: custom: the loss function and the task kind it serves
    fn: UserLoss | None = None
    task: str | None = None


@dataclass(frozen=True)
class ResolvedLoss:
    """A :class:`LossSpec` checked against the model's output width."""

    spec: LossSpec
    task: str
    hyper: tuple[HyperParam, ...]
    normalizer: str
    fn: Callable[[torch.Tensor, torch.Tensor, HyperValues], torch.Tensor]

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == TASK_CLASSIFICATION:
            return (logits.argmax(dim=1) == y).sum()
        if self.task == TASK_BINARY:
            hits = (logits > 0) == (y > 0.5)
            return hits.reshape(hits.shape[0], -1).all(dim=1).sum()
        return torch.zeros((), dtype=torch.int64)

    def manifest_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {"type": self.spec.kind, "task": self.task, "normalizer": self.normalizer}
        if self.spec.kind == "focal":
            entry["binary"] = self.spec.binary
        if self.spec.kind == "custom" and self.spec.fn is not None:
            entry["function"] = f"{self.spec.fn.__module__}:{getattr(self.spec.fn, '__qualname__', '?')}"
        return entry


def resolve_loss(spec: LossSpec | str, num_outputs: int) -> ResolvedLoss:
    """Validate ``spec`` for a model with ``num_outputs`` logits; raises :class:`ExportError`."""
    if isinstance(spec, str):
        spec = LossSpec(kind=spec)
    if spec.kind not in LOSSES:
        raise ExportError(f"unsupported loss {spec.kind!r}; supported losses: {', '.join(LOSSES)}")
    _reject_foreign_options(spec)
    c = num_outputs
    if spec.kind == "cross_entropy":
        if not 0.0 <= spec.label_smoothing < 1.0:
            raise ExportError(f"cross_entropy: label_smoothing must be in [0, 1), got {spec.label_smoothing}")
        hyper = [HyperParam(name="label_smoothing", shape=(), default=(spec.label_smoothing,))]
        if spec.class_weights is not None:
            weights = _per_output("cross_entropy: class_weights", spec.class_weights, c, broadcast=False)
            if min(weights) < 0 or sum(weights) <= 0:
                raise ExportError("cross_entropy: class_weights must be >= 0 with a positive sum")
            hyper.append(HyperParam(name="class_weights", shape=(c,), default=weights))
        normalizer = "count" if spec.class_weights is None else "class_weights"
        return ResolvedLoss(spec, TASK_CLASSIFICATION, tuple(hyper), normalizer, _cross_entropy)
    if spec.kind == "focal":
        if spec.focal_gamma < 0:
            raise ExportError(f"focal: gamma must be >= 0, got {spec.focal_gamma}")
        gamma = HyperParam(name="focal_gamma", shape=(), default=(spec.focal_gamma,))
        if spec.binary:
            alpha_value = 0.25 if spec.focal_alpha is None else spec.focal_alpha
            if not isinstance(alpha_value, float | int) or not 0.0 <= alpha_value <= 1.0:
                raise ExportError(f"focal (binary): alpha must be one number in [0, 1], got {alpha_value!r}")
            alpha = HyperParam(name="focal_alpha", shape=(), default=(float(alpha_value),))
            return ResolvedLoss(spec, TASK_BINARY, (alpha, gamma), "count", _binary_focal)
        if c < 2:
            raise ExportError("focal (softmax) needs >= 2 classes; use binary=True (--binary) for one logit")
        values = _per_output("focal: alpha", 1.0 if spec.focal_alpha is None else spec.focal_alpha, c, broadcast=True)
        alpha = HyperParam(name="focal_alpha", shape=(c,), default=values)
        return ResolvedLoss(spec, TASK_CLASSIFICATION, (alpha, gamma), "count", _softmax_focal)
    if spec.kind == "bce":
        values = _per_output("bce: pos_weight", 1.0 if spec.pos_weight is None else spec.pos_weight, c, broadcast=True)
        if min(values) <= 0:
            raise ExportError("bce: pos_weight must be > 0")
        pos_weight = HyperParam(name="pos_weight", shape=(c,), default=values)
        return ResolvedLoss(spec, TASK_BINARY, (pos_weight,), "count", _bce)
    if spec.kind == "mse":
        return ResolvedLoss(spec, TASK_REGRESSION, (), "count", lambda z, y, h: F.mse_loss(z, y))
    if spec.kind == "l1":
        return ResolvedLoss(spec, TASK_REGRESSION, (), "count", lambda z, y, h: F.l1_loss(z, y))
    if spec.kind == "huber":
        if not spec.huber_delta > 0:
            raise ExportError(f"huber: delta must be > 0, got {spec.huber_delta}")
        delta = HyperParam(name="huber_delta", shape=(), default=(spec.huber_delta,))
        return ResolvedLoss(spec, TASK_REGRESSION, (delta,), "count", _huber)
    fn, task = spec.fn, spec.task or TASK_CLASSIFICATION
    if fn is None or not callable(fn):
        raise ExportError("custom loss: give the loss function (LossSpec(fn=...), or --loss module:function)")
    if task not in TASKS:
        raise ExportError(f"custom loss: task must be one of {', '.join(TASKS)}, got {task!r}")
    return ResolvedLoss(spec, task, (), "count", lambda z, y, h: fn(z, y))


def _reject_foreign_options(spec: LossSpec) -> None:
    """Options that belong to another loss are an error, not silently ignored."""
    default = LossSpec()
    owners = {
        "class_weights": ("cross_entropy",),
        "label_smoothing": ("cross_entropy",),
        "focal_alpha": ("focal",),
        "focal_gamma": ("focal",),
        "binary": ("focal",),
        "pos_weight": ("bce",),
        "huber_delta": ("huber",),
        "fn": ("custom",),
        "task": ("custom",),
    }
    for option, kinds in owners.items():
        if spec.kind not in kinds and getattr(spec, option) != getattr(default, option):
            raise ExportError(f"loss {spec.kind!r} does not take option {option!r} (it belongs to {kinds[0]!r})")


def _per_output(what: str, value: float | tuple[float, ...], count: int, *, broadcast: bool) -> tuple[float, ...]:
    values = (float(value),) if isinstance(value, float | int) else tuple(float(v) for v in value)
    if len(values) == 1 and broadcast:
        return values * count
    if len(values) != count:
        raise ExportError(f"{what} has {len(values)} values, the model has {count} outputs")
    return values


def _log_prob_of_label(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = F.log_softmax(logits, dim=1)
    return log_probs, log_probs.gather(1, y.unsqueeze(1)).squeeze(1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, hyper: HyperValues) -> torch.Tensor:
    log_probs, picked = _log_prob_of_label(logits, y)
    eps, num_classes = hyper["label_smoothing"], logits.shape[1]
    weights = hyper.get("class_weights")
    if weights is None:
        nll = -picked.mean()
        smooth = -log_probs.sum(dim=1).mean()
    else:
        total = weights[y].sum()
        nll = -(weights[y] * picked).sum() / total
        smooth = -(log_probs * weights.unsqueeze(0)).sum() / total
    return (1.0 - eps) * nll + eps / num_classes * smooth


def _softmax_focal(logits: torch.Tensor, y: torch.Tensor, hyper: HyperValues) -> torch.Tensor:
    _, picked = _log_prob_of_label(logits, y)
    modulating = torch.pow(1.0 - picked.exp(), hyper["focal_gamma"])
    return -(hyper["focal_alpha"][y] * modulating * picked).mean()


def _binary_focal(logits: torch.Tensor, y: torch.Tensor, hyper: HyperValues) -> torch.Tensor:
    alpha, gamma = hyper["focal_alpha"], hyper["focal_gamma"]
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = p * y + (1.0 - p) * (1.0 - y)
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    return (alpha_t * torch.pow(1.0 - p_t, gamma) * ce).mean()


def _bce(logits: torch.Tensor, y: torch.Tensor, hyper: HyperValues) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=hyper["pos_weight"])


def _huber(logits: torch.Tensor, y: torch.Tensor, hyper: HyperValues) -> torch.Tensor:
    delta = hyper["huber_delta"]
    diff = (logits - y).abs()
    return torch.where(diff < delta, 0.5 * diff * diff, delta * (diff - 0.5 * delta)).mean()
