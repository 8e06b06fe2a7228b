"""ErrorFeedback (residual + sent == original) and residual persistence."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.codecs import CODEC_NAMES, CodecSpec, ErrorFeedback, decode_update, load_residual, save_residual
from edge_agent.errors import MalformedMessage
from edge_agent.protocol import tensors as tensors_module
from edge_agent.protocol.tensors import write_tensor_file
from tests.edge_agent.codecs.helpers import cnn_delta


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_residual_plus_sent_equals_delta_plus_old_residual(name: str) -> None:
    spec = CodecSpec(name, fraction=0.02) if "topk" in name else CodecSpec(name)
    feedback = ErrorFeedback()
    rng = np.random.default_rng(0)
    for round_ in range(3):
        delta = cnn_delta(round_)
        before = {key: value.copy() for key, value in feedback.residual.items()}
        sent = decode_update(feedback.compress(delta, spec, rng=rng))
        for key, value in delta.items():
            want = value.astype(np.float64) + before.get(key, 0.0)
            got = feedback.residual[key].astype(np.float64) + sent[key]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * (np.abs(want).max() + 1e-3))
            assert feedback.residual[key].dtype == np.float32


def test_topk_feedback_eventually_sends_everything() -> None:
    feedback = ErrorFeedback()
    delta = {"w": np.linspace(-1, 1, 100, dtype=np.float32)}
    zero = {"w": np.zeros(100, np.float32)}
    total = decode_update(feedback.compress(delta, CodecSpec("topk", fraction=0.1), rng=np.random.default_rng(0)))["w"]
    for _ in range(9):
        total += decode_update(feedback.compress(zero, CodecSpec("topk", fraction=0.1), rng=np.random.default_rng(0)))[
            "w"
        ]
    np.testing.assert_allclose(total, delta["w"], atol=1e-7)
    assert not feedback.residual["w"].any()


def test_failed_compress_changes_nothing_and_reset_clears() -> None:
    feedback = ErrorFeedback({"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"'w'.*non-finite"):
        feedback.compress({"w": np.array([1, np.nan, 2], np.float32)}, CodecSpec("int8"), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"'w': residual shape \(3,\) != update shape \(4,\)"):
        feedback.compress({"w": np.ones(4, np.float32)}, CodecSpec("int8"), rng=np.random.default_rng(0))
    assert feedback.residual["w"].tolist() == [1.0, 1.0, 1.0]
    feedback.compress({"v": np.ones(2, np.float32)}, CodecSpec("sign"), rng=np.random.default_rng(0))
    assert set(feedback.residual) == {"w", "v"}  # residuals of tensors not in this update are kept
    feedback.reset()
    assert feedback.residual == {}
    with pytest.raises(ValueError, match="float32"):
        ErrorFeedback({"w": np.ones(3)})


def test_residual_persistence_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "residual.ffts"
    assert load_residual(path) == {}
    feedback = ErrorFeedback()
    feedback.compress(cnn_delta(0), CodecSpec("int4"), rng=np.random.default_rng(0))
    save_residual(path, feedback.residual)
    loaded = load_residual(path)
    assert list(loaded) == list(feedback.residual)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, feedback.residual[key])
        assert value.flags.writeable
    restored = ErrorFeedback(loaded)
    assert restored.residual.keys() == feedback.residual.keys()


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "residual.ffts"
    save_residual(path, {"w": np.ones(3, np.float32)})

    def killed(*args: object) -> None:
        raise KeyboardInterrupt("killed mid-write")

    for target in ("fsync", "replace"):
        with monkeypatch.context() as patch:
            patch.setattr(tensors_module.os, target, killed)
            with pytest.raises(KeyboardInterrupt):
                save_residual(path, {"w": np.full(1000, 2.0, np.float32)})
        assert load_residual(path)["w"].tolist() == [1.0, 1.0, 1.0]
    save_residual(path, {"w": np.full(2, 3.0, np.float32)})
    assert load_residual(path)["w"].tolist() == [3.0, 3.0]


def test_corrupt_residual_files_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "residual.ffts"
    save_residual(path, {"w": np.ones(3, np.float32)})
    data = path.read_bytes()
    for bad in (data[:-3], b"garbage", data[:4] + b"\x09" + data[5:]):
        path.write_bytes(bad)
        with pytest.raises(MalformedMessage, match=str(path)):
            load_residual(path)
    write_tensor_file(path, {"w": np.ones(3, np.float64)})
    with pytest.raises(MalformedMessage, match="float64"):
        load_residual(path)
    write_tensor_file(path, {"w": np.array([np.inf], np.float32)})
    with pytest.raises(MalformedMessage, match="non-finite"):
        load_residual(path)


CHILD = """
import sys
import numpy as np
from edge_agent.codecs import save_residual
path = sys.argv[1]
tensors = [{"w": np.full(1 << 20, float(i), np.float32)} for i in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    save_residual(path, tensors[i % 2])
    i += 1
"""


def test_killed_writer_leaves_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "residual.ffts"
    save_residual(path, {"w": np.full(1 << 20, 1.0, np.float32)})
    repo = Path(__file__).resolve().parents[3]
    for delay in (0.05, 0.13, 0.21):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=repo, stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        values = np.unique(load_residual(path)["w"])
        assert values.tolist() in ([1.0], [2.0])
