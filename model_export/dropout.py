"""Dropout whose mask is a pure function of the train step's ``seed`` input.

ONNX's random ops cannot be seeded from a graph input (FIELD_NOTES: ``nn.Dropout`` exports as
``RandomUniformLike``, a new mask every run), so a device could not reproduce a step and eager
PyTorch could not be compared with onnxruntime. :func:`replace_dropout` swaps every
``nn.Dropout`` of the *prepared copy* of a model for :class:`SeededDropout`, whose keep-mask is a
counter-based hash of ``(step seed, element index, per-module salt)``.

The hash only uses int64 ``Mul``, ``Add``, ``Mod`` and ``BitwiseXor`` (all in ONNX
opset 18 with int64 CPU kernels) on values kept below ``2**31``, so no product overflows int64 and
onnxruntime reproduces it bit for bit: eager PyTorch inside the same :func:`seed_scope` draws the
same mask. Without a seed in scope (eval, inference graphs) the layer is the identity.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from model_export.rng import current_seed

#: The Mersenne prime 2**31 - 1: hash states stay in [0, PRIME), products in int64.
PRIME = (1 << 31) - 1
# Multipliers: primitive roots / well-mixing constants below 2**31.
_MULTIPLIERS = (48271, 1103515245 % PRIME, 69621, 1664525)


def _mix(h: torch.Tensor, multiplier: int, bits: int) -> torch.Tensor:
    """One round: ``h * a mod P``, then xor the low ``bits`` bits into the top bits.

    ``(h mod 2**bits) * 2**(31 - bits)`` is a left shift that stays below ``2**31``. No division:
    the exporter lowers integer ``div`` through float32, which is not exact above ``2**24``.
    """
    h = torch.remainder(h * multiplier, PRIME)
    return torch.bitwise_xor(h, torch.remainder(h, 1 << bits) * (1 << (31 - bits)))


def keep_mask(seed: torch.Tensor, like: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Boolean keep-mask shaped like ``like``; each element kept with probability ``1 - p`` (to ~2**-31).

    ``seed`` is an int64 scalar tensor (any value); ``salt`` separates layers that see the same shape.
    """
    base = torch.remainder(seed.to(torch.int64), PRIME)
    base = torch.remainder(base * _MULTIPLIERS[0] + salt % PRIME, PRIME)
    # like.numel() stays symbolic under make_fx (torch.Size.numel() would fix the batch size)
    h = torch.arange(like.numel(), dtype=torch.int64).reshape(like.shape)
    h = torch.remainder(h + base, PRIME)
    h = _mix(h, _MULTIPLIERS[1], 16)
    h = torch.remainder(h + base, PRIME)
    h = _mix(h, _MULTIPLIERS[2], 13)
    h = _mix(h, _MULTIPLIERS[3], 15)
    return h >= int(p * PRIME)


def salt_for(name: str) -> int:
    """A stable per-module salt from the module's path in the model."""
    return zlib.crc32(name.encode()) % PRIME


class SeededDropout(nn.Module):
    """``nn.Dropout`` with a mask derived from :func:`model_export.rng.current_seed`."""

    def __init__(self, p: float, salt: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.salt = salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = current_seed()
        if not self.training or self.p == 0.0 or seed is None:
            return x
        mask = keep_mask(seed, x, self.salt, self.p).to(x.dtype)
        return x * (mask * (1.0 / (1.0 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def replace_dropout(model: nn.Module) -> list[str]:
    """Replace every ``nn.Dropout`` in ``model`` (in place) by :class:`SeededDropout`; returns their paths.

    ``p == 1`` (drop everything) is rejected by :mod:`model_export.verify` before this runs.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                path = f"{name}.{child_name}" if name else child_name
                seeded = SeededDropout(child.p, salt_for(path))
                seeded.train(child.training)
                setattr(module, child_name, seeded)
                replaced.append(path)
    return replaced
