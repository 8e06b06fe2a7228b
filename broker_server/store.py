"""Every global model version on disk: ``{root}/v{version:06d}/weights.fft`` + ``meta.json``.

Files for people, scripts and plots; a restartable server keeps its state in the server store
(:mod:`broker_server.persistence`), which this directory may lag behind after a crash.

A version directory is written under a temporary name and renamed into place, so a killed
server leaves either a complete version or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.tensors import read_tensor_file, write_tensor_file

Tensors = dict[str, np.ndarray]


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def save(self, version: int, weights: Tensors, meta: dict[str, Any]) -> Path:
        target = self.path(version)
        if target.exists():
            raise FileExistsError(f"model version {version} already stored at {target}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".v{version:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_tensor_file(tmp / "weights.fft", weights)
        (tmp / "meta.json").write_text(json.dumps({"version": version, **meta}, indent=2, sort_keys=True))
        os.replace(tmp, target)
        return target

    def has(self, version: int) -> bool:
        return self.path(version).is_dir()

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in self.root.iterdir() if p.name.startswith("v") and p.is_dir())

    def load(self, version: int) -> tuple[Tensors, dict[str, Any]]:
        path = self.path(version)
        meta = json.loads((path / "meta.json").read_text())
        return read_tensor_file(path / "weights.fft"), meta
