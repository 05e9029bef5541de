"""The shipped command lines carry KV events and load to the processor's router.

The agg and disagg topologies of the Kubernetes overlays (as ``kubectl kustomize`` renders
them) and of the compose file's profiles run as local processes against real NATS and etcd:
each LLM worker, its publisher sidecar and the processor, with the shipped command line and the
environment it is given there (Kubernetes: the ConfigMap's settings and the container's own
variables; compose: the service's environment and the image's entrypoint). What a pod or
container has and a test host has not is substituted, nothing else:

- ``sglmesh`` is this interpreter's ``-m sglmesh``; ``/models`` is the local model cache
  (the workers'; the processor has none, and fetches the model's files through the mesh into
  a temp directory standing for its ``model-cache`` emptyDir);
- the mesh's servers are the test's (with a namespace of its own);
- the credentials Secret is left out (the test servers have no users; authentication is tested
  in test_planes_auth.py), in compose the ``--credentials`` flags with it;
- a pod's IP is 127.0.0.1; each pod's two processes share a host name of their own (a UTS
  namespace: the pod's name, or compose's ``hostname``), a temp directory (the pod's
  ``engine-sockets`` emptyDir at /tmp) and this host's loopback (the pod's network namespace);
- pods share this host's network here, so the second pod of the disaggregated topology has its
  ports (9090, 9190, 5557, 5558) moved, and the processor its system port.

The other ports are the shipped ones (8000, 9090, 9190, 5557, 5558, 8998): the test fails at
once, naming the port, if another process holds one.
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
SHIPPED_PORTS = (8000, 9090, 9190, 5557, 5558, 8998)


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
        # As the servers bind: a connection of an earlier run in TIME_WAIT does not hold it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


CACHE = "/var/cache/sglmesh"  # the processor's model-cache emptyDir (Kubernetes)
Spec = tuple[list[str], dict[str, str]]  # a shipped command line and its environment
# The LLM workers of a topology (each with its publisher sidecar in its pod / network namespace).
WORKERS = {"agg": ("worker",), "disagg": ("prefill", "decode")}


def _k8s_specs(topology: str) -> dict[str, Spec]:
    """``<worker>``, ``<worker>-publisher`` and ``processor``: the overlay's containers."""
    docs = kustomize(K8S / "overlays" / topology)
    (config,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"]

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
            elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
                env[var["name"]] = "127.0.0.1"  # the pod's IP: here, this host's loopback
        return [*container["command"], *container.get("args", [])], env

    out = {}
    for name in WORKERS[topology]:
        pod = _pod(docs, "Deployment", name)
        (worker,) = pod["spec"]["containers"]
        (sidecar,) = pod["spec"]["initContainers"]
        out[name] = spec(worker)
        out[f"{name}-publisher"] = spec(sidecar)
    (processor,) = _pod(docs, "Deployment", "processor")["spec"]["containers"]
    out["processor"] = spec(processor)
    return out


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


def _compose_specs(topology: str) -> dict[str, Spec]:
    """The same roles from the compose file's profile."""
    services = _compose()["services"]

    def spec(name: str) -> Spec:
        service = services[name]
        assert topology in service.get("profiles", [topology]), name
        argv = [*_entrypoint(_compose_target(service)), *service["command"]]
        env = {
            key: API_KEY if value.startswith("${SGLMESH_API_KEY") else value
            for key, value in service["environment"].items()
        }
        return _without_credentials(argv), env

    out = {}
    for name in WORKERS[topology]:
        out[name] = spec(name)
        out[f"{name}-publisher"] = spec(f"{name}-publisher")
    out["processor"] = spec("processor")
    return out


def _hostname(source: str, worker: str) -> str:
    """The host name of a worker's pod (k8s: the pod's name) or container (compose: its
    ``hostname``, which its sidecar's ``--node`` names)."""
    if source == "compose":
        hostname: str = _compose()["services"][worker]["hostname"]
        return hostname
    return f"{worker}-5d8f7c9b4-x2k7q"


def _shift_ports(argv: list[str], shift: dict[int, int]) -> list[str]:
    """A second pod's ports on this host: the shipped port numbers, moved (flags and the
    KV-events endpoints)."""
    out = []
    for arg in argv:
        for old, new in shift.items():
            if arg == str(old):
                arg = str(new)
            arg = arg.replace(f':{old}"', f':{new}"')
        out.append(arg)
    return out


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


@pytest.mark.parametrize("topology", ["agg", "disagg"])
@pytest.mark.parametrize("source", ["k8s", "compose"])
async def test_shipped_lines_route_on_the_workers_kv_events_and_load(
    source: str, topology: str, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    busy = [p for p in SHIPPED_PORTS if not _port_free(p)]
    if busy:
        pytest.fail(f"the shipped ports {busy} are in use on this host", pytrace=False)
    specs = _k8s_specs(topology) if source == "k8s" else _compose_specs(topology)

    model = prepare_default_model()
    assert model.name == DEFAULT_MODEL_NAME
    namespace = f"wiring{uuid.uuid4().hex[:8]}"
    mesh = {
        "SGLMESH_NAMESPACE": namespace,
        "SGLMESH_NATS_URL": nats_server.url,
        "SGLMESH_ETCD_ENDPOINTS": etcd_server.endpoint,
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processor_tmp = tmp_path / "processor-tmp"
    processor_tmp.mkdir()
    # Each pod's engine-sockets emptyDir. Short: an ipc socket's path must fit in 107 bytes,
    # which pytest's deep tmp_path would not leave room for (in the pod it is /tmp).
    pod_tmps: list[Path] = []

    nc = await nats.connect(nats_server.url)
    loads: dict[int, LoadMetrics] = {}
    got_loads = asyncio.Event()

    async def on_load(msg: Any) -> None:
        load = msgspec.msgpack.decode(msg.data, type=LoadMetrics)
        loads[load.worker_id] = load
        if len(loads) == len(WORKERS[topology]):
            got_loads.set()

    await nc.subscribe(f"{namespace}.events.load.*", cb=on_load)
    try:
        with _children() as children:

            def start(
                role: str, tmp: Path, prefix: list[str], shift: dict[int, int], **extra: str
            ) -> _Child:
                argv, env = specs[role]
                environ = {**hermetic_env(), **env, **mesh, "TMPDIR": str(tmp), **extra}
                local = _local(_shift_ports(argv, shift), model.parent)
                # The processor's model-cache emptyDir is its pod's own.
                local = [str(tmp / "model-cache") if a == CACHE else a for a in local]
                child = _Child(role, [*prefix, *local], environ, logs)
                children.append(child)
                return child

            sidecar_ports = []
            for index, worker in enumerate(WORKERS[topology]):
                # Pods share this host's network namespace here: the second pod's ports move.
                shift = {} if index == 0 else {p: free_port() for p in (9090, 9190, 5557, 5558)}
                pod_tmp = Path(tempfile.mkdtemp(prefix="pod-"))
                pod_tmps.append(pod_tmp)
                # The pod's own host name (a UTS namespace), shared by its two containers. As
                # the kubelet starts them: the native sidecar first, then the worker.
                hostname = _hostname(source, worker)
                sidecar = start(
                    f"{worker}-publisher",
                    pod_tmp,
                    ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname],
                    shift,
                )
                port = shift.get(9190, 9190)
                await _wait(f"http://127.0.0.1:{port}/health", sidecar, _ok, children)
                sidecar_ports.append(port)
                engine = start(
                    worker, pod_tmp, ["nsenter", "--target", str(sidecar.proc.pid), "--uts"], shift
                )
                port = shift.get(9090, 9090)
                await _wait(f"http://127.0.0.1:{port}/health", engine, _ok, children)

            def everyone() -> str:
                return "\n".join(c.output() for c in children)

            # The processor's pod (container) has its own network namespace, where the system
            # port (the ConfigMap's 9090) is free; on this host a worker holds it.
            system_port = str(free_port())
            # Its image has no model directory (SGLMESH_MODEL_CACHE names none): it fetches
            # the model's files through the mesh, as in a pod.
            ingress = start(
                "processor",
                processor_tmp,
                [],
                {},
                SGLMESH_SYSTEM_PORT=system_port,
                SGLMESH_MODEL_CACHE=str(processor_tmp / "no-models"),
            )
            served = json.loads(
                await _wait(
                    "http://127.0.0.1:8000/v1/models",
                    ingress,
                    lambda s, b: s == 200 and DEFAULT_MODEL_NAME in b,
                    children,
                )
            )
            assert [m["id"] for m in served["data"]] == [DEFAULT_MODEL_NAME]
            await _wait("http://127.0.0.1:8000/health", ingress, _ok, children)
            # Served from files fetched through the mesh (k8s: its emptyDir; compose: the cache).
            fetched = list(processor_tmp.glob("*/mesh/*/tokenizer.json"))
            assert len(fetched) == 1, (fetched, everyone())

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
                # The engines' BlockStored events travel worker -> sidecar -> NATS -> router.
                await asyncio.sleep(2.0)
                before_sum, before_count = await overlap()
                await complete()
                after_sum, after_count = await overlap()
            assert after_count > before_count
            # The router expected most of the prompt in the chosen worker's cache: it knows
            # the blocks only from the KV events the sidecars relayed.
            assert after_sum - before_sum >= 0.5, (before_sum, after_sum, everyone())

            # Load: every engine's reports, relayed by its sidecar, on the subject the router
            # follows, and in the sidecars' own sglang:* gauges.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got_loads.wait(), 15)
            assert len(loads) == len(WORKERS[topology]), (loads, everyone())
            for port in sidecar_ports:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/metrics") as resp,
                ):
                    text = await resp.text()
                assert "sglang:num_running_reqs{" in text and "worker_id=" in text, text[-2000:]
            for pod_tmp in pod_tmps:
                assert os.listdir(pod_tmp), "the engine's socket directory is in the pod's /tmp"
    finally:
        await nc.close()
        for pod_tmp in pod_tmps:
            shutil.rmtree(pod_tmp, ignore_errors=True)


def _ok(status: int, body: str) -> bool:
    return status == 200
