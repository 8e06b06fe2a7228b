"""Byzantine robustness on digits: clean FedAvg, attacked FedAvg and each robust rule, one script run.

The federation of ``tests/broker_server/test_byzantine_digits.py`` (the real server over the
in-memory transport, ten devices training a digits MLP with onnxruntime, two of them Byzantine;
see :mod:`tests.broker_server.byzantine_fleet`), for every attack (Gaussian noise σ=10, sign flip
×−4, ×100 scaling) and every rule (median, trimmed mean β=0.2, Multi-Krum f=2 m=5, norm clipping
2.0, and plain Krum f=2 m=1 for comparison). Prints a markdown table of final test accuracy and
the difference to the clean FedAvg run in points, per data seed and Dirichlet ``alpha``.

    python benchmarks/robust.py [--seeds 0 1 2] [--alpha 10 1] [--rounds 20]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.runtime.bundle import Bundle
from tests.broker_server.byzantine_fleet import (
    ATTACKS,
    NUM_BYZANTINE,
    NUM_DEVICES,
    ROUNDS,
    RULES,
    Attack,
    TrainingCache,
    digits_task,
    export_digits_mlp,
    final_accuracy,
    run_federation,
    trainer_for,
)

#: the rules of the test, plus single Krum (it averages one update: slower to converge on non-IID data)
BENCH_RULES = {**RULES, "krum": {"rule": "krum", "f": NUM_BYZANTINE, "m": 1}}
COMPARED: dict[str, dict[str, Any]] = {"fedavg": {}, **BENCH_RULES}
COLUMNS = list(COMPARED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="data split seeds")
    parser.add_argument("--alpha", type=float, nargs="+", default=[10.0], help="Dirichlet concentrations")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_digits_mlp(Path(tmp) / "bundle")
        cache = TrainingCache(trainer_for(bundle))
        for alpha in args.alpha:
            for seed in args.seeds:
                rows += run_split(bundle, cache, alpha=alpha, seed=seed, rounds=args.rounds)
                print(f"alpha {alpha:g} seed {seed}: done ({time.perf_counter() - started:.0f}s)", flush=True)
    print_table(rows, args)
    print(f"\n{cache.trained} trainings, {cache.reused} reused from the cache; {time.perf_counter() - started:.0f}s")


Row = tuple[float, int, str, float, dict[str, float]]


def run_split(bundle: Bundle, cache: TrainingCache, *, alpha: float, seed: int, rounds: int) -> list[Row]:
    """The clean run, then every attack against FedAvg and each rule, on one data split."""
    shards, test = digits_task(alpha=alpha, seed=seed)

    def accuracy(robust: dict[str, Any], attack: Attack | None) -> float:
        return final_accuracy(run_federation(bundle, shards, test, cache, robust=robust, attack=attack, rounds=rounds))

    clean = accuracy({}, None)
    return [
        (alpha, seed, attack.describe(), clean, {name: accuracy(table, attack) for name, table in COMPARED.items()})
        for attack in ATTACKS.values()
    ]


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\nDigits MLP, {NUM_DEVICES} devices ({NUM_BYZANTINE} Byzantine = 20 %), {args.rounds} rounds, "
        "real server (in-memory transport), final test accuracy % (Δ vs clean FedAvg, points)\n"
    )
    print("| α | seed | attack | clean FedAvg | " + " | ".join(COLUMNS) + " |")
    print("|---:|---:|---|---:|" + "---:|" * len(COLUMNS))
    for alpha, seed, attack, clean, accuracies in rows:
        cells = [f"{accuracies[c] * 100:.1f} ({(accuracies[c] - clean) * 100:+.1f})" for c in COLUMNS]
        print(f"| {alpha:g} | {seed} | {attack} | {clean * 100:.1f} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        worst = {c: min((r[4][c] - r[3]) * 100 for r in rows) for c in COLUMNS}
        mean = {c: statistics.mean((r[4][c] - r[3]) * 100 for r in rows) for c in COLUMNS}
        print("| | | worst Δ | | " + " | ".join(f"{worst[c]:+.1f}" for c in COLUMNS) + " |")
        print("| | | mean Δ | | " + " | ".join(f"{mean[c]:+.1f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
