"""The processor under faults: a worker killed mid-stream, a client that leaves, a SIGTERM.

Real processes throughout (nats-server, etcd, sim workers, the processor, HTTP). The workers
run slowly (``--speedup-ratio`` well below 1) so streams last seconds and a fault lands in
the middle of them; the mesh timeouts are short (``--stream-timeout`` 1-2 s, heartbeats
every 0.2 s, 2 s leases) so a dead worker is noticed within a couple of seconds.

A note on what "seamless" means with the simulated engine: its token ``i`` is a function of
(seed, prompt token ids, i). A migrated request is resent with the tokens generated so far
appended to its prompt, so after the migration point the engine draws from a *different*
stream than the unmigrated run would have. The kill test therefore checks each migrated text
against what the mesh itself generates for that continuation (prompt + the first ``k``
tokens): the streamed text must be exactly the reference's first ``k`` words followed by the
continuation's words, with nothing lost or repeated at the seam.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tokenizers import Tokenizer

from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from tests.integration.processor_mesh import (
    Mesh,
    Processor,
    Worker,
    mesh,
    parse_metric,
    sse_events,
)

MODEL = "tiny"
# Decode steps of ~50 ms: a 64-token stream takes ~3.5 s.
SLOW = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny / "tokenizer.json"))


@pytest.fixture(scope="module")
async def slow_mesh(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path_factory: pytest.TempPathFactory,
    tiny: Path,
) -> AsyncIterator[tuple[Mesh, Worker, Processor]]:
    """One slow aggregated worker and a processor."""
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("slow")) as m:
        processor = m.add_processor()
        (worker,) = await m.add_workers(tiny, (), served=MODEL, speedup=SLOW)
        await processor.wait_model(MODEL)
        yield m, worker, processor


@dataclass
class StreamResult:
    text: str = ""
    finish: str | None = None
    usage: dict[str, Any] | None = None
    errors: list[Any] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def _until_routed_to_both(http: aiohttp.ClientSession, processor: Processor) -> None:
    """One-token requests until the processor has routed to two workers: wait_model returns
    once the model is servable, possibly before the second worker's card is known, and round
    robin spreads only over the workers it knows."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        text = await processor.metrics()
        routed = {line.split("instance=", 1)[1].split('"')[1] for line in text.splitlines()
                  if line.startswith("sglmesh_processor_routing_decisions_total{")}  # fmt: skip
        if len(routed) >= 2:
            return
        assert asyncio.get_running_loop().time() < deadline, f"routed only to {routed}"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        async with http.post(f"{processor.v1}/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()


async def stream_completion(
    http: aiohttp.ClientSession, processor: Processor, body: dict[str, Any], out: StreamResult
) -> StreamResult:
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    async with http.post(f"{processor.v1}/completions", json=request) as resp:
        assert resp.status == 200, await resp.text()
        async for event in sse_events(resp):
            if "error" in event:
                out.errors.append(event)
                continue
            if event.get("usage"):
                out.usage = event["usage"]
            for choice in event["choices"]:
                parts.append(choice["text"])
                out.finish = choice["finish_reason"] or out.finish
            out.started.set()
    out.text = "".join(parts)
    return out


async def complete(http: aiohttp.ClientSession, processor: Processor, body: dict[str, Any]) -> str:
    async with http.post(f"{processor.v1}/completions", json=body) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
        text: str = payload["choices"][0]["text"]
        return text


def words_of(text: str) -> list[str]:
    """The test tokenizer's output is one word per token, each preceded by one space."""
    words = text.split(" ")
    assert words[0] == "" and all(words[1:]), f"not one space per word: {text!r}"
    return words[1:]


async def test_kill_a_worker_mid_stream_migrates_without_gaps(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path: Path,
    tiny: Path,
    tokenizer: Tokenizer,
) -> None:
    n_tokens, n_streams = 64, 20
    rng = random.Random(20)
    vocab = tokenizer.get_vocab_size()
    prompts = [
        [rng.randrange(30, vocab) for _ in range(rng.randrange(8, 40))] for _ in range(n_streams)
    ]
    bodies = [
        {"model": MODEL, "prompt": p, "max_tokens": n_tokens, "seed": i, "ignore_eos": True}
        for i, p in enumerate(prompts)
    ]
    # A killed worker is noticed by its silent stream (2 s) or its expired lease (2 s).
    async with mesh(nats_server, etcd_server, tmp_path, stream_timeout=2.0) as m:
        processor = m.add_processor()
        victim, survivor = await m.add_workers(tiny, (), (), served=MODEL, speedup=SLOW)
        await processor.wait_model(MODEL)
        async with aiohttp.ClientSession() as http:
            results = [StreamResult() for _ in bodies]
            tasks = [
                asyncio.create_task(stream_completion(http, processor, b, r))
                for b, r in zip(bodies, results, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 10)
            await asyncio.sleep(0.5)
            on_victim = await victim.metric("sglmesh_worker_inflight_requests")
            assert on_victim >= 5, "round robin should have put about half the streams there"
            assert all(not t.done() for t in tasks), "streams ended before the kill: too fast"
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            elapsed = time.monotonic() - killed_at
            failures = [r for r in done if isinstance(r, BaseException)]
            assert not failures, (failures[:3], m.output())
            for r in results:
                assert not r.errors, (r.errors, processor.output())
                assert r.finish == "length"
                assert r.usage is not None and r.usage["completion_tokens"] == n_tokens
                assert len(words_of(r.text)) == n_tokens
            assert elapsed < 20, elapsed

            migrations = await processor.metric("sglmesh_processor_migrations_total", model=MODEL)
            assert migrations >= on_victim, (migrations, on_victim)
            assert migrations <= n_streams

            # The reference: the same requests, unmigrated, on the surviving worker.
            refs = await asyncio.gather(*(complete(http, processor, b) for b in bodies))
            identical = [r.text == ref for r, ref in zip(results, refs, strict=True)]
            # The streams that stayed on the survivor are untouched by the kill.
            assert identical.count(True) >= n_streams - on_victim

            async def check_seam(i: int) -> None:
                got, ref = words_of(results[i].text), words_of(refs[i])
                common = next(
                    (j for j, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b),
                    n_tokens,
                )
                assert 0 < common < n_tokens, (common, results[i].text, refs[i])
                ids = [tokenizer.token_to_id(w) for w in ref]
                # The migration happened after token k = common (or a little before it, if
                # the continuation's first words happened to repeat the reference's).
                candidates = [k for k in (common, common - 1, common - 2) if k > 0]

                async def expected(k: int) -> list[str]:
                    body = {
                        **bodies[i],
                        "prompt": [*prompts[i], *ids[:k]],
                        "max_tokens": n_tokens - k,
                    }
                    return ref[:k] + words_of(await complete(http, processor, body))

                options = await asyncio.gather(*(expected(k) for k in candidates))
                assert got in options, (i, common, got, options)

            await asyncio.gather(*(check_seam(i) for i, same in enumerate(identical) if not same))
        assert survivor.alive(), survivor.output()  # it served every reference above


async def test_client_disconnect_aborts_the_engine_request(
    slow_mesh: tuple[Mesh, Worker, Processor],
) -> None:
    m, worker, processor = slow_mesh
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 1500,
            "ignore_eos": True}  # fmt: skip

    async def idle() -> bool:
        text = await worker.metrics()
        return (
            parse_metric(text, "sglang:num_running_reqs") == 0
            and parse_metric(text, "sglmesh_worker_inflight_requests") == 0
        )

    async def wait_aborted(before: float, since: float) -> float:
        while True:
            cancelled = await worker.metric("sglmesh_worker_errors_total", kind="cancelled")
            if cancelled == before + 1 and await idle():
                return time.monotonic() - since
            if time.monotonic() - since > 5:
                raise AssertionError(f"the worker still runs the request:\n{m.output()}")
            await asyncio.sleep(0.05)

    disconnects_before = await processor.metric(
        "sglmesh_processor_client_disconnects_total", model=MODEL
    )
    # A stream: read a few events, then drop the connection.
    cancelled_before = await worker.metric("sglmesh_worker_errors_total", kind="cancelled")
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{processor.v1}/completions", json={**body, "stream": True})
        assert resp.status == 200
        seen = 0
        async for _ in sse_events(resp):
            seen += 1
            if seen == 3:
                break
        assert await worker.metric("sglang:num_running_reqs") == 1  # ~75 s of work left
        resp.close()
        left_at = time.monotonic()
    took = await wait_aborted(cancelled_before, left_at)
    assert took < 1.5, took

    # A non-streaming request whose client gives up while it waits for the whole answer.
    cancelled_before = await worker.metric("sglmesh_worker_errors_total", kind="cancelled")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                f"{processor.v1}/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=1.0),
            )
        left_at = time.monotonic()
    took = await wait_aborted(cancelled_before, left_at)
    assert took < 1.5, took

    disconnects = await processor.metric("sglmesh_processor_client_disconnects_total", model=MODEL)
    assert disconnects == disconnects_before + 2


async def test_inflight_gauge_counts_open_requests(
    slow_mesh: tuple[Mesh, Worker, Processor],
) -> None:
    _, worker, processor = slow_mesh
    body = {"model": MODEL, "prompt": "a story", "max_tokens": 300, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        results = [StreamResult() for _ in range(3)]
        tasks = [asyncio.create_task(stream_completion(http, processor, body, r)) for r in results]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 10)
            inflight = await processor.metric("sglmesh_processor_inflight_requests", model=MODEL)
            assert inflight == 3, [
                line for line in (await processor.metrics()).splitlines() if "inflight" in line
            ]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Leave the worker idle for the next test.
    deadline = time.monotonic() + 5
    while await worker.metric("sglmesh_worker_inflight_requests") > 0:
        assert time.monotonic() < deadline, worker.output()
        await asyncio.sleep(0.05)


async def test_sigterm_processor_under_load_drains_and_exits_zero(
    slow_mesh: tuple[Mesh, Worker, Processor],
) -> None:
    m, _, _ = slow_mesh
    # No migration: every in-flight stream must finish on its own, on its first worker.
    processor = m.add_processor("--migration-limit", "0")
    await processor.wait_model(MODEL)
    n_tokens = 24  # ~1.5 s per stream: well inside the 5 s grace period
    bodies = [
        {"model": MODEL, "prompt": f"story number {i}", "max_tokens": n_tokens, "seed": i,
         "ignore_eos": True}
        for i in range(10)
    ]  # fmt: skip
    async with aiohttp.ClientSession() as http:
        results = [StreamResult() for _ in bodies]
        tasks = [
            asyncio.create_task(stream_completion(http, processor, b, r))
            for b, r in zip(bodies, results, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 10)
        processor.signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Once the signal is handled the processor says it is draining (not ready)...
        while True:
            try:
                async with http.get(f"{processor.base}/health") as resp:
                    if resp.status == 503:
                        assert (await resp.json())["status"] in ("draining", "unhealthy")
                        break
            except aiohttp.ClientConnectionError:
                break  # already closed its listener
            assert time.monotonic() - signalled < 2, "SIGTERM not handled within 2 s"
            await asyncio.sleep(0.02)

        # ...and refuses new requests while the old ones finish: 503 with an OpenAI error
        # body, or no connection at all once the listener is closed.
        refused: list[str] = []
        while not all(t.done() for t in tasks) and time.monotonic() - signalled < 10:
            try:
                async with http.post(
                    f"{processor.v1}/completions",
                    json={**bodies[0], "max_tokens": 2},
                ) as resp:
                    payload = await resp.json()
                    assert resp.status == 503, payload
                    assert payload["error"]["code"] == 503
                    refused.append("503")
            except aiohttp.ClientConnectionError:
                refused.append("refused")
            await asyncio.sleep(0.1)
        assert refused, "no request was tried while draining"

        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        failures = [r for r in done if isinstance(r, BaseException)]
        assert not failures, (failures[:3], processor.output())
        for r in results:
            assert not r.errors, r.errors
            assert r.finish == "length"
            assert r.usage is not None and r.usage["completion_tokens"] == n_tokens
        assert await processor.wait_exit(15) == 0, processor.output()
        assert time.monotonic() - signalled < 10


async def test_a_guided_request_is_not_migrated_mid_output(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path, tiny: Path
) -> None:
    # Constrained output cannot resume on another worker (its grammar state died with the
    # worker): the stream ends with an error naming why, where a plain one migrates.
    body = {"model": MODEL, "prompt": "once there was a dog", "max_tokens": 64,
            "ignore_eos": True, "regex": "[a-z ]+"}  # fmt: skip
    async with mesh(nats_server, etcd_server, tmp_path, stream_timeout=2.0) as m:
        processor = m.add_processor("--router-mode", "round-robin")
        workers = await m.add_workers(tiny, (), (), served=MODEL, speedup=SLOW)
        await processor.wait_model(MODEL)
        async with aiohttp.ClientSession() as http:
            await _until_routed_to_both(http, processor)
            results = [StreamResult() for _ in range(2)]
            tasks = [
                asyncio.create_task(stream_completion(http, processor, {**body, "seed": i}, r))
                for i, r in enumerate(results)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 10)
            await asyncio.sleep(0.3)
            # Round robin put one stream on each worker.
            counts = [await w.metric("sglmesh_worker_inflight_requests") for w in workers]
            assert counts == [1, 1], counts
            workers[0].signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        failed = [r for r in results if r.errors]
        assert len(failed) == 1, [(r.errors, r.finish) for r in results]
        message = failed[0].errors[0]["error"]["message"]
        assert "cannot migrate after its first token" in message, message
        (survivor,) = [r for r in results if not r.errors]
        assert survivor.finish == "length"
