"""Secure aggregation (Bonawitz et al., CCS 2017, double masking): the server learns only the sum.

Pure modules, no I/O; randomness comes from an injected :class:`RandomSource`
(:class:`SystemRandomSource`, backed by :mod:`secrets`, by default). The device owns the wire
contract; the server imports it. Protocol, threat model and parameters: ``docs/secagg.md``.

* :mod:`.ring` — float update <-> integers mod ``2**k`` (clip, stochastic rounding, overflow bound);
* :mod:`.shamir` — t-out-of-n sharing of 32-byte secrets over ``GF(2**31 - 1)``;
* :mod:`.crypto` — X25519, HKDF-SHA256, AES-256-GCM share transport; :mod:`.prg` — AES-CTR masks;
* :mod:`.client` / :mod:`.server` — the two state machines; :mod:`.recover` — the unmasking math;
* :mod:`.messages` / :mod:`.wire` — the messages and their byte layout.

A session end to end (transport left out)::

    params = SecAggParams(session=os.urandom(16), cohort=n, threshold=default_threshold(n),
                          length=m, ring=ring_spec_for(n, clip=0.05))
    server = SecAggServer(params)
    clients = {i: SecAggClient(params, i) for i in range(1, n + 1)}   # on the devices
    for c in clients.values(): server.receive_keys(c.advertise())
    keys = server.key_list()
    for c in clients.values(): server.receive_shares(c.share_keys(keys))
    bundles = server.share_bundles()
    for i, c in clients.items():
        server.receive_masked(c.mask(bundles[i], quantize(update_i, params.ring, np_rng)))
    request = server.unmask_request()
    for c in clients.values(): server.receive_unmask(c.unmask(request))
    mean = server.result().mean()          # float64, over the survivors

**Asynchronous buffered aggregation (FedBuff).** Secure aggregation only ever reveals the sum of
a *fixed* set of inputs, so it runs once per buffer, not per update: the server assigns each
buffer its own cohort up front (the devices whose uploads will fill it, indexed ``1..n``), a
fresh 16-byte session id, and a threshold ``t`` (``default_threshold(n)``); the buffer is
sealed when the session's ``result()`` arrives, or abandoned on :class:`SecAggAbort` (its
devices are then re-tasked into a later buffer). Per-update weights cannot be applied by the
server to a masked input: the device scales its update by its example count before
:func:`quantize` (:mod:`.weighting`); a staleness factor can be applied to the unmasked sum
because a cohort is tasked at once on one model version, so its staleness is one number
(``broker_server.secagg_async``). A device may belong to several open buffers at once: every
session has its own keys.
"""

from edge_agent.secagg.client import SecAggClient
from edge_agent.secagg.crypto import RandomSource, SystemRandomSource
from edge_agent.secagg.messages import (
    Abort,
    AdvertiseKeys,
    DeviceKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    Setup,
    ShareBundle,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_agent.secagg.params import SecAggParams, default_threshold
from edge_agent.secagg.ring import RingSpec, decode_mean, decode_sum, quantization_bound, quantize, ring_spec_for
from edge_agent.secagg.server import SecAggResult, SecAggServer
from edge_agent.secagg.wire import decode, decode_as, encode

__all__ = [
    "Abort",
    "AdvertiseKeys",
    "DeviceKeys",
    "EncryptedShares",
    "KeyList",
    "MaskedInput",
    "RandomSource",
    "RingSpec",
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "Setup",
    "ShareBundle",
    "ShareKind",
    "SystemRandomSource",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "decode_as",
    "decode_mean",
    "decode_sum",
    "default_threshold",
    "encode",
    "quantization_bound",
    "quantize",
    "ring_spec_for",
]
