"""A device's presence: the retained STATUS it publishes, its last will and its birth message."""

from __future__ import annotations

from typing import Any

from edge_agent import __version__
from edge_agent.blobs.claim_uploads import CAPABILITY as CLAIM_CAPABILITY
from edge_agent.codecs import CODEC_NAMES
from edge_agent.device.eligibility import Decision
from edge_agent.device.state import DeviceState
from edge_agent.protocol.messages import FORMAT_VERSION, StatusMessage, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.transport.base import Will

#: What this agent speaks, announced in STATUS (docs/protocol.md §9); ``claim_check``: it takes
#: upload grants and model references (CLAIM, docs/blobs.md)
CAPABILITIES = {"protocol": [FORMAT_VERSION], "codecs": list(CODEC_NAMES), CLAIM_CAPABILITY: True}


def status_message(
    device_id: str,
    *,
    online: bool,
    bundle_digest: str = "",
    num_examples: int = 0,
    decision: Decision | None = None,
    state: DeviceState | None = None,
    install: dict[str, Any] | None = None,
    device_class: str = "default",
) -> StatusMessage:
    """The device's STATUS: capabilities while online, and its last eligibility decision if any."""
    return StatusMessage(
        device_id=device_id,
        online=online,
        agent_version=__version__,
        bundle_digest=bundle_digest,
        num_examples=num_examples,
        capabilities=CAPABILITIES | {"device_class": device_class} if online else {},
        eligibility=decision.as_dict() if decision is not None else {},
        device_state=state.as_dict() if state is not None else {},
        install=install or {},
    )


def offline_will(device_id: str, topics: Topics = Topics()) -> Will:
    """The retained status the broker publishes if the device vanishes."""
    payload = encode_message(status_message(device_id, online=False))
    return Will(topic=topics.status(device_id), payload=payload, qos=1, retain=True)


def online_birth(
    device_id: str, bundle_digest: str, num_examples: int, topics: Topics = Topics(), *, device_class: str = "default"
) -> Will:
    """The retained status to publish on every (re)connect (MQTT transports' ``birth``)."""
    status = status_message(
        device_id, online=True, bundle_digest=bundle_digest, num_examples=num_examples, device_class=device_class
    )
    return Will(topic=topics.status(device_id), payload=encode_message(status), qos=1, retain=True)
