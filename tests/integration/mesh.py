"""Helpers for integration tests: runtimes and responder processes on real NATS and etcd."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer
from shared.runtime import DistributedRuntime

ROOT = Path(__file__).resolve().parents[2]

# Every child process the tests start gets it (mesh_flags), so /engine/* routes answer them.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_config(nats: NatsServer, etcd: EtcdServer, **overrides: Any) -> MeshConfig:
    base = MeshConfig(
        namespace=overrides.pop("namespace", f"t{os.getpid()}x{time.monotonic_ns() % 10**9}"),
        nats_url=nats.url,
        etcd_endpoints=[etcd.endpoint],
        lease_ttl=2,
        heartbeat_interval=0.2,
        stream_timeout=1.0,
        graceful_shutdown_grace_period=5.0,
        admin_token=ADMIN_TOKEN,
    )
    return dataclasses.replace(base, **overrides)


@contextlib.asynccontextmanager
async def runtime(config: MeshConfig) -> AsyncIterator[DistributedRuntime]:
    rt = DistributedRuntime(config)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.shutdown(grace=0.5)


def mesh_flags(cfg: MeshConfig, *, grace: float | None = None) -> list[str]:
    """The command-line flags that put a child process into ``cfg``'s mesh."""
    period = cfg.graceful_shutdown_grace_period if grace is None else grace
    return [
        "--namespace", cfg.namespace,
        "--nats-url", cfg.nats_url,
        "--etcd-endpoints", ",".join(cfg.etcd_endpoints),
        "--lease-ttl", str(cfg.lease_ttl),
        "--stream-timeout", str(cfg.stream_timeout),
        "--heartbeat-interval", str(cfg.heartbeat_interval),
        "--graceful-shutdown-grace-period", str(period),
        "--log-format", "text",
        "--admin-token", ADMIN_TOKEN,
    ]  # fmt: skip


class Responder:
    """A serving subprocess that prints ``READY <instance hex> [extra...]`` once it serves.

    ``module`` defaults to the streaming test responder (tests/integration/responder.py).
    """

    def __init__(
        self,
        config: MeshConfig,
        endpoint: str,
        *,
        module: str = "tests.integration.responder",
        extra_args: list[str] | None = None,
    ) -> None:
        args = [
            sys.executable, "-m", module,
            "--endpoint", endpoint,
            *mesh_flags(config),
            *(extra_args or []),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"responder failed to start: {line!r} {err[-2000:]}")
        fields = line.split()
        self.instance_id = int(fields[1], 16)
        self.ready_fields = fields[2:]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
