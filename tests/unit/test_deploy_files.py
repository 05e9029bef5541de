"""The deployment files parse and keep the operational promises (probes, health checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"nats.yaml", "etcd.yaml", "mesh-config.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_is_well_formed(path: Path) -> None:
    for doc in _docs(path):
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sglmesh"
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            spec = doc["spec"]
            assert (
                spec["selector"]["matchLabels"].items()
                <= spec["template"]["metadata"]["labels"].items()
            )
            for container in spec["template"]["spec"]["containers"]:
                assert "readinessProbe" in container, container["name"]
                assert "livenessProbe" in container, container["name"]
                assert "resources" in container, container["name"]


def test_mesh_config_map_uses_the_mesh_env_vars() -> None:
    (config_map,) = _docs(ROOT / "k8s" / "mesh-config.yaml")
    data = config_map["data"]
    assert data["SGLMESH_NATS_URL"].startswith("nats://nats:")
    assert data["SGLMESH_ETCD_ENDPOINTS"].startswith("http://etcd:")


def test_compose_file_has_infrastructure_with_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "etcd"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert "healthcheck" in service, name
