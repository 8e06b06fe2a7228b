"""`fedflock demo` exactly as the README runs it: the headline numbers must hold."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedflock.datasets import dirichlet_partition, train_test_split

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_demo_reaches_90_percent_within_20_rounds_on_the_embedded_broker(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fedflock", "demo", "--out", str(out), "--no-progress"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy"] >= 0.90, summary
    assert summary["wall_s"] < 180, summary
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == list(range(1, 21))
    assert all(r["reported"] == "10" and r["selected"] == "10" for r in rows)
    assert max(float(r["test_accuracy"]) for r in rows) >= 0.90
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "models").iterdir())) == 21
    assert "final test accuracy" in proc.stdout


def test_dirichlet_partition_is_a_partition_and_small_alpha_is_skewed() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(y, 20, 0.5, rng, min_size=8)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(len(y)))
    assert min(len(p) for p in parts) >= 8
    skewed = np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])
    iid = np.mean(
        [np.bincount(y[p], minlength=10).max() / len(p) for p in dirichlet_partition(y, 20, 1000.0, rng, min_size=8)]
    )
    assert skewed > 2 * iid  # the dominant class share is much larger when non-IID


def test_train_test_split_is_stratified() -> None:
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = train_test_split(y, 0.2, np.random.default_rng(1))
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    np.testing.assert_array_equal(np.bincount(y[test]), [2, 4, 6, 8])


@pytest.mark.timeout(180)
def test_demo_runs_against_an_external_mosquitto(mosquitto, digits_bundle, tmp_path, monkeypatch) -> None:
    import fedflock.demo as demo

    monkeypatch.setattr(demo, "export_demo_bundle", lambda out_dir, *, lr: digits_bundle)  # export tested above
    report = demo.run_demo(
        demo.DemoConfig(
            devices=4,
            per_round=2,
            rounds=3,
            mqtt_url=mosquitto.url,
            out_dir=tmp_path,
            topics=demo.Topics("demo-ext/v1"),
            progress=False,
        )
    )
    assert [r.completed for r in report.results] == [True, True, True]
    assert all(r.reported == 2 for r in report.results)
    assert report.final_accuracy is not None and report.final_accuracy > 0.3
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "accuracy.png").exists()
