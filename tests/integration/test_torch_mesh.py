"""The mesh with the real model: torch workers behind the processor, as users run them.

Real processes throughout (nats-server, etcd, ``sglmesh worker --engine torch`` workers over
SmolLM2-135M-Instruct's real weights, the processor, HTTP):

- disaggregated serving (prefill + decode workers, the real KV pages moving between them)
  answers 20 chat requests exactly as an aggregated worker does, token for token (greedy);
- a worker killed with SIGKILL mid-stream: its streams migrate to the other worker and every
  client's whole text equals an unmigrated run's (greedy: the continuation of prompt + tokens
  so far is what the model would have said anyway).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.infra import EtcdServer, NatsServer
from tests.integration.processor_mesh import Processor, mesh, sse_events
from tests.real_model import MODEL_NAME, PROMPTS, chat_ids, model_dir

pytest.importorskip("torch")

# A real model on two shared cores: several workers load and run it at once.
pytestmark = pytest.mark.timeout(400)

TOKENS = 32


async def chat(
    http: aiohttp.ClientSession, processor: Processor, messages: list[dict[str, str]]
) -> dict[str, Any]:
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with http.post(f"{processor.v1}/chat/completions", json=body) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
        return dict(payload)


async def answers(processor: Processor) -> list[tuple[str, int]]:
    async with aiohttp.ClientSession() as http:
        replies = await asyncio.gather(*(chat(http, processor, p) for p in PROMPTS))
    return [
        (r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]) for r in replies
    ]


async def test_disaggregated_answers_equal_aggregated(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    model = model_dir()
    async with mesh(nats_server, etcd_server, tmp_path / "agg") as m:
        processor = m.add_processor()
        await m.add_workers(model, (), served=MODEL_NAME, engine="torch")
        await processor.wait_model(MODEL_NAME)
        aggregated = await answers(processor)
    async with mesh(nats_server, etcd_server, tmp_path / "disagg") as m:
        processor = m.add_processor()
        prefill, decode = await m.add_workers(
            model,
            ("--disaggregation-mode", "prefill"),
            ("--disaggregation-mode", "decode"),
            served=MODEL_NAME,
            engine="torch",
        )
        await processor.wait_model(MODEL_NAME)
        disaggregated = await answers(processor)
        # Every request went through the prefill worker and moved its KV to the decode one.
        assert await prefill.metric("sglmesh_worker_requests_total", role="prefill") >= len(PROMPTS)
        assert await decode.metric("sglmesh_worker_requests_total", role="decode") >= len(PROMPTS)
    assert all(n == TOKENS for _, n in aggregated)
    assert disaggregated == aggregated
    assert aggregated[0][0].startswith("The capital of France is Paris.")


async def stream(
    http: aiohttp.ClientSession, processor: Processor, body: dict[str, Any], started: asyncio.Event
) -> tuple[str, dict[str, Any] | None, list[Any]]:
    parts: list[str] = []
    usage = None
    errors: list[Any] = []
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{processor.v1}/completions", json=request) as resp:
        assert resp.status == 200, await resp.text()
        async for event in sse_events(resp):
            if "error" in event:
                errors.append(event)
                continue
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                parts.append(choice["text"])
                started.set()
    return "".join(parts), usage, errors


async def test_kill_a_worker_mid_stream_and_the_text_is_unchanged(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    tokens = 48
    bodies = [
        {"model": MODEL_NAME, "prompt": chat_ids(p), "max_tokens": tokens, "temperature": 0,
         "ignore_eos": True}
        for p in PROMPTS[:8]
    ]  # fmt: skip
    async with mesh(nats_server, etcd_server, tmp_path, stream_timeout=2.0) as m:
        processor = m.add_processor("--router-mode", "round-robin")
        workers = await m.add_workers(model_dir(), (), (), served=MODEL_NAME, engine="torch")
        await processor.wait_model(MODEL_NAME)
        async with aiohttp.ClientSession() as http:
            # The model is listed once one worker is known: wait until both take requests.
            short = {**bodies[0], "max_tokens": 1, "stream": False}
            for _ in range(40):
                async with http.post(f"{processor.v1}/completions", json=short) as resp:
                    assert resp.status == 200, await resp.text()
                served = [await w.metric("sglmesh_worker_requests_total") for w in workers]
                if all(served):
                    break
            assert all(served), served
            started = [asyncio.Event() for _ in bodies]
            tasks = [
                asyncio.create_task(stream(http, processor, b, s))
                for b, s in zip(bodies, started, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            inflight = [await w.metric("sglmesh_worker_inflight_requests") for w in workers]
            on_victim = max(inflight)
            victim, survivor = workers if inflight[0] >= inflight[1] else workers[::-1]
            assert on_victim >= 1 and not any(t.done() for t in tasks), "too fast to kill"
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            recovered = time.monotonic() - killed_at
            migrations = await processor.metric(
                "sglmesh_processor_migrations_total", model=MODEL_NAME
            )
            assert migrations >= on_victim, (migrations, on_victim, m.output())
            for _, usage, errors in results:
                assert not errors, (errors, processor.output())
                assert usage is not None and usage["completion_tokens"] == tokens
            # The reference: the same requests, unmigrated, on the surviving worker.
            refs = [await stream(http, processor, body, asyncio.Event()) for body in bodies]
        for (text, _, _), (ref, _, _) in zip(results, refs, strict=True):
            assert text == ref
        assert survivor.alive(), survivor.output()
        print(f"\n{on_victim} stream(s) migrated; all done {recovered:.1f}s after the kill")
