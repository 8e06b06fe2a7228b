"""A suite-size ``fedflock simulate``: 40 devices in 2 worker processes, 3 rounds, real Mosquitto."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from fedflock.simulate.run import SimulateConfig, run_simulation


def test_simulated_fleet_completes_rounds_and_writes_its_report(
    mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path
) -> None:
    config = SimulateConfig(
        devices=40,
        per_round=8,
        rounds=3,
        profile="mixed",
        processes=2,
        seed=3,
        mqtt_url=mosquitto.url,
        bundle=digits_bundle.directory,
        out_dir=tmp_path / "sim",
        start_hour=21.0,  # phones home on wifi, some charging, some low: a mix of reasons
        time_scale=120.0,
        round_timeout_s=12.0,
        over_selection=1.25,
        tick_s=1.0,
        topics=Topics(f"sim-{uuid.uuid4().hex[:8]}"),
        progress=False,
    )
    report = run_simulation(config)

    assert [r.round for r in report.rows] == [1, 2, 3]
    assert all(r.completed and r.reported >= 1 for r in report.rows)
    assert all(r.connected >= 38 and r.selected == 10 for r in report.rows)  # ceil(1.25 * 8)
    assert sum(r.bytes_up for r in report.rows) > 0 and sum(r.bytes_down for r in report.rows) > 0
    assert report.rows[-1].test_accuracy is not None and report.rows[-1].test_accuracy > 0.15
    # devices that cannot train say why, and the server's view counts them by reason code
    declined = {code for r in report.rows for code in r.declined}
    assert declined & {"battery_low", "not_charging", "too_hot", "outside_window"}
    assert all(r.eligible <= r.connected for r in report.rows)

    out = config.out_dir
    with open(out / "rounds.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and rows[0]["declined"]
    for png in ("accuracy.png", "participation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and sum(summary["profiles"].values()) == 40
    assert len(summary["workers"]) == 2 and all(w["trained"] >= 1 for w in summary["workers"])
