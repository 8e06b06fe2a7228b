"""Ed25519 verification on a device: the pure-Python verifier (edge_agent.crypto.ed25519) vs the
``cryptography`` package (OpenSSL), in one run. Devices run the pure one (no ``cryptography`` in the
``agent`` extra); a model install verifies two signatures (release statement, manifest.sig).

    PYTHONPATH=. python3 benchmarks/ed25519.py [--n 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.crypto.ed25519 import verify


def timed(fn: Callable[[], object], n: int) -> float:
    """Median milliseconds per call over ``n`` calls."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    message = os.urandom(400)  # about a release statement's size
    signature = key.sign(message)
    assert verify(raw, message, signature)
    pure = timed(lambda: verify(raw, message, signature), args.n)
    fast = timed(lambda: public.verify(signature, message), args.n)
    print("| verifier | ms / signature (median) | ratio |")
    print("|---|---|---|")
    print(f"| pure Python (edge_agent.crypto.ed25519) | {pure:.3f} | {pure / fast:.0f}x |")
    print(f"| cryptography (OpenSSL) | {fast:.3f} | 1x |")


if __name__ == "__main__":
    main()
