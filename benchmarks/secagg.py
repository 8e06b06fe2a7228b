"""Secure aggregation overhead (issue #7): bytes per device and server time vs plain int8 aggregation.

For each configuration ``n:m`` (n devices, m parameters; default ``100:100000``,
``100:1000000`` and ``500:100000``) one script run does, on the same float updates (device ``i``'s
update is ``N(0, clip/2)`` seeded by ``(--seed, i)``):

* **SecAgg**: a full session of :mod:`edge_agent.secagg` with ``t = default_threshold(n)``, b = 8
  bit codes, clip 0.05 and the ring bits :func:`~edge_agent.secagg.ring.ring_spec_for` picks;
  ``--drop`` (default 30%) of the devices, chosen at random, drop after sharing keys (their masked
  input never arrives), the worst case for the server. Every message goes through its bytes
  (``encode``/``decode``). The result is checked: the ring sum must equal the survivors' codes'
  sum exactly and the float sum must be within the quantization bound, or the script fails.
* **Plain**: the survivors' same updates as int8 FFCU payloads (``edge_agent.codecs``, one
  tensor) folded with ``WeightedMean.add_encoded``, the server's real path.

*Server* time counts everything the server does with bytes in and bytes out (decode, phase logic,
routing, the masked fold, rebuilding secrets, regenerating masks, encode); *client* time is the
mean per device of each step (``mask``/``unmask`` over survivors; quantize is part of ``mask``), all
devices simulated in this one process. Times are process CPU seconds (``time.process_time``,
robust on a shared machine) with wall seconds (``time.perf_counter``) in parentheses; everything
runs on one thread.
Payload generation and the plain path's int8 encoding are not timed. Bytes are message sizes
including the 22-byte header; up = device to server.

    python benchmarks/secagg.py [--configs 100:100000 100:1000000 500:100000] [--drop 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker_server.aggregate import WeightedMean  # noqa: E402
from edge_agent.codecs import CodecSpec, encode_update  # noqa: E402
from edge_agent.secagg import (  # noqa: E402
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    default_threshold,
    encode,
    quantization_bound,
    quantize,
    ring_spec_for,
)

CLIP = 0.05
T = TypeVar("T")


@dataclass
class Run:
    n: int
    m: int
    t: int = 0
    ring_bits: int = 0
    survivors: int = 0
    server_s: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    server_cpu: dict[str, float] = field(default_factory=dict)  # process CPU seconds per phase
    client_s: dict[str, float] = field(default_factory=dict)
    client_cpu: dict[str, float] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    plain_bytes: int = 0
    plain_s: float = 0.0
    plain_cpu: float = 0.0
    max_error: float = 0.0
    bound: float = 0.0


def _update(seed: int, index: int, m: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).normal(0.0, CLIP / 2, m).astype(np.float32)


Tables = tuple[dict[str, float], dict[str, float]]


def _timed(tables: Tables, key: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, adding its wall and process-CPU seconds to ``tables[0][key]`` / ``tables[1][key]``."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    tables[0][key] = tables[0].get(key, 0.0) + time.perf_counter() - wall
    tables[1][key] = tables[1].get(key, 0.0) + time.process_time() - cpu
    return value


def _secagg(run: Run, dropped: set[int], seed: int) -> np.ndarray:
    """One session; returns the survivors' float sum (checked against the plain codes)."""
    n, m = run.n, run.m
    params = SecAggParams(
        session=secrets.token_bytes(16),
        cohort=n,
        threshold=default_threshold(n),
        length=m,
        ring=ring_spec_for(n, clip=CLIP),
    )
    run.t, run.ring_bits = params.threshold, params.ring.ring_bits
    server, clients = SecAggServer(params), {i: SecAggClient(params, i) for i in range(1, n + 1)}
    srv, cli = (run.server_s, run.server_cpu), (run.client_s, run.client_cpu)
    up, down = run.up, run.down

    setups = [_timed(srv, "keys", _setup, server, i) for i in clients]
    down["Setup"] = len(setups[0])
    for client in clients.values():
        data = _timed(cli, "advertise", _advertise, client)
        up["AdvertiseKeys"] = len(data)
        _timed(srv, "keys", _serve, server.receive_keys, data, AdvertiseKeys)
    key_list = _timed(srv, "keys", _close, server.key_list)
    down["KeyList"] = len(key_list)

    for client in clients.values():
        data = _timed(cli, "share_keys", _step, client.share_keys, key_list, KeyList)
        up["EncryptedShares"] = len(data)
        _timed(srv, "shares", _serve, server.receive_shares, data, EncryptedShares)
    bundles = _timed(srv, "shares", _bundles, server)
    down["ShareBundle"] = len(bundles[1])

    expected = np.zeros(m, dtype=np.int64)
    for index, client in clients.items():
        if index in dropped:
            continue  # it drops before its masked input arrives: no need to compute one
        update = _update(seed, index, m)
        codes = _timed(cli, "mask", quantize, update, params.ring, np.random.default_rng([seed, index, 1]))
        expected += codes
        data = _timed(cli, "mask", _step, lambda b, q=codes, c=client: c.mask(b, q), bundles[index], ShareBundle)
        up["MaskedInput"] = len(data)
        _timed(srv, "masked", _serve, server.receive_masked, data, MaskedInput)
    request = _timed(srv, "unmask", _close, server.unmask_request)
    down["UnmaskRequest"] = len(request)

    for index, client in clients.items():
        if index not in dropped:
            data = _timed(cli, "unmask", _step, client.unmask, request, UnmaskRequest)
            up["UnmaskResponse"] = len(data)
            _timed(srv, "unmask", _serve, server.receive_unmask, data, UnmaskResponse)
    result = _timed(srv, "unmask", server.result)
    run.survivors = result.count
    for table in cli:
        for key in table:
            table[key] /= result.count if key in ("mask", "unmask") else n
    if not np.array_equal(result.ring_sum.astype(np.int64), expected):
        raise SystemExit(f"n={n} m={m}: the secure sum differs from the plain sum of the codes")
    run.bound = quantization_bound(result.count, params.ring)
    return result.sum()


def _as(message: object, cls: type[T]) -> T:
    assert isinstance(message, cls)
    return message


def _setup(server: SecAggServer, index: int) -> bytes:
    return encode(server.setup(index))


def _advertise(client: SecAggClient) -> bytes:
    return encode(client.advertise())


def _serve(receive: Callable[[Any], bool], data: bytes, cls: type) -> bool:
    """Server: decode a device's message and hand it to ``receive``."""
    return receive(_as(decode(data), cls))


def _close(close: Callable[[], Any]) -> bytes:
    return encode(close())


def _bundles(server: SecAggServer) -> dict[int, bytes]:
    return {i: encode(b) for i, b in server.share_bundles().items()}


def _step(act: Callable[[Any], Any], data: bytes, cls: type) -> bytes:
    """Device: decode the server's message, act on it, encode the answer."""
    return encode(act(_as(decode(data), cls)))


def _plain(run: Run, survivors: list[int], seed: int, secure_sum: np.ndarray) -> None:
    spec, shapes = CodecSpec.parse("int8"), {"update": (run.m,)}
    mean, clipped = WeightedMean(), np.zeros(run.m)
    plain: Tables = ({}, {})
    for index in survivors:
        update = _update(seed, index, run.m)
        clipped += np.clip(update, -CLIP, CLIP)
        payload = encode_update({"update": update}, spec, rng=np.random.default_rng([seed, index, 2]))
        run.plain_bytes = len(payload)
        _timed(plain, "fold", mean.add_encoded, payload, 1.0, shapes)
    _timed(plain, "fold", mean.result)
    run.plain_s, run.plain_cpu = plain[0]["fold"], plain[1]["fold"]
    run.max_error = float(np.abs(secure_sum - clipped).max())
    if not run.max_error < run.bound:
        raise SystemExit(f"n={run.n} m={run.m}: float error {run.max_error} exceeds the bound {run.bound}")


def _measure(n: int, m: int, drop: float, seed: int) -> Run:
    run = Run(n, m)
    order = [int(i) for i in np.random.default_rng([seed, n]).permutation(np.arange(1, n + 1))]
    cut = round(drop * n)
    secure_sum = _secagg(run, set(order[:cut]), seed)
    _plain(run, sorted(order[cut:]), seed, secure_sum)
    return run


def _bytes_table(runs: list[Run]) -> list[str]:
    names = ["AdvertiseKeys", "EncryptedShares", "MaskedInput", "UnmaskResponse"]
    head = "| n | m | t | k | " + " | ".join(f"{x} B" for x in names)
    head += " | SecAgg up B | plain int8 up B | up ratio | SecAgg down B |"
    lines = [head, "|" + "---:|" * (len(names) + 8)]
    for r in runs:
        total, down = sum(r.up[x] for x in names), sum(r.down.values())
        cells = [str(r.n), f"{r.m:,}", str(r.t), str(r.ring_bits)] + [f"{r.up[x]:,}" for x in names]
        cells += [f"{total:,}", f"{r.plain_bytes:,}", f"{total / r.plain_bytes:.2f}x", f"{down:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _time_table(runs: list[Run]) -> list[str]:
    phases = ["keys", "shares", "masked", "unmask"]
    head = "| n | m | survivors | " + " | ".join(f"server {p} CPU s" for p in phases)
    head += (
        " | SecAgg server CPU s (wall) | plain int8 fold CPU s (wall) | ratio CPU (wall) | max float error | bound |"
    )
    lines = [head, "|" + "---:|" * (len(phases) + 8)]
    for r in runs:
        cpu, wall = sum(r.server_cpu.values()), sum(r.server_s.values())
        cells = [str(r.n), f"{r.m:,}", str(r.survivors)] + [f"{r.server_cpu[p]:.3f}" for p in phases]
        cells += [f"{cpu:.2f} ({wall:.2f})", f"{r.plain_cpu:.3f} ({r.plain_s:.3f})"]
        cells += [f"{cpu / r.plain_cpu:.0f}x ({wall / r.plain_s:.0f}x)", f"{r.max_error:.2e}", f"{r.bound:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _client_table(runs: list[Run]) -> list[str]:
    steps = ["advertise", "share_keys", "mask", "unmask"]
    head = "| n | m | " + " | ".join(f"{s} CPU ms" for s in steps) + " | total CPU ms (wall) |"
    lines = [head, "|" + "---:|" * (len(steps) + 3)]
    for r in runs:
        cells = [str(r.n), f"{r.m:,}"] + [f"{r.client_cpu[s] * 1e3:.1f}" for s in steps]
        cells.append(f"{sum(r.client_cpu.values()) * 1e3:.0f} ({sum(r.client_s.values()) * 1e3:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--configs", nargs="+", default=["100:100000", "100:1000000", "500:100000"])
    parser.add_argument("--drop", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# secagg benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load}")
    print(f"# python {platform.python_version()}, numpy {np.__version__}, drop {args.drop:.0%}, seed {args.seed}\n")
    runs = []
    for n, m in configs:
        started = time.perf_counter()
        runs.append(_measure(n, m, args.drop, args.seed))
        print(f"n={n} m={m:,}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print("Bytes per device (each message, up = device -> server):\n")
    print("\n".join(_bytes_table(runs)))
    print("\nServer time (SecAgg session vs plain int8 fold of the survivors' same updates):\n")
    print("\n".join(_time_table(runs)))
    print("\nClient time per device (mean; quantize included in mask):\n")
    print("\n".join(_client_table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
