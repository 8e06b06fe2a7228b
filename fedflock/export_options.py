"""``fedflock export`` flags for the loss, the optimizer, federated terms and micro-batching.

Parsed here into :class:`~model_export.losses.LossSpec`, :class:`~model_export.optimizers.OptimizerSpec`
and :class:`~model_export.federated.FederatedSpec` (imported lazily: only ``export`` needs torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

LOSS_NAMES = ("cross_entropy", "focal", "bce", "mse", "l1", "huber")


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,5, got {text!r}") from exc
    return values


def add_export_options(exp: argparse.ArgumentParser) -> None:
    loss = exp.add_argument_group("loss")
    loss.add_argument("--loss", default="cross_entropy", help=f"{', '.join(LOSS_NAMES)} or module:function")
    loss.add_argument("--task", choices=("classification", "binary", "regression"), help="for a custom loss")
    loss.add_argument("--class-weights", type=floats, help="cross_entropy: per-class weights, e.g. 1,5")
    loss.add_argument("--label-smoothing", type=float, help="cross_entropy: epsilon in [0, 1)")
    loss.add_argument("--focal-alpha", type=floats, help="focal: alpha (one number, or one per class)")
    loss.add_argument("--focal-gamma", type=float, help="focal: gamma >= 0")
    loss.add_argument("--binary", action="store_true", help="focal: sigmoid (binary / multi-label) focal loss")
    loss.add_argument("--pos-weight", type=floats, help="bce: positive-class weight (one, or one per output)")
    loss.add_argument("--huber-delta", type=float, help="huber: delta > 0")

    opt = exp.add_argument_group("optimizer")
    opt.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    opt.add_argument("--lr", type=float, default=None, help="default learning rate (a graph input)")
    opt.add_argument("--momentum", type=float, default=None, help="sgd (default 0.9)")
    opt.add_argument("--nesterov", action="store_true", help="sgd")
    opt.add_argument("--weight-decay", type=float, default=None)
    opt.add_argument("--betas", type=floats, default=None, help="adam/adamw, e.g. 0.9,0.999")
    opt.add_argument("--eps", type=float, default=None, help="adam/adamw")

    fed = exp.add_argument_group("federated terms and memory")
    fed.add_argument("--fedprox-mu", type=float, default=None, help="add the FedProx term with this default mu")
    fed.add_argument("--trainable-masks", action="store_true", help="one 0/1 mask input per trainable tensor")
    fed.add_argument(
        "--personal", action="append", default=[], metavar="PATTERN", help="personal tensors (name or glob)"
    )
    fed.add_argument("--micro-batch", type=int, default=None, help="add accumulation graphs; default micro-batch")
    exp.add_argument(
        "--sign-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="sign the bundle's manifest with this ed25519 key (fedflock pki signing-key; docs/security.md)",
    )


def export_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`model_export.exporter.export_bundle` from the parsed flags."""
    from model_export.exporter import load_factory
    from model_export.federated import FederatedSpec
    from model_export.losses import LossSpec
    from model_export.optimizers import OptimizerSpec

    loss_options: dict[str, Any] = {
        "class_weights": args.class_weights,
        "label_smoothing": args.label_smoothing,
        "focal_alpha": _one_or_many(args.focal_alpha),
        "focal_gamma": args.focal_gamma,
        "binary": args.binary or None,
        "pos_weight": _one_or_many(args.pos_weight),
        "huber_delta": args.huber_delta,
        "task": args.task,
    }
    loss_options = {key: value for key, value in loss_options.items() if value is not None}
    if ":" in args.loss:
        fn: Any = load_factory(args.loss)  # any callable (logits, y) -> scalar
        loss = LossSpec(kind="custom", fn=fn, **loss_options)
    elif args.loss in LOSS_NAMES:
        loss = LossSpec(kind=args.loss, **loss_options)
    else:
        raise ConfigError(f"--loss must be one of {', '.join(LOSS_NAMES)} or module:function, got {args.loss!r}")

    opt_options: dict[str, Any] = {
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "eps": args.eps,
        "nesterov": args.nesterov or None,
    }
    if args.betas is not None:
        if len(args.betas) != 2:
            raise ConfigError(f"--betas takes two numbers, got {args.betas}")
        opt_options["betas"] = tuple(args.betas)
    if args.optimizer == "sgd":
        opt_options = {"lr": 0.05, "momentum": 0.9} | {k: v for k, v in opt_options.items() if v is not None}
    optimizer = OptimizerSpec(kind=args.optimizer, **{k: v for k, v in opt_options.items() if v is not None})
    federated = FederatedSpec(
        fedprox_mu=args.fedprox_mu, trainable_masks=args.trainable_masks, personal=tuple(args.personal)
    )
    kwargs: dict[str, Any] = {"loss": loss, "optimizer": optimizer, "federated": federated}
    if args.sign_key is not None:
        from edge_agent.crypto.signing import SigningKey, bundle_signer

        kwargs["signer"] = bundle_signer(SigningKey.load(args.sign_key))
    return kwargs | {"micro_batch": args.micro_batch}


def _one_or_many(values: tuple[float, ...] | None) -> float | tuple[float, ...] | None:
    if values is None:
        return None
    return values[0] if len(values) == 1 else values
