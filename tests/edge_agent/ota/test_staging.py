"""DownloadStaging: in-order chunks, resume after a restart (even a kill mid-chunk), sha256 check, full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.errors import ContractViolation, IntegrityError, StorageError
from edge_agent.ota.staging import DownloadStaging, write_json_atomic

REPO = Path(__file__).resolve().parents[3]
CHUNK = 1000
PAYLOAD = bytes(range(256)) * 20 + b"tail"  # 5124 bytes: 5 full chunks and a short last one
SHA = hashlib.sha256(PAYLOAD).hexdigest()
TID = "t0123456789abcdef01234567"


def chunks(data: bytes = PAYLOAD) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def begin(staging: DownloadStaging, *, sha: str = SHA, size: int = len(PAYLOAD)) -> int:
    return staging.begin(TID, size, CHUNK, sha)


def test_chunks_in_order_give_the_verified_file(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    assert begin(staging) == 0

    nexts = [staging.write_chunk(TID, i, data) for i, data in enumerate(chunks())]

    assert nexts == [1, 2, 3, 4, 5, 6]
    assert staging.finish(TID).read_bytes() == PAYLOAD
    staging.discard(TID)
    assert list(tmp_path.iterdir()) == []


def test_out_of_order_and_duplicate_chunks_are_not_written(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    parts = chunks()
    staging.write_chunk(TID, 0, parts[0])

    assert staging.write_chunk(TID, 2, parts[2]) == 1  # gap: ask for a resend from 1
    assert staging.write_chunk(TID, 0, parts[0]) == 1  # duplicate
    assert staging.next_index(TID) == 1
    assert (tmp_path / f"{TID}.part").stat().st_size == CHUNK


def test_chunk_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)

    with pytest.raises(ContractViolation, match="expected 1000"):
        staging.write_chunk(TID, 0, b"short")
    assert staging.next_index(TID) == 0


def test_resume_after_a_restart_keeps_progress(tmp_path: Path) -> None:
    first = DownloadStaging(tmp_path)
    begin(first)
    for i, data in enumerate(chunks()[:3]):
        first.write_chunk(TID, i, data)

    restarted = DownloadStaging(tmp_path)
    assert restarted.next_index(TID) == 3
    assert begin(restarted) == 3
    for i, data in enumerate(chunks()[3:], start=3):
        restarted.write_chunk(TID, i, data)

    assert restarted.finish(TID).read_bytes() == PAYLOAD


def test_uncounted_tail_of_the_part_file_is_cut_on_resume(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    for i, data in enumerate(chunks()[:2]):
        staging.write_chunk(TID, i, data)
    with open(tmp_path / f"{TID}.part", "ab") as part:  # a chunk half-written when the process died
        part.write(b"\xff" * 600)

    restarted = DownloadStaging(tmp_path)

    assert begin(restarted) == 2
    assert (tmp_path / f"{TID}.part").stat().st_size == 2 * CHUNK
    for i, data in enumerate(chunks()[2:], start=2):
        restarted.write_chunk(TID, i, data)
    assert restarted.finish(TID).read_bytes() == PAYLOAD


KILL_MID_CHUNK = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from edge_agent.ota.staging import DownloadStaging

    root, tid, size, chunk, sha = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    payload = bytes(range(256)) * 20 + b"tail"
    staging = DownloadStaging(root)
    staging.begin(tid, size, chunk, sha)
    staging.write_chunk(tid, 0, payload[:chunk])
    staging.write_chunk(tid, 1, payload[chunk : 2 * chunk])
    real_write = os.write

    def write_half_then_die(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    os.write = write_half_then_die
    staging.write_chunk(tid, 2, payload[2 * chunk : 3 * chunk])
    sys.exit(3)
    """
)


def test_process_killed_mid_chunk_resumes_from_the_last_durable_chunk(tmp_path: Path) -> None:
    args = [str(REPO), str(tmp_path), TID, str(len(PAYLOAD)), str(CHUNK), SHA]
    child = subprocess.run([sys.executable, "-c", KILL_MID_CHUNK, *args], capture_output=True, timeout=60)
    assert child.returncode == -9, child.stderr.decode()
    assert (tmp_path / f"{TID}.part").stat().st_size == 2 * CHUNK + CHUNK // 2

    restarted = DownloadStaging(tmp_path)

    assert begin(restarted) == 2
    for i, data in enumerate(chunks()[2:], start=2):
        restarted.write_chunk(TID, i, data)
    assert restarted.finish(TID).read_bytes() == PAYLOAD


def test_different_parameters_restart_the_transfer(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    staging.write_chunk(TID, 0, chunks()[0])
    other = PAYLOAD[::-1]

    assert begin(DownloadStaging(tmp_path), sha=hashlib.sha256(other).hexdigest()) == 0
    assert (tmp_path / f"{TID}.part").stat().st_size == 0


@pytest.mark.parametrize("sidecar", [b"{not json", b'{"format": 1}', b'{"format": 99, "transfer_id": "x"}'])
def test_unusable_sidecar_restarts_the_transfer(sidecar: bytes, tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    staging.write_chunk(TID, 0, chunks()[0])
    (tmp_path / f"{TID}.json").write_bytes(sidecar)

    assert begin(DownloadStaging(tmp_path)) == 0


def test_sidecar_counting_more_than_the_part_file_holds_restarts(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    staging.write_chunk(TID, 0, chunks()[0])
    (tmp_path / f"{TID}.part").write_bytes(b"")  # e.g. the part file was lost

    assert begin(DownloadStaging(tmp_path)) == 0


def test_sha256_mismatch_discards_the_download(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging, sha="0" * 64)
    for i, data in enumerate(chunks()):
        staging.write_chunk(TID, i, data)

    with pytest.raises(IntegrityError, match="discarded"):
        staging.finish(TID)

    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ContractViolation, match="not staged"):
        staging.next_index(TID)


def test_finish_before_all_chunks_is_refused(tmp_path: Path) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    staging.write_chunk(TID, 0, chunks()[0])

    with pytest.raises(ContractViolation, match="only 1 of 6"):
        staging.finish(TID)


def test_disk_full_keeps_the_durable_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = DownloadStaging(tmp_path)
    begin(staging)
    staging.write_chunk(TID, 0, chunks()[0])
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 100:
            return real_write(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        with pytest.raises(StorageError, match="disk full"):
            staging.write_chunk(TID, 1, chunks()[1])

    assert staging.next_index(TID) == 1
    assert json.loads((tmp_path / f"{TID}.json").read_bytes())["chunks"] == 1
    for i, data in enumerate(chunks()[1:], start=1):  # space freed: the same chunk again
        staging.write_chunk(TID, i, data)
    assert staging.finish(TID).read_bytes() == PAYLOAD


def test_atomic_json_write_failure_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"v": 1})

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="disk full"):
        write_json_atomic(target, {"v": 2})

    assert json.loads(target.read_bytes()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize(
    ("transfer_id", "size", "chunk", "sha", "reason"),
    [
        ("../escape", 10, 5, SHA, "transfer id"),
        ("a/b", 10, 5, SHA, "transfer id"),
        (TID, 0, 5, SHA, "transfer size"),
        (TID, 10**12, 5, SHA, "transfer size"),
        (TID, 10, 0, SHA, "chunk size"),
        (TID, 10, 5, "ABC", "sha256"),
    ],
)
def test_bad_parameters_are_refused(
    transfer_id: str, size: int, chunk: int, sha: str, reason: str, tmp_path: Path
) -> None:
    with pytest.raises(ContractViolation, match=reason):
        DownloadStaging(tmp_path / "root").begin(transfer_id, size, chunk, sha)
    assert not (tmp_path / "root").exists()
