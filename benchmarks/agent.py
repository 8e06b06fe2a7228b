"""The agent's footprint, one script run, one markdown table (issue #5): idle, training, install size.

1. **Idle agent.** Starts Mosquitto, exports the digits CNN, starts ``python -m fedflock agent``
   as a subprocess exactly as a device would run it (:func:`agent_command`), waits for its retained
   "online" status, lets it settle, then samples its RSS (and USS) every second for
   ``--idle-seconds`` and its CPU time at both ends: CPU % of one core = Δ(user + system) / wall.
   Goals: RSS < 60 MB, CPU < 1 % of one core.
2. **Training peak RSS vs PyTorch.** A fresh agent trains ``--rounds`` tasks × ``--epochs``
   epochs on the whole digits training split (batch 16, 1 thread) for a server driven from this
   process over the same Mosquitto; then a PyTorch subprocess trains the same model on the same
   data for the same epochs, without networking. Peak RSS is the kernel's high-water mark
   (``VmHWM``); a 5 ms psutil sampler cross-checks it. The agent keeps running after its tasks, as
   on a device, so its RSS when idle again is reported too. Goal: agent ≤ 0.35× PyTorch.
3. **Venv size of an agent-only install.** ``python3 -m venv`` in a temp dir, then
   ``pip install "<copy of the repo>[agent]"`` from the configured index; the size on disk is the
   sum of file sizes under the venv (symlinks not followed, so the interpreter they point at is not
   counted). torch must not be in it. If pip fails (e.g. no network), the section falls back to an
   estimate from the installed files of the agent dependencies in this environment, and says so.
   Goal: ≤ 200 MB.

CPU time, not wall time, is what the idle and training rows report: the 2-core machine is shared.
MB means 10^6 bytes in the goals of the issue; the table prints both MiB and MB for memory.

    python benchmarks/agent.py [--idle-seconds 30] [--rounds 3] [--epochs 2] [--skip-venv] [--skip-training]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.agent_report import IdleResult, TrainingResult, render  # noqa: E402
from benchmarks.rss import RssSampler  # noqa: E402
from benchmarks.venv_size import measure_venv  # noqa: E402
from broker_server.mosquitto_process import MosquittoProcess  # noqa: E402
from broker_server.server import FederatedServer, ServerConfig  # noqa: E402
from edge_agent.protocol.messages import StatusMessage, decode_message  # noqa: E402
from edge_agent.protocol.topics import Topics  # noqa: E402
from edge_agent.runtime.bundle import Bundle  # noqa: E402
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url  # noqa: E402

#: what ``pip install fedflock[agent]`` may pull in; none of these may be torch
#: what ``python3 -m venv`` puts in every venv before anything is installed

TORCH_TRAINER = """
import sys, time, numpy as np, torch
from model_export.models import digits_cnn
torch.set_num_threads(1)
data = np.load(sys.argv[1]); x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
model = digits_cnn(10); opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
start = time.process_time()
for _ in range(int(sys.argv[2]) * int(sys.argv[3])):
    for idx in torch.randperm(len(x), generator=g).split(16):
        opt.zero_grad(); torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward(); opt.step()
print(f"train_cpu_s={time.process_time() - start:.3f}")
print(open("/proc/self/status").read())  # VmHWM: the peak RSS of this program (see high_water_mark)
"""

#: per-distribution file sizes, run by the venv's own interpreter

_started = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# How a device starts the agent. Keep it in this one function: when `--config agent.toml` lands,
# only this changes.


def agent_command(*, bundle: Path, data: Path, device_id: str, mqtt_url: str, state_dir: Path) -> list[str]:
    """The command line of ``fedflock agent``; ``state_dir`` is created here, as a device's installer would."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "fedflock",
        "agent",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--device-id",
        device_id,
        "--mqtt-url",
        mqtt_url,
        "--state-dir",
        str(state_dir),
    ]


@contextmanager
def running(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess with stdout/stderr in ``log``; killed on the way out if it is still running."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            yield process
        except BaseException:
            sink.flush()
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print(f"--- last lines of {log.name}:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def reap(process: subprocess.Popen[bytes], timeout_s: float) -> resource.struct_rusage:
    """Wait for ``process`` with ``wait4`` and return its resource usage (CPU time; see high_water_mark)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{process.args!r} did not exit within {timeout_s:.0f}s")
        time.sleep(0.05)


def high_water_mark(proc_status: str) -> int:
    """Peak RSS in bytes from the text of ``/proc/<pid>/status`` (``VmHWM``).

    Not ``ru_maxrss``: Linux folds the RSS of the forking process (this one, torch imported for
    the export) into a child's ``ru_maxrss`` at ``exec``, so every child would report ~0.5 GiB.
    ``VmHWM`` belongs to the address space the child ``exec``-ed into.
    """
    line = next(line for line in proc_status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def wait_online(mqtt_url: str, device_id: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    """Block until ``device_id``'s retained status says online (the agent is connected and subscribed)."""
    host, port = parse_mqtt_url(mqtt_url)
    watcher = MqttTransport(MqttConfig(host=host, port=port, client_id=f"watch-{device_id}"))
    watcher.start()
    try:
        watcher.subscribe(Topics().status(device_id), qos=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the agent exited with code {process.returncode} before coming online")
            inbound = watcher.receive(timeout=0.2)
            if inbound is None:
                continue
            message = decode_message(inbound.payload)
            if isinstance(message, StatusMessage) and message.online:
                return
        raise SystemExit(f"the agent did not come online within {timeout_s:.0f}s")
    finally:
        watcher.close()


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, kw_only=True)
class Setup:
    work: Path
    bundle: Bundle
    data: Path
    examples: int


def prepare(work: Path) -> Setup:
    import torch

    from fedflock.datasets import load_digits_arrays, train_test_split
    from model_export.exporter import export_bundle
    from model_export.models import digits_cnn

    progress("exporting the digits CNN bundle")
    torch.manual_seed(0)
    bundle = Bundle.open(export_bundle(digits_cnn(10), input_shape=(1, 8, 8), num_classes=10, out_dir=work / "b"))
    x, y = load_digits_arrays()
    train, _ = train_test_split(y, 0.2, np.random.default_rng(0))
    data = work / "device.npz"
    np.savez(data, x=x[train], y=y[train])
    return Setup(work=work, bundle=bundle, data=data, examples=len(train))


# --------------------------------------------------------------------------------------------
# 1. Idle


def measure_idle(setup: Setup, broker: MosquittoProcess, *, seconds: float, settle_s: float) -> IdleResult:
    device_id = "idle-bench"
    command = agent_command(
        bundle=setup.bundle.directory,
        data=setup.data,
        device_id=device_id,
        mqtt_url=broker.url,
        state_dir=setup.work / f"{device_id}.state",
    )
    progress(f"idle: starting {' '.join(command[1:4])} ...")
    with running(command, setup.work / "idle-agent.log") as process:
        agent = psutil.Process(process.pid)
        started = time.monotonic()
        wait_online(broker.url, device_id, 60, process)
        startup_wall = time.monotonic() - started
        cpu = agent.cpu_times()
        startup_cpu = cpu.user + cpu.system
        progress(f"idle: online after {startup_wall:.1f}s; settling {settle_s:.0f}s, then sampling {seconds:.0f}s")
        time.sleep(settle_s)
        rss: list[int] = []
        uss: list[int] = []
        before, t0 = agent.cpu_times(), time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            rss.append(agent.memory_info().rss)
            full = _memory_full_info(agent)
            if full is not None:
                uss.append(full)
            time.sleep(min(1.0, max(0.0, seconds - elapsed)))
        after, wall = agent.cpu_times(), time.monotonic() - t0
        threads = agent.num_threads()
        if process.poll() is not None:
            raise SystemExit(f"the idle agent exited with code {process.returncode}")
        process.terminate()  # SIGTERM: the agent publishes "offline" and exits
        process.wait(timeout=30)
    busy = (after.user + after.system) - (before.user + before.system)
    return IdleResult(
        seconds=wall,
        startup_wall_s=startup_wall,
        startup_cpu_s=startup_cpu,
        rss_median=int(statistics.median(rss)),
        rss_max=max(rss),
        uss_median=int(statistics.median(uss)) if uss else None,
        cpu_percent=100.0 * busy / wall,
        threads=threads,
    )


def _memory_full_info(process: psutil.Process) -> int | None:
    try:
        return int(process.memory_full_info().uss)
    except (psutil.AccessDenied, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# 2. Training peak vs PyTorch


def measure_training(
    setup: Setup, broker: MosquittoProcess, *, rounds: int, epochs: int, settle_s: float
) -> TrainingResult:
    device_id = "train-bench"
    # no --max-tasks: a device keeps running after its tasks, so what it holds afterwards is measured too
    command = agent_command(
        bundle=setup.bundle.directory,
        data=setup.data,
        device_id=device_id,
        mqtt_url=broker.url,
        state_dir=setup.work / f"{device_id}.state",
    )
    progress(f"training: the agent serves {rounds} tasks x {epochs} epochs")
    with running(command, setup.work / "train-agent.log") as process:
        agent = psutil.Process(process.pid)
        sampler = RssSampler(process.pid).start()
        host, port = parse_mqtt_url(broker.url)
        server = FederatedServer(
            MqttTransport(MqttConfig(host=host, port=port, client_id="bench-server")),
            setup.bundle,
            ServerConfig(
                rounds=rounds,
                clients_per_round=1,
                min_clients=1,
                local_epochs=epochs,
                wait_for_clients_s=60,
                round_timeout_s=300,
            ),
        )
        server.start()
        try:
            if not server.wait_for_devices(1, timeout_s=60):
                raise SystemExit("the training agent did not come online")
            before = agent.cpu_times()
            results = server.run()
            after = agent.cpu_times()
        finally:
            server.close()
        time.sleep(settle_s)
        rss_after = agent.memory_info().rss
        agent_peak = high_water_mark(Path(f"/proc/{process.pid}/status").read_text())
        process.terminate()  # SIGTERM: the agent publishes "offline" and exits 0
        agent_usage = reap(process, 60)
        agent_sampled = sampler.stop()
    if not all(r.completed for r in results):
        raise SystemExit(f"not every round completed: {results}")
    progress("training: PyTorch baseline")
    torch_log = setup.work / "torch.log"
    torch_command = [sys.executable, "-c", TORCH_TRAINER, str(setup.data), str(rounds), str(epochs)]
    with running(torch_command, torch_log) as torch_process:
        torch_sampler = RssSampler(torch_process.pid).start()
        torch_usage = reap(torch_process, 600)
        torch_sampled = torch_sampler.stop()
    output = torch_log.read_text()
    if torch_process.returncode != 0 or "train_cpu_s=" not in output or "VmHWM:" not in output:
        raise SystemExit(f"the PyTorch baseline failed:\n{output[-2000:]}")
    return TrainingResult(
        examples=setup.examples,
        rounds=rounds,
        epochs=epochs,
        agent_peak=agent_peak,
        agent_sampled_peak=agent_sampled,
        agent_rss_after=rss_after,
        agent_task_cpu_s=(after.user + after.system) - (before.user + before.system),
        agent_cpu_s=agent_usage.ru_utime + agent_usage.ru_stime,
        torch_peak=high_water_mark(output),
        torch_sampled_peak=torch_sampled,
        torch_train_cpu_s=float(output.split("train_cpu_s=")[1].split()[0]),
        torch_cpu_s=torch_usage.ru_utime + torch_usage.ru_stime,
    )


# --------------------------------------------------------------------------------------------
# 3. Venv size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0, help="after coming online, before sampling")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-venv", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bundle, venv)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fedflock-agent-bench-"))
    progress(f"work directory {work}")
    try:
        setup = prepare(work)
        training: TrainingResult | None = None
        with MosquittoProcess(work / "mq") as broker:
            idle = measure_idle(setup, broker, seconds=args.idle_seconds, settle_s=args.settle_seconds)
            if not args.skip_training:
                training = measure_training(
                    setup, broker, rounds=args.rounds, epochs=args.epochs, settle_s=args.settle_seconds
                )
        venv = None if args.skip_venv else measure_venv(work)
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"fedflock agent footprint: digits CNN bundle, `python -m fedflock agent` subprocess, Mosquitto, "
        f"{psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}\n"
    )
    print(render(idle, training, venv))


if __name__ == "__main__":
    main()
