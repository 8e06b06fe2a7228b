"""Fault drills at full size (issue #8): more devices, more rounds, more faults than the test suite.

    python benchmarks/drills.py                 # all five drills, full size
    python benchmarks/drills.py --only proxy    # one of: mosquitto server agent proxy disk
    python benchmarks/drills.py --quick         # the test-suite sizes (a smoke run)

Each drill runs real processes (``fedflock agent`` / ``fedflock broker``) against a real
Mosquitto and reads its exactly-once verdict from the server's SQLite store
(``fedflock.drills.report``). Prints one ``DRILL {...}`` JSON line per drill and a table at the
end; exits 1 if any drill lost an update or counted one twice. The disk-full drill needs to
mount a tmpfs (root or CAP_SYS_ADMIN). docs/drills.md explains what each drill proves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from broker_server.mosquitto_process import MosquittoProcess  # noqa: E402
from edge_agent.runtime.bundle import Bundle  # noqa: E402
from fedflock.drills.agent_kill import agent_kill_drill  # noqa: E402
from fedflock.drills.disk_full import disk_full_drill  # noqa: E402
from fedflock.drills.flaky_links import flaky_links_drill  # noqa: E402
from fedflock.drills.mosquitto_kill import mosquitto_kill_drill  # noqa: E402
from fedflock.drills.report import DrillReport  # noqa: E402
from fedflock.drills.server_kill import server_kill_drill  # noqa: E402

#: (full size, quick size) keyword arguments per drill
SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "mosquitto": ({"devices": 8, "rounds": 3}, {"devices": 4, "rounds": 1}),
    "server": ({"devices": 8, "rounds": 3}, {"devices": 4, "rounds": 1}),
    "agent": ({"devices": 3, "rounds": 4, "kills": 3}, {"devices": 1, "rounds": 2, "kills": 2}),
    "proxy": ({"devices": 8, "rounds": 4, "faulty_connections": 60}, {"devices": 3, "rounds": 2}),
    "disk": ({"repeats": 5}, {"repeats": 1}),
}


def mlp_bundle(directory: Path) -> Bundle:
    """The drills' model: the 4-feature MLP of the server tests (exported with torch, ~3 s)."""
    from tests.broker_server.fake_fleet import export_mlp_bundle

    return export_mlp_bundle(directory)


def run_drill(name: str, work: Path, broker: MosquittoProcess, bundle: Bundle, size: dict[str, int]) -> DrillReport:
    runners: dict[str, Callable[[], DrillReport]] = {
        "mosquitto": lambda: mosquitto_kill_drill(work, bundle, **size),
        "server": lambda: server_kill_drill(work, broker, bundle, **size),
        "agent": lambda: agent_kill_drill(work, broker, bundle, **size),
        "proxy": lambda: flaky_links_drill(work, broker, bundle, **size),
        "disk": lambda: disk_full_drill(work, broker, bundle, **size)[0],
    }
    return runners[name]()


def table(reports: list[DrillReport]) -> str:
    head = (
        "| drill | devices | rounds | faults | updates | lost | counted twice | recover s (max) "
        "| reconnects | retransmits | dup. refused | wall s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in reports:
        recover = "n/a" if r.recover_s is None else f"{r.recover_s:.1f}"
        lines.append(
            f"| {r.drill} | {r.devices} | {r.rounds} | {r.faults} | {r.updates_accepted}/{r.updates_issued} "
            f"| {r.lost} | {r.counted_twice} | {recover} | {r.reconnects} | {r.retransmits} "
            f"| {r.duplicates_refused} | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SIZES), action="append", help="run only these drills")
    parser.add_argument("--quick", action="store_true", help="the test-suite sizes")
    args = parser.parse_args()
    names = args.only or list(SIZES)
    reports: list[DrillReport] = []
    with tempfile.TemporaryDirectory(prefix="fedflock-drills-") as tmp:
        root = Path(tmp)
        bundle = mlp_bundle(root / "bundle")
        with MosquittoProcess(root / "mosquitto") as broker:
            for name in names:
                work = root / f"drill-{name}"
                work.mkdir()
                size = SIZES[name][1 if args.quick else 0]
                began = time.monotonic()
                print(f"# {name} drill {size} ...", flush=True)
                report = run_drill(name, work, broker, bundle, size)
                print(report.json_line(), f"({time.monotonic() - began:.0f}s)", flush=True)
                reports.append(report)
    print()
    print(table(reports))
    return 0 if all(r.lost == 0 and r.counted_twice == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
