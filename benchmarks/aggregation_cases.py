"""The measured side of ``benchmarks/aggregation.py``: one case (fedflock fold, Flower's
``aggregate`` or a plain numpy loop) over K generated updates of a 1M-parameter model, run in its
own process so its peak RSS is its own. Updates are generated deterministically from a seeded
noise pool; generation is never timed.
"""

from __future__ import annotations

import importlib
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from broker_server.aggregate import WeightedMean  # noqa: E402
from edge_agent.codecs import CodecSpec, decode_update, encode_update  # noqa: E402
from edge_agent.codecs.workers import default_workers  # noqa: E402

SHAPES: dict[str, tuple[int, ...]] = {  # 1x28x28 -> conv32 -> conv64 -> 2x pool -> fc312 -> fc10
    "conv1.weight": (32, 1, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "fc1.weight": (312, 3136),
    "fc1.bias": (312,),
    "fc2.weight": (10, 312),
    "fc2.bias": (10,),
}
NAMES = list(SHAPES)
PARAMS = sum(math.prod(shape) for shape in SHAPES.values())
POOL = 2 * PARAMS  # seeded N(0, 0.01) noise; update i is a slice of it at a seeded offset
CASES = (
    "fedflock-fp32",
    "fedflock-fp32-mt",
    "fedflock-int8",
    "fedflock-int8-mt",
    "flower-fp32",
    "flower-int8",
    "flower-fp32-deser",
    "flower-int8-deser",
    "numpy-fp32",
)


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 << 20


class _CacheFlusher:
    """Rewrites a buffer twice the L3 size so the next timed pass starts from DRAM."""

    def __init__(self) -> None:
        self._buffer = np.zeros(2 * l3_bytes(), dtype=np.uint8)
        self._tick = 0

    def __call__(self) -> None:
        self._tick = (self._tick + 1) % 251
        self._buffer.fill(self._tick)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _update(pool: np.ndarray, seed: int, i: int) -> tuple[int, dict[str, np.ndarray], np.random.Generator]:
    """Update ``i``: ``(num_examples, float32 tensors, rng for stochastic rounding)``, seeded by (seed, i).

    A function rather than a generator body so no suspended frame keeps the float copy alive.
    """
    rng = np.random.default_rng([seed, i])
    offset = int(rng.integers(0, POOL - PARAMS + 1))
    flat = pool[offset : offset + PARAMS] * np.float32(rng.uniform(0.5, 2.0))
    tensors, start = {}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        tensors[name] = flat[start : start + size].reshape(shape)
        start += size
    return int(rng.integers(16, 513)), tensors, rng


def _payloads(pool: np.ndarray, k: int, seed: int, spec: CodecSpec) -> Iterator[tuple[int, bytes]]:
    """Encoded updates one at a time, as they would arrive; nothing but the payload is kept."""
    for i in range(k):
        weight, tensors, rng = _update(pool, seed, i)
        payload = encode_update(tensors, spec, rng=rng, order=NAMES)
        del tensors
        yield weight, payload
        del payload


class _Stopwatch:
    """Wall and CPU seconds summed over the timed sections (CPU time is robust to a shared machine's load)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._wall = self._cpu = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def fedflock_workers(case: str) -> int:
    """Fold threads of a fedflock case: 1, or (``-mt``) WeightedMean's default, the usable CPUs (at most 4)."""
    return default_workers() if case.endswith("-mt") else 1


def _fedflock(
    pool: np.ndarray, k: int, seed: int, codec: str, flush: Callable[[], None], workers: int
) -> tuple[_Stopwatch, dict]:
    spec = CodecSpec.parse(codec)
    mean = WeightedMean(workers=workers)
    watch = _Stopwatch()
    for weight, payload in _payloads(pool, k, seed, spec):
        flush()
        watch.start()
        mean.add_encoded(payload, float(weight), SHAPES)
        watch.stop()
        del payload
    watch.start()
    result = mean.result()
    watch.stop()
    return watch, result


def _numpy_loop(pool: np.ndarray, k: int, seed: int, flush: Callable[[], None]) -> tuple[_Stopwatch, dict]:
    acc: dict[str, np.ndarray] = {}
    total = 0.0
    watch = _Stopwatch()
    for i in range(k):
        weight, tensors, _ = _update(pool, seed, i)
        flush()
        watch.start()
        w = float(weight)
        for name, x in tensors.items():
            if name not in acc:
                acc[name] = np.zeros(x.shape, dtype=np.float64)
            acc[name] += np.multiply(x, w, dtype=np.float64)  # acc += w * x, in float64
        total += w
        watch.stop()
        del tensors
    watch.start()
    result = {name: (value / total).astype(np.float32) for name, value in acc.items()}
    watch.stop()
    return watch, result


def _flower_inputs(pool: np.ndarray, k: int, seed: int, codec: str) -> tuple[list, float]:
    """The ``(NDArrays, num_examples)`` list Flower's aggregate takes; plus seconds spent decoding."""
    results: list[tuple[list[np.ndarray], int]] = []
    decode_s = 0.0
    if codec == "fp32":
        for i in range(k):
            weight, tensors, _ = _update(pool, seed, i)
            results.append(([tensors[name] for name in NAMES], weight))
        return results, decode_s
    for weight, payload in _payloads(pool, k, seed, CodecSpec.parse(codec)):
        start = time.perf_counter()
        decoded = decode_update(payload, SHAPES)
        decode_s += time.perf_counter() - start
        results.append(([decoded[name] for name in NAMES], weight))
    return results, decode_s


def _flower_server_call(case: str) -> tuple[Callable[[list[Any]], list[np.ndarray]], Callable[[list], list]]:
    """(the timed call, what turns decoded ``(NDArrays, n)`` inputs into its argument) for a Flower case.

    ``-deser``: what Flower's server does with the ``Parameters`` a client sends (the bytes
    ``ndarrays_to_parameters`` makes): ``parameters_to_ndarrays`` on every result, then
    ``aggregate``. Otherwise ``aggregate`` alone on already-resident ndarrays.
    """
    import flwr.common

    aggregate = importlib.import_module("flwr.server.strategy.aggregate").aggregate
    if not case.endswith("-deser"):
        return aggregate, lambda results: results
    to_ndarrays = flwr.common.parameters_to_ndarrays

    def deserialize_and_aggregate(results: list[Any]) -> list[np.ndarray]:
        return aggregate([(to_ndarrays(parameters), n) for parameters, n in results])

    def serialize(results: list) -> list:
        return [(flwr.common.ndarrays_to_parameters(arrays), n) for arrays, n in results]

    return deserialize_and_aggregate, serialize


def child(case: str, k: int, seed: int, repeats: int, result_path: str | None, flush_mode: str) -> dict:
    report: dict[str, Any] = {"case": case, "k": k}
    aggregate: Callable[[list[Any]], list[np.ndarray]] | None = None
    if case.startswith("flower"):
        try:
            import flwr

            aggregate, prepare = _flower_server_call(case)
        except ImportError as exc:  # flwr (or one of its dependencies) is not installed here
            return {**report, "error": f"flwr not importable: {type(exc).__name__}: {exc}"}
        report["flwr"] = flwr.__version__
    pool = np.random.default_rng([seed, 2**31]).standard_normal(POOL, dtype=np.float32)
    pool *= np.float32(0.01)
    flusher = _CacheFlusher()
    flusher()
    flush = flusher if flush_mode == "each" else (lambda: None)
    baseline = _vm_kib("VmRSS")
    report["peak_reset"] = _reset_peak()
    times: list[float] = []
    cpu_times: list[float] = []
    faults: list[int] = []  # minor page faults per timed pass (streamed cases: the whole pass, generation included)
    result: dict[str, np.ndarray] = {}
    if aggregate is not None:
        results, report["decode_s"] = _flower_inputs(pool, k, seed, case.split("-")[1])
        results = prepare(results)  # -deser: the serialized Parameters only (the ndarrays are dropped)
        report["inputs_mb"] = (_vm_kib("VmRSS") - baseline) * 1024 / 1e6
        for _ in range(repeats):
            result = {}
            flusher()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            watch = _Stopwatch()
            watch.start()
            layers = aggregate(results)
            watch.stop()
            times.append(watch.wall)
            cpu_times.append(watch.cpu)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            result = dict(zip(NAMES, layers, strict=True))
    else:
        for _ in range(repeats):
            result = {}
            flusher()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if case == "numpy-fp32":
                watch, result = _numpy_loop(pool, k, seed, flush)
            else:
                report["workers"] = fedflock_workers(case)
                watch, result = _fedflock(pool, k, seed, case.split("-")[1], flush, report["workers"])
            times.append(watch.wall)
            cpu_times.append(watch.cpu)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    report["times"] = times
    report["cpu_times"] = cpu_times
    report["faults"] = faults
    report["extra_mb"] = (_vm_kib("VmHWM") - baseline) * 1024 / 1e6
    if result_path:
        np.save(result_path, np.concatenate([np.asarray(result[name], dtype=np.float32).ravel() for name in NAMES]))
    return report
