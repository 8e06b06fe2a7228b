"""Local DP on the agent: ``[privacy]`` in agent.toml, and a real task (onnxruntime) whose delta is
clipped and noised before the codec, with the per-round ε in the UPDATE metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge_agent.codecs import decode_update
from edge_agent.config import parse_agent_config
from edge_agent.data import Dataset
from edge_agent.errors import ConfigError
from edge_agent.privacy import LocalDP, LocalDPConfig, clip_update, local_epsilon
from edge_agent.protocol.messages import TaskMessage, UpdateMessage
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.task_runner import TaskRunner

AGENT_TOML = """
device_id = "dp-dev"
bundle = "bundle"
[data]
kind = "npz"
path = "data.npz"
"""


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def parse(extra: str, tmp_path: Path):
    import tomllib

    return parse_agent_config(tomllib.loads(AGENT_TOML + extra), path=tmp_path / "agent.toml")


def test_agent_toml_privacy_table_is_parsed_and_checked(tmp_path: Path) -> None:
    assert parse("", tmp_path).privacy is None
    parsed = parse("[privacy]\nclip_norm = 0.5\nnoise_multiplier = 4.0\n", tmp_path).privacy
    assert parsed == LocalDPConfig(clip_norm=0.5, noise_multiplier=4.0, delta=1e-5)
    for bad, key in (
        ("[privacy]\nclip_norm = 0.5\n", "privacy.noise_multiplier"),
        ("[privacy]\nclip_norm = -1\nnoise_multiplier = 1\n", "privacy.clip_norm"),
        ("[privacy]\nclip_norm = 1\nnoise_multiplier = 1\ndelta = 2\n", "privacy.delta"),
        ("[privacy]\nclip_norm = 1\nnoise_multiplier = 1\nsigma = 2\n", "privacy.sigma"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse(bad, tmp_path)


def data() -> Dataset:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    return Dataset(x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64))


def run_task(bundle: Bundle, local_dp: LocalDP | None) -> UpdateMessage:
    runner = TaskRunner(
        OrtTrainer.open(bundle, threads=1),
        data(),
        rng=np.random.default_rng(0),  # the same batches in both runs
        clock=lambda: 0.0,
        state_dir=None,
        codec_preferences={"unknown": ("fp32",)},
        error_feedback=True,
        local_dp=local_dp,
    )
    weights = bundle.initial_weights()
    task = TaskMessage(
        device_id="dp-dev",
        round=1,
        task_id="t1",
        model_version=0,
        bundle_digest=bundle.digest,
        epochs=1,
        batch_size=16,
        lr=0.1,
        deadline_s=60.0,
        codecs=("fp32",),
        weights={t.name: weights[t.name] for t in bundle.manifest.shared_model_tensors},
    )
    result = runner.execute(task)
    assert isinstance(result, UpdateMessage), result
    return result


def test_local_dp_noises_the_clipped_delta_before_the_codec_and_reports_epsilon(bundle: Bundle) -> None:
    expected = {t.name: t.shape for t in bundle.manifest.aggregated_tensors}
    plain = run_task(bundle, None)
    config = LocalDPConfig(clip_norm=0.05, noise_multiplier=2.0)
    private = run_task(bundle, LocalDP(config, rng=np.random.default_rng(11)))
    assert "local_dp_epsilon" not in plain.metrics
    assert private.metrics["local_dp_epsilon"] == pytest.approx(local_epsilon(2.0, 1e-5), rel=1e-6)
    assert private.metrics["local_dp_epsilon"] == pytest.approx(4.38, abs=0.01)  # docs/privacy.md's table
    clean = decode_update(plain.payload, expected)
    noisy = decode_update(private.payload, expected)
    clipped = clip_update(clean, config.clip_norm)
    noise = np.concatenate([(noisy[n].astype(np.float64) - clipped[n]).ravel() for n in expected])
    # what was sent is clip(Δ, C) + N(0, (zC)²): the residual is the noise, of std zC (fp32 codec: exact)
    assert abs(float(noise.mean())) < 4 * 0.1 / math.sqrt(noise.size)
    assert float(noise.std()) == pytest.approx(config.noise_multiplier * config.clip_norm, rel=0.25)
    assert not np.allclose(noise, 0.0)
