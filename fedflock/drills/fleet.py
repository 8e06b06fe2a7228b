"""A fleet of real ``fedflock agent --config`` processes for a drill, each with its own data,
state directory and log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from edge_agent.runtime.bundle import Bundle
from fedflock.drills.processes import AgentSpec, FedflockProcess, OutboxRow, outbox_rows, wait_for, write_agent_config

__all__ = ["AgentFleet"]


class AgentFleet:
    """``count`` agents ``<name>-0`` ... with ``examples[i]`` random rows each (4 features, 3 classes:
    the shape of the drills' MLP bundle)."""

    def __init__(
        self, work: Path, bundle: Bundle, *, url: str, prefix: str, count: int, name: str = "drill", seed: int = 0
    ) -> None:
        self.work = work
        self.prefix = prefix
        rng = np.random.default_rng(seed)
        self.examples: dict[str, int] = {}
        self.specs: list[AgentSpec] = []
        self.processes: list[FedflockProcess] = []
        for i in range(count):
            device_id = f"{name}-{i}"
            n = int(rng.integers(24, 64))
            data = work / f"{device_id}.npz"
            x = rng.standard_normal((n, 4)).astype(np.float32)
            np.savez(data, x=x, y=rng.integers(0, 3, n).astype(np.int64))
            spec = AgentSpec(
                device_id=device_id,
                state_dir=work / device_id,
                bundle=bundle.directory,
                data=data,
                mqtt_url=url,
                topic_prefix=prefix,
            )
            self.examples[device_id] = n
            self.specs.append(spec)
            config = write_agent_config(spec, work / f"{device_id}.toml")
            self.processes.append(FedflockProcess(["agent", "--config", str(config)], work / f"{device_id}.log"))

    @property
    def device_ids(self) -> list[str]:
        return [spec.device_id for spec in self.specs]

    def point_at(self, url: str) -> None:
        """Rewrite every agent.toml to connect to ``url`` (takes effect at the next start)."""
        self.specs = [replace(spec, mqtt_url=url) for spec in self.specs]
        for spec in self.specs:
            write_agent_config(spec, self.work / f"{spec.device_id}.toml")

    def point_one(self, index: int, url: str) -> None:
        """Rewrite agent ``index``'s agent.toml to connect to ``url``."""
        spec = self.specs[index] = replace(self.specs[index], mqtt_url=url)
        write_agent_config(spec, self.work / f"{spec.device_id}.toml")

    def start(self, *, env: Mapping[str, str] | None = None, online_timeout: float = 30.0) -> None:
        """Start every agent that is not running and wait until each says it is online."""
        before = {}
        for spec, process in zip(self.specs, self.processes, strict=True):
            if not process.running:
                before[spec.device_id] = self._online_lines(process, spec)
                process.start(env=env)
        for spec, process in zip(self.specs, self.processes, strict=True):
            if spec.device_id in before:
                count = before[spec.device_id]
                wait_for(partial(self._came_online, process, spec, count), online_timeout, f"{spec.device_id} online")

    def wait_exited(self, timeout: float) -> list[int]:
        """Wait until every agent process ended; their exit codes."""
        wait_for(lambda: not any(p.running for p in self.processes), timeout, "every agent to exit")
        return [p.returncode() or 0 for p in self.processes]

    def terminate(self) -> None:
        for process in self.processes:
            if process.running:
                process.terminate()

    def outbox(self, device_id: str) -> list[OutboxRow]:
        return outbox_rows(self.work / device_id)

    def delivered(self, task_ids: set[str]) -> bool:
        """True once every one of ``task_ids`` is marked delivered in its device's outbox."""
        found = {row.task_id for d in self.device_ids for row in self.outbox(d) if row.delivered_at is not None}
        return task_ids <= found

    def retransmits(self) -> int:
        """Sends after the first, over every result in every outbox."""
        return sum(max(row.attempts - 1, 0) for d in self.device_ids for row in self.outbox(d))

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.close()

    @classmethod
    def _came_online(cls, process: FedflockProcess, spec: AgentSpec, before: int) -> bool:
        return cls._online_lines(process, spec) > before or not process.running

    @staticmethod
    def _online_lines(process: FedflockProcess, spec: AgentSpec) -> int:
        return process.output().count(f"agent {spec.device_id} online at")
