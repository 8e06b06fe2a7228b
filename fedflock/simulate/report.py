"""What a simulation reports: one row per round (pure), a live progress line, CSV, PNG, JSON."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["COLUMNS", "Progress", "RoundRow", "decline_reasons", "dropouts_in", "write_outputs"]


@dataclass(frozen=True, kw_only=True)
class RoundRow:
    round: int
    completed: bool
    connected: int
    eligible: int
    selected: int
    reported: int
    failed: int
    dropped: int
    bytes_up: int
    bytes_down: int
    test_accuracy: float | None
    duration_s: float
    #: reason code -> online devices that reported it in their last "cannot train" STATUS
    declined: dict[str, int] = field(default_factory=dict)
    #: reason code -> devices that could not upload at the round's end (worker-side check)
    upload_blocked: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        acc = "-" if self.test_accuracy is None else f"{self.test_accuracy:.3f}"
        reasons = _reasons(self.declined)
        blocked = f"  upload blocked: {_reasons(self.upload_blocked)}" if self.upload_blocked else ""
        return (
            f"round {self.round:3d}  connected {self.connected}  eligible {self.eligible}"
            f" (declined: {reasons or 'none'})  selected {self.selected}  reported {self.reported}"
            f"  dropped {self.dropped}  up {_size(self.bytes_up)}  down {_size(self.bytes_down)}"
            f"  accuracy {acc}  {self.duration_s:.1f}s{blocked}"
        )


def _reasons(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items(), key=lambda kv: -kv[1]))


COLUMNS = (
    "round",
    "completed",
    "connected",
    "eligible",
    "selected",
    "reported",
    "failed",
    "dropped",
    "bytes_up",
    "bytes_down",
    "test_accuracy",
    "duration_s",
    "declined",
    "upload_blocked",
)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f}GiB"


def decline_reasons(eligibility: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Count reason codes over devices' last reported train decisions that said "cannot train"."""
    counts: Counter[str] = Counter()
    for decision in eligibility:
        if decision.get("eligible") is False and decision.get("phase") in ("train", "continue"):
            for reason in decision.get("reasons", ()):
                if isinstance(reason, Mapping) and isinstance(reason.get("code"), str):
                    counts[reason["code"]] += 1
    return dict(counts)


def dropouts_in(times: Sequence[float], start: float, end: float) -> int:
    """Dropouts (wall-clock times) inside the round ``(start, end]``."""
    return sum(1 for t in times if start < t <= end)


class Progress:
    """A live status line on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, *, enabled: bool = True) -> None:
        self._stream = stream
        self._enabled = enabled
        self._tty = enabled and stream.isatty()
        self._live = False

    @property
    def is_live(self) -> bool:
        """Whether :meth:`live` shows anything (a terminal)."""
        return self._tty

    def live(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + text)
            self._stream.flush()
            self._live = True

    def line(self, text: str) -> None:
        if not self._enabled:
            return
        if self._live:
            self._stream.write("\r\x1b[2K")
            self._live = False
        self._stream.write(text + "\n")
        self._stream.flush()


def write_outputs(out: Path, rows: Sequence[RoundRow], summary: Mapping[str, Any]) -> dict[str, Path]:
    """``rounds.csv``, ``summary.json``, ``accuracy.png`` and ``participation.png`` in ``out``."""
    paths = {
        "csv": out / "rounds.csv",
        "json": out / "summary.json",
        "accuracy_png": out / "accuracy.png",
        "participation_png": out / "participation.png",
    }
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            values["declined"] = ";".join(f"{k}={v}" for k, v in sorted(row.declined.items()))
            values["upload_blocked"] = ";".join(f"{k}={v}" for k, v in sorted(row.upload_blocked.items()))
            writer.writerow(values)
    paths["json"].write_text(json.dumps({**summary, "rounds": [asdict(r) for r in rows]}, indent=2))
    _plot_accuracy(rows, paths["accuracy_png"])
    _plot_participation(rows, paths["participation_png"])
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(rows: Sequence[RoundRow], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r.round for r in rows]
    ax_acc.plot(rounds, [r.test_accuracy for r in rows], marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy", ylim=(0, 1))
    ax_time.bar(rounds, [r.duration_s for r in rows], color="tab:orange")
    ax_time.set(xlabel="round", ylabel="seconds", title="Round time")
    for axis in (ax_acc, ax_time):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_participation(rows: Sequence[RoundRow], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_part, ax_why) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [r.round for r in rows]
    for name, values in (
        ("connected", [r.connected for r in rows]),
        ("eligible", [r.eligible for r in rows]),
        ("selected", [r.selected for r in rows]),
        ("reported", [r.reported for r in rows]),
        ("dropped", [r.dropped for r in rows]),
    ):
        ax_part.plot(rounds, values, marker=".", label=name)
    ax_part.set(xlabel="round", ylabel="devices", title="Participation")
    ax_part.legend(fontsize=8)
    codes = sorted({code for r in rows for code in r.declined})
    bottom = [0] * len(rows)
    for code in codes:
        values = [r.declined.get(code, 0) for r in rows]
        ax_why.bar(rounds, values, bottom=bottom, label=code)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_why.set(xlabel="round", ylabel="devices", title="Why devices could not train")
    if codes:
        ax_why.legend(fontsize=8)
    for axis in (ax_part, ax_why):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
