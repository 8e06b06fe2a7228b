"""Central DP end to end: ``fedflock broker --privacy-option ...`` as a real process, real Mosquitto,
two real agent processes training with onnxruntime. The budget fits exactly two rounds of the
configured noise: the broker runs them, refuses the third, exits 0 and prints the ε it spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_server.privacy import SampledGaussian, epsilon_for
from tests.fixtures import digits_split, write_npz

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
DELTA = 1e-5


def fedflock(*args: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fedflock", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(150)
def test_broker_with_central_dp_stops_when_the_budget_is_spent(mosquitto, digits_bundle, tmp_path) -> None:
    devices, test = digits_split(2, alpha=1.0, seed=5)
    mechanism = SampledGaussian(sampling_rate=2 / 4, noise_multiplier=2.0)
    two, three = epsilon_for(mechanism, 2, DELTA), epsilon_for(mechanism, 3, DELTA)
    budget = (two + three) / 2
    prefix = "dpmosq/v1"
    agents = [
        fedflock(
            "agent",
            "--bundle",
            str(digits_bundle.directory),
            "--data",
            str(write_npz(tmp_path / f"d{i}.npz", data)),
            "--device-id",
            f"dp-agent-{i}",
            "--mqtt-url",
            mosquitto.url,
            "--topic-prefix",
            prefix,
            log=tmp_path / f"agent-{i}.log",
        )
        for i, data in enumerate(devices)
    ]
    out = tmp_path / "out"
    privacy = {"epsilon": budget, "delta": DELTA, "clip_norm": 1.0, "population": 4, "noise_multiplier": 2.0}
    try:
        server = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedflock",
                "broker",
                "--bundle",
                str(digits_bundle.directory),
                "--mqtt-url",
                mosquitto.url,
                "--topic-prefix",
                prefix,
                "--rounds",
                "10",
                "--clients-per-round",
                "2",
                "--min-clients",
                "2",
                "--local-epochs",
                "1",
                "--round-timeout",
                "60",
                "--wait-for-clients",
                "60",
                "--codecs",
                "fp32",
                "--test-data",
                str(write_npz(tmp_path / "test.npz", test)),
                "--out",
                str(out),
                *[f"--privacy-option={key}={value!r}" for key, value in privacy.items()],
            ],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=130,
        )
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=20)
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(2))
    assert server.returncode == 0, server.stdout + server.stderr + logs
    assert f"2/3 rounds completed; metrics in {out}" in server.stdout, server.stdout
    assert f"central DP: ε={two:.4f} spent of {budget:g}" in server.stdout, server.stdout
    assert "privacy budget spent" in server.stdout and "2 rounds charged" in server.stdout
    results = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["completed"]) for r in results] == [(1, True), (2, True), (3, False)], results
    assert "privacy budget spent" in results[-1]["reason"]
    assert logs.count("trained") == 4, logs  # no task went out for round 3
    assert sorted(p.name for p in (out / "models").iterdir()) == ["v000000", "v000001", "v000002"]
