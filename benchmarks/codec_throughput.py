"""Update-codec throughput: encode, decode and server-side accumulate, per codec.

The update is a ~4.1M-parameter tensor set (conv + fc layers, float32, N(0, 0.01) values).
For each codec: the median of ``--runs`` timings (after one warm-up) of

* **encode**: ``encode_update`` (fp32 dict -> FFCU bytes, stochastic rounding included);
* **decode**: ``decode_update`` (bytes -> float32 dict, full validation included);
* **accumulate**: ``accumulate_update`` into pre-allocated, pre-touched float64 accumulators;

reported as MB/s of fp32 input (1 MB = 10**6 bytes, 4 bytes per parameter), plus the payload
size relative to the fp32 codec's. Prints a markdown table.

    python benchmarks/codec_throughput.py [--runs 7] [--codecs int8 topk-int8:0.01 ...] [--zstd]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.codecs import CODEC_NAMES, CodecSpec, accumulate_update, decode_update, encode_update  # noqa: E402

SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (256, 128, 3, 3),
    "conv1.bias": (256,),
    "conv2.weight": (512, 256, 3, 3),
    "conv2.bias": (512,),
    "fc1.weight": (2048, 1280),
    "fc1.bias": (2048,),
    "fc2.weight": (10, 2048),
    "fc2.bias": (10,),
}


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy imports
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--codecs", nargs="*", default=None, help="codec specs (default: every codec, top-k at 1%%)")
    parser.add_argument("--zstd", action="store_true", help="add +zstd to every codec")
    args = parser.parse_args(argv)
    texts = args.codecs or [f"{name}:0.01" if name.startswith("topk") else name for name in CODEC_NAMES]
    specs = [CodecSpec.parse(text + ("+zstd" if args.zstd else "")) for text in texts]

    rng = np.random.default_rng(0)
    delta = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in SHAPES.items()}
    elements = sum(value.size for value in delta.values())
    megabytes = elements * 4 / 1e6
    fp32_bytes = len(encode_update(delta, CodecSpec("fp32"), rng=rng))
    acc = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for value in acc.values():
        value.fill(0.0)

    print(
        f"{elements:,} parameters ({megabytes:.1f} MB fp32), {len(SHAPES)} tensors; numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs; median of {args.runs} runs\n"
    )
    print("| codec | payload | vs fp32 | encode MB/s | decode MB/s | accumulate MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in specs:
        payload = encode_update(delta, spec, rng=rng)
        encode = _median_seconds(functools.partial(encode_update, delta, spec, rng=rng), args.runs)
        decode = _median_seconds(functools.partial(decode_update, payload, SHAPES), args.runs)
        fold = _median_seconds(functools.partial(accumulate_update, payload, acc, 0.5, SHAPES), args.runs)
        print(
            f"| {spec} | {len(payload):,} B | {fp32_bytes / len(payload):.1f}x | {megabytes / encode:,.0f} | "
            f"{megabytes / decode:,.0f} | {megabytes / fold:,.0f} |"
        )


if __name__ == "__main__":
    main()
