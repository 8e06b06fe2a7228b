"""`fedflock agent status --config` and the agent command's refusals, in process (no broker needed)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.device import probes
from edge_agent.device.probes import PowerReading
from edge_agent.errors import StorageFull
from edge_agent.ota import ModelStore
from edge_agent.store import DeviceStore
from fedflock.cli import main
from tests.fixtures import digits_split, write_npz

#: A policy whose every check passes on any Linux machine: nothing required, every unknown allowed.
RELAXED_POLICY = """
[policy]
min_free_memory_mb = 0
min_free_disk_mb = 0
max_temperature_c = 150
unmetered_for = []
require_network_for = []

[policy.unknown]
battery = "allow"
charging = "allow"
memory = "allow"
"""

#: Only on the charger (which these tests make unknown), and more free disk than any machine has.
CHARGER_ONLY_POLICY = """
[policy]
require_charging = true
min_free_disk_mb = 1e12
min_free_memory_mb = 0
max_temperature_c = 150
unmetered_for = []
require_network_for = []

[policy.unknown]
charging = "deny"
memory = "allow"
"""


def write_config(tmp_path: Path, bundle_dir: Path, policy: str = RELAXED_POLICY) -> Path:
    devices, _ = digits_split(2)
    data = write_npz(tmp_path / "d0.npz", devices[0])
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "cli-status-01"\ndevice_class = "pi"\nstate_dir = "state"\nbundle = "{bundle_dir}"\n\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\n\n[data]\nkind = "npz"\npath = "{data.name}"\n{policy}',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def unknown_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """No battery and no charger, on any machine running the tests."""
    monkeypatch.setattr(probes, "read_power", lambda root, ps: PowerReading())


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """`fedflock agent --config` installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def phase_lines(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (train|download|upload) +(.*)$", out, re.M)}


def test_status_before_the_agent_ever_ran(digits_bundle, tmp_path, capsys) -> None:
    config = write_config(tmp_path, digits_bundle.directory)
    assert main(["agent", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"device cli-status-01 (pi), state in {tmp_path / 'state'}\n"), out
    assert re.search(r"^  battery \w+.*, cpu \d+%, .*memory free \d+ MB", out, re.M), out  # cpu measured, not unknown
    assert re.search(r"^  network \w+ \(", out, re.M), out
    assert phase_lines(out) == {"train": "eligible", "download": "eligible", "upload": "eligible"}, out
    assert "queues: no store yet (the agent has not run)" in out
    assert "model: none installed yet" in out
    assert not (tmp_path / "state").exists()  # status only looks


def test_status_json_has_the_documented_keys(digits_bundle, tmp_path, capsys) -> None:
    config = write_config(tmp_path, digits_bundle.directory)
    assert main(["agent", "status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"device_id", "device_state", "eligibility", "queues", "model"}
    assert report["device_id"] == "cli-status-01"
    state = report["device_state"]
    assert {"taken_at", "battery_percent", "charging", "cpu_load", "memory_available_bytes", "network"} <= set(state)
    assert isinstance(state["cpu_load"], float) and 0.0 <= state["cpu_load"] <= 1.0  # two samples, 0.5 s apart
    assert state["memory_available_bytes"] > 0
    assert set(state["network"]) == {"interface", "kind", "metered", "link_up"}
    assert report["eligibility"] == [
        {"phase": phase, "eligible": True, "reasons": []} for phase in ("train", "download", "upload")
    ]
    assert report["queues"] is None and report["model"] is None


def test_a_denying_policy_shows_each_phases_reasons(digits_bundle, tmp_path, capsys, unknown_power) -> None:
    config = write_config(tmp_path, digits_bundle.directory, policy=CHARGER_ONLY_POLICY)
    assert main(["agent", "status", "--config", str(config)]) == 0
    lines = phase_lines(capsys.readouterr().out)
    assert all(line.startswith("not eligible: charging unknown (policy: deny)") for line in lines.values()), lines
    # the disk check applies to training and downloads, not to uploads (they free space)
    assert "disk" in lines["train"] and "MB free <" in lines["download"], lines
    assert "disk" not in lines["upload"], lines

    assert main(["agent", "status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    codes = {d["phase"]: [r["code"] for r in d["reasons"]] for d in report["eligibility"]}
    assert codes == {
        "train": ["charging_unknown", "disk_low"],
        "download": ["charging_unknown", "disk_low"],
        "upload": ["charging_unknown"],
    }
    assert all(d["eligible"] is False for d in report["eligibility"])


def test_status_reads_the_store_and_model_without_touching_them(digits_bundle, tmp_path, capsys) -> None:
    """What the agent left behind, shown as is; no model-store recovery (the agent may be mid-install)."""
    config = write_config(tmp_path, digits_bundle.directory)
    state = tmp_path / "state"
    models = ModelStore(state / "models").open()
    assert models.install_directory(1, digits_bundle.directory, validate=lambda bundle: None).ok
    in_progress = state / "models" / "staging" / "2-0123456789ab"
    in_progress.mkdir()
    with DeviceStore.open(state / "agent.db") as store:
        store.put_task("t-1", 1, b"task", 0.0, 4e9)
        store.put_result("t-1", 1, b"result", 4e9)
        store.put_task("t-2", 2, b"task", 0.0, 4e9)
    assert main(["agent", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "queues: 1 tasks waiting, 1 results to upload, 0 delivered kept; store " in out, out
    assert f"model: v1 {digits_bundle.digest[:12]}… ({state / 'models' / 'versions'}/1-" in out, out
    assert in_progress.is_dir()  # ModelStore.open() would have deleted it


def test_flags_of_the_quick_start_are_refused_next_to_config(tmp_path, capsys) -> None:
    config = str(tmp_path / "agent.toml")  # never read: the flags are refused first
    assert main(["agent", "--config", config, "--bundle", "b"]) == 2
    assert "error [config_error]: --config replaces --bundle: set bundle in the config file" in capsys.readouterr().err
    assert main(["agent", "--config", config, "--mqtt-url", "mqtt://b:1883"]) == 2
    assert "--config replaces --mqtt-url: set [mqtt] url in the config file" in capsys.readouterr().err
    assert main(["agent", "status", "--config", config, "--max-tasks", "1"]) == 2
    assert "--max-tasks works only without --config" in capsys.readouterr().err
    assert main(["agent", "--config", config, "--json"]) == 2
    assert "--json goes with `fedflock agent status`" in capsys.readouterr().err


def test_status_without_config_is_refused(capsys) -> None:
    assert main(["agent", "status"]) == 2
    assert "error [config_error]: fedflock agent status needs --config agent.toml" in capsys.readouterr().err
    assert main(["agent"]) == 2
    assert "needs --config agent.toml, or all of --bundle, --data and --device-id" in capsys.readouterr().err


def test_config_errors_reach_the_user_with_their_key(tmp_path, capsys) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "x"\nbundle = "b"\ncolour = "red"\n[data]\nkind = "npz"\npath = "d.npz"\n')
    assert main(["agent", "status", "--config", str(config)]) == 2
    assert "fedflock agent: error [config_error]: unknown key colour" in capsys.readouterr().err


def test_a_state_dir_that_cannot_be_created_is_a_clear_error(tmp_path, capsys, restore_signals) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "x"\nbundle = "b"\nstate_dir = "a-file/state"\n[data]\nkind = "npz"\npath = "d"\n')
    assert main(["agent", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"error [storage_error]: cannot create state_dir {tmp_path / 'a-file' / 'state'}: Not a directory" in err


def test_a_full_disk_pauses_the_agent_instead_of_ending_it() -> None:
    from fedflock.agent_cli import serve

    class FillsUpOnce:
        def __init__(self) -> None:
            self.runs = 0

        def run(self, stop: threading.Event) -> None:
            self.runs += 1
            if self.runs == 1:
                raise StorageFull("device storage full: could not commit in agent.db")

    agent, stop = FillsUpOnce(), threading.Event()
    started = time.monotonic()
    serve(agent, stop, retry_s=0.05)
    assert agent.runs == 2  # served again after the pause, and returned when run() returned
    assert time.monotonic() - started >= 0.05


def test_a_stop_during_the_full_disk_pause_ends_the_agent() -> None:
    from fedflock.agent_cli import serve

    class AlwaysFull:
        runs = 0

        def run(self, stop: threading.Event) -> None:
            self.runs += 1
            stop.set()  # SIGTERM arrives while the disk is full
            raise StorageFull("device storage full")

    agent = AlwaysFull()
    serve(agent, threading.Event(), retry_s=30)
    assert agent.runs == 1
