"""Error feedback: remember what the codec dropped and send it with the next update.

EF-SGD / EF21-style memory: ``corrected = delta + residual``, send ``encode(corrected)`` and
keep ``residual = corrected - decode(payload)``. Nothing the codec drops is lost, only delayed,
which is what makes aggressive codecs (top-k, sign, int2) converge.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_agent.codecs.decode import decode_update
from edge_agent.codecs.spec import CodecSpec
from edge_agent.codecs.wire import encode_update, float32_array
from edge_agent.errors import MalformedMessage, ProtocolError
from edge_agent.protocol.tensors import read_tensor_file, write_tensor_file


class ErrorFeedback:
    """The residual the codec dropped, added to the next update.

    Invariant after :meth:`compress`, per tensor of ``delta`` (within float32 rounding)::

        residual_after + decode(payload) == delta + residual_before

    Residuals for names not in ``delta`` are kept for a later update. A residual whose shape no
    longer matches the tensor of the same name raises ``ValueError`` (call :meth:`reset`).
    """

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self._residual: dict[str, np.ndarray] = {}
        for name, value in (residual or {}).items():
            array = np.asarray(value)
            if array.dtype != np.float32:
                raise ValueError(f"residual {name!r}: expected float32, got {array.dtype}")
            self._residual[name] = np.array(array, dtype=np.float32)

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """The current residual (name -> float32 array); treat as read-only."""
        return self._residual

    def reset(self) -> None:
        self._residual = {}

    def compress(
        self,
        delta: Mapping[str, np.ndarray],
        spec: CodecSpec,
        *,
        rng: np.random.Generator,
        overrides: Mapping[str, CodecSpec] | None = None,
        order: Sequence[str] | None = None,
        without_feedback: Collection[str] = (),
    ) -> bytes:
        """Encode ``delta + residual`` and keep what was dropped. Atomic: on error nothing changes.

        ``overrides`` and ``order`` are passed to :func:`encode_update`. Tensors named in
        ``without_feedback`` are sent as they are and keep no residual: statistics such as
        BatchNorm running means and variances are pulled toward a target, not summed like
        gradients, and replaying their dropped part later overshoots (measured: running
        variances drifting to ~0 and the model collapsing under top-k with feedback on them).
        """
        corrected: dict[str, np.ndarray] = {}
        for name, value in delta.items():
            value = float32_array(name, value)
            previous = None if name in without_feedback else self._residual.get(name)
            if previous is None:
                corrected[name] = value
            elif previous.shape != value.shape:
                raise ValueError(
                    f"tensor {name!r}: residual shape {previous.shape} != update shape {value.shape}; call reset()"
                )
            else:
                corrected[name] = value + previous
        payload = encode_update(corrected, spec, rng=rng, overrides=overrides, order=order)
        # positions in the payload index ``order``; the update must then hold every tensor of it
        names = order if order is not None else list(corrected)
        sent = decode_update(payload, {name: corrected[name].shape for name in names})
        residual = {k: v for k, v in self._residual.items() if k not in without_feedback}
        for name, value in corrected.items():
            if name in without_feedback:
                continue
            leftover = sent[name]
            np.subtract(value, leftover, out=leftover)
            residual[name] = leftover
        self._residual = residual
        return payload


def save_residual(path: str | os.PathLike[str], residual: Mapping[str, np.ndarray]) -> None:
    """Persist a residual atomically (a killed process leaves the old file or the new one)."""
    write_tensor_file(path, residual)


def load_residual(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a residual saved by :func:`save_residual`; ``{}`` if the file does not exist.

    A corrupt file (or one holding non-float32 / non-finite tensors) raises
    :class:`MalformedMessage` naming the path.
    """
    target = Path(path)
    try:
        tensors = read_tensor_file(target)
    except FileNotFoundError:
        return {}
    except ProtocolError as exc:
        raise MalformedMessage(f"residual file {target}: {exc.reason}") from exc
    for name, value in tensors.items():
        if value.dtype != np.float32:
            raise MalformedMessage(f"residual file {target}: tensor {name!r} is {value.dtype}, expected float32")
        if value.size and not np.isfinite(value).all():
            raise MalformedMessage(f"residual file {target}: tensor {name!r} holds non-finite values")
    return tensors
