"""Processes for the processor's integration tests, started exactly as a user starts them.

``python -m sglmesh worker --engine sim|torch ...`` and ``python -m sglmesh processor ...`` run as
subprocesses on the session's real NATS and etcd (or a test's own), each with its log in a
file that a failing assertion can show. A :class:`Mesh` is one namespace: its workers and
processors, all killed (SIGKILL) when it closes, whatever state a test left them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any

import aiohttp

from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer, free_port
from shared.model import default_cache_dir
from tests.integration.mesh import ROOT, make_config, mesh_flags

__all__ = [
    "Encoder",
    "Mesh",
    "Processor",
    "Worker",
    "error_detail",
    "mesh",
    "parse_metric",
    "sse_events",
]


def hermetic_env() -> dict[str, str]:
    """The environment without a developer's SGLMESH_*/DYN_* settings (they would change the
    flags of what we start); the model cache location is kept."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SGLMESH_", "DYN_")) or key == "SGLMESH_MODEL_CACHE"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metric(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` (exact) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != name:
            continue
        found = dict(_LABEL.findall(match.group("labels") or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group("value"))
    return total


class _Process:
    """A subprocess whose stdout and stderr go to a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[str] = open(self.log_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=hermetic_env(), stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def output(self, tail: int = 6000) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} ({self.log_path}) ---\n{text[-tail:]}"

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()


async def _poll_status(
    proc: _Process, url: str, timeout: float, ok: Any = lambda status, body: status == 200
) -> Any:
    """GET ``url`` until ``ok(status, json body)``; fail at once if the process exits."""
    deadline = time.monotonic() + timeout
    last: Any = None
    async with aiohttp.ClientSession() as http:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited {proc.proc.returncode}:\n{proc.output()}")
            try:
                async with http.get(url) as resp:
                    body = await resp.json(content_type=None)
                    last = (resp.status, body)
                    if ok(resp.status, body):
                        return body
            except (aiohttp.ClientError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name}: {url} not ready ({last}):\n{proc.output()}")
            await asyncio.sleep(0.1)


async def _metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


class Worker(_Process):
    """``python -m sglmesh worker --engine sim|torch ...`` with its system server on a free
    port (the simulator at ``speedup``, or the real model on the torch engine)."""

    def __init__(
        self,
        cfg: MeshConfig,
        model: Path,
        log_dir: Path,
        *flags: str,
        name: str = "worker",
        served_model_name: str | None = None,
        speedup: float = 0,
        engine: str = "sim",
    ) -> None:
        self.system_port = free_port()
        self.base = f"http://127.0.0.1:{self.system_port}"
        engine_flags = ["--speedup-ratio", str(speedup)] if engine == "sim" else []
        args = [
            sys.executable, "-m", "sglmesh", "worker",
            "--engine", engine,
            *engine_flags,
            "--model-path", str(model),
            "--page-size", "16",
            "--max-total-tokens", "65536",
            *mesh_flags(cfg),
            "--system-host", "127.0.0.1",
            "--system-port", str(self.system_port),
            *(["--served-model-name", served_model_name] if served_model_name else []),
            *flags,
        ]  # fmt: skip
        super().__init__(f"{name}-{self.system_port}", args, log_dir)

    async def wait_ready(self, timeout: float = 60) -> None:
        await _poll_status(self, f"{self.base}/health", timeout)

    async def metrics(self) -> str:
        return await _metrics_text(f"{self.base}/metrics")

    async def metric(self, name: str, **labels: str) -> float:
        return parse_metric(await self.metrics(), name, **labels)


class Encoder(_Process):
    """``python -m sglmesh worker --embedding-worker ...``: an embedding worker on the CPU
    engine, with its system server on a free port. ``model`` None: no ``--model-path``, and
    ``flags`` choose the role (``--multimodal-encode-worker`` for the image encoder)."""

    def __init__(
        self,
        cfg: MeshConfig,
        model: Path | None,
        log_dir: Path,
        *flags: str,
        name: str = "encoder",
    ) -> None:
        self.system_port = free_port()
        self.base = f"http://127.0.0.1:{self.system_port}"
        role = ["--embedding-worker", "--model-path", str(model)] if model is not None else []
        args = [
            sys.executable, "-m", "sglmesh", "worker", *role,
            *mesh_flags(cfg),
            "--system-host", "127.0.0.1",
            "--system-port", str(self.system_port),
            *flags,
        ]  # fmt: skip
        super().__init__(f"{name}-{self.system_port}", args, log_dir)

    async def wait_ready(self, timeout: float = 180) -> None:
        # Generous: torch and the weights load in seconds alone, far slower beside others.
        await _poll_status(self, f"{self.base}/health", timeout)

    async def metric(self, name: str, **labels: str) -> float:
        return parse_metric(await _metrics_text(f"{self.base}/metrics"), name, **labels)


class Processor(_Process):
    """``python -m sglmesh processor ...`` on a free HTTP port."""

    def __init__(
        self, cfg: MeshConfig, log_dir: Path, *flags: str, name: str = "processor"
    ) -> None:
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        args = [
            sys.executable, "-m", "sglmesh", "processor",
            *mesh_flags(cfg),
            "--http-host", "127.0.0.1",
            "--http-port", str(self.http_port),
            # Test models live in pytest's temp directories.
            *([] if "--model-root" in flags else [
                "--model-root", f"{tempfile.gettempdir()},{default_cache_dir()}"]),
            *flags,
        ]  # fmt: skip
        super().__init__(f"{name}-{self.http_port}", args, log_dir)

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    async def wait_live(self, timeout: float = 60) -> None:
        await _poll_status(self, f"{self.base}/live", timeout)

    async def wait_model(self, model: str, timeout: float = 60) -> None:
        """Until ``model`` is listed in /v1/models and /health is ready."""

        def listed(status: int, body: Any) -> bool:
            return status == 200 and any(m.get("id") == model for m in body.get("data", []))

        await _poll_status(self, f"{self.v1}/models", timeout, listed)
        await _poll_status(self, f"{self.base}/health", timeout)

    async def wait_no_models(self, timeout: float = 30) -> None:
        await _poll_status(
            self, f"{self.v1}/models", timeout, lambda s, b: s == 200 and b.get("data") == []
        )

    async def metrics(self) -> str:
        return await _metrics_text(f"{self.base}/metrics")

    async def metric(self, name: str, **labels: str) -> float:
        return parse_metric(await self.metrics(), name, **labels)


class Mesh:
    """One namespace: its config, workers and processors; ``close`` kills what is left."""

    def __init__(self, cfg: MeshConfig, log_dir: Path) -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        self.encoders: list[Encoder] = []
        self.processors: list[Processor] = []

    async def add_workers(
        self,
        model: Path,
        *specs: tuple[str, ...],
        speedup: float = 0,
        served: str | None = None,
        engine: str = "sim",
    ) -> list[Worker]:
        """One worker per ``specs`` item (its extra flags), started together, ready on return."""
        new = [
            Worker(
                self.cfg,
                model,
                self.log_dir,
                *flags,
                name=_role(flags),
                speedup=speedup,
                served_model_name=served,
                engine=engine,
            )
            for flags in specs
        ]
        self.workers.extend(new)
        await asyncio.gather(*(w.wait_ready() for w in new))
        return new

    async def add_encoders(self, model: Path | None, *specs: tuple[str, ...]) -> list[Encoder]:
        """One embedding worker per ``specs`` item (its extra flags), ready on return."""
        new = [Encoder(self.cfg, model, self.log_dir, *flags) for flags in specs]
        self.encoders.extend(new)
        await asyncio.gather(*(e.wait_ready() for e in new))
        return new

    def add_processor(self, *flags: str) -> Processor:
        processor = Processor(self.cfg, self.log_dir, *flags)
        self.processors.append(processor)
        return processor

    def output(self) -> str:
        return "\n".join(p.output() for p in [*self.processors, *self.workers, *self.encoders])

    def close(self) -> None:
        for p in [*self.processors, *self.workers, *self.encoders]:
            p.stop()


def _role(flags: tuple[str, ...]) -> str:
    if "--disaggregation-mode" in flags:
        return flags[flags.index("--disaggregation-mode") + 1]
    return "worker"


@contextlib.asynccontextmanager
async def mesh(
    nats: NatsServer, etcd: EtcdServer, log_dir: Path, **overrides: Any
) -> AsyncIterator[Mesh]:
    """A fresh namespace on ``nats``/``etcd``; every process started in it dies on exit."""
    m = Mesh(make_config(nats, etcd, **overrides), log_dir)
    try:
        yield m
    finally:
        m.close()


# -- HTTP helpers -------------------------------------------------------------------------------


def error_detail(body: Any) -> Mapping[str, Any]:
    """The ``error`` object of an OpenAI error body, checked for its four fields."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    detail = body["error"]
    assert isinstance(detail, dict), body
    assert set(detail) >= {"message", "type", "param", "code"}, body
    assert isinstance(detail["message"], str) and detail["message"], body
    assert isinstance(detail["type"], str) and detail["type"], body
    return detail


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The JSON payloads of a server-sent event stream, up to ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
