"""Helpers shared by the OTA tests (fixtures stay in the test modules).

Two valid bundles are needed to test upgrades. Instead of a second ~10 s export, the second
one is derived from the session's digits bundle: scaled initial weights, a fresh sha256 for
the weights file in the manifest, and so a different bundle digest.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.ota.archive import pack_bundle
from edge_agent.protocol.manifest import load_manifest, sha256_file, write_manifest
from edge_agent.protocol.tensors import read_tensor_file, write_tensor_file
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer


@dataclass(frozen=True)
class Release:
    """One model version as the server would publish it."""

    directory: Path
    digest: str
    archive: bytes


def release(directory: Path) -> Release:
    return Release(directory=directory, digest=Bundle.open(directory).digest, archive=pack_bundle(directory))


def derive_bundle(source: Path, dest: Path, *, scale: float) -> Path:
    """Copy ``source`` to ``dest`` with every float weight multiplied by ``scale``."""
    shutil.copytree(source, dest)
    manifest, _ = load_manifest(dest, verify=False)
    weights_path = dest / manifest.weights_file
    weights = read_tensor_file(weights_path)
    scaled = {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    write_tensor_file(weights_path, scaled)
    files = {**manifest.files, manifest.weights_file: sha256_file(weights_path)}
    write_manifest(dest, dataclasses.replace(manifest, files=files))
    return dest


def sample_inputs(bundle: Bundle, n: int = 4) -> np.ndarray:
    shape = tuple(d for d in bundle.manifest.input.shape if d is not None)
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)


def predict(directory: Path) -> np.ndarray:
    """Open ``directory`` as a bundle and run its inference graph on fixed inputs."""
    bundle = Bundle.open(directory)
    return OrtTrainer.open(bundle).predict(bundle.initial_weights(), sample_inputs(bundle))


def evaluate_loss(bundle: Bundle) -> float:
    """What the agent's ``validate`` does: one evaluation batch, returning the loss."""
    x = sample_inputs(bundle, n=8)
    y = np.arange(8, dtype=np.int64) % bundle.manifest.num_classes
    return OrtTrainer.open(bundle).evaluate(bundle.initial_weights(), x, y).loss
