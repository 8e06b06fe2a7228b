"""``fedflock backup`` / ``fedflock restore`` on real files, with a real store written by another process.

The writer (tests/deploy/store_writer.py) commits rounds to the real SQLite server store and
writes model versions the way the server does while the backups run; every backup must restore
to a store that passes SQLite's integrity check, whose every round is internally consistent
(the checkpoint counts exactly the accepted tasks: both are written in one transaction), and
whose model files all belong to versions the restored store holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from broker_server.persistence import SqliteServerStore
from fedflock.backup_cli import restore_backup, write_backup
from fedflock.backup_manifest import MANIFEST, STORE_MEMBER, BackupError
from fedflock.cli import main

REPO = Path(__file__).resolve().parents[2]


def _start_writer(tmp_path: Path, max_rounds: int = 400) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    db, models, stop = tmp_path / "live" / "server.db", tmp_path / "live" / "models", tmp_path / "stop"
    db.parent.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.deploy.store_writer", str(db), str(models), str(stop), str(max_rounds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    return writer, db, models, stop


def _finished_store(tmp_path: Path, rounds: int = 3) -> tuple[Path, Path]:
    writer, db, models, _ = _start_writer(tmp_path, max_rounds=rounds)
    assert writer.wait(timeout=60) == 0
    return db, models


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_consistent(db: Path, models: Path) -> list[int]:
    store = SqliteServerStore.open(db)
    try:
        versions = store.model_versions()
        last = store.last_round() or 0
        assert versions == list(range(last + 1)) or versions == list(range(last))  # the open round has none yet
        for number in range(1, last + 1):
            snapshot = store.load_round(number)
            assert snapshot.checkpoint.count == len(snapshot.accepted) or snapshot.round.status == "completed"
            assert snapshot.checkpoint.accepted == snapshot.accepted or snapshot.round.status == "completed"
            if snapshot.round.status == "completed":
                assert snapshot.round.result_version == number and number in versions
    finally:
        store.close()
    on_disk = sorted(int(p.name[1:]) for p in models.iterdir())
    assert set(on_disk) <= set(versions), "a model file from a version the store does not hold"
    return on_disk


def test_backups_taken_while_a_server_writes_restore_consistently(tmp_path: Path) -> None:
    writer, db, models, stop = _start_writer(tmp_path)
    archives = []
    try:
        for index in range(3):
            out = tmp_path / f"backup-{index}.tar"
            assert main(["backup", "--store", f"sqlite://{db}", "--models", str(models), "--out", str(out)]) == 0
            archives.append(out)
            time.sleep(0.2)
    finally:
        stop.touch()
        assert writer.wait(timeout=60) == 0
    seen_versions = []
    for index, archive in enumerate(archives):
        target = tmp_path / f"restored-{index}"
        target.mkdir()
        code = main(["restore", str(archive), "--store", str(target / "server.db"), "--models", str(target / "models")])
        assert code == 0
        on_disk = _assert_consistent(target / "server.db", target / "models")
        for version in on_disk:  # the files are the server's, byte for byte
            for name in ("weights.fft", "meta.json"):
                assert _sha(target / "models" / f"v{version:06d}" / name) == _sha(models / f"v{version:06d}" / name)
        seen_versions.append(on_disk[-1])
    assert seen_versions == sorted(seen_versions) and seen_versions[-1] > seen_versions[0], "the writer wrote meanwhile"


def test_config_file_names_the_store_and_models_and_check_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _finished_store(tmp_path)
    (tmp_path / "live" / "broker.toml").write_text('[server]\nbundle = "b"\nout = "."\nstore = "server.db"\n')
    out = tmp_path / "b.tar"
    assert main(["backup", "--config", str(tmp_path / "live" / "broker.toml"), "--out", str(out)]) == 0
    assert "model versions 0..3, 8 model files" in capsys.readouterr().out
    assert main(["restore", "--check", str(out)]) == 0
    assert ": ok (" in capsys.readouterr().out
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[-1] == MANIFEST and STORE_MEMBER in names and "models/v000003/weights.fft" in names


def test_backup_never_overwrites_and_refuses_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, models = _finished_store(tmp_path)
    out = tmp_path / "b.tar"
    out.write_bytes(b"keep me")
    assert main(["backup", "--store", str(db), "--models", str(models), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["backup", "--store", "postgresql://fedflock@db/fedflock", "--out", str(tmp_path / "c.tar")]) == 2
    assert "pg_dump" in capsys.readouterr().err
    assert main(["backup", "--store", str(tmp_path / "nothing.db"), "--out", str(tmp_path / "d.tar")]) == 2
    assert "no SQLite store" in capsys.readouterr().err and not (tmp_path / "nothing.db").exists()


def _rewrite(archive: Path, out: Path, edit) -> None:
    """Copy ``archive`` to ``out`` member by member, letting ``edit(name, data)`` change or drop members."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            stream = src.extractfile(member)
            assert stream is not None
            result = edit(member.name, stream.read())
            for name, data in [] if result is None else result:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))


def _flip(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]


CORRUPTIONS = {
    "flipped byte in a model file": (
        lambda n, d: [(n, _flip(d) if n == "models/v000002/weights.fft" else d)],
        "is corrupt: sha256",
    ),
    "flipped byte in the store": (lambda n, d: [(n, _flip(d) if n == STORE_MEMBER else d)], "is corrupt: sha256"),
    "member missing": (lambda n, d: None if n == "models/v000001/meta.json" else [(n, d)], "missing 1 file"),
    "extra member": (lambda n, d: [(n, d), ("../evil", b"x")] if n == MANIFEST else [(n, d)], "unsafe member path"),
    "no manifest": (lambda n, d: None if n == MANIFEST else [(n, d)], "no single manifest.json"),
    "manifest of another backup": (
        lambda n, d: [(n, d.replace(b'"size": ', b'"size": 1', 1) if n == MANIFEST else d)],
        "the manifest says",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_restore_refuses_a_corrupt_archive_and_touches_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db, models = _finished_store(tmp_path)
    good = tmp_path / "good.tar"
    write_backup(store=db, models=models, out=good)
    bad = tmp_path / "bad.tar"
    edit, message = CORRUPTIONS[case]
    _rewrite(good, bad, edit)
    before = {p: _sha(p) for p in [db, *models.rglob("*")] if p.is_file()}
    code = main(["restore", str(bad), "--store", str(db), "--models", str(models), "--force"])
    assert code == 2 and message in capsys.readouterr().err
    assert {p: _sha(p) for p in [db, *models.rglob("*")] if p.is_file()} == before
    assert not [p for p in tmp_path.rglob("*") if "restore" in p.name], "staging left behind"


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    db, models = _finished_store(tmp_path)
    good = tmp_path / "good.tar"
    write_backup(store=db, models=models, out=good)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackupError):
        restore_backup(archive=truncated, store=tmp_path / "new.db", models=tmp_path / "new-models", force=False)
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"\x00" * 100 + b"not a tar file" * 100)
    with pytest.raises(BackupError, match=r"cannot read the backup|no single manifest"):
        restore_backup(archive=not_tar, store=tmp_path / "new.db", models=None, force=False)
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "new-models").exists()


def test_a_store_from_a_newer_fedflock_is_refused(tmp_path: Path) -> None:
    import sqlite3

    db, _ = _finished_store(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE fedflock_meta SET value = '99' WHERE key = 'schema_version'")
    out = tmp_path / "future.tar"
    assert write_backup(store=db, models=None, out=out).schema_version == 99  # backup copies what is there
    with pytest.raises(BackupError, match="schema 99; this fedflock knows up to"):
        restore_backup(archive=out, store=tmp_path / "new.db", models=None, force=False)
    assert not (tmp_path / "new.db").exists()


def test_existing_targets_need_force_and_are_moved_aside_not_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, models = _finished_store(tmp_path, rounds=2)
    archive = tmp_path / "b.tar"
    write_backup(store=db, models=models, out=archive)
    target = tmp_path / "t"
    target.mkdir()
    old_db = _finished_store(target, rounds=4)[0]  # target/live/server.db with 4 rounds
    old_models = old_db.parent / "models"
    old_sha = _sha(old_db)
    args = ["restore", str(archive), "--store", str(old_db), "--models", str(old_models)]
    assert main(args) == 2 and "add --force" in capsys.readouterr().err
    assert _sha(old_db) == old_sha
    assert main([*args, "--force"]) == 0
    out = capsys.readouterr().out
    asides = sorted(old_db.parent.glob("*.pre-restore-*"))
    assert [p.name.split(".pre-restore-")[0] for p in asides] == ["models", "server.db"] and "moved aside" in out
    assert _sha(next(p for p in asides if p.name.startswith("server.db"))) == old_sha
    assert _assert_consistent(old_db, old_models) == [0, 1, 2]
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
    assert manifest["store"]["model_versions"] == [0, 1, 2]
