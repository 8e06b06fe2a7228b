"""Server-side aggregation of K updates: fedflock's streaming fold vs Flower's ``aggregate`` (issue #6).

The model is a ~1.0M-parameter MNIST-sized CNN (8 tensors, float32). For each K (default 200
and 1000) the same K updates (seeded: update ``i`` depends only on ``--seed`` and ``i``) go
through seven cases, each in a fresh subprocess so its peak RSS is its own:

* **fedflock fp32 / int8**: ``WeightedMean.add_encoded`` on FFCU payloads, the server's real
  path (encoded bytes in, one float64 accumulator per tensor). Updates are *streamed*: a
  generator makes update ``i``, encodes it and drops the float copy; the server folds it; the
  payload is dropped. Only the fold calls (plus the final ``result()``) are timed. Each codec
  runs twice: with one fold thread (``WeightedMean(workers=1)``) and (``-mt``) with the default,
  one thread per usable CPU up to 4. Flower's ``aggregate`` is single-threaded numpy; the
  multi-thread rows use more of the machine, the single-thread rows compare like with like.
* **Flower fp32**: ``flwr.server.strategy.aggregate.aggregate(results)`` with ``results`` the
  list of ``(NDArrays, num_examples)`` pairs its signature demands, so all K decoded updates are
  resident before the (timed) call.
* **Flower int8**: Flower has no int8 path; the same int8 payloads are decoded to float32 first
  (``decode_update``, not timed: Flower's time excludes the decode, which favours Flower) and
  then aggregated as above.
* **Flower fp32 / int8, deserialize + aggregate**: what Flower's server really receives is one
  serialized ``Parameters`` per client (the bytes ``flwr.common.ndarrays_to_parameters`` makes);
  the timed call is ``parameters_to_ndarrays`` on every result, then ``aggregate``. Flower has no
  int8 wire format, so the int8 row serializes the int8-decoded float32 arrays.
* **numpy loop**: the bandwidth reference, ``acc += w * x`` in float64 over already-decoded
  float32 updates, streamed like fedflock's.

Cache: before every timed aggregation a 2x-L3-sized buffer is rewritten (``--flush once``), so
every case starts cold; a streamed update is then folded right after it was made, as on a server
where it was just received (making and encoding it is the traffic between two folds). Flower's
K x 4 MB inputs cannot be cache-resident whatever is done. ``--flush each`` also flushes before
every single fold (pessimistic for the streamed cases: the accumulator starts cold each time).

*Wall s*: best and median of ``--repeats`` of the whole aggregation of K updates; speed-ups are
given best vs best and median vs median. *MB/s*: fp32-equivalent
input (K x parameters x 4 B, 1 MB = 10**6 B) per second. *Extra RSS*: the child's kernel peak
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the baseline is taken) minus its
baseline RSS after imports and set-up; the benchmark's own noise pool and cache-flush buffer
are allocated before the baseline, while the in-flight update (float copy and payload) counts.
For Flower the resident inputs count: its API requires them. Every timed pass also records its
minor page faults: Flower's calls swing by 10-20x depending on whether glibc hands its K weighted
copies already-mapped memory (no faults) or fresh pages, so all runs are printed, not only the best.

    python benchmarks/aggregation.py [--ks 200 1000] [--repeats 3] [--seed 0] [--flush once|each]

Run it in an environment with ``flwr`` installed; without it the Flower rows are skipped with
a loud warning and the fedflock rows still print.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.aggregation_cases import CASES, PARAMS, SHAPES, child, l3_bytes  # noqa: E402
from edge_agent.codecs.workers import default_workers  # noqa: E402

FLOWER_BYTES_PER_UPDATE = 2.2 * PARAMS * 4  # inputs + aggregate's weighted copies + slack
FLOWER_DESER_BYTES_PER_UPDATE = 3.4 * PARAMS * 4  # bytes + deserialized arrays + weighted copies + slack
RSS_GOAL_MB = 200.0
SPEED_GOAL = 5.0
BANDWIDTH_GOAL = 0.5


# --------------------------------------------------------------------------- parent side


def _flower_probe() -> tuple[str | None, str | None]:
    """(flwr version, None) if Flower's aggregate imports here, else (None, reason)."""
    try:
        import flwr
        from flwr.server.strategy.aggregate import aggregate  # noqa: F401
    except ImportError as exc:  # flwr (or one of its dependencies) is not installed here
        return None, f"{type(exc).__name__}: {exc}"
    return flwr.__version__, None


def _run_child(case: str, k: int, args: argparse.Namespace, result_path: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--ks", str(k)]
    command += ["--seed", str(args.seed), "--repeats", str(args.repeats), "--result", result_path]
    command += ["--flush", args.flush]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"case": case, "k": k, "error": f"child exited {done.returncode}: {done.stderr.strip()[-2000:]}"}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["child_s"] = time.monotonic() - started
    return report


def _flower_k(k: int, case: str) -> int:
    """The largest K <= k whose Flower inputs and working copies fit in 80 % of available RAM."""
    available = psutil.virtual_memory().available * 0.8
    per_update = FLOWER_DESER_BYTES_PER_UPDATE if case.endswith("-deser") else FLOWER_BYTES_PER_UPDATE
    return max(1, min(k, int(available // per_update)))


def _machine() -> str:
    memory = psutil.virtual_memory()
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} CPUs, L3 {l3_bytes() >> 20} MiB, RAM {memory.total / 2**30:.1f} GiB "
        f"({memory.available / 2**30:.1f} GiB available), load average {load}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, numpy {np.__version__}"
    )


def _fmt_mb(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


LABELS = {
    "fedflock-fp32": ("fedflock `WeightedMean.add_encoded` (FFCU bytes in), 1 thread", "fp32"),
    "fedflock-fp32-mt": (f"fedflock `WeightedMean.add_encoded` (FFCU bytes in), {default_workers()} threads", "fp32"),
    "fedflock-int8": ("fedflock `WeightedMean.add_encoded` (FFCU bytes in), 1 thread", "int8"),
    "fedflock-int8-mt": (f"fedflock `WeightedMean.add_encoded` (FFCU bytes in), {default_workers()} threads", "int8"),
    "flower-fp32": ("Flower `aggregate` (ndarrays resident)", "fp32"),
    "flower-int8": ("Flower `aggregate` (int8 decoded first, not timed)", "int8"),
    "flower-fp32-deser": ("Flower `parameters_to_ndarrays` + `aggregate` (bytes in)", "fp32"),
    "flower-int8-deser": ("Flower `parameters_to_ndarrays` + `aggregate` (int8 decoded, sent as fp32)", "int8"),
    "numpy-fp32": ("numpy loop `acc += w * x` (float64)", "fp32"),
}
FLOWER_CASES = ("flower-{codec}", "flower-{codec}-deser")
FEDFLOCK_CASES = (("fedflock-{codec}", "1 thread"), ("fedflock-{codec}-mt", f"{default_workers()} threads"))


def _per_update(
    reports: dict[tuple[str, int], dict], case: str, k: int, stat: str = "best", clock: str = "wall"
) -> float | None:
    """Wall (or CPU) seconds per update of ``case`` at ``k``, best or median of its runs (None if it did not run)."""
    report = reports.get((case, k), {})
    if "times" not in report:
        return None
    pick = min if stat == "best" else statistics.median
    return float(pick(report["times" if clock == "wall" else "cpu_times"])) / report["k"]


def _table(reports: dict[tuple[str, int], dict], ks: list[int]) -> list[str]:
    """Per case: wall seconds (best, median, all runs), bandwidth, extra RSS, share of the numpy loop."""
    mb = PARAMS * 4 / 1e6
    columns = [
        "K",
        "path",
        "codec",
        "best s",
        "median s",
        "all runs s",
        "CPU s best / median",
        "MB/s fp32-equiv (best)",
    ]
    columns += ["extra RSS MB", "of numpy-loop MB/s (best)"]
    lines = ["| " + " | ".join(columns) + " |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ks:
        numpy_rate = _per_update(reports, "numpy-fp32", k)
        for case in CASES:
            path, codec = LABELS[case]
            report = reports.get((case, k), {})
            if "times" not in report:
                lines.append(f"| {k} | {path} | {codec} | not run: {report.get('error', 'skipped')[:80]} | | | | | | |")
                continue
            ran_k = report["k"]
            cpu = [_per_update(reports, case, k, stat, "cpu") or 0.0 for stat in ("best", "median")]
            best, median = _per_update(reports, case, k), _per_update(reports, case, k, "median")
            assert best is not None and median is not None
            shown_k = f"{k}" if ran_k == k else f"{k} (ran {ran_k}, scaled)"
            extra = _fmt_mb(report["extra_mb"])
            if case.startswith("flower"):
                extra += f" (inputs {_fmt_mb(report['inputs_mb'])})"
            runs = " / ".join(f"{t:.3f}" for t in report["times"])
            fraction = f"{numpy_rate / best:.0%}" if numpy_rate else "n/a"
            cells = [shown_k, path, codec, f"{best * k:.3f}", f"{median * k:.3f}", runs]
            cells += [f"{cpu[0] * k:.3f} / {cpu[1] * k:.3f}", f"{mb / best:,.0f}"]
            lines.append("| " + " | ".join([*cells, extra, fraction]) + " |")
    return lines


def _ratio_table(reports: dict[tuple[str, int], dict], ks: list[int]) -> list[str]:
    """fedflock's speed-up over each Flower case: best vs best and median vs median, wall and CPU time."""
    columns = ["K", "codec", "fedflock", "clock", "vs `aggregate` best/best", "vs `aggregate` median/median"]
    columns += ["vs deserialize + `aggregate` best/best", "vs deserialize + `aggregate` median/median"]
    lines = ["| " + " | ".join(columns) + " |", "|---:|---|---|---|---:|---:|---:|---:|"]
    for k in ks:
        for codec in ("fp32", "int8"):
            for ours, threads in FEDFLOCK_CASES:
                for clock in ("wall", "cpu"):
                    cells = [str(k), codec, threads, clock]
                    for pattern in FLOWER_CASES:
                        for stat in ("best", "median"):
                            theirs = _per_update(reports, pattern.format(codec=codec), k, stat, clock)
                            mine = _per_update(reports, ours.format(codec=codec), k, stat, clock)
                            cells.append(f"{theirs / mine:.1f}x" if theirs and mine else "n/a")
                    lines.append("| " + " | ".join(cells) + " |")
    return lines


def _checks(result_dir: Path, ks: list[int], reports: dict[tuple[str, int], dict]) -> list[str]:
    """fedflock's mean vs Flower's and the numpy loop's on the same updates (same K only)."""
    lines = []
    pairs = [("fedflock-fp32", "flower-fp32"), ("fedflock-int8", "flower-int8"), ("fedflock-fp32", "numpy-fp32")]
    pairs += [("fedflock-fp32-mt", "fedflock-fp32"), ("fedflock-int8-mt", "fedflock-int8")]  # threads: same bits
    pairs += [("flower-fp32", "flower-fp32-deser"), ("flower-int8", "flower-int8-deser")]
    for k in ks:
        for ours, theirs in pairs:
            a, b = reports.get((ours, k), {}), reports.get((theirs, k), {})
            if "times" not in a or "times" not in b or a["k"] != b["k"]:
                continue
            x = np.load(result_dir / f"{ours}-{k}.npy")
            y = np.load(result_dir / f"{theirs}-{k}.npy")
            diff = float(np.max(np.abs(x.astype(np.float64) - y)))
            scale = float(np.max(np.abs(y)))
            lines.append(f"K={k}: {ours} vs {theirs}: max |diff| {diff:.2e} (max |value| {scale:.2e})")
    return lines


def _goals(reports: dict[tuple[str, int], dict], ks: list[int]) -> list[str]:
    lines = []
    for k in ks:
        numpy_rate = _per_update(reports, "numpy-fp32", k)
        for codec, (pattern_ours, threads) in ((c, f) for c in ("fp32", "int8") for f in FEDFLOCK_CASES):
            case_ours = pattern_ours.format(codec=codec)
            ours = reports.get((case_ours, k), {})
            if "times" not in ours:
                continue
            parts = []
            for pattern in FLOWER_CASES:
                case = pattern.format(codec=codec)
                ratios = []
                for stat in ("best", "median"):
                    theirs, mine = (
                        _per_update(reports, case, k, stat),
                        _per_update(reports, case_ours, k, stat),
                    )
                    if theirs and mine:
                        ratios.append((stat, theirs / mine))
                if not ratios:
                    parts.append(f"{case}: not measured")
                    continue
                verdicts = ", ".join(
                    f"{stat} {ratio:.1f}x {'met' if ratio >= SPEED_GOAL else 'NOT met'}" for stat, ratio in ratios
                )
                parts.append(f">= {SPEED_GOAL:.0f}x {case}: {verdicts}")
            rss_ok = ours["extra_mb"] <= RSS_GOAL_MB
            parts.append(f"extra RSS <= 0.2 GB: {'met' if rss_ok else 'NOT met'} ({ours['extra_mb']:.1f} MB)")
            rate = _per_update(reports, case_ours, k)
            if numpy_rate and rate:
                share = numpy_rate / rate
                parts.append(f">= 50% of numpy loop: {'met' if share >= BANDWIDTH_GOAL else 'NOT met'} ({share:.0%})")
            lines.append(f"K={k} {codec} ({threads}): " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (best and median are reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--flush",
        choices=("once", "each"),
        default="once",
        help="rewrite a 2x-L3 buffer before every timed aggregation (once, default) or, for the streamed "
        "cases, before every single fold (each: pessimistic, the accumulator starts cold every update)",
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.ks[0], args.seed, args.repeats, args.result, args.flush)))
        return

    started = time.monotonic()
    flwr_version, flwr_error = _flower_probe()
    command = " ".join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"machine: {_machine()}")
    print(f"flwr: {flwr_version or 'NOT INSTALLED'} (its `aggregate` is single-threaded numpy)")
    print(f"fedflock fold threads: 1, and {default_workers()} in the -mt rows (the usable CPUs, at most 4)")
    print(
        f"model: {PARAMS:,} parameters ({PARAMS * 4 / 1e6:.2f} MB fp32) in {len(SHAPES)} tensors; "
        f"seed {args.seed}; best and median of {args.repeats}; "
        + f"cache flushed ({2 * l3_bytes() >> 20} MiB buffer) "
        + (
            "before every timed aggregation; a streamed update is folded right after it is made\n"
            if args.flush == "once"
            else "before every single fold of the streamed cases and before Flower's call\n"
        )
    )
    if flwr_error:
        banner = "!" * 78
        print(
            f"{banner}\n!! Flower NOT importable ({flwr_error});\n!! Flower rows are skipped, "
            f"no speed ratios. Install flwr to run the comparison.\n{banner}\n",
            flush=True,
        )
        print(f"{banner}\n!! Flower NOT importable: {flwr_error}\n{banner}", file=sys.stderr, flush=True)

    reports: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="ff-aggregation-") as tmp:
        result_dir = Path(tmp)
        for k in args.ks:
            for case in args.cases:
                run_k = k
                if case.startswith("flower"):
                    if flwr_error:
                        reports[(case, k)] = {"case": case, "k": k, "error": "flwr not importable"}
                        continue
                    run_k = _flower_k(k, case)
                    if run_k < k:
                        print(
                            f"note: {case} at K={k} does not fit in 80 % of available RAM; "
                            f"running K={run_k} (largest that fits) and scaling linearly",
                            flush=True,
                        )
                report = _run_child(case, run_k, args, str(result_dir / f"{case}-{k}.npy"))
                reports[(case, k)] = report
                if "times" in report:
                    print(
                        f"  {case} K={run_k}: best {min(report['times']):.3f} s of "
                        f"{', '.join(f'{t:.3f}' for t in report['times'])} (minor faults {report['faults']}); "
                        f"extra RSS {report['extra_mb']:.1f} MB; "
                        f"child wall {report['child_s']:.0f} s"
                        + (f"; decode {report['decode_s']:.2f} s (not timed)" if report.get("decode_s") else ""),
                        flush=True,
                    )
                else:
                    print(f"  {case} K={run_k}: {report['error']}", flush=True)
        checks = _checks(result_dir, args.ks, reports)

    print()
    print("\n".join(_table(reports, args.ks)))
    print()
    print("fedflock speed-up (Flower seconds / fedflock seconds per update; wall and CPU time):\n")
    print("\n".join(_ratio_table(reports, args.ks)))
    print()
    print("\n".join(checks))
    print()
    print("\n".join(_goals(reports, args.ks)))
    if any(not report.get("peak_reset", True) for report in reports.values()):
        print("warning: /proc/self/clear_refs refused; peaks include import-time memory")
    if flwr_error:
        print(f"\n!! Flower NOT importable ({flwr_error}): no comparison was made.")
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
