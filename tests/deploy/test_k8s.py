"""deploy/k8s: the manifests, read as YAML, against the server's real config parser and ops routes.

No cluster here. This file checks what the manifests promise with PyYAML alone: every file
kustomization.yaml names exists; the server's broker.toml (parsed by the server's own parser)
names only paths the Deployment mounts, the Services' names and ports, the Secret keys it mounts
and the database user of the PostgreSQL StatefulSet; the probes hit routes the ops endpoint
really serves (200 / 503); one replica, Recreate; every container has requests and limits.
``kubectl kustomize`` and schema validation (kubernetes-validate) run in test_schemas.py.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.web import OpsApp
from fedflock.broker_config import BrokerSettings, build_settings, read_document
from fedflock.cli import main

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return document


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = objects()[(kind, name)]["spec"]["template"]["spec"]
    return spec


def settings() -> BrokerSettings:
    return build_settings(read_document(K8S / "broker.toml"))


def test_every_file_the_kustomization_names_exists_and_the_broker_files_are_generated(tmp_path: Path) -> None:
    kust = kustomization()
    generated = [f for g in kust["configMapGenerator"] for f in g["files"]]
    assert all((K8S / name).is_file() for name in [*kust["resources"], *generated])
    assert (K8S / "mosquitto/mosquitto.conf").read_text() == (
        REPO / "deploy/compose/mosquitto/mosquitto.conf"
    ).read_text()
    assert main(["pki", "acl", "--dir", str(tmp_path / "none"), "--out", str(tmp_path / "acl")]) == 0
    assert (K8S / "mosquitto/fedflock.acl").read_text() == (tmp_path / "acl").read_text()
    assert {doc["metadata"].get("namespace") for doc in objects().values()} == {None}  # kustomize sets it
    assert kust["namespace"] == "fedflock" and ("Namespace", "fedflock") in objects()


def _mounts(spec: dict[str, Any], container: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volumeMount, volume) for one container (``{}`` for a volumeClaimTemplate's)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    (c,) = [c for c in spec["containers"] if c["name"] == container]
    return {m["mountPath"]: (m, volumes.get(m["name"], {})) for m in c["volumeMounts"]}


def _under(path: Path, mounts: dict[str, Any]) -> str:
    matches = [m for m in mounts if path == Path(m) or Path(m) in path.parents]
    assert matches, f"{path} is not mounted"
    return max(matches, key=len)


def test_the_server_config_names_only_what_the_deployment_mounts() -> None:
    broker, spec = settings(), pod("Deployment", "broker-server")
    mounts = _mounts(spec, "broker-server")
    (args,) = [c["args"] for c in spec["containers"] if c["name"] == "broker-server"]
    config_mount, config_volume = mounts[args[args.index("--config") + 1]]
    generator = {g["name"]: g for g in kustomization()["configMapGenerator"]}[config_volume["configMap"]["name"]]
    assert config_mount["subPath"] in generator["files"]
    for path in (broker.bundle, broker.out, broker.test_data):
        assert path is not None and _under(path, mounts) == "/var/lib/fedflock"
    tls_mount = _under(Path(str(broker.mqtt.ca_file)), mounts)
    assert mounts[tls_mount][1]["secret"]["secretName"] == "fedflock-server-tls"
    names = {Path(str(p)).name for p in (broker.mqtt.ca_file, broker.mqtt.cert_file, broker.mqtt.key_file)}
    assert names == {"ca.crt", "tls.crt", "tls.key"}  # the keys of the Secret the README creates
    secret_doc = (K8S / "broker-server.yaml").read_text()
    assert all(f"--from-file={name}=" in secret_doc for name in names)
    init = spec["initContainers"][0]
    assert str(broker.bundle / "manifest.json") in " ".join(init["command"])


def test_services_ports_and_credentials_agree() -> None:
    broker, objs = settings(), objects()
    url = urlsplit(broker.mqtt.url)
    service = objs[("Service", str(url.hostname))]
    assert url.scheme == "mqtts" and [p["port"] for p in service["spec"]["ports"]] == [url.port]
    conf = (K8S / "mosquitto/mosquitto.conf").read_text()
    listener = re.search(r"^listener (\d+) ", conf, re.M)
    (mosquitto,) = pod("StatefulSet", "mosquitto")["containers"]
    assert listener is not None and [p["containerPort"] for p in mosquitto["ports"]] == [int(listener.group(1))]
    store = urlsplit(broker.store or "")
    assert objs[("Service", str(store.hostname))]["spec"]["ports"][0]["port"] == store.port == 5432
    (postgres,) = pod("StatefulSet", "postgres")["containers"]
    env = {e["name"]: e for e in postgres["env"]}
    assert (store.username, store.path.lstrip("/")) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])
    (server,) = pod("Deployment", "broker-server")["containers"]
    assert {e["name"]: e for e in server["env"]}["PGPASSWORD"]["valueFrom"] == env["POSTGRES_PASSWORD"]["valueFrom"]
    assert (
        broker.client_id == "fedflock-server" and "user fedflock-server" in (K8S / "mosquitto/fedflock.acl").read_text()
    )


def test_mosquitto_finds_every_file_its_config_names() -> None:
    spec = pod("StatefulSet", "mosquitto")
    mounts = _mounts(spec, "mosquitto")
    claims = {t["metadata"]["name"] for t in objects()[("StatefulSet", "mosquitto")]["spec"]["volumeClaimTemplates"]}
    keys = ("acl_file", "persistence_location", "cafile", "certfile", "keyfile", "crlfile")
    conf = (K8S / "mosquitto/mosquitto.conf").read_text()
    for line in conf.splitlines():
        if not line.split()[:1] or line.split()[0] not in keys:
            continue
        path = PurePosixPath(line.split()[1])
        mount_path = _under(Path(str(path)), mounts)
        mount, volume = mounts[mount_path]
        relative = str(path.relative_to(mount_path))
        if "configMap" in volume:
            generator = {g["name"]: g for g in kustomization()["configMapGenerator"]}[volume["configMap"]["name"]]
            assert relative in [Path(f).name for f in generator["files"]]
        elif "secret" in volume:
            assert relative in [item["path"] for item in volume["secret"]["items"]]
        else:
            assert mount["name"] in claims and relative == "."


def test_probes_hit_routes_the_ops_endpoint_serves() -> None:
    broker = settings()
    (server,) = pod("Deployment", "broker-server")["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports[server["livenessProbe"]["httpGet"]["port"]] == ports[server["readinessProbe"]["httpGet"]["port"]]
    assert ports["ops"] == broker.ops.port and broker.ops.host == "0.0.0.0"
    ready = [False]
    app = OpsApp(metrics=ServerMetrics(), status=dict, ready=lambda: ready[0], assets={})
    live, readiness = server["livenessProbe"]["httpGet"]["path"], server["readinessProbe"]["httpGet"]["path"]
    assert app.handle("GET", live).status == 200 and app.handle("GET", readiness).status == 503
    ready[0] = True
    assert app.handle("GET", readiness).status == 200


def test_one_server_replica_replaced_not_rolled_and_every_container_is_sized() -> None:
    objs = objects()
    deployment = objs[("Deployment", "broker-server")]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    for (kind, name), doc in objs.items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], (name, container["name"])
            assert resources["limits"]["memory"], (name, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if kind == "StatefulSet" or name == "broker-server":
            probes = [c for c in spec["containers"] if "livenessProbe" in c and "readinessProbe" in c]
            assert len(probes) == len(spec["containers"]), name
