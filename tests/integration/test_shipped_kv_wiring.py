"""The shipped command lines carry KV events and load to the processor's router.

The agg topology of the Kubernetes overlay (as ``kubectl kustomize`` renders it) and of the
compose file is run as local processes against real NATS and etcd: the worker, its publisher
sidecar and the processor, each with its shipped command line and the environment it is given
there (Kubernetes: the ConfigMap's settings and the container's own variables; compose: the
service's environment and the image's entrypoint). What a pod or container has and a test host
has not is substituted, nothing else:
``sglmesh`` is this interpreter's ``-m sglmesh``; ``/models`` is the local model cache; the
mesh's servers are the test's (a namespace of its own); the processor's system port, since its
pod's network namespace is not the worker's here; the sidecar and the worker share a temp
directory (the pod's ``engine-sockets`` emptyDir at /tmp); the credentials Secret is left out
(the test servers have no users; authentication is tested in test_planes_auth.py), in compose
the ``--credentials`` flags with it; compose's worker host name (``hostname: worker``, the
sidecar's ``--node``) is this host's. Worker and sidecar share this host's name and loopback as
they share the pod's (the container's network namespace).

The ports are the shipped ones (8000, 9090, 9190, 5557, 5558): the test fails at once, naming
the port, if another process holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import msgspec
import nats
import pytest

from proto.metrics import LoadMetrics
from shared.infra import EtcdServer, NatsServer, free_port
from shared.model import DEFAULT_MODEL_NAME, prepare_default_model
from tests.integration.processor_mesh import hermetic_env, parse_metric
from tests.unit.deploy_tools import K8S, ROOT, kustomize
from tests.unit.test_deploy_files import _compose, _compose_target, _entrypoint

API_KEY = "k" * 32
SHIPPED_PORTS = (8000, 9090, 9190, 5557, 5558)


class _Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[str] = open(self.log_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._log.flush()
        return f"--- {self.name} ---\n{self.log_path.read_text(errors='replace')[-4000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    template: dict[str, Any] = doc["spec"]["template"]
    return template


def _local(arg: str, models: Path) -> str:
    """A pod's path, as it is on this host."""
    if arg == "/models" or arg.startswith("/models/"):
        return str(models) + arg.removeprefix("/models")
    return arg


Spec = tuple[list[str], dict[str, str]]  # a shipped command line and its environment


def _k8s_specs() -> dict[str, Spec]:
    docs = kustomize(K8S / "overlays" / "agg")
    (config,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"]
    worker_pod = _pod(docs, "Deployment", "worker")
    (worker,) = worker_pod["spec"]["containers"]
    (sidecar,) = worker_pod["spec"]["initContainers"]
    (processor,) = _pod(docs, "Deployment", "processor")["spec"]["containers"]

    def spec(container: dict[str, Any]) -> Spec:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] == "sglmesh-config"
            env.update(config)
        for var in container.get("env", []):
            if var["name"] == "SGLMESH_CREDENTIALS":
                continue  # the Secret's file: the test servers have no users
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var["valueFrom"].get("secretKeyRef", {}).get("name") == "sglmesh-api-key":
                env[var["name"]] = API_KEY
        return [*container["command"], *container.get("args", [])], env

    return {"publisher": spec(sidecar), "worker": spec(worker), "processor": spec(processor)}


def _without_credentials(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--credentials":
            skip = True
        else:
            out.append(arg)
    return out


def _compose_specs() -> dict[str, Spec]:
    services = _compose()["services"]

    def spec(name: str) -> Spec:
        service = services[name]
        argv = [*_entrypoint(_compose_target(service)), *service["command"]]
        env = {
            key: API_KEY if value.startswith("${SGLMESH_API_KEY") else value
            for key, value in service["environment"].items()
        }
        return _without_credentials(argv), env

    publisher_argv, publisher_env = spec("worker-publisher")
    assert services["worker"]["hostname"] == "worker"
    publisher_argv = [socket.gethostname() if a == "worker" else a for a in publisher_argv]
    return {
        "publisher": (publisher_argv, publisher_env),
        "worker": spec("worker"),
        "processor": spec("processor"),
    }


def _local(argv: list[str], models: Path) -> list[str]:
    """A shipped command line as it runs here: /models is the local model cache."""
    assert argv[0] == "sglmesh"
    out = [sys.executable, "-m", "sglmesh"]
    for arg in argv[1:]:
        if arg == "/models" or arg.startswith("/models/"):
            arg = str(models) + arg.removeprefix("/models")
        out.append(arg)
    return out


@contextlib.contextmanager
def _children() -> Iterator[list[_Child]]:
    children: list[_Child] = []
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


async def _wait(
    url: str, child: _Child, ok: Any, everyone: list[_Child], timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            if child.proc.poll() is not None:
                logs = "\n".join(c.output() for c in everyone)
                raise AssertionError(f"{child.name} exited:\n{logs}")
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with http.get(url) as resp:
                    body = await resp.text()
                    if ok(resp.status, body):
                        return body
            if time.monotonic() > deadline:
                logs = "\n".join(c.output() for c in everyone)
                raise AssertionError(f"{url} not ready:\n{logs}")
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("source", ["k8s", "compose"])
async def test_shipped_agg_lines_route_on_the_workers_kv_events_and_load(
    source: str, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    busy = [p for p in SHIPPED_PORTS if not _port_free(p)]
    if busy:
        pytest.fail(f"the shipped ports {busy} are in use on this host", pytrace=False)
    specs = _k8s_specs() if source == "k8s" else _compose_specs()

    model = prepare_default_model()
    assert model.name == DEFAULT_MODEL_NAME
    namespace = f"wiring{uuid.uuid4().hex[:8]}"
    mesh = {
        "SGLMESH_NAMESPACE": namespace,
        "SGLMESH_NATS_URL": nats_server.url,
        "SGLMESH_ETCD_ENDPOINTS": etcd_server.endpoint,
    }
    # The engine-sockets emptyDir. Short: an ipc socket's path must fit in 107 bytes, which
    # pytest's deep tmp_path would not leave room for (in the pod it is /tmp).
    pod_tmp = Path(tempfile.mkdtemp(prefix="pod-"))
    processor_tmp = tmp_path / "processor-tmp"
    processor_tmp.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    nc = await nats.connect(nats_server.url)
    loads: list[LoadMetrics] = []

    got_load = asyncio.Event()

    async def on_load(msg: Any) -> None:
        loads.append(msgspec.msgpack.decode(msg.data, type=LoadMetrics))
        got_load.set()

    await nc.subscribe(f"{namespace}.events.load.*", cb=on_load)
    try:
        with _children() as children:
            # As the kubelet starts them: the native sidecar first, then the worker.
            def start(role: str, tmp: Path, **extra: str) -> _Child:
                argv, env = specs[role]
                environ = {**hermetic_env(), **env, **mesh, "TMPDIR": str(tmp), **extra}
                return _Child(role, _local(argv, model.parent), environ, logs)

            publisher = start("publisher", pod_tmp)
            children.append(publisher)
            engine = start("worker", pod_tmp)
            children.append(engine)

            def everyone() -> str:
                return "\n".join(c.output() for c in children)

            await _wait("http://127.0.0.1:9190/health", publisher, lambda s, b: s == 200, children)
            await _wait("http://127.0.0.1:9090/health", engine, lambda s, b: s == 200, children)
            # The processor's pod (container) has its own network namespace, where the system
            # port (the ConfigMap's 9090) is free; on this host the worker holds it.
            ingress = start("processor", processor_tmp, SGLMESH_SYSTEM_PORT=str(free_port()))
            children.append(ingress)
            served = json.loads(
                await _wait(
                    "http://127.0.0.1:8000/v1/models",
                    ingress,
                    lambda s, b: s == 200 and DEFAULT_MODEL_NAME in b,
                    children,
                )
            )
            assert [m["id"] for m in served["data"]] == [DEFAULT_MODEL_NAME]
            await _wait("http://127.0.0.1:8000/health", ingress, lambda s, b: s == 200, children)

            prompt = "tell me a long story about the sun and the moon and the stars " * 8
            body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 4}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with aiohttp.ClientSession(headers=headers) as http:

                async def complete() -> dict[str, Any]:
                    url = "http://127.0.0.1:8000/v1/completions"
                    async with http.post(url, json=body) as resp:
                        answer: dict[str, Any] = await resp.json()
                        assert resp.status == 200, (answer, everyone())
                        return answer

                async def overlap() -> tuple[float, float]:
                    async with http.get("http://127.0.0.1:8000/metrics") as resp:
                        text = await resp.text()
                    labels = {"model": DEFAULT_MODEL_NAME}
                    return (
                        parse_metric(text, "sglmesh_processor_kv_overlap_ratio_sum", **labels),
                        parse_metric(text, "sglmesh_processor_kv_overlap_ratio_count", **labels),
                    )

                await complete()
                # The engine's BlockStored events travel worker -> sidecar -> NATS -> router.
                await asyncio.sleep(2.0)
                before_sum, before_count = await overlap()
                await complete()
                after_sum, after_count = await overlap()
            assert after_count == before_count + 1
            # The router expected most of the prompt in the worker's cache: it knows the
            # blocks only from the KV events the sidecar relayed.
            assert after_sum - before_sum >= 0.5, (before_sum, after_sum, everyone())

            # Load: the engine's reports, relayed by the sidecar, on the subject the router
            # follows, and in the sidecar's own sglang:* gauges.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got_load.wait(), 15)
            assert loads, f"no load report on {namespace}.events.load.*:\n{everyone()}"
            async with (
                aiohttp.ClientSession() as http,
                http.get("http://127.0.0.1:9190/metrics") as resp,
            ):
                text = await resp.text()
            assert "sglang:num_running_reqs{" in text and "worker_id=" in text, text[-2000:]
            assert os.listdir(pod_tmp), "the engine's socket directory is in the shared /tmp"
    finally:
        await nc.close()
        shutil.rmtree(pod_tmp, ignore_errors=True)
