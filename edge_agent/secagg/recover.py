"""The server's unmasking math: from the masked sum and ``t`` unmasking responses to the plain sum.

With survivors ``U3`` and dropped devices ``D = U2 \\ U3``::

    sum_{u in U3} y_u = sum x_u + sum_{u in U3} PRG(b_u) + sum_{u in U3, v in D} sign(u, v) PRG(s_uv)

(pairs inside ``U3`` cancel; ``sign(u, v) = +1`` if ``u < v`` else ``-1``). The server rebuilds
``b_u`` for every survivor and ``s_v^SK`` for every dropped device from the shares, checks each
rebuilt private key against the public key ``v`` advertised, recomputes ``s_uv`` with the
survivor's public key, and subtracts. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_agent.errors import SecAggTampered
from edge_agent.secagg import crypto, ring, shamir
from edge_agent.secagg.messages import DeviceKeys
from edge_agent.secagg.params import SecAggParams
from edge_agent.secagg.prg import MaskStream


def rebuild_secrets(responses: Mapping[int, Mapping[int, bytes]], owners: Sequence[int]) -> dict[int, bytes]:
    """Each owner's secret from ``responses[responder][owner]`` (64-byte shares), all responders used."""
    responders = sorted(responses)
    data = b"".join(responses[r][o] for r in responders for o in owners)
    values = np.frombuffer(data, dtype="<u4").astype(np.int64).reshape(len(responders), len(owners), shamir.WORDS)
    return dict(zip(owners, shamir.reconstruct_many(responders, values), strict=True))


def remove_masks(
    params: SecAggParams,
    masked_sum: np.ndarray,
    keys: Mapping[int, DeviceKeys],
    seeds: Mapping[int, bytes],
    mask_keys: Mapping[int, bytes],
) -> np.ndarray:
    """``masked_sum`` minus the survivors' self masks (``seeds``) and the dropped devices' pair masks.

    ``seeds``: survivor -> ``b_u``; ``mask_keys``: dropped device -> rebuilt ``s_v^SK``;
    ``keys``: the advertised keys of ``U1``. Returns a new reduced ring vector.
    """
    acc = masked_sum.copy()
    stream = MaskStream(params.ring, params.length)
    for seed in seeds.values():
        stream.subtract(acc, seed)
    for dropped, private in mask_keys.items():
        pair = crypto.keypair_from_private(private)
        if pair.public != keys[dropped].mask_public:
            raise SecAggTampered(f"the rebuilt mask key of device {dropped} does not match its advertised key")
        for survivor in seeds:
            secret = crypto.agree(pair, keys[survivor].mask_public, survivor)
            seed = crypto.mask_seed(secret, params.session, survivor, dropped)
            stream.apply(acc, seed, -1 if survivor < dropped else +1)
    return ring.reduce(acc, params.ring)
