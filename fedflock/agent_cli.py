"""``fedflock agent --config agent.toml`` and ``fedflock agent status``: a device from its config file.

Start-up order: read the config (every error names its key), make the state directory, recover
the model store (a crash during an earlier install leaves a working model) and install the
configured bundle on first start, open the data (streamed sources are cached once), start the
resource monitor, then connect. The onnxruntime sessions are created at the first task, so an
idle agent stays small (docs/benchmarks.md, "Agent").
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_agent.config import AgentFileConfig, load_agent_config
from edge_agent.datasources import open_data
from edge_agent.device.eligibility import decide
from edge_agent.device.load import ort_threads
from edge_agent.device.monitor import MonitorConfig, ResourceMonitor
from edge_agent.errors import BundleError, ConfigError, StorageError, StorageFull, TransportError
from edge_agent.gate import working_set
from edge_agent.ota import DownloadStaging, InstalledModel, ModelStore, ModelUpdater, UpdaterConfig
from edge_agent.ota.validation import evaluation_validator
from edge_agent.protocol.manifest import load_manifest
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.store import DeviceStore, StoreConfig
from edge_agent.transport.base import Transport

log = logging.getLogger("fedflock.cli")

#: examples evaluated to validate a model before it is switched to
#: ``agent status``: seconds between two sensor samples (the CPU load is the busy share between them)
CPU_SAMPLE_S = 0.5
#: The flag-driven quick start's options, and where the config file says the same (``None``: nowhere).
#: With ``--config`` they would be silently ignored, so they are refused.
FLAG_ONLY_OPTIONS: dict[str, str | None] = {
    "bundle": "bundle",
    "data": "[data]",
    "device_id": "device_id",
    "mqtt_url": "[mqtt] url",
    "topic_prefix": "[mqtt] topic_prefix",
    "state_dir": "state_dir",
    "threads": "[policy.load] threads",
    "seed": "[agent] seed",
    "network": "[network] (the agent detects the link)",
    "codec_preference": "[codecs]",
    "no_error_feedback": "[agent] error_feedback",
    "max_tasks": None,
    "micro_batch": None,
}


@dataclass(frozen=True)
class DevicePaths:
    models: Path
    store: Path
    data_cache: Path
    downloads: Path

    @classmethod
    def of(cls, state_dir: Path) -> DevicePaths:
        return cls(
            models=state_dir / "models",
            store=state_dir / "agent.db",
            data_cache=state_dir / "data-cache",
            downloads=state_dir / "downloads",
        )


def validation_rows(split: Any) -> tuple[Any, Any]:
    """``(x, y)`` to validate installs on: the held-out rows, or the training rows without any."""
    rows = split.validation if split.validation is not None and len(split.validation) else split.train
    return rows.x, rows.y


def installed_model(store: ModelStore, config: AgentFileConfig, x: Any, y: Any) -> InstalledModel:
    """The model to run: the store's current one, or the configured bundle installed as version 0
    (so that any version the server announces, from 1 on, replaces it if its digest differs)."""
    store.open()
    current = store.current()
    if current is not None:
        return current
    report = store.install_directory(0, config.bundle, validate=evaluation_validator(x, y))
    if not report.ok:
        raise BundleError(f"cannot install {config.bundle} as the first model: {report.stage}: {report.reason}")
    current = store.current()
    assert current is not None
    log.info("installed %s as model version %d", config.bundle, current.version)
    return current


def run_agent_from_config(path: Path, stop: threading.Event) -> int:
    from edge_agent.agent import Agent, AgentConfig
    from edge_agent.runtime.trainer import OrtTrainer
    from fedflock.wiring import configured_device_transport

    config = load_agent_config(path)
    warn_if_unauthenticated(config)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # typically /var/lib/fedflock for a user who may not create it
        raise StorageError(f"cannot create state_dir {config.state_dir}: {exc.strerror or exc}") from exc
    paths = DevicePaths.of(config.state_dir)
    split = open_data(config.data, cache_dir=paths.data_cache)
    models = ModelStore(paths.models)
    model = installed_model(models, config, split.train.x, split.train.y)
    bundle = Bundle.open(model.path)
    threads = ort_threads(config.policy.load, os.cpu_count())
    trainer = OrtTrainer.open(bundle, threads=threads, lazy=True)
    trainer.check_data(split.train.x, split.train.y)  # fail now, not at the first task
    monitor = ResourceMonitor(
        MonitorConfig(interval_s=config.monitor_interval_s, state_dir=config.state_dir, network=config.network)
    )
    agent_config = AgentConfig(
        device_id=config.device_id,
        device_class=config.device_class,
        topics=Topics(config.mqtt.topic_prefix),
        seed=config.seed,
        state_dir=config.state_dir,
        codec_preferences=config.codec_preferences,
        error_feedback=config.error_feedback,
        chunk_bytes=config.chunk_bytes,
        result_ttl_s=config.result_ttl_s,
        store=StoreConfig(retention_s=config.retention_s),
        privacy=config.privacy,
    )
    transport: Transport = configured_device_transport(
        config, bundle_digest=bundle.digest, num_examples=len(split.train)
    )
    if os.environ.get("FEDFLOCK_DRILL_CRASH"):  # opt-in test hook of the fault drills (docs/drills.md)
        from fedflock.drills.crash import wrap_for_drill

        transport = wrap_for_drill(transport, agent_config.topics.results(config.device_id), os.environ)
    agent = Agent(
        agent_config,
        transport,
        trainer,
        split.train,
        monitor=monitor,
        policy=config.policy,
        validation=split.validation,
        updater=ModelUpdater(
            config.device_id,
            agent_config.topics,
            models,
            DownloadStaging(paths.downloads),
            # the held-out rows when there are any: a rollout compares canary and baseline on them
            evaluation_validator(*validation_rows(split)),
            config=UpdaterConfig(trusted_keys=config.trusted_keys),
        ),
        open_trainer=lambda new: OrtTrainer.open(new, threads=threads, lazy=True),
    )
    with monitor:
        if not start_when_reachable(agent, stop, config.mqtt.url):
            return 0
        log.info(
            "agent %s online at %s: model v%d, %d examples",
            config.device_id,
            config.mqtt.url,
            model.version,
            len(split.train),
        )
        try:
            serve(agent, stop)
        finally:
            agent.close()
    return 0


#: how long an agent whose disk is full waits before it tries again
STORAGE_FULL_RETRY_S = 60.0


def serve(agent: Any, stop: threading.Event, *, retry_s: float = STORAGE_FULL_RETRY_S) -> None:
    """Run ``agent`` until ``stop``. A full disk does not end the process: the store rolled the
    failed write back (nothing committed is lost), so the agent logs it, waits ``retry_s`` and
    serves again; space comes back when logs rotate or an operator frees it, and results stored
    before are delivered then. (Exiting would only make systemd restart it into the same disk.)"""
    while not stop.is_set():
        try:
            agent.run(stop)
            return
        except StorageFull as exc:
            log.error("%s: pausing, retrying in %.0f s", exc, retry_s)
            stop.wait(retry_s)


def warn_if_unauthenticated(config: AgentFileConfig) -> None:
    """One line at start: the keys models must be signed by, or that they are not authenticated."""
    if config.trusted_keys:
        log.info("models must be signed by a trusted key: %s", config.trusted_keys.describe())
        return
    tls = " (TLS authenticates the broker, not the bundles)" if config.mqtt.url.startswith("mqtts://") else ""
    log.warning("no [ota] trusted_keys: bundles are not authenticated%s", tls)


def start_when_reachable(agent: Any, stop: threading.Event, url: str) -> bool:
    """Start the agent, retrying with jittered exponential backoff while the broker is unreachable
    (a device boots before its network is up; a fleet must not retry in lockstep). False: stopped."""
    from edge_agent.transport.mqtt_config import reconnect_delay

    rng = random.Random()
    attempt = 0
    while not stop.is_set():
        try:
            agent.start()
            return True
        except TransportError as exc:
            delay = reconnect_delay(attempt, min_delay=1.0, max_delay=60.0, jitter=1.0, rng=rng)
            log.warning("broker %s not reachable (%s); retrying in %.0fs", url, exc.reason, delay)
            stop.wait(delay)
            attempt += 1
    return False


def agent_status(path: Path, *, as_json: bool = False, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the device's state, eligibility per phase with reasons, queues and model version.

    Read-only, so it is safe while the agent runs: the store is opened without its start-up
    check, and the model pointer is read without the model store's crash recovery.
    """
    config = load_agent_config(path)
    paths = DevicePaths.of(config.state_dir)
    monitor = ResourceMonitor(MonitorConfig(state_dir=config.state_dir, network=config.network))
    monitor.sample()  # the CPU load is measured between two samples
    sleep(CPU_SAMPLE_S)
    state = monitor.sample()
    history: list[float] = []
    sizes = None
    if paths.store.exists():
        with DeviceStore.open(paths.store, config=StoreConfig(check_on_open=False)) as store:
            history = store.participations(state.taken_at - config.retention_s)
            sizes = store.sizes()
    model = read_model_pointer(paths.models)
    model_dir = Path(model["path"]) if model is not None and "path" in model else config.bundle
    # the agent trains only when a batch of 2 fits in memory on top of min_free_memory_mb
    needs = {"train": _smallest_working_set(model_dir)}
    now = datetime.now()
    decisions = [
        decide(state, config.policy, phase=phase, now=now, history=history, working_set_bytes=needs.get(phase, 0))
        for phase in ("train", "download", "upload")
    ]
    report: dict[str, Any] = {
        "device_id": config.device_id,
        "device_state": state.as_dict(),
        "eligibility": [d.as_dict() for d in decisions],
        "queues": None if sizes is None else asdict(sizes),
        "model": model,
    }
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"device {config.device_id} ({config.device_class}), state in {config.state_dir}")
    print(_describe_state(state.as_dict()))
    for decision in decisions:
        print(f"  {decision.phase:<9} {decision}")
    if sizes is None:
        print("queues: no store yet (the agent has not run)")
    else:
        print(
            f"queues: {sizes.pending_tasks} tasks waiting, {sizes.pending_results} results to upload, "
            f"{sizes.delivered_results} delivered kept; store {sizes.bytes / 1e6:.1f} MB"
        )
    if model is None:
        print("model: none installed yet")
    elif "error" in model:
        print(f"model: {model['error']} (the agent repairs the store when it starts)")
    else:
        print(f"model: v{model['version']} {model['digest'][:12]}… ({model['path']})")
    return 0


def read_model_pointer(models: Path) -> dict[str, Any] | None:
    """The current model as ``models/current.json`` names it (``edge_agent.ota.store``), or ``None``.

    Unlike ``ModelStore.open()``, which repairs the store (deletes staging, rewrites the pointer),
    this only reads, so it cannot disturb an install the running agent is making.
    An unreadable pointer gives ``{"error": ...}``.
    """
    pointer = models / "current.json"
    try:
        raw = json.loads(pointer.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"model pointer {pointer} unreadable: {exc}"}
    current = raw.get("current") if isinstance(raw, dict) else None
    if current is None:
        return None
    try:
        version, digest = int(current["version"]), str(current["digest"])
    except (KeyError, TypeError, ValueError):
        return {"error": f"model pointer {pointer} has no valid current record"}
    path = models / "versions" / f"{version}-{digest[:12]}"
    return {"version": version, "digest": digest, "path": str(path)}


def _smallest_working_set(bundle_dir: Path) -> int:
    """Bytes one training step of batch 2 needs (``edge_agent.gate``); 0 when the bundle is unreadable."""
    try:
        manifest, _ = load_manifest(bundle_dir, verify=False)
    except BundleError:
        return 0
    return working_set(manifest).at(2)


def _describe_state(state: dict[str, Any]) -> str:
    def show(value: Any, unit: str = "", scale: float = 1.0) -> str:
        if value is None:
            return "unknown"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value / scale:.0f}{unit}" if not math.isnan(value) else "unknown"

    net = state["network"]
    return (
        f"  battery {show(state['battery_percent'], '%')}, charging {show(state['charging'])}, "
        f"cpu {show(None if state['cpu_load'] is None else state['cpu_load'] * 100, '%')}, "
        f"temperature {show(state['temperature_c'], ' C')}, "
        f"memory free {show(state['memory_available_bytes'], ' MB', 1e6)}, "
        f"disk free {show(state['disk_free_bytes'], ' MB', 1e6)}\n"
        f"  network {net['kind']} ({net['interface'] or 'no interface'}), metered {show(net['metered'])}, "
        f"link up {show(net['link_up'])}"
    )


def check_no_legacy_flags(args: Any) -> None:
    """Refuse flag-driven options next to ``--config`` (the config file would silently win)."""
    from fedflock.cli import build_parser

    defaults = vars(build_parser().parse_args(["agent"]))
    for name, key in FLAG_ONLY_OPTIONS.items():
        if getattr(args, name) != defaults[name]:
            flag = "--" + name.replace("_", "-")
            if key is None:
                raise ConfigError(f"{flag} works only without --config (the flag-driven quick start)")
            raise ConfigError(f"--config replaces {flag}: set {key} in the config file")
    if args.json and args.action != "status":
        raise ConfigError("--json goes with `fedflock agent status`")
