"""The demo's headline numbers: test accuracy per round and wall time, for a few seeds.

Runs ``fedflock demo``'s code (embedded amqtt broker, 20 agents, 10 per round, Dirichlet α = 0.5)
once per seed and prints a markdown table: accuracy per round for every seed, the first round
reaching 90 %, and wall time (export included).

    python benchmarks/demo_rounds.py [--seeds 0 1 2] [--mqtt-url mqtt://127.0.0.1:1883]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedflock.demo import DemoConfig, DemoReport, run_demo


def first_round_at(report: DemoReport, target: float) -> str:
    hits = [r.round for r in report.results if r.test_accuracy is not None and r.test_accuracy >= target]
    return str(hits[0]) if hits else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mqtt-url", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reports = {}
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix=f"fedflock-demo-{seed}-"))
        reports[seed] = run_demo(DemoConfig(seed=seed, out_dir=out, mqtt_url=args.mqtt_url, progress=False))
    print("| round | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---:|" + "---:|" * len(args.seeds))
    for index in range(len(reports[args.seeds[0]].results)):
        cells = []
        for seed in args.seeds:
            accuracy = reports[seed].results[index].test_accuracy
            cells.append("-" if accuracy is None else f"{accuracy:.3f}")
        print(f"| {index + 1} | " + " | ".join(cells) + " |")
    print("| first round ≥ 0.90 | " + " | ".join(first_round_at(reports[s], 0.9) for s in args.seeds) + " |")
    print("| wall time (s) | " + " | ".join(f"{reports[s].wall_s:.1f}" for s in args.seeds) + " |")


if __name__ == "__main__":
    main()
