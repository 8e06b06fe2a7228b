"""SIGKILL mid-write: every result the writer saw committed is there, and the file is sound."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from edge_agent.store import DeviceStore
from tests.edge_agent.store import T0

REPO = Path(__file__).resolve().parents[3]

_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from edge_agent.store import DeviceStore
    with DeviceStore.open({path!r}) as store:
        i = 0
        while True:
            task_id = f"r{{i}}"
            store.put_task(task_id, 1, b"T" * 1000, 0.0, 2e9)
            store.put_result(task_id, 1, bytes([i % 251]) * 50_000, 2e9)
            print(task_id, flush=True)  # only after put_result returned: committed
            i += 1
    """
)


def test_results_printed_as_committed_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(repo=str(REPO), path=str(path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed: list[str] = []
    try:
        assert child.stdout is not None
        while len(committed) < 25:
            line = child.stdout.readline()
            assert line, f"writer exited early: {child.stderr.read() if child.stderr else ''}"
            committed.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)  # the writer is mid-loop, most likely mid-transaction
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)  # a plain connection first: recovery of the WAL must need nothing from us
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    with DeviceStore.open(path) as store:
        store.verify()
        for task_id in committed:
            item = store.get_result(task_id)
            assert item is not None, f"{task_id} was reported committed but is missing"
            assert item.envelope == bytes([int(task_id[1:]) % 251]) * 50_000
        assert all(t.task_id not in committed for t in store.pending_tasks(T0))  # finished with their results
        assert store.sizes().pending_results >= len(committed)
