"""deploy/device/install.sh and uninstall.sh, run for real under ``--root``, and the systemd unit.

What this proves: on this machine (x86-64, Debian 12, Python 3.11) the script builds the venv
the ``--system-onnxruntime`` way (``--system-site-packages`` over the interpreter's onnxruntime,
the agent wheel with ``--no-deps``, then numpy/paho-mqtt/psutil, satisfied offline from the
system site-packages), the installed ``fedflock`` imports the agent from the venv without torch,
the files land with their modes, a re-run upgrades in place and never overwrites an edited
config, and ``systemd-analyze verify`` accepts the unit with its ExecStart pointing at the staged
binary. The default path (a venv of its own, ``pip install 'fedflock[agent]'`` from an index)
needs the network, so it is checked as a dry run, action by action. Not proven here: the user
creation, chown and systemctl steps (printed, skipped under --root), and any ARM machine.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_agent_config

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / "deploy" / "device"
INSTALL, UNINSTALL = DEVICE / "install.sh", DEVICE / "uninstall.sh"
UNIT = "fedflock-agent.service"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline from a copy of the checkout (the build writes no files in it)."""
    source = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("edge_agent", "broker_server", "model_export", "fedflock"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            out,
            source,
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("fedflock-*.whl")
    return built


def _run(script: Path, *args: str | Path, systemd: str = "252") -> subprocess.CompletedProcess[str]:
    # PIP_NO_COMPILE: no .pyc for the whole project in every run (speed only; imports work without)
    env = {**os.environ, "FEDFLOCK_SYSTEMD_VERSION": systemd, "PIP_NO_COMPILE": "1"}
    return subprocess.run(
        ["bash", script, *map(str, args)], capture_output=True, text=True, env=env, cwd="/", timeout=120
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_upgrade_verify_and_uninstall_under_a_root(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "agent.toml"
    shutil.copy(DEVICE / "agent.toml.example", config)
    common = ("--root", root, "--from", wheel, "--no-index", "--system-onnxruntime")

    first = _run(INSTALL, *common, "--config", config, systemd="255")
    assert first.returncode == 0, first.stderr + first.stdout
    venv = root / "opt/fedflock/venv"
    for skipped in ("useradd --system", "chown fedflock:fedflock", "systemctl daemon-reload", "systemctl restart"):
        assert f"skip (--root): {skipped}" in first.stdout
    probe = subprocess.run(
        [venv / "bin/python", "-I", "-c", "import sys, edge_agent.agent, fedflock.cli; "
         "print(edge_agent.agent.__file__); print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd="/",
    )  # fmt: skip
    where, torch_loaded = probe.stdout.split()
    assert Path(where).is_relative_to(venv) and torch_loaded == "False"
    assert "agent" in subprocess.run([venv / "bin/fedflock", "--help"], capture_output=True, text=True).stdout
    installed = root / "etc/fedflock/agent.toml"
    assert installed.read_bytes() == config.read_bytes() and _mode(installed) == 0o640
    assert load_agent_config(installed).device_id == "pi-kitchen-01"
    assert _mode(root / "etc/fedflock") == 0o750 and _mode(root / "var/lib/fedflock") == 0o750
    unit = root / "etc/systemd/system" / UNIT
    assert unit.read_bytes() == (DEVICE / UNIT).read_bytes()
    assert (root / f"etc/systemd/system/{UNIT}.d/backoff.conf").is_file()  # systemd 255 gets the backoff

    # a re-run (an upgrade) keeps the venv and never overwrites an edited config: first as a dry run
    python_inode = (venv / "bin/python").lstat().st_ino
    config.write_text(config.read_text().replace("pi-kitchen-01", "pi-garage-02"))
    planned = _run(INSTALL, *common, "--config", config, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "upgrading in place" in planned.stdout and "--replace-config overwrites it" in planned.stdout
    assert f"+ install -m 0640 {config} {installed}" not in planned.stdout
    replaced = _run(INSTALL, *common, "--config", config, "--replace-config", "--no-start")
    assert replaced.returncode == 0, replaced.stderr
    assert "upgrading in place" in replaced.stdout and (venv / "bin/python").lstat().st_ino == python_inode
    assert load_agent_config(installed).device_id == "pi-garage-02"
    assert load_agent_config(installed.with_name("agent.toml.bak")).device_id == "pi-kitchen-01"

    # systemd accepts the unit as installed, its ExecStart pointing at the staged binary
    staged = tmp_path / "verify" / UNIT
    staged.parent.mkdir()
    staged.write_text(unit.read_text().replace("/opt/fedflock/venv/bin/fedflock", str(venv / "bin/fedflock")))
    verify = subprocess.run(["systemd-analyze", "verify", staged], capture_output=True, text=True)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    gone = _run(UNINSTALL, "--root", root)
    assert gone.returncode == 0, gone.stderr
    assert not venv.exists() and not unit.exists() and not (root / f"etc/systemd/system/{UNIT}.d").exists()
    assert installed.is_file() and (root / "var/lib/fedflock").is_dir()  # config and state stay
    purged = _run(UNINSTALL, "--root", root, "--purge")
    assert purged.returncode == 0 and "skip (--root): userdel fedflock" in purged.stdout
    assert not (root / "etc/fedflock").exists() and not (root / "var/lib/fedflock").exists()


def test_dry_run_prints_every_action_of_the_default_path_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    index = "https://pypi.internal.example/simple"
    result = _run(INSTALL, "--dry-run", "--root", root, "--from", "fedflock[agent]==0.1.0", "--index-url", index)
    assert result.returncode == 0, result.stderr
    assert list(root.iterdir()) == []
    r, py = str(root), "python3"
    venv = f"{r}/opt/fedflock/venv"
    pip = f"{venv}/bin/python -m pip --disable-pip-version-check install --upgrade --index-url {index}"
    assert result.stdout.splitlines() == [
        "skip (--root): useradd --system --user-group --home-dir /var/lib/fedflock --no-create-home "
        "--shell /usr/sbin/nologin fedflock",
        f"+ install -d -m 0755 {r}/opt/fedflock {r}/etc/systemd/system",
        f"+ install -d -m 0750 {r}/etc/fedflock {r}/var/lib/fedflock",
        f"skip (--root): chown root:fedflock {r}/etc/fedflock",
        f"skip (--root): chown fedflock:fedflock {r}/var/lib/fedflock",
        f"+ {py} -m venv {venv}",
        f"+ {pip} fedflock[agent]==0.1.0",
        f"+ {venv}/bin/python -I -c import onnxruntime, edge_agent.agent; "
        'print("agent imports, onnxruntime", onnxruntime.__version__)',
        f"+ install -m 0640 {DEVICE}/agent.toml.example {r}/etc/fedflock/agent.toml.example",
        f"no config yet: write {r}/etc/fedflock/agent.toml (see {r}/etc/fedflock/agent.toml.example)",
        f"skip (--root): chown root:fedflock {r}/etc/fedflock/agent.toml.example",
        f"skip (--root): chown root:fedflock {r}/etc/fedflock/agent.toml",
        f"+ install -m 0644 {DEVICE}/{UNIT} {r}/etc/systemd/system/{UNIT}",
        "skip (--root): systemctl daemon-reload",
        f"skip (--root): systemctl enable {UNIT}",
        f"skip (--root): systemctl restart {UNIT}",
        f"done: fedflock agent in {venv} (logs: journalctl -u fedflock-agent)",
    ]


def test_dry_run_without_root_shows_the_system_actions(tmp_path: Path) -> None:
    result = _run(INSTALL, "--dry-run", "--no-start")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "+ chown fedflock:fedflock /var/lib/fedflock" in lines and "+ systemctl daemon-reload" in lines
    assert any(line.startswith("+ useradd --system") or line == "user fedflock exists" for line in lines)
    assert "not starting (--no-start)" in lines and not Path("/opt/fedflock/venv").exists()


def test_bad_input_is_refused_before_anything_is_done(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    missing = str(tmp_path / "missing.whl")
    cases: dict[tuple[str, str], str] = {
        ("--from", missing): f"--from {missing}: no such file or directory",
        ("--config", str(tmp_path / "nope.toml")): "no such file",
        ("--frm", "x"): "unknown option --frm",
        ("--python", "python9.9"): "--python python9.9: not found",
    }
    for args, message in cases.items():
        result = _run(INSTALL, "--root", root, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    result = _run(INSTALL, "--root", root, "--system-onnxruntime", "--python", bare / "bin/python")
    assert result.returncode == 2 and "cannot import onnxruntime" in result.stderr
    assert list(root.iterdir()) == []
    assert _run(INSTALL, "--root", tmp_path / "absent").returncode == 2
