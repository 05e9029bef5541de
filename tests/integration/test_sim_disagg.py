"""Disaggregation with simulated engines in separate processes, over real TCP and NATS."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer
from shared.runtime import Client, DistributedRuntime
from tests.integration.mesh import Responder, make_config, runtime

KV_BYTES_PER_TOKEN = 4096


async def start_engine(cfg: MeshConfig, component: str, **sim: Any) -> Responder:
    sim = {
        "speedup_ratio": 0,
        "page_size": 16,
        "max_total_tokens": 16384,
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
        "bootstrap_port": 0,
        "bootstrap_host": "127.0.0.1",
        **sim,
    }
    return await asyncio.to_thread(
        Responder,
        cfg,
        f"{cfg.namespace}.{component}.generate",
        module="tests.integration.engine_host",
        extra_args=["--sim-config", json.dumps(sim)],
    )


class Mesh:
    def __init__(self, rt: DistributedRuntime) -> None:
        self.rt = rt
        self.clients: dict[str, Client] = {}

    async def client(self, component: str, endpoint: str = "generate") -> Client:
        key = f"{component}.{endpoint}"
        if key not in self.clients:
            self.clients[key] = await self.rt.client(component, endpoint)
            await self.clients[key].wait_for_instances(1, timeout=10)
        return self.clients[key]

    async def generate(self, component: str, **kwargs: Any) -> list[dict[str, Any]]:
        stream = await (await self.client(component)).generate(kwargs)
        return [out async for out in stream]

    async def stats(self, component: str) -> list[dict[str, int]]:
        stream = await (await self.client(component, "stats")).generate({})
        return next(iter([s async for s in stream]))


def tokens(outputs: list[dict[str, Any]]) -> list[int]:
    return [t for out in outputs for t in out["output_ids"]]


@pytest.fixture
async def mesh(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[tuple[MeshConfig, Mesh]]:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as rt:
        yield cfg, Mesh(rt)


async def test_prefill_plus_decode_equals_aggregated(mesh: tuple[MeshConfig, Mesh]) -> None:
    cfg, m = mesh
    agg, prefill, decode = await asyncio.gather(
        start_engine(cfg, "agg"),
        start_engine(cfg, "prefill", disaggregation_mode="prefill"),
        start_engine(cfg, "decode", disaggregation_mode="decode"),
    )
    try:
        port = int(prefill.ready_fields[0])
        rng = random.Random(7)
        for case in range(4):
            prompt = [rng.randrange(1000, 30000) for _ in range(rng.randrange(20, 300))]
            sampling = {"max_new_tokens": 40, "temperature": 0.7, "sampling_seed": 100 + case}
            expected = await m.generate(
                "agg", input_ids=prompt, sampling_params=sampling, rid=f"agg-{case}"
            )
            room = rng.randrange(2**62)
            boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": room}
            prefill_out, decode_out = await asyncio.gather(
                m.generate(
                    "prefill",
                    input_ids=prompt,
                    sampling_params={**sampling, "max_new_tokens": 1},
                    rid=f"p-{case}",
                    **boot,
                ),
                m.generate(
                    "decode", input_ids=prompt, sampling_params=sampling, rid=f"d-{case}", **boot
                ),
            )
            assert len(tokens(expected)) == 40
            assert tokens(decode_out) == tokens(expected)
            assert tokens(prefill_out) == tokens(expected)[:1]
            final = decode_out[-1]["meta_info"]
            assert final["finish_reason"]["type"] == "length"
            assert final["prompt_tokens"] == len(prompt)
        for component in ("prefill", "decode", "agg"):
            assert all(r["request_pages"] == 0 for r in await m.stats(component)), component
    finally:
        for proc in (agg, prefill, decode):
            proc.stop()


async def test_decode_without_prefill_times_out_clearly(mesh: tuple[MeshConfig, Mesh]) -> None:
    cfg, m = mesh
    prefill = await start_engine(cfg, "prefill", disaggregation_mode="prefill")
    decode = await start_engine(cfg, "decode", disaggregation_mode="decode", bootstrap_timeout=0.5)
    try:
        port = int(prefill.ready_fields[0])
        t0 = time.monotonic()
        out = await m.generate(
            "decode",
            input_ids=list(range(1000, 1100)),
            sampling_params={"max_new_tokens": 8},
            rid="lonely",
            bootstrap_host="127.0.0.1",
            bootstrap_port=port,
            bootstrap_room=12345,
        )
        elapsed = time.monotonic() - t0
        finish = out[-1]["meta_info"]["finish_reason"]
        assert finish["type"] == "abort"
        assert "timeout" in finish["message"].lower() or "timed out" in finish["message"].lower()
        assert "12345" in finish["message"]
        assert 0.4 < elapsed < 3.0
        assert tokens(out) == []
        assert all(r["request_pages"] == 0 for r in await m.stats("decode"))
    finally:
        prefill.stop()
        decode.stop()


async def _wait_freed(m: Mesh, component: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = await m.stats(component)
        if all(r["request_pages"] == 0 and r["running"] == 0 for r in stats):
            return
        assert time.monotonic() < deadline, f"{component} still holds KV: {stats}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("aborted", ["decode", "prefill"])
async def test_abort_on_either_side_frees_both(mesh: tuple[MeshConfig, Mesh], aborted: str) -> None:
    cfg, m = mesh
    # Realistic timing (speedup 1) so the decode is still running when it is aborted.
    prefill = await start_engine(cfg, "prefill", disaggregation_mode="prefill", speedup_ratio=1)
    decode = await start_engine(cfg, "decode", disaggregation_mode="decode", speedup_ratio=1)
    try:
        port = int(prefill.ready_fields[0])
        prompt = list(range(2000, 2600))
        boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 777}
        if aborted == "decode":
            prefill_task = asyncio.create_task(
                m.generate(
                    "prefill",
                    input_ids=prompt,
                    sampling_params={"max_new_tokens": 1},
                    rid="p",
                    **boot,
                )
            )
            stream = await (await m.client("decode")).generate(
                {
                    "input_ids": prompt,
                    "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True},
                    "rid": "d",
                    **boot,
                }
            )
            got = 0
            async for out in stream:
                got += len(out["output_ids"])
                if got >= 5:
                    break
            running = await m.stats("decode")
            assert running[0]["request_pages"] > 0  # it holds KV while decoding
            await stream.aclose()
            await asyncio.wait_for(prefill_task, timeout=5)
        else:
            # The decode registers and waits; the prefill is aborted mid-prefill, once its
            # engine holds the request's KV (8000 tokens: ~0.25 s of simulated prefill).
            long_prompt = list(range(2000, 10000))
            decode_task = asyncio.create_task(
                m.generate(
                    "decode",
                    input_ids=long_prompt,
                    sampling_params={"max_new_tokens": 50},
                    rid="d",
                    **boot,
                )
            )
            stream = await (await m.client("prefill")).generate(
                {
                    "input_ids": long_prompt,
                    "sampling_params": {"max_new_tokens": 1},
                    "rid": "p",
                    **boot,
                }
            )
            deadline = time.monotonic() + 3
            while (await m.stats("prefill"))[0]["request_pages"] == 0:
                assert time.monotonic() < deadline, "the prefill never took KV"
                await asyncio.sleep(0.01)
            await stream.aclose()
            out = await asyncio.wait_for(decode_task, timeout=5)
            finish = out[-1]["meta_info"]["finish_reason"]
            assert finish["type"] == "abort", finish
            assert tokens(out) == []
        await _wait_freed(m, "decode")
        await _wait_freed(m, "prefill")
    finally:
        prefill.stop()
        decode.stop()
