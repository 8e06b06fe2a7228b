"""A crash at any point of an install leaves a working model.

Each test runs the install in a child process that SIGKILLs itself right after one durable
step (the store's test-only ``_after_step`` hook), then opens the store as a restarted agent
would and checks that the current model is the old or the new one, opens and predicts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_agent.ota.store import INSTALL_STEPS, ModelStore
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, derive_bundle, predict, release

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from edge_agent.ota.store import ModelStore

    root, archive, digest, version, kill_at = sys.argv[2:7]

    def after(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store = ModelStore(Path(root)).open()
    report = store.install(
        int(version), Path(archive), expected_digest=digest, validate=lambda b: None, _after_step=after
    )
    print(report, file=sys.stderr)
    sys.exit(3)
    """
)


@pytest.fixture(scope="module")
def v1(digits_bundle: Bundle) -> Release:
    return release(digits_bundle.directory)


@pytest.fixture(scope="module")
def v2(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Release:
    return release(derive_bundle(digits_bundle.directory, tmp_path_factory.mktemp("v2") / "b", scale=0.5))


def install_killed_at(root: Path, release: Release, version: int, step: str, tmp_path: Path) -> None:
    archive = tmp_path / "archive.tar"
    archive.write_bytes(release.archive)
    args = [str(REPO), str(root), str(archive), release.digest, str(version), step]
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, timeout=120)
    assert child.returncode == -9, f"child was not killed at {step!r}: {child.stderr.decode()[-2000:]}"


def assert_working(store: ModelStore, expected: Release) -> None:
    current = store.current()
    assert current is not None and current.digest == expected.digest
    logits = predict(current.path)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()
    assert np.allclose(logits, predict(expected.directory))
    assert list((store.root / "staging").iterdir()) == []
    assert not list(store.root.glob(".current.json.tmp-*"))


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_upgrade_killed_after_each_step_leaves_a_working_model(
    step: str, v1: Release, v2: Release, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    assert ModelStore(root).open().install(1, v1.archive, expected_digest=v1.digest, validate=lambda b: None).ok

    install_killed_at(root, v2, 2, step, tmp_path)
    restarted = ModelStore(root).open()

    switched = INSTALL_STEPS.index(step) >= INSTALL_STEPS.index("pointer")
    assert_working(restarted, v2 if switched else v1)
    previous = restarted.previous()
    expected_dirs = {f"1-{v1.digest[:12]}", f"2-{v2.digest[:12]}"} if switched else {f"1-{v1.digest[:12]}"}
    assert {p.name for p in (root / "versions").iterdir()} == expected_dirs
    assert (previous is not None and previous.digest == v1.digest) if switched else previous is None


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_first_install_killed_after_each_step_leaves_nothing_broken(step: str, v1: Release, tmp_path: Path) -> None:
    root = tmp_path / "store"

    install_killed_at(root, v1, 1, step, tmp_path)
    restarted = ModelStore(root).open()

    if INSTALL_STEPS.index(step) < INSTALL_STEPS.index("renamed"):
        assert restarted.current() is None
        assert list((root / "versions").iterdir()) == []
    else:  # the renamed version was validated before the rename: recovery adopts it
        assert_working(restarted, v1)
