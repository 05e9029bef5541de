"""Every shipped overlay renders with kubectl kustomize, the Helm chart with Helm's own library,
and every object they render is valid.

Valid means: accepted by the Kubernetes OpenAPI schemas of ``K8S_VERSION`` in strict mode (no
unknown fields), or by the schema in ``schemas/`` for a CRD (the ServiceMonitor). The broken
fixtures show that the check fails where a cluster would refuse the object.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy_tools import (
    HELM_VALUES,
    K8S,
    K8S_VERSION,
    OVERLAYS,
    helm_lint,
    helm_template,
    kustomize,
    render_all,
    validation_errors,
)

RENDERINGS = (*OVERLAYS, *HELM_VALUES)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_all()


def test_every_overlay_directory_is_tested() -> None:
    assert {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()} == set(OVERLAYS)


@pytest.mark.parametrize("overlay", RENDERINGS)
def test_overlay_renders_and_every_object_validates(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "ConfigMap", "Deployment", "StatefulSet", "Service", "Job", "NetworkPolicy",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
    } <= kinds  # fmt: skip
    errors = [e for doc in docs for e in validation_errors(doc)]
    assert not errors, f"{overlay} (Kubernetes {K8S_VERSION}):\n" + "\n".join(errors)


def _deployment(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (doc,) = [
        d
        for d in rendered["agg"]
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "worker"
    ]
    return copy.deepcopy(doc)


def _breakages() -> dict[str, Any]:
    def misspelt_field(doc: dict[str, Any]) -> None:
        doc["spec"]["replica"] = doc["spec"].pop("replicas")

    def wrong_type(doc: dict[str, Any]) -> None:
        doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9090"

    def missing_required(doc: dict[str, Any]) -> None:
        del doc["spec"]["selector"]

    def map_for_a_list(doc: dict[str, Any]) -> None:
        doc["spec"]["template"]["spec"]["containers"][0]["env"] = {"SGLMESH_LOG_FORMAT": "text"}

    return {
        "misspelt_field": misspelt_field,
        "wrong_type": wrong_type,
        "missing_required": missing_required,
        "map_for_a_list": map_for_a_list,
    }


BREAKAGES = _breakages()


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_object_fails_validation(
    breakage: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    doc = _deployment(rendered)
    assert validation_errors(doc) == []
    BREAKAGES[breakage](doc)
    assert validation_errors(doc), f"{breakage} went through"


def test_a_broken_service_monitor_fails_validation(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (monitor,) = [d for d in rendered["agg"] if d["kind"] == "ServiceMonitor"]
    assert validation_errors(monitor) == []
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert validation_errors(broken)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    assert validation_errors(broken)


def test_a_kind_without_a_schema_fails_validation() -> None:
    doc = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "labels": {"app.kubernetes.io/part-of": "sglmesh"}},
        "spec": {},
    }
    (error,) = validation_errors(doc)
    assert "no schema" in error


def test_a_broken_overlay_fails_to_render_or_validate(tmp_path: Path) -> None:
    """An overlay on top of a shipped one, as an operator would write it: a patch with a
    misspelt field renders (kustomize does not know the API) and fails validation; a patch
    aimed at a missing object fails to render."""
    overlay = tmp_path / "typo"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "agg", overlay)],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "worker"},
                        "patch": yaml.safe_dump(
                            [
                                {
                                    "op": "add",
                                    "path": "/spec/template/spec/containers/0/resource",
                                    "value": {"limits": {"memory": "1Gi"}},
                                }
                            ]
                        ),
                    }
                ],
            }
        )
    )
    docs = kustomize(overlay)
    errors = [e for doc in docs for e in validation_errors(doc)]
    assert len(errors) == 1 and "resource" in errors[0], errors
    overlay = tmp_path / "missing"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "agg", overlay)],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "worker"},
                        "patch": yaml.safe_dump(
                            [
                                {
                                    "op": "replace",
                                    "path": "/spec/template/spec/nodeName/x",
                                    "value": 1,
                                }
                            ]
                        ),
                    }
                ],
            }
        )
    )
    with pytest.raises(RuntimeError, match="kubectl kustomize"):
        kustomize(overlay)


def test_the_chart_lints_clean() -> None:
    for report in helm_lint(list(HELM_VALUES.values())):
        assert not report["errors"], report
        # Helm's severities: 1 info ("icon is recommended"), 2 warning, 3 error.
        assert all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize(
    "values,complaint",
    [
        ({"topology": "both"}, "/topology"),
        ({"engine": "vllm"}, "/engine"),
        ({"model": {"path": "/data/model"}}, "/model/path"),
        ({"etcd": {"replicas": 2}}, "/etcd/replicas"),
        ({"vision": {"imageSize": 10}}, "/vision/imageSize"),
    ],
)
def test_the_chart_refuses_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RuntimeError, match=f"HelmValuesError(.|\\n)*{complaint}"):
        helm_template(values=values)


def test_chart_values_reach_the_objects() -> None:
    docs = helm_template(
        values={
            "topology": "disagg",
            "images": {"registry": "registry.example.com/", "tag": "1.2.3"},
            "workers": {"decode": {"replicas": 3}},
            "nats": {"replicas": 5},
            "networkPolicies": {"enabled": False},
            "serviceMonitor": {"enabled": False},
            "kvPublisher": {"enabled": False},
        }
    )
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    decode = by_name[("Deployment", "decode")]
    assert decode["spec"]["replicas"] == 3
    (container,) = decode["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/sglmesh/decode:1.2.3"
    assert "--kv-events-config" not in container["args"]
    assert "initContainers" not in decode["spec"]["template"]["spec"]
    nats = by_name[("StatefulSet", "nats")]
    assert nats["spec"]["replicas"] == 5
    routes = nats["spec"]["template"]["spec"]["containers"][0]["args"][-1].split(",")
    assert len(routes) == 5
    assert not {k for k, _ in by_name} & {"NetworkPolicy", "ServiceMonitor"}
    assert [e for d in docs for e in validation_errors(d)] == []
