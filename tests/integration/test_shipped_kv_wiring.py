"""The shipped Kubernetes command lines carry KV events and load to the processor's router.

The agg overlay, as ``kubectl kustomize`` renders it, is run as local processes against real
NATS and etcd: the worker container, its publisher sidecar and the processor, each with the
rendered command line and the environment its pod gives it (the ConfigMap's settings and the
container's own variables). What a pod has and a test host has not is substituted, nothing else:
``sglmesh`` is this interpreter's ``-m sglmesh``; ``/models`` is the local model cache; the
mesh's servers are the test's (a namespace of its own); the processor's system port, since its
pod's network namespace is not the worker's here; the sidecar and the worker share a temp
directory (the pod's ``engine-sockets`` emptyDir at /tmp); the credentials Secret is left out
(the test servers have no users; authentication is tested in test_planes_auth.py). Worker and
sidecar share this host's name and loopback as they share the pod's.

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


def _command(container: dict[str, Any], models: Path) -> list[str]:
    argv = [*container["command"], *container.get("args", [])]
    assert argv[0] == "sglmesh"
    return [sys.executable, "-m", "sglmesh", *(_local(a, models) for a in argv[1:])]


def _environment(
    container: dict[str, Any], config: dict[str, str], mesh: dict[str, str], tmp: Path
) -> dict[str, str]:
    env = hermetic_env()
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
    env.update(mesh)
    env["TMPDIR"] = str(tmp)
    return env


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


async def test_agg_overlay_routes_on_the_workers_kv_events_and_load(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    busy = [p for p in SHIPPED_PORTS if not _port_free(p)]
    if busy:
        pytest.fail(f"the shipped ports {busy} are in use on this host", pytrace=False)
    docs = kustomize(K8S / "overlays" / "agg")
    (config,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"]
    worker_pod = _pod(docs, "Deployment", "worker")
    (worker,) = worker_pod["spec"]["containers"]
    (sidecar,) = worker_pod["spec"]["initContainers"]
    (processor,) = _pod(docs, "Deployment", "processor")["spec"]["containers"]

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
            publisher = _Child(
                "publisher",
                _command(sidecar, model.parent),
                _environment(sidecar, config, mesh, pod_tmp),
                logs,
            )
            children.append(publisher)
            engine = _Child(
                "worker",
                _command(worker, model.parent),
                _environment(worker, config, mesh, pod_tmp),
                logs,
            )
            children.append(engine)

            def everyone() -> str:
                return "\n".join(c.output() for c in children)

            await _wait("http://127.0.0.1:9190/health", publisher, lambda s, b: s == 200, children)
            await _wait("http://127.0.0.1:9090/health", engine, lambda s, b: s == 200, children)
            # The processor's pod has its own network namespace, where the ConfigMap's system
            # port (9090) is free; on this host the worker holds it.
            processor_env = _environment(processor, config, mesh, processor_tmp)
            processor_env["SGLMESH_SYSTEM_PORT"] = str(free_port())
            ingress = _Child("processor", _command(processor, model.parent), processor_env, logs)
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
