"""The device's own copy of its personal tensors (trained here, never uploaded or aggregated).

Initialised from the bundle's weights, replaced after every task and, when a state directory is
given, persisted there (one tensor-set file per bundle digest, written atomically) so that a
restarted agent keeps what it learnt.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.errors import ConfigError, FedflockError
from edge_agent.protocol.tensors import read_tensor_file, write_tensor_file
from edge_agent.runtime.bundle import Bundle, Tensors, check_tensors


class PersonalStore:
    def __init__(self, bundle: Bundle, state_dir: str | Path | None = None) -> None:
        self._bundle = bundle
        self._names = [t.name for t in bundle.manifest.personal_tensors]
        self.path = Path(state_dir) / f"personal-{bundle.digest[:16]}.fft" if state_dir is not None else None
        self._tensors: Tensors | None = None

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def load(self) -> Tensors:
        """The current personal tensors (from the state file, else the bundle's initial values)."""
        if self._tensors is None:
            if self.path is not None and self.path.exists():
                try:
                    tensors = read_tensor_file(self.path)
                    check_tensors(self._bundle.manifest, tensors, names=self._names)
                except (OSError, FedflockError, ValueError) as exc:
                    raise ConfigError(f"personal tensors in {self.path} are unusable: {exc}") from exc
            else:
                initial = self._bundle.initial_weights() if self._names else {}
                tensors = {name: initial[name] for name in self._names}
            self._tensors = tensors
        return dict(self._tensors)

    def save(self, tensors: Tensors) -> None:
        self._tensors = {name: tensors[name] for name in self._names}
        if self.path is None or not self._names:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        write_tensor_file(tmp, self._tensors)
        os.replace(tmp, self.path)
