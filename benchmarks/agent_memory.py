"""Peak RSS of a real agent process while it trains, next to a PyTorch process doing the same work.

One run: starts Mosquitto, exports the digits CNN, starts ``fedflock agent`` as a subprocess with
the whole digits training split (1,437 examples), drives ``--rounds`` FedAvg rounds from this
process, and samples the agent's RSS every 5 ms with psutil. Then a PyTorch subprocess trains the
same model on the same data for the same number of epochs (what a device would need without
fedflock's exporter) and is sampled the same way. Prints a markdown table.

    python benchmarks/agent_memory.py [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rss import RssSampler  # noqa: E402
from broker_server.mosquitto_process import MosquittoProcess  # noqa: E402
from broker_server.server import FederatedServer, ServerConfig  # noqa: E402
from edge_agent.runtime.bundle import Bundle  # noqa: E402
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url  # noqa: E402
from fedflock.datasets import load_digits_arrays, train_test_split  # noqa: E402

TORCH_TRAINER = """
import sys, numpy as np, torch
from model_export.models import digits_cnn
torch.set_num_threads(1)
data = np.load(sys.argv[1]); x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
model = digits_cnn(10); opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
for _ in range(int(sys.argv[2]) * int(sys.argv[3])):
    for idx in torch.randperm(len(x), generator=g).split(16):
        opt.zero_grad(); torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward(); opt.step()
print("done")
"""


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from model_export.exporter import export_bundle
    from model_export.models import digits_cnn

    work = Path(tempfile.mkdtemp(prefix="fedflock-mem-"))
    bundle = Bundle.open(export_bundle(digits_cnn(10), input_shape=(1, 8, 8), num_classes=10, out_dir=work / "b"))
    x, y = load_digits_arrays()
    train, _ = train_test_split(y, 0.2, np.random.default_rng(0))
    data = work / "device.npz"
    np.savez(data, x=x[train], y=y[train])
    env = dict(os.environ, PYTHONPATH=str(REPO))

    with MosquittoProcess(work / "mq") as broker:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedflock",
                "agent",
                "--bundle",
                str(bundle.directory),
                "--data",
                str(data),
                "--device-id",
                "mem-bench",
                "--mqtt-url",
                broker.url,
                "--max-tasks",
                str(args.rounds),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sampler = RssSampler(agent.pid).start()
        host, port = parse_mqtt_url(broker.url)
        server = FederatedServer(
            MqttTransport(MqttConfig(host=host, port=port, client_id="mem-server")),
            bundle,
            ServerConfig(
                rounds=args.rounds,
                clients_per_round=1,
                min_clients=1,
                local_epochs=args.epochs,
                wait_for_clients_s=60,
                round_timeout_s=120,
            ),
        )
        server.start()
        if not server.wait_for_devices(1, timeout_s=60):
            raise SystemExit("the agent did not come online")
        time.sleep(0.2)
        idle_rss = sampler.samples[-1][1]
        results = server.run()
        server.close()
        agent.wait(timeout=60)
        agent_peak = sampler.stop()
    assert all(r.completed for r in results), results

    torch_proc = subprocess.Popen(
        [sys.executable, "-c", TORCH_TRAINER, str(data), str(args.rounds), str(args.epochs)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    torch_sampler = RssSampler(torch_proc.pid).start()
    torch_proc.wait(timeout=300)
    torch_peak = torch_sampler.stop()

    print(f"digits CNN, {len(train)} examples, {args.rounds} tasks x {args.epochs} epochs, batch 16, 1 thread\n")
    print("| process | peak RSS (MiB) | ratio to PyTorch |")
    print("|---|---:|---:|")
    rows = [
        (f"fedflock agent: onnxruntime + MQTT, {args.rounds} tasks", agent_peak),
        ("fedflock agent: connected, idle, before the first task", idle_rss),
    ]
    for label, rss in rows:
        print(f"| {label} | {mib(rss)} | {rss / torch_peak:.2f} |")
    print(f"| PyTorch eager: same model, data and epochs, no networking | {mib(torch_peak)} | 1.00 |")


if __name__ == "__main__":
    main()
