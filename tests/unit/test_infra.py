"""shared.infra against the real binaries: every other real-infrastructure test stands on it."""

from __future__ import annotations

import os
import socket
import uuid

import aetcd
import nats
import pytest

from shared.infra import (
    LOOPBACK,
    EtcdServer,
    InfraError,
    NatsServer,
    PortInUseError,
    find_binary,
    free_port,
    probe_etcd,
    probe_nats,
)

_GRPC_OPTIONS = {
    # gRPC honours *_proxy variables; a loopback etcd must never be reached through a proxy.
    "grpc.enable_http_proxy": 0,
    # By default a new channel reuses a process-wide subchannel, and after a server restart
    # that one may still be in reconnect backoff: "Connection refused" for up to a second.
    "grpc.use_local_subchannel_pool": 1,
}


def _etcd_client(server: EtcdServer) -> aetcd.Client:
    return aetcd.Client(host=server.host, port=server.port, timeout=5, options=_GRPC_OPTIONS)


async def _etcd_get(server: EtcdServer, key: bytes) -> bytes | None:
    # A fresh client per call: a restarted server must not wait for gRPC's reconnect backoff.
    async with _etcd_client(server) as client:
        found = await client.get(key)
    return None if found is None else bytes(found.value)


async def _etcd_put(server: EtcdServer, key: bytes, value: bytes) -> None:
    async with _etcd_client(server) as client:
        await client.put(key, value)


async def _nats_round_trip(server: NatsServer) -> None:
    nc = await nats.connect(server.url, connect_timeout=2, allow_reconnect=False)
    try:
        subject = f"infra.test.{uuid.uuid4().hex}"
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"ping")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"ping"
    finally:
        await nc.close()


@pytest.mark.parametrize("name", ["nats-server", "etcd"])
def test_find_binary_finds_both(name: str) -> None:
    path = find_binary(name)
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_find_binary_missing_says_how_to_install() -> None:
    with pytest.raises(InfraError, match=r"pip install 'sglmesh\[local\]'"):
        find_binary("sglmesh-no-such-server")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))


async def test_nats_publish_subscribe_round_trip(nats_server: NatsServer) -> None:
    assert nats_server.running
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    await _nats_round_trip(nats_server)


async def test_etcd_put_get(etcd_server: EtcdServer) -> None:
    assert etcd_server.endpoint == f"http://127.0.0.1:{etcd_server.port}"
    key = f"/test/infra/{uuid.uuid4().hex}".encode()
    await _etcd_put(etcd_server, key, b"value")
    assert await _etcd_get(etcd_server, key) == b"value"


def test_taken_port_is_refused_before_spawning(nats_server: NatsServer) -> None:
    clash = NatsServer(nats_server.port, log_file=nats_server.log_file.with_name("clash.log"))
    with pytest.raises(PortInUseError) as caught:
        clash.start()
    assert caught.value.port == nats_server.port
    assert str(nats_server.port) in str(caught.value)
    assert not clash.running


@pytest.mark.chaos
async def test_nats_restart_keeps_port(own_nats: NatsServer) -> None:
    port, url, old_pid = own_nats.port, own_nats.url, own_nats.pid
    own_nats.restart()
    await own_nats.wait_ready()
    assert (own_nats.port, own_nats.url) == (port, url)
    assert own_nats.pid not in (None, old_pid)
    await _nats_round_trip(own_nats)


@pytest.mark.chaos
async def test_etcd_restart_keeps_data_and_wipe_loses_it(own_etcd: EtcdServer) -> None:
    port, peer_port = own_etcd.port, own_etcd.peer_port
    await _etcd_put(own_etcd, b"/test/infra/durable", b"kept")

    own_etcd.restart()
    await own_etcd.wait_ready()
    assert await _etcd_get(own_etcd, b"/test/infra/durable") == b"kept"

    own_etcd.restart(wipe=True)
    await own_etcd.wait_ready()
    assert (own_etcd.port, own_etcd.peer_port) == (port, peer_port)
    assert await _etcd_get(own_etcd, b"/test/infra/durable") is None


@pytest.mark.chaos
@pytest.mark.parametrize("fixture", ["own_nats", "own_etcd"])
def test_kill_really_kills(fixture: str, request: pytest.FixtureRequest) -> None:
    server: NatsServer | EtcdServer = request.getfixturevalue(fixture)
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not server.running
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    probe = probe_nats if isinstance(server, NatsServer) else probe_etcd
    assert not probe(server.host, server.port, 0.5)
    # A killed server comes back on the same port, as a chaos test expects.
    server.start()
    server.wait_ready_sync()
    assert probe(server.host, server.port, 1.0)
