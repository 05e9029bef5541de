"""The processor's OpenAI API through the official ``openai`` client, on real meshes.

Every process is real: nats-server, etcd, ``sglmesh worker --engine sim`` workers and
``sglmesh processor``, talking HTTP. The workers serve the default model directory
(SmolLM2-135M-Instruct's tokenizer and chat template), so chat templating and
detokenization are the real ones; the simulated engine's tokens are a function of (seed,
prompt, position) only, which makes exact comparisons (stream vs not, disaggregated vs
aggregated) meaningful.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from shared.infra import EtcdServer, NatsServer
from shared.model import prepare_default_model
from tests.integration.processor_mesh import Mesh, Processor, error_detail, mesh, parse_metric

MODEL = "smollm2"
ALIAS = "smollm2-alias"
CONTEXT_LENGTH = 8192  # the default model's max_position_embeddings
# No faults are injected here: the mesh timeouts are the forgiving production-like ones, so
# a busy CI machine (2 cores, a hundred streams) does not turn into a false "worker died".
CALM = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}


@pytest.fixture(scope="module")
def smol() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="module")
async def agg(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path_factory: pytest.TempPathFactory,
    smol: Path,
) -> AsyncIterator[tuple[Mesh, Processor]]:
    """Two aggregated workers and a processor."""
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("agg"), **CALM) as m:
        processor = m.add_processor()
        await m.add_workers(smol, (), (), served=f"{MODEL},{ALIAS}")
        await processor.wait_model(MODEL)
        yield m, processor


@pytest.fixture(scope="module")
async def disagg(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path_factory: pytest.TempPathFactory,
    smol: Path,
) -> AsyncIterator[tuple[Mesh, Processor]]:
    """One prefill worker, one decode worker and a processor."""
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("disagg"), **CALM) as m:
        processor = m.add_processor()
        await m.add_workers(
            smol,
            ("--disaggregation-mode", "prefill"),
            ("--disaggregation-mode", "decode"),
            served=MODEL,
            speedup=1,  # real-time steps: the hundred streams overlap, as on a GPU
        )
        await processor.wait_model(MODEL)
        yield m, processor


def client_for(processor: Processor) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=processor.v1, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
async def client(agg: tuple[Mesh, Processor]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client_for(agg[1]) as c:
        yield c


MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a story about a cat and a dog."},
]
PROMPT = "Once upon a time, in a city by the sea,"
IGNORE_EOS = {"ignore_eos": True}


async def chat_text(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, str | None]:
    """(text, finish_reason) of a non-streamed chat completion."""
    resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
    (choice,) = resp.choices
    return choice.message.content or "", choice.finish_reason


async def chat_stream_text(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kw)
    parts: list[str] = []
    finish: str | None = None
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish


# -- aggregated mesh ---------------------------------------------------------------------------


async def test_chat_and_completion_report_usage_and_length(client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, seed=1, extra_body=IGNORE_EOS
    )
    assert chat.object == "chat.completion" and chat.model == MODEL
    (choice,) = chat.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content and len(choice.message.content.split()) >= 12
    usage = chat.usage
    assert usage is not None
    # The real chat template wraps the messages: far more tokens than the words in them.
    assert usage.prompt_tokens > 20
    assert usage.completion_tokens == 24
    assert usage.total_tokens == usage.prompt_tokens + 24

    comp = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=17, seed=1, extra_body=IGNORE_EOS
    )
    assert comp.object == "text_completion"
    (cchoice,) = comp.choices
    assert cchoice.finish_reason == "length" and cchoice.text
    assert comp.usage is not None
    assert comp.usage.completion_tokens == 17
    assert 5 <= comp.usage.prompt_tokens <= 20
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + 17


async def test_stream_equals_unary_and_ends_with_a_usage_chunk(
    client: openai.AsyncOpenAI,
) -> None:
    text, finish = await chat_text(client, max_tokens=40, seed=7, extra_body=IGNORE_EOS)
    assert finish == "length"
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = [chunk async for chunk in stream]
    # At least one content chunk and the usage chunk: a fast simulated engine may deliver all
    # 40 tokens before the first write, which then go out as one event.
    assert len(chunks) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last = chunks
    assert last.choices == [] and last.usage is not None  # the usage chunk comes last
    assert last.usage.completion_tokens == 40
    assert last.usage.total_tokens == last.usage.prompt_tokens + 40
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert content[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1

    # The same for text completions.
    comp = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, seed=7, extra_body=IGNORE_EOS
    )
    cstream = await client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=30,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    cchunks = [chunk async for chunk in cstream]
    *ccontent, clast = cchunks
    assert clast.choices == [] and clast.usage is not None
    assert clast.usage.completion_tokens == 30
    assert "".join(c.choices[0].text for c in ccontent) == comp.choices[0].text
    assert ccontent[-1].choices[0].finish_reason == "length"

    # Without include_usage, no chunk carries usage.
    plain = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, seed=7, stream=True
    )
    usages = [c.usage async for c in plain]
    assert usages and all(u is None for u in usages)


async def test_same_seed_same_text_other_seed_other_text(client: openai.AsyncOpenAI) -> None:
    # Two workers behind round robin: consecutive requests go to different workers.
    a, _ = await chat_text(client, max_tokens=20, seed=11)
    b, _ = await chat_text(client, max_tokens=20, seed=11)
    c, _ = await chat_text(client, max_tokens=20, seed=12)
    assert a == b
    assert a != c


async def test_stop_string_cuts_the_text_and_finishes_with_stop(
    client: openai.AsyncOpenAI,
) -> None:
    full, finish = await chat_text(client, max_tokens=40, seed=21, extra_body=IGNORE_EOS)
    assert finish == "length"
    words = full.split()
    assert len(words) >= 30
    # A stop string from the middle of the text, spanning a word boundary.
    stop = f"{words[15][-2:]} {words[16][:2]}"
    cut = full.index(stop)
    assert 0 < cut < len(full) - len(stop)
    expected = full[:cut]

    text, finish = await chat_text(
        client, max_tokens=40, seed=21, stop=[stop, "never-in-the-text"], extra_body=IGNORE_EOS
    )
    assert finish == "stop"
    assert stop not in text
    assert text == expected
    streamed, sfinish = await chat_stream_text(
        client, max_tokens=40, seed=21, stop=stop, extra_body=IGNORE_EOS
    )
    assert sfinish == "stop"
    assert streamed == expected

    comp = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, seed=21, extra_body=IGNORE_EOS
    )
    ctext = comp.choices[0].text
    cwords = ctext.split()
    cstop = cwords[20]
    cut = ctext.index(cstop)
    # Room for 4000 tokens: the stop string, not the length, must end the engine request (the
    # first 40 tokens are the same whatever max_tokens is: the same seed). The simulator here
    # has no step time, so the room must outlast a worker's --response-flush-interval (5 ms)
    # by far: tokens reach the processor (and its cancel the engine) no sooner than that.
    # Locally the cancel lands after 310-380 tokens; under half the room says it was prompt.
    stopped = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4000, seed=21, stop=cstop, extra_body=IGNORE_EOS
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == ctext[:cut]
    assert stopped.usage is not None and stopped.usage.completion_tokens < 2000


async def test_n_choices(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, n=2, seed=5, extra_body=IGNORE_EOS
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    texts = [c.message.content for c in resp.choices]
    assert all(texts) and texts[0] != texts[1]
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24
    # Choice 0 keeps the request's seed.
    single, _ = await chat_text(client, max_tokens=12, seed=5, extra_body=IGNORE_EOS)
    assert texts[0] == single

    stream = await client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=10,
        n=2,
        seed=5,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    parts: dict[int, list[str]] = {0: [], 1: []}
    finishes: dict[int, str | None] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            parts[choice.index].append(choice.text)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert "".join(parts[0]) != "".join(parts[1])


async def test_models_are_listed_with_their_aliases(client: openai.AsyncOpenAI) -> None:
    ids = {m.id async for m in client.models.list()}
    assert ids == {MODEL, ALIAS}
    model = await client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    # An alias serves requests too.
    resp = await client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=3)
    assert resp.model == ALIAS and resp.choices[0].text
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_errors_are_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    assert bad.value.status_code == 400 and bad.value.param == "max_tokens"

    with pytest.raises(openai.BadRequestError) as empty:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert empty.value.param == "messages"

    too_long = 100_000
    with pytest.raises(openai.BadRequestError) as ctx:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=too_long)
    message = ctx.value.message
    assert str(CONTEXT_LENGTH) in message and str(too_long) in message, message

    with pytest.raises(openai.BadRequestError) as prompt_ctx:
        await client.completions.create(model=MODEL, prompt=" hello" * 9000, max_tokens=4)
    assert str(CONTEXT_LENGTH) in prompt_ctx.value.message

    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.status_code == 404
    assert "no-such-model" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="hi", stream=True)


async def test_health_live_openapi_and_metrics(agg: tuple[Mesh, Processor]) -> None:
    _, processor = agg
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{processor.base}/health") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert health["status"] == "healthy" and MODEL in health["models"]
        async with http.get(f"{processor.base}/live") as resp:
            assert resp.status == 200
        async with http.get(f"{processor.base}/openapi.json") as resp:
            assert resp.status == 200
            doc = json.loads(await resp.read())
        assert "/v1/chat/completions" in doc["paths"]
        assert "/v1/completions" in doc["paths"]
        async with http.get(f"{processor.base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert "sglmesh_processor_requests_total" in text


async def test_request_metrics_count_each_status(
    agg: tuple[Mesh, Processor], client: openai.AsyncOpenAI
) -> None:
    _, processor = agg

    async def count(status: str) -> float:
        return await processor.metric(
            "sglmesh_processor_requests_total",
            model=MODEL,
            endpoint="chat_completions",
            status=status,
        )

    ok_before, bad_before = await count("200"), await count("400")
    await chat_text(client, max_tokens=3)
    await chat_stream_text(client, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        await chat_text(client, max_tokens=CONTEXT_LENGTH)
    assert await count("400") == bad_before + 1
    # Both successful requests (unary and streamed) count as 200s.
    assert await count("200") == ok_before + 2, [
        line
        for line in (await processor.metrics()).splitlines()
        if line.startswith("sglmesh_processor_requests_total")
    ]


# -- disaggregated mesh ------------------------------------------------------------------------


async def test_disaggregated_hundred_concurrent_streams(disagg: tuple[Mesh, Processor]) -> None:
    m, processor = disagg

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Request number {i}: tell me a story."}],
            max_tokens=16 + i % 16,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        finish: str | None = None
        tokens = -1
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return finish, tokens

    async with client_for(processor) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(client, i) for i in range(100)), return_exceptions=True), 60
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, (errors[:3], m.output())
    assert results == [("length", 16 + i % 16) for i in range(100)]
    # Every request went through both legs.
    text = await processor.metrics()
    for role in ("prefill", "decode"):
        routed = parse_metric(text, "sglmesh_processor_routing_decisions_total", role=role)
        assert routed >= 100, role


async def test_disaggregated_answer_equals_aggregated(
    agg: tuple[Mesh, Processor], disagg: tuple[Mesh, Processor]
) -> None:
    # The simulated engine's tokens depend on (seed, prompt, position) only, and a
    # disaggregated pair produces exactly what an aggregated engine does.
    async with client_for(agg[1]) as a, client_for(disagg[1]) as d:
        for seed in (1, 2, 3):
            expected = await chat_text(a, max_tokens=24, seed=seed, extra_body=IGNORE_EOS)
            assert await chat_text(d, max_tokens=24, seed=seed, extra_body=IGNORE_EOS) == expected
            assert await chat_stream_text(d, max_tokens=24, seed=seed, extra_body=IGNORE_EOS) == (
                expected
            )
        comp_a = await a.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, seed=4)
        comp_d = await d.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, seed=4)
        assert comp_d.choices[0].text == comp_a.choices[0].text
        assert comp_a.usage is not None and comp_d.usage is not None
        assert (comp_d.usage.prompt_tokens, comp_d.usage.completion_tokens) == (
            comp_a.usage.prompt_tokens,
            comp_a.usage.completion_tokens,
        )


# -- a model that loses its workers ------------------------------------------------------------


async def test_model_without_workers_is_503_and_unknown_model_404(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path: Path,
    smol: Path,
) -> None:
    async with mesh(nats_server, etcd_server, tmp_path, **CALM) as m:
        processor = m.add_processor()
        workers = await m.add_workers(smol, (), served=MODEL)
        await processor.wait_model(MODEL)
        async with client_for(processor) as client:
            assert (await chat_text(client, max_tokens=2))[0]
            for w in workers:
                w.signal(signal.SIGTERM)
            for w in workers:
                assert await w.wait_exit(30) == 0, w.output()
            await processor.wait_no_models()

            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
            async with aiohttp.ClientSession() as http:
                for stream in (False, True):
                    async with http.post(
                        f"{processor.v1}/chat/completions", json={**body, "stream": stream}
                    ) as resp:
                        assert resp.status == 503, await resp.text()
                        assert resp.content_type == "application/json"
                        detail = error_detail(await resp.json())
                        assert MODEL in detail["message"]
                        assert "Retry-After" in resp.headers
                async with http.get(f"{processor.base}/health") as resp:
                    assert resp.status == 503  # nothing servable: not ready
                async with http.get(f"{processor.base}/live") as resp:
                    assert resp.status == 200  # but alive
            with pytest.raises(openai.InternalServerError) as gone:
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            assert gone.value.status_code == 503
            with pytest.raises(openai.NotFoundError) as unknown:
                await client.completions.create(model="never-served", prompt=PROMPT)
            assert unknown.value.status_code == 404

            # A worker coming back makes the model servable again.
            await m.add_workers(smol, (), served=MODEL)
            await processor.wait_model(MODEL)
            assert (await chat_text(client, max_tokens=2))[0]
