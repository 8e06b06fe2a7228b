"""Update binding (issue #7): every UPDATE names the exact TASK it answers, so replays are refused.

The server puts a fresh random ``nonce`` (16 bytes, 32 lower-case hex digits, from the OS CSPRNG)
into every TASK and remembers it with the task. The device echoes it in its UPDATE together with
``base_digest``, the sha256 (64 lower-case hex) of the exact TASK payload it trained from — the
tensor-set bytes as received, which the server computed once when it encoded them. The server
accepts an UPDATE only if topic device == header device == the task's device, the (round, task)
pair is one it issued, the nonce is the task's and the base digest is what it sent
(docs/protocol.md §6a, docs/security.md "Replay protection").

Why the payload digest and not ``sha256(bundle_digest, model_version)``: the version number does
not identify the weights. Two clusters (clustered FL), a server restored from an older store
that re-issues a version number, or a TASK whose download was swapped all have one
(bundle, version) pair and different weights; only a digest of the bytes trained from tells a
delta computed against other weights from a good one. It is cheap: one sha256 pass over a
payload the device has just received whole (~1-2 GB/s, a fraction of decoding it), and the
server hashes its encoded payload once per round (async: once per version).

This module is pure: patterns, header parsing, the digest, and :func:`binding_refusal`, which
says which rule an UPDATE breaks. The refusal classes derive from
:class:`~edge_agent.errors.ContractViolation` and carry the stable codes counted in the server's
rejections (``/metrics`` ``updates_rejected_total{reason}``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from edge_agent.errors import ContractViolation, MalformedMessage
from edge_agent.protocol.header import Header

__all__ = [
    "BASE_DIGEST_PATTERN",
    "NONCE_BYTES",
    "NONCE_PATTERN",
    "BadNonce",
    "BindingRefused",
    "CrossDevice",
    "CrossRound",
    "Replayed",
    "TaskBinding",
    "WrongBase",
    "binding_refusal",
    "new_nonce",
    "optional_digest",
    "optional_nonce",
    "payload_digest",
]

NONCE_BYTES = 16
NONCE_PATTERN = re.compile(r"^[0-9a-f]{32}$")
BASE_DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class BindingRefused(ContractViolation):
    """An UPDATE that does not answer the task it names (base of the five codes below)."""

    code = "binding_refused"


class Replayed(BindingRefused):
    """The task's result was already consumed: its round closed (or buffer sealed) with it, or the round is over."""

    code = "replayed"


class CrossRound(BindingRefused):
    """The (round, task) pair is not one the server issued, or not of the round it is collecting."""

    code = "cross_round"


class CrossDevice(BindingRefused):
    """The header's device differs from the topic's, or the task was issued to another device."""

    code = "cross_device"


class WrongBase(BindingRefused):
    """The update was trained from other weights than the task sent (base digest or model version)."""

    code = "wrong_base"


class BadNonce(BindingRefused):
    """The update's nonce is missing or is not its task's."""

    code = "bad_nonce"


@dataclass(frozen=True)
class TaskBinding:
    """What the server remembers of one TASK to check its UPDATE (both "" for a task issued unbound,
    i.e. stored by a server that predates binding: its update is accepted without them)."""

    nonce: str = ""
    base_digest: str = ""


def new_nonce() -> str:
    """A fresh task nonce: 16 random bytes from the OS CSPRNG, as 32 lower-case hex digits."""
    return secrets.token_hex(NONCE_BYTES)


def payload_digest(payload: bytes | bytearray | memoryview) -> str:
    """The base digest of a TASK payload: sha256 of its bytes exactly as sent, lower-case hex."""
    return hashlib.sha256(payload).hexdigest()


def optional_nonce(h: Header) -> str:
    """The header's ``nonce`` ("" when absent: a peer that predates binding)."""
    if "nonce" not in h.raw:
        return ""
    value = h.str_field("nonce")
    if not NONCE_PATTERN.match(value):
        raise MalformedMessage(f"{h.type_name} field 'nonce' is not 32 lower-case hex digits")
    return value


def optional_digest(h: Header) -> str:
    """The header's ``base_digest`` ("" when absent)."""
    if "base_digest" not in h.raw:
        return ""
    value = h.str_field("base_digest")
    if not BASE_DIGEST_PATTERN.match(value):
        raise MalformedMessage(f"{h.type_name} field 'base_digest' is not 64 lower-case hex digits")
    return value


def binding_refusal(
    *,
    device_id: str,
    nonce: str,
    base_digest: str,
    owner: str,
    binding: TaskBinding,
    task_id: str,
) -> BindingRefused | None:
    """Why an UPDATE from ``device_id`` for ``task_id`` (issued to ``owner`` with ``binding``) is
    refused, or None. Round/task membership is the caller's (it knows which round it collects).

    A task issued with a nonce needs the same nonce back (an update without one is refused: a
    server that accepted unbound updates would let a replay through by stripping the field). A
    task issued without one (by an older server, restored from its store) takes its update as is.
    """
    if owner != device_id:
        return CrossDevice(f"task {task_id!r} was issued to {owner!r}, not {device_id!r}")
    if not binding.nonce:
        return None
    if not nonce:
        return BadNonce(f"update for task {task_id!r} carries no nonce (an agent that predates update binding)")
    if not secrets.compare_digest(nonce, binding.nonce):
        return BadNonce(f"update for task {task_id!r} carries another task's nonce")
    if base_digest != binding.base_digest:
        shown = base_digest[:12] or "none"
        return WrongBase(
            f"update for task {task_id!r} was trained from weights {shown}…, the task sent {binding.base_digest[:12]}…"
        )
    return None
