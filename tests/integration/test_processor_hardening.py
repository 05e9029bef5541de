"""One request must not take the API down: each weakness the hardening issue found, against a
real processor, worker, NATS and etcd.

Every test that sends a heavy input also probes ``/health`` while the processor works on it:
the event loop must keep answering (the bound is looser than the 100 ms goal, since other test
runs share this machine; before the fix these inputs blocked it for seconds).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import msgspec
import pytest

from proto.discovery import ModelCard, WorkerType, model_key
from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from tests.integration.mesh import ROOT, make_config, runtime
from tests.integration.processor_mesh import Processor, error_detail, mesh

MODEL = "tiny"
KEY = "sk-test-0123456789abcdef"
HEALTH_BOUND = 0.5  # seconds; the goal is 0.1 on a quiet machine (see bench/bad_input.py)


@pytest.fixture(scope="module")
async def procs(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Processor, Processor]]:
    tiny = make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")
    calm = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("hard"), **calm) as m:
        open_ = m.add_processor("--header-timeout", "1", "--body-timeout", "1")
        keyed = m.add_processor("--api-key", f"{KEY},sk-other-0123456789abcdef")
        await m.add_workers(tiny, ("--sim-output-len-mean", "8"), served=MODEL)
        await open_.wait_model(MODEL)
        await keyed.wait_live()
        yield open_, keyed


async def _post(url: str, body: bytes, **headers: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r,
    ):
        return r.status, await r.json(content_type=None)


async def _while_probing(p: Processor, work: Awaitable[Any]) -> tuple[Any, float]:
    """Run ``work`` while probing /health every 10 ms; returns its result and the slowest
    probe (seconds)."""
    slowest = 0.0
    task = asyncio.ensure_future(work)
    async with aiohttp.ClientSession() as http:
        while not task.done():
            started = time.perf_counter()
            async with http.get(f"{p.base}/health") as resp:
                await resp.read()
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return await task, slowest


async def test_huge_stop_strings_are_refused_fast_and_long_ones_work(
    procs: tuple[Processor, Processor],
) -> None:
    p, _ = procs
    # The body that grew the processor to 24 GB: 16 stop strings of 100,000 characters.
    body = json.dumps(
        {"model": MODEL, "prompt": "once", "max_tokens": 4, "stop": ["ab" * 50_000] * 16}
    ).encode()
    (status, err), slowest = await _while_probing(p, _post(f"{p.v1}/completions", body))
    assert status == 400 and error_detail(err)["param"].startswith("stop"), err
    assert slowest < HEALTH_BOUND, slowest
    # The largest allowed: 16 x 1,024 characters, matched in linear time.
    body = json.dumps(
        {"model": MODEL, "prompt": "once", "max_tokens": 8, "stop": ["ab" * 512] * 16}
    ).encode()
    status, out = await _post(f"{p.v1}/completions", body)
    assert status == 200, out


async def test_a_10mb_body_does_not_stall_the_event_loop(
    procs: tuple[Processor, Processor],
) -> None:
    p, _ = procs
    text = "word " * (2 * 1024 * 1024)  # 10 MiB in one message
    body = json.dumps(
        {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": text}]}
    ).encode()
    (status, err), slowest = await _while_probing(p, _post(f"{p.v1}/chat/completions", body))
    assert status == 400 and "context length" in error_detail(err)["message"], err
    assert slowest < HEALTH_BOUND, slowest


async def test_prompts_times_n_count_against_admission(procs: tuple[Processor, Processor]) -> None:
    p, _ = procs
    body = json.dumps({"model": MODEL, "prompt": ["hi"] * 1000, "n": 8, "max_tokens": 1})
    status, err = await _post(f"{p.v1}/completions", body.encode())
    assert status == 400 and "8000 engine requests" in error_detail(err)["message"], err
    body = json.dumps({"model": MODEL, "prompt": ["hi"] * 1025, "max_tokens": 1})
    status, err = await _post(f"{p.v1}/completions", body.encode())
    assert status == 400 and error_detail(err)["param"] == "prompt", err


async def test_json_sent_as_text_plain_is_refused(procs: tuple[Processor, Processor]) -> None:
    p, _ = procs
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    status, err = await _post(f"{p.v1}/completions", body, **{"Content-Type": "text/plain"})
    assert status == 415 and "Content-Type" in error_detail(err)["message"], err


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _closed_within(sock: socket.socket, feed: list[bytes], gap: float) -> tuple[float, bytes]:
    """Send ``feed`` one piece every ``gap`` seconds until the server closes the connection;
    returns when it closed (seconds) and what it answered."""
    started = time.monotonic()
    answer = b""
    for piece in feed:
        try:
            sock.sendall(piece)
        except OSError:
            break
        sock.settimeout(gap)
        try:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        except TimeoutError:
            continue
        except OSError:
            break
    else:
        sock.settimeout(10)
        with_data = sock.recv(65536)
        answer += with_data
    return time.monotonic() - started, answer


async def test_slowloris_headers_and_slow_bodies_are_cut_off(
    procs: tuple[Processor, Processor],
) -> None:
    p, _ = procs
    # Headers dribbled one line every 0.3 s never complete: closed after --header-timeout 1.
    head = [b"POST /v1/completions HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 30
    sock = _connect(p.http_port)
    elapsed, answer = await asyncio.to_thread(_closed_within, sock, head, 0.3)
    sock.close()
    assert elapsed < 5 and answer == b"", (elapsed, answer)
    # A body that never arrives: 408 after --body-timeout 1.
    sock = _connect(p.http_port)
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    elapsed, answer = await asyncio.to_thread(_closed_within, sock, [request], 5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < 4, elapsed


async def test_api_keys(procs: tuple[Processor, Processor]) -> None:
    _, keyed = procs
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
        status, err = await _post(f"{keyed.v1}/completions", body, **headers)
        assert status == 401 and error_detail(err)["type"] == "authentication_error", err
    await _wait_healthy(keyed)
    status, out = await _post(f"{keyed.v1}/completions", body, Authorization=f"Bearer {KEY}")
    assert status == 200 and out["choices"], out
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{keyed.v1}/models") as resp:
            assert resp.status == 401
        for open_path in ("/health", "/live", "/metrics"):
            async with http.get(f"{keyed.base}{open_path}") as resp:
                assert resp.status == 200, open_path


async def _wait_healthy(p: Processor) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{p.base}/health") as resp:
                if resp.status == 200:
                    return
            assert time.monotonic() < deadline, p.output()
            await asyncio.sleep(0.1)


def test_no_key_beyond_loopback_refuses_to_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sglmesh", "processor", "--http-host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0], done.stderr


async def test_a_forged_card_path_is_never_read(
    procs: tuple[Processor, Processor], nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    p, _ = procs
    ns = p.args[p.args.index("--namespace") + 1]
    cfg = make_config(nats_server, etcd_server, namespace=ns)
    card = ModelCard(
        name="forged",
        model_path="/etc",
        chat_template_path="/etc/passwd",
        worker_type=WorkerType.AGGREGATED,
        instance_id=0x5EC,
        endpoint=f"{ns}.backend.generate",
    )
    async with runtime(cfg) as rt:
        await rt.put_registered(model_key(ns, "forged", 0x5EC), msgspec.msgpack.encode(card))
        deadline = time.monotonic() + 15
        while True:
            body = json.dumps(
                {"model": "forged", "messages": [{"role": "user", "content": "hi"}]}
            ).encode()
            status, err = await _post(f"{p.v1}/chat/completions", body)
            if status == 503 and "cannot be served" in json.dumps(err):
                break
            assert time.monotonic() < deadline, (status, err)
            await asyncio.sleep(0.2)
    assert "/etc" not in json.dumps(err), err
    assert "outside the allowed model roots" in p.output(20000)


async def test_a_deleted_registration_comes_back(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server, lease_ttl=3)

    async def handler(request: Any, ctx: Any) -> AsyncIterator[Any]:
        yield request

    async with runtime(cfg) as worker, runtime(cfg) as other:
        served = await worker.endpoint("backend", "generate").serve(handler)
        await other.etcd.client.delete(served.key.encode())
        deadline = time.monotonic() + 10
        while await other.etcd.client.get(served.key.encode()) is None:
            assert time.monotonic() < deadline, "the worker never registered again"
            await asyncio.sleep(0.1)
