"""Per-round metrics as CSV, JSON and a PNG plot (people would rather look than read)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from broker_server.server import RoundResult
from edge_agent.runtime.trainer import EvalResult

COLUMNS = (
    "round",
    "model_version",
    "selected",
    "reported",
    "failed",
    "num_examples",
    "duration_s",
    "completed",
    "test_loss",
    "test_accuracy",
    "train_loss",
    "train_accuracy",
)


def _row(result: RoundResult) -> dict[str, object]:
    row = {key: value for key, value in asdict(result).items() if key in COLUMNS}
    row["train_loss"] = result.train_metrics.get("train_loss")
    row["train_accuracy"] = result.train_metrics.get("train_accuracy")
    return row


def write_metrics(out_dir: Path, results: list[RoundResult], *, baseline: EvalResult | None = None) -> dict[str, Path]:
    """Write ``metrics.csv``, ``metrics.json`` and ``accuracy.png`` into ``out_dir``."""
    rows = [_row(r) for r in results]
    paths = {"csv": out_dir / "metrics.csv", "json": out_dir / "metrics.json", "png": out_dir / "accuracy.png"}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot_rounds(results, paths["png"], baseline=baseline)
    return paths


def plot_rounds(results: list[RoundResult], path: Path, *, baseline: EvalResult | None = None) -> None:
    """Accuracy and loss per round; round 0 is the initial model when ``baseline`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in results if r.completed]
    start = [baseline] if baseline is not None else []
    rounds = [0] * len(start) + [r.round for r in done]
    test_acc = [b.accuracy for b in start] + [r.test_accuracy for r in done]
    test_loss = [b.loss for b in start] + [r.test_loss for r in done]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    train_rounds = rounds[len(start) :]
    panels = [
        (ax_acc, test_acc, "train_accuracy", "accuracy", "Accuracy per round", "lower right"),
        (ax_loss, test_loss, "train_loss", "loss", "Loss per round", "upper right"),
    ]
    for axis, test_values, train_key, ylabel, title, legend_at in panels:
        axis.plot(rounds, test_values, marker="o", label="global model, test set")
        train_values = [r.train_metrics.get(train_key) for r in done]
        axis.plot(train_rounds, train_values, marker=".", linestyle="--", label="devices, local training (mean)")
        axis.set(xlabel="round", ylabel=ylabel, title=title)
        axis.grid(alpha=0.3)
        axis.legend(loc=legend_at)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
