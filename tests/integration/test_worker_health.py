"""Health canaries and engine routes on real NATS and etcd.

A canary goes through the normal endpoint to its own instance; when it fails the instance
leaves discovery (another runtime's client sees it go) and ``/health`` turns 503, and when it
passes again the instance comes back. Busy endpoints get no canary. The engine routes run on a
real aiohttp system server: pausing takes the worker out and suspends its canary, continuing
brings it back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from proto.request import FAKE_BOOTSTRAP_HOST, PreprocessedRequest
from proto.response import EngineOutput, FinishReason
from shared.engine.protocol import Engine
from shared.infra import EtcdServer, NatsServer
from shared.runtime import Client, Context, DistributedRuntime, ServedEndpoint
from shared.runtime.system_server import SystemServer
from shared.worker.engine_routes import ENGINE_ROUTES, register_engine_routes
from shared.worker.health import Canary, canary_payload
from tests.integration.mesh import ADMIN_HEADERS, make_config, runtime


class Switchable:
    """A generate handler that answers, fails, hangs or blocks on demand."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | error | hang | finish_error
        self.requests: list[PreprocessedRequest] = []
        self.release = asyncio.Event()

    async def __call__(self, request: PreprocessedRequest, ctx: Context) -> AsyncIterator[Any]:
        self.requests.append(request)
        if request.annotations == ["block"]:
            await self.release.wait()
        if self.mode == "error":
            raise RuntimeError("engine exploded")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "finish_error":
            yield EngineOutput(finish_reason=FinishReason.ERROR)
            return
        yield EngineOutput(token_ids=[7], finish_reason=FinishReason.LENGTH)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def serve(
    worker: DistributedRuntime, caller: DistributedRuntime, handler: Switchable
) -> tuple[ServedEndpoint, Client]:
    served = await worker.endpoint("backend", "generate").serve(
        handler, request_type=PreprocessedRequest
    )
    client = await caller.client("backend", "generate")
    await client.wait_for_instances(1, timeout=5)
    return served, client


def listed(client: Client, worker: DistributedRuntime) -> bool:
    return worker.instance_id in {r.instance_id for r in client.instances()}


# -- payloads --------------------------------------------------------------------------------


def test_default_payloads_per_role() -> None:
    agg = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
    assert agg.token_ids == [1]
    assert agg.stop_conditions.max_tokens == 1 and agg.stop_conditions.ignore_eos is False
    opts = agg.sampling_options
    assert (opts.temperature, opts.top_p, opts.top_k) == (0.0, 1.0, -1)
    assert agg.bootstrap_info is None
    for role in ("decode", "prefill"):
        p = canary_payload(role, bos_token_id=5, bootstrap_port=8998, env={})
        assert p.token_ids == [5]
        assert p.bootstrap_info is not None
        assert p.bootstrap_info.bootstrap_host == FAKE_BOOTSTRAP_HOST
        assert (p.bootstrap_info.bootstrap_port, p.bootstrap_info.bootstrap_room) == (8998, 0)
    decode = canary_payload("decode", bos_token_id=None, bootstrap_port=None, env={})
    assert decode.bootstrap_info is not None and decode.bootstrap_info.bootstrap_port == 0
    with pytest.raises(ValueError, match="worker type"):
        canary_payload("encode", bos_token_id=None, bootstrap_port=None, env={})


def test_payload_override_from_env_and_file(tmp_path: Path) -> None:
    body = {"token_ids": [9, 9], "stop_conditions": {"max_tokens": 2}, "_HEALTH_CHECK": True}
    agg = canary_payload(
        "aggregated",
        bos_token_id=1,
        bootstrap_port=None,
        env={"DYN_HEALTH_CHECK_PAYLOAD": json.dumps(body)},
    )
    assert agg.token_ids == [9, 9] and agg.stop_conditions.max_tokens == 2
    path = tmp_path / "canary.json"
    path.write_text(json.dumps({**body, "bootstrap_info": None}))
    env = {"SGLMESH_HEALTH_CHECK_PAYLOAD": f"@{path}", "DYN_HEALTH_CHECK_PAYLOAD": "ignored"}
    prefill = canary_payload("prefill", bos_token_id=1, bootstrap_port=1234, env=env)
    assert prefill.token_ids == [9, 9]
    # The fake-transfer bootstrap info is put back on top of the override.
    assert prefill.bootstrap_info is not None
    assert prefill.bootstrap_info.bootstrap_host == FAKE_BOOTSTRAP_HOST
    assert prefill.bootstrap_info.bootstrap_port == 1234
    for bad, match in (
        ("[1, 2]", "JSON object"),
        ("{nope", "not valid JSON"),
        ('{"stop_conditions": {}}', "not a valid generate request"),
        (f"@{tmp_path / 'missing.json'}", "cannot read"),
    ):
        with pytest.raises(ValueError, match=match):
            canary_payload(
                "aggregated",
                bos_token_id=1,
                bootstrap_port=None,
                env={"SGLMESH_HEALTH_CHECK_PAYLOAD": bad},
            )


# -- the canary ------------------------------------------------------------------------------


async def test_failing_canary_leaves_discovery_and_comes_back(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    handler = Switchable()
    changes: list[bool] = []

    async def on_change(healthy: bool) -> None:
        changes.append(healthy)

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        served, client = await serve(worker, caller, handler)
        system = SystemServer(worker, "127.0.0.1", 0)
        await system.start()
        payload = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
        canary = Canary(worker, served, payload, wait_time=0.2, timeout=1.0, on_change=on_change)
        canary.start()
        try:
            await wait_until(lambda: canary.passed >= 2)
            assert canary.healthy and canary.failed == 0 and not changes
            assert handler.requests[0].token_ids == [1]
            assert canary.last_result is not None and canary.last_result.chunks == 1
            assert worker.health()[0]

            handler.mode = "error"
            await wait_until(lambda: not canary.healthy)
            await wait_until(lambda: not listed(client, worker))
            assert changes == [False]
            assert not served.registered
            ready, body = worker.health()
            assert not ready and body["endpoints"][served.name] == "notready"
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{system.port}/health") as resp,
            ):
                assert resp.status == 503
            assert canary.last_result is not None and canary.last_result.error is not None
            assert "handler_error" in canary.last_result.error
            # Still probing while out, through the direct subject.
            failed = canary.failed
            await wait_until(lambda: canary.failed >= failed + 2)
            assert changes == [False]

            handler.mode = "ok"
            await wait_until(lambda: canary.healthy)
            await wait_until(lambda: listed(client, worker))
            assert changes == [False, True]
            assert served.registered and worker.health()[0]
        finally:
            await canary.close()
            await system.close()
        assert not canary.running


async def test_timeout_and_error_finish_count_as_failures(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    handler = Switchable()
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        served, _client = await serve(worker, caller, handler)
        payload = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
        canary = Canary(worker, served, payload, wait_time=5.0, timeout=0.3)
        handler.mode = "hang"
        assert not await canary.check()
        assert canary.last_result is not None and "within" in (canary.last_result.error or "")
        assert not served.registered
        # The hung canary request was cancelled, not left running.
        await wait_until(lambda: not served.streams)
        handler.mode = "ok"
        assert await canary.check()
        assert served.registered and canary.healthy
        handler.mode = "finish_error"
        assert not await canary.check()
        assert canary.last_result is not None and "error" in (canary.last_result.error or "")
        assert (canary.sent, canary.passed, canary.failed) == (3, 1, 2)


async def test_busy_endpoint_gets_no_canary(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    handler = Switchable()
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        served, client = await serve(worker, caller, handler)
        payload = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
        canary = Canary(worker, served, payload, wait_time=0.2, timeout=1.0)
        stream = await client.generate(
            PreprocessedRequest(token_ids=[3], annotations=["block"]), response_type=EngineOutput
        )
        await wait_until(lambda: bool(served.streams))
        canary.start()
        try:
            await asyncio.sleep(0.8)  # four idle periods' worth
            assert canary.sent == 0
            handler.release.set()
            assert [c.token_ids async for c in stream] == [[7]]
            await wait_until(lambda: canary.passed >= 1)
            assert canary.healthy
        finally:
            await canary.close()


async def test_canary_stops_on_shutdown(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    cfg = make_config(nats_server, etcd_server)
    handler = Switchable()
    worker = DistributedRuntime(cfg)
    await worker.start()
    served = await worker.endpoint("backend", "generate").serve(
        handler, request_type=PreprocessedRequest
    )
    payload = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
    canary = Canary(worker, served, payload, wait_time=0.2, timeout=1.0)
    canary.start()
    await wait_until(lambda: canary.passed >= 1)
    worker.request_shutdown()
    await wait_until(lambda: not canary.running, timeout=2.0)
    await worker.shutdown(grace=0.2)
    assert not served.registered
    await canary.close()


# -- engine routes ---------------------------------------------------------------------------


class FakeEngine:
    """Records engine calls; ``fail`` makes the named method raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.active = 0
        self.fail: str | None = None

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise RuntimeError(f"{name} broke")

    async def flush_cache(self) -> bool:
        await self._call("flush_cache")
        return self.active == 0

    async def pause_generation(self) -> None:
        await self._call("pause_generation")

    async def continue_generation(self) -> None:
        await self._call("continue_generation")

    async def release_memory_occupation(self) -> None:
        await self._call("release_memory_occupation")

    async def resume_memory_occupation(self) -> None:
        await self._call("resume_memory_occupation")

    async def start_profile(self) -> None:
        await self._call("start_profile")

    async def stop_profile(self) -> None:
        await self._call("stop_profile")

    def num_active_requests(self) -> int:
        return self.active


async def test_engine_routes_drive_discovery_and_the_canary(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    handler = Switchable()
    engine = FakeEngine()
    events: list[str] = []
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        served, client = await serve(worker, caller, handler)
        payload = canary_payload("aggregated", bos_token_id=None, bootstrap_port=None, env={})
        canary = Canary(worker, served, payload, wait_time=0.2, timeout=1.0)

        async def leave() -> None:
            events.append("leave")
            canary.suspend()
            await served.unregister()

        async def rejoin() -> None:
            events.append("rejoin")
            await served.register()
            canary.resume()

        system = SystemServer(worker, "127.0.0.1", 0)
        routes = register_engine_routes(system, cast(Engine, engine), leave=leave, rejoin=rejoin)
        assert routes == list(ENGINE_ROUTES) and len(routes) == 7
        await system.start()
        canary.start()
        base = f"http://127.0.0.1:{system.port}/engine"
        try:
            async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as http:

                async def post(path: str, data: Any = b"") -> tuple[int, dict[str, Any]]:
                    async with http.post(f"{base}/{path}", data=data) as resp:
                        return resp.status, await resp.json()

                status, body = await post("pause_generation")
                assert status == 200 and body["status"] == "ok" and body["paused"]
                assert events == ["leave"] and canary.suspended
                await wait_until(lambda: not listed(client, worker))
                assert not worker.health()[0]
                # Suspended: no canary runs, so none can put the paused worker back.
                sent = canary.sent
                await asyncio.sleep(0.5)
                assert canary.sent == sent and not served.registered

                # Released while paused, resumed: still out until generation continues.
                assert (await post("release_memory_occupation"))[0] == 200
                status, body = await post("resume_memory_occupation")
                assert status == 200 and body == {
                    "status": "ok",
                    "message": "memory resumed",
                    "paused": True,
                    "released": False,
                }
                assert events == ["leave"] and not served.registered

                status, body = await post("continue_generation", b"{}")
                assert status == 200 and not body["paused"]
                assert events == ["leave", "rejoin"] and not canary.suspended
                await wait_until(lambda: listed(client, worker))
                assert worker.health()[0]
                sent = canary.sent
                await wait_until(lambda: canary.sent > sent)  # probing again

                for path in ("start_profile", "stop_profile"):
                    status, body = await post(path)
                    assert status == 200 and body["status"] == "ok"

                status, body = await post("pause_generation", b"{not json")
                assert status == 400 and body["status"] == "error"
                assert "JSON" in body["message"]
                assert (await post("pause_generation", b"[1]"))[0] == 400
                assert events == ["leave", "rejoin"]  # a bad body changes nothing

                engine.active = 2
                status, body = await post("flush_cache")
                assert status == 409 and body["flushed"] is False and body["status"] == "error"
                engine.active = 0
                status, body = await post("flush_cache")
                assert status == 200 and body["flushed"] is True and body["status"] == "ok"

                engine.fail = "pause_generation"
                status, body = await post("pause_generation")
                assert status == 500 and body["status"] == "error"
                assert "pause_generation broke" in body["message"]
                assert "Traceback" not in json.dumps(body)
                # The engine did not pause: the worker is back in discovery.
                assert events == ["leave", "rejoin", "leave", "rejoin"]
                assert served.registered

                assert engine.calls.count("pause_generation") == 2
                assert "flush_cache" in engine.calls
        finally:
            await canary.close()
            await system.close()
