"""Authentication and least privilege on the planes, against real servers configured by the
project's own code (``shared/infra_auth.py``, as ``sglmesh infra up`` and ``sglmesh run`` do).

Nothing is anonymous: NATS and etcd refuse clients without credentials; each role can do what
its job needs and nothing else (a worker cannot forge KV events, read the processor's replies
or write a publisher's records); the mesh works end to end with the per-role credentials, and
keeps working after etcd restarts (its simple tokens die with it: the client logs in again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aetcd
import nats
import nats.errors
import pytest

from shared.config import MeshConfig, read_credentials_file
from shared.infra import EtcdServer, NatsServer
from shared.infra_auth import Credentials, enable_etcd_auth, ensure_credentials
from shared.runtime import DistributedRuntime
from shared.runtime.etcd import EtcdSession
from shared.runtime.planes_auth import etcd_auth

NAMESPACE = "secure"


@dataclasses.dataclass
class Secured:
    nats: NatsServer
    etcd: EtcdServer
    creds: Credentials

    def config(self, role: str, **overrides: Any) -> MeshConfig:
        values = read_credentials_file(str(self.creds.env_file(role)))
        base = MeshConfig(
            namespace=NAMESPACE,
            nats_url=self.nats.url,
            etcd_endpoints=[self.etcd.endpoint],
            lease_ttl=2,
            heartbeat_interval=0.2,
            stream_timeout=1.0,
            nats_user=values["SGLMESH_NATS_USER"],
            nats_password=values["SGLMESH_NATS_PASSWORD"],
            etcd_user=values["SGLMESH_ETCD_USER"],
            etcd_password=values["SGLMESH_ETCD_PASSWORD"],
        )
        return dataclasses.replace(base, **overrides)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    creds = ensure_credentials(tmp_path)
    with (
        NatsServer(data_dir=tmp_path / "nats", config_file=creds.nats_config) as nats_server,
        EtcdServer(data_dir=tmp_path / "etcd-data") as etcd_server,
    ):
        asyncio.run(enable_etcd_auth("127.0.0.1", etcd_server.port, creds, NAMESPACE))
        yield Secured(nats_server, etcd_server, creds)


@contextlib.asynccontextmanager
async def nats_as(secured: Secured, role: str) -> AsyncIterator[tuple[Any, list[Exception]]]:
    cfg = secured.config(role)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        secured.nats.url,
        user=cfg.nats_user,
        password=cfg.nats_password,
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        yield nc, errors
    finally:
        await nc.close()


async def _denied(errors: list[Exception], nc: Any) -> bool:
    await nc.flush()
    await asyncio.sleep(0.2)
    return any("permissions violation" in str(e) for e in errors)


async def test_anonymous_clients_are_refused(secured: Secured) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.nats.url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.nats.url, user="worker", password="wrong", allow_reconnect=False)
    anonymous = EtcdSession([("127.0.0.1", secured.etcd.port)], 5)
    with pytest.raises(ConnectionError, match="requires authentication"):
        await anonymous.start(connect_timeout=1.0)
    await anonymous.close()
    wrong = MeshConfig(etcd_user="worker", etcd_password="not-the-password")
    with pytest.raises(ConnectionError, match="authentication failed"):
        session = EtcdSession([("127.0.0.1", secured.etcd.port)], 5, auth=etcd_auth(wrong))
        await session.start(connect_timeout=1.0)


async def test_only_the_publisher_may_publish_events(secured: Secured) -> None:
    subject = f"{NAMESPACE}.events.kv.1f"
    async with nats_as(secured, "processor") as (watcher, _):
        got: list[bytes] = []

        async def seen(msg: Any) -> None:
            got.append(msg.data)

        await watcher.subscribe(f"{NAMESPACE}.events.>", cb=seen)
        await watcher.flush()
        for role in ("worker", "processor", "admin"):
            async with nats_as(secured, role) as (nc, errors):
                await nc.publish(subject, b"forged by " + role.encode())
                assert await _denied(errors, nc), role
        async with nats_as(secured, "publisher") as (nc, errors):
            await nc.publish(subject, b"relayed")
            assert not await _denied(errors, nc)
        await asyncio.sleep(0.2)
        assert got == [b"relayed"]


async def test_a_worker_cannot_read_replies_or_call_workers(secured: Secured) -> None:
    async with nats_as(secured, "worker") as (nc, errors):
        await nc.subscribe("_INBOX.processor.>")
        assert await _denied(errors, nc)
    async with nats_as(secured, "worker") as (nc, errors):
        await nc.publish(f"{NAMESPACE}.backend.generate", b"request")
        assert await _denied(errors, nc)
    async with nats_as(secured, "publisher") as (nc, errors):
        await nc.subscribe(f"{NAMESPACE}.backend.generate")
        assert await _denied(errors, nc)


async def test_etcd_roles_are_confined_to_their_keys(secured: Secured) -> None:
    port = secured.etcd.port
    worker = EtcdSession([("127.0.0.1", port)], 5, auth=etcd_auth(secured.config("worker")))
    processor = EtcdSession([("127.0.0.1", port)], 5, auth=etcd_auth(secured.config("processor")))
    await worker.start(connect_timeout=5)
    await processor.start(connect_timeout=5)
    try:
        await worker.put(f"/{NAMESPACE}/models/m/1", b"card")
        for forged in (f"/{NAMESPACE}/instances/publisher/1", "/other/models/m/1"):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await worker.put(forged, b"forged")
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await processor.put(f"/{NAMESPACE}/models/m/2", b"forged")
        got = await processor.client.get(f"/{NAMESPACE}/models/m/1".encode())
        assert got is not None and got.value == b"card"
    finally:
        await worker.close()
        await processor.close()


async def test_mesh_serves_with_role_credentials_across_an_etcd_restart(
    secured: Secured,
) -> None:
    worker = DistributedRuntime(secured.config("worker"))
    processor = DistributedRuntime(secured.config("processor"))
    await worker.start()
    await processor.start()

    async def handler(request: Any, ctx: Any) -> AsyncIterator[Any]:
        for i in range(request["n"]):
            yield {"i": i}

    try:
        # The client first: the instance must arrive through the (authenticated) watch.
        client = await processor.client("backend", "generate")
        await worker.endpoint("backend", "generate").serve(handler)
        await client.wait_for_instances(1, timeout=5)
        assert [c["i"] async for c in await client.generate({"n": 3})] == [0, 1, 2]

        # Simple tokens live in etcd's memory: after a restart every token is invalid, the
        # clients log in again, and the worker's registration comes back.
        await asyncio.to_thread(secured.etcd.restart)
        await secured.etcd.wait_ready()
        await worker.put_registered(f"/{NAMESPACE}/models/m/{worker.instance_id:x}", b"card")
        await client.wait_for_instances(1, timeout=10)
        assert [c["i"] async for c in await client.generate({"n": 2})] == [0, 1]
    finally:
        await processor.shutdown(grace=0.5)
        await worker.shutdown(grace=0.5)


async def test_a_client_that_connected_before_etcd_auth_was_on_logs_in_after(
    tmp_path: Path,
) -> None:
    """Kubernetes starts the pods and the etcd-auth Job together: a processor may connect
    while etcd is still anonymous, and must log in with its credentials once auth is on
    (podman kube play of the agg overlay found it failing "user name is empty" for good)."""
    creds = ensure_credentials(tmp_path)
    with EtcdServer(data_dir=tmp_path / "etcd-data") as etcd_server:
        values = read_credentials_file(str(creds.env_file("processor")))
        cfg = MeshConfig(
            etcd_endpoints=[etcd_server.endpoint],
            etcd_user=values["SGLMESH_ETCD_USER"],
            etcd_password=values["SGLMESH_ETCD_PASSWORD"],
        )
        session = EtcdSession(cfg.etcd_hostports(), 5, auth=etcd_auth(cfg))
        await session.start()
        try:
            await session.client.get_prefix(f"/{NAMESPACE}/models/".encode())
            await enable_etcd_auth("127.0.0.1", etcd_server.port, creds, NAMESPACE)
            # Anonymous reads are refused now; this client's own are not.
            await session.client.get_prefix(f"/{NAMESPACE}/models/".encode())
        finally:
            await session.close()
