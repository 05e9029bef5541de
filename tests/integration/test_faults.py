"""Faults survived for real: killed responders, SIGTERM drain, NATS and etcd restarts."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import pytest

from proto.discovery import instances_prefix
from shared.infra import EtcdServer, NatsServer
from shared.runtime import Context, MeshError, ResponderDeadError
from tests.integration.mesh import Responder, make_config, runtime

pytestmark = pytest.mark.chaos


async def start_responder(cfg: Any, endpoint: str) -> Responder:
    return await asyncio.to_thread(Responder, cfg, endpoint)


async def test_kill_9_mid_stream_fails_fast_and_the_instance_leaves_discovery(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    endpoint = f"{cfg.namespace}.backend.generate"
    responder = await start_responder(cfg, endpoint)
    try:
        async with runtime(cfg) as caller:
            client = await caller.client(endpoint)
            await client.wait_for_instances(1, timeout=5)
            stream = await client.generate({"n": 1000, "delay": 0.02})
            for _ in range(5):
                await stream.__anext__()
            responder.signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(ResponderDeadError) as info:
                async for _ in stream:
                    pass
            failed_after = time.monotonic() - t0
            assert info.value.retryable
            # Whichever comes first: silence past the stream timeout or the lease expiring.
            assert failed_after <= cfg.stream_timeout + 0.5
            await client._watcher.wait_for(lambda items: not items, timeout=cfg.lease_ttl + 2)
            assert client.instances() == []
    finally:
        responder.stop()


async def test_sigterm_drains_in_flight_streams_and_new_requests_go_elsewhere(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    endpoint = f"{cfg.namespace}.backend.generate"
    leaving, staying = await asyncio.gather(
        start_responder(cfg, endpoint), start_responder(cfg, endpoint)
    )
    try:
        async with runtime(cfg) as caller:
            client = await caller.client(endpoint)
            await client.wait_for_instances(2, timeout=5)

            async def collect(stream: Any) -> list[dict[str, int]]:
                return [c async for c in stream]

            in_flight = [
                await client.generate({"n": 20, "delay": 0.05}, instance_id=leaving.instance_id)
                for _ in range(4)
            ]
            tasks = [asyncio.create_task(collect(s)) for s in in_flight]
            await asyncio.sleep(0.2)
            leaving.signal(signal.SIGTERM)
            await client._watcher.wait_for(
                lambda _: client.instance_ids() == [staying.instance_id], timeout=3
            )
            new = [await client.generate({"n": 1}) for _ in range(6)]
            new_pids = {c["pid"] for s in new for c in [x async for x in s]}
            assert new_pids == {staying.proc.pid}
            finished = await asyncio.gather(*tasks)
            for chunks in finished:
                assert [c["i"] for c in chunks] == list(range(20))
                assert {c["pid"] for c in chunks} == {leaving.proc.pid}
            assert await asyncio.to_thread(leaving.wait, 10) == 0
    finally:
        leaving.stop()
        staying.stop()


async def test_sigterm_past_the_grace_period_ends_streams_with_a_retryable_error(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server, graceful_shutdown_grace_period=0.3)
    endpoint = f"{cfg.namespace}.backend.generate"
    responder = await start_responder(cfg, endpoint)
    try:
        async with runtime(cfg) as caller:
            client = await caller.client(endpoint)
            await client.wait_for_instances(1, timeout=5)
            stream = await client.generate({"n": 1000, "delay": 0.05})
            await stream.__anext__()
            responder.signal(signal.SIGTERM)
            with pytest.raises(MeshError) as info:
                async for _ in stream:
                    pass
            assert info.value.code == "shutting_down"
            assert info.value.retryable
            assert await asyncio.to_thread(responder.wait, 10) == 0
    finally:
        responder.stop()


async def test_nats_restart_under_load(own_nats: NatsServer, etcd_server: EtcdServer) -> None:
    cfg = make_config(own_nats, etcd_server)

    async def handler(request: Any, ctx: Context) -> AsyncIterator[int]:
        for i in range(request["n"]):
            await asyncio.sleep(0.005)
            yield i

    outcomes: collections.Counter[str] = collections.Counter()
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(handler)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    # Every request must end, one way or the other, well within this bound.
                    async with asyncio.timeout(cfg.stream_timeout + 2):
                        stream = await client.generate({"n": 10})
                        assert [c async for c in stream] == list(range(10))
                    outcomes["ok"] += 1
                except MeshError as exc:
                    assert exc.retryable, exc
                    outcomes[exc.code] += 1
                    await asyncio.sleep(0.05)

        loaders = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.5)
        ok_before = outcomes["ok"]
        assert ok_before > 0
        own_nats.kill()
        await asyncio.sleep(1.0)
        own_nats.start()
        await own_nats.wait_ready()
        back = time.monotonic()
        ok_at_restart = outcomes["ok"]
        while outcomes["ok"] < ok_at_restart + 20:
            assert time.monotonic() - back < 5, f"no recovery within 5 s: {outcomes}"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loaders), timeout=cfg.stream_timeout + 3)
    assert outcomes["ok"] > ok_at_restart


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data", "data-lost"])
async def test_etcd_restart_worker_is_discoverable_again(
    nats_server: NatsServer, own_etcd: EtcdServer, wipe: bool
) -> None:
    cfg = make_config(nats_server, own_etcd)

    async def handler(request: Any, ctx: Context) -> AsyncIterator[int]:
        yield 1

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(handler)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        own_etcd.kill()
        await asyncio.sleep(0.5)
        # NATS still works while etcd is down: the last known instances keep serving.
        assert [c async for c in await client.generate({})] == [1]
        own_etcd.restart(wipe=wipe)
        await own_etcd.wait_ready()
        back = time.monotonic()
        prefix = instances_prefix(cfg.namespace, "backend", "generate").encode()
        etcd = aetcd.Client(
            host="127.0.0.1",
            port=own_etcd.port,
            options={"grpc.use_local_subchannel_pool": 1, "grpc.enable_http_proxy": 0},
        )
        try:
            while True:
                found = list(await etcd.get_prefix(prefix))
                if found:
                    break
                assert time.monotonic() - back < 2 * cfg.lease_ttl, "not re-registered"
                await asyncio.sleep(0.1)
        finally:
            await etcd.close()
        await client.wait_for_instances(1, timeout=2 * cfg.lease_ttl)
        assert [c async for c in await client.generate({})] == [1]
