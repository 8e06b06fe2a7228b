"""Gradient accumulation over micro-batches, as two graphs, for devices with little memory.

A device that can only hold the activations of ``m`` examples still trains with an effective
batch of ``B = k·m``::

    accumulate(x, y, seed, scale, *loss_hyper, *params, *buffers, *grad.<p>)
        -> (loss, correct, *new.<buffers>, *new.grad.<p>)          # once per micro-batch
    apply(lr, step, [adam_eps], [fedprox_mu], *trainable params, *grad.<p>, *optimizer_state, *global.<p>, *mask.<p>)
        -> (*new.<trainable params>, *new.<optimizer_state>)       # once per effective batch

``accumulate`` runs forward and backward on one micro-batch and adds ``scale · gradient`` to the
accumulators (zeros at the start of every effective batch). With ``scale = m_j / B`` (or, for
class-weighted cross-entropy, ``Σ_{micro} w[y] / Σ_{batch} w[y]``) the accumulated gradient is
the gradient of the batch loss, so the update equals the one-batch train step up to float
rounding. Only one micro-batch's activations exist at a time: peak memory scales with ``m``.
``apply`` is the optimizer (with FedProx and masks) and touches no activations.

Caveat: BatchNorm normalises each micro-batch with its own statistics and updates its running
statistics once per micro-batch, so a BatchNorm model does *not* match the large-batch step
exactly (the usual accumulation caveat; GroupNorm/LayerNorm models are unaffected). Seeded
layers (dropout) draw per micro-batch, from the micro-batch's own ``seed``.
"""

from __future__ import annotations

from torch import nn

from model_export.gradients import forward_backward
from model_export.losses import ResolvedLoss
from model_export.optimizers import Optimizer
from model_export.rng import seed_scope
from model_export.train_step import (
    OUTPUT_PREFIX,
    GraphFn,
    Named,
    TensorLayout,
    named_graph,
    optimizer_hyper_names,
    optimizer_update,
)

GRAD_PREFIX = "grad."


def accumulator_names(layout: TensorLayout) -> tuple[str, ...]:
    return tuple(GRAD_PREFIX + p for p in layout.trainable)


def make_accumulate_step(model: nn.Module, layout: TensorLayout, loss: ResolvedLoss) -> GraphFn:
    trainable = set(layout.trainable)
    hyper = tuple(h.name for h in loss.hyper)
    accumulators = accumulator_names(layout)
    inputs = ("x", "y", "seed", "scale", *hyper, *layout.model_tensors, *accumulators)
    outputs = ("loss", "correct", *(OUTPUT_PREFIX + n for n in (*layout.buffers, *accumulators)))

    def body(v: Named) -> Named:
        params = {name: v[name] for name in layout.parameters}
        buffers = {name: v[name] for name in layout.buffers}
        values = {name: v[name] for name in hyper}
        with seed_scope(v["seed"]):
            result = forward_backward(
                model, params, buffers, trainable, v["x"], v["y"], lambda z, y: loss.fn(z, y, values)
            )
        out: Named = {"loss": result.loss, "correct": loss.correct(result.logits, v["y"])}
        out.update({OUTPUT_PREFIX + n: result.buffers[n] for n in layout.buffers})
        for name, acc in zip(layout.trainable, accumulators, strict=True):
            grad = result.grads.get(name)
            out[OUTPUT_PREFIX + acc] = v[acc] if grad is None else v[acc] + v["scale"] * grad
        return out

    return named_graph(body, inputs, outputs)


def make_apply_step(layout: TensorLayout, optimizer: Optimizer) -> GraphFn:
    accumulators = accumulator_names(layout)
    inputs = (
        "lr",
        "step",
        *optimizer_hyper_names(optimizer, layout),
        *layout.trainable,
        *accumulators,
        *layout.optimizer_state,
        *layout.global_inputs,
        *layout.mask_inputs,
    )
    outputs = tuple(OUTPUT_PREFIX + n for n in (*layout.trainable, *layout.optimizer_state))

    def body(v: Named) -> Named:
        params = {name: v[name] for name in layout.trainable}
        grads = {name: v[acc] for name, acc in zip(layout.trainable, accumulators, strict=True)}
        return optimizer_update(optimizer, layout, params, grads, v)

    return named_graph(body, inputs, outputs)
