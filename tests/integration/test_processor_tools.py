"""Tool calls and reasoning through the processor's HTTP API, with the official ``openai`` client.

Real processes on real NATS and etcd: ``sglmesh worker --engine sim`` workers started with and
without ``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``, and a scripted worker
(tests/integration/scripted_worker.py) whose output contains a Hermes tool call or a thinking
block, tokenized with the default model's tokenizer, so the processor's detokenizer and parsers
run on real token streams.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.infra import EtcdServer, NatsServer
from shared.model import prepare_default_model
from tests.integration.mesh import Responder
from tests.integration.processor_mesh import Mesh, Processor, mesh
from tests.integration.scripted_worker import MODEL as SCRIPTED

PLAIN = "plain"
TOOLED = "tooled"
CALM = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
async def tools_mesh(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Mesh, Processor]]:
    smol: Path = prepare_default_model()
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("tools"), **CALM) as m:
        processor = m.add_processor("--router-mode", "round-robin")
        await m.add_workers(smol, (), served=PLAIN)
        await m.add_workers(
            smol,
            ("--dyn-tool-call-parser", "hermes", "--dyn-reasoning-parser", "qwen3"),
            served=TOOLED,
        )
        scripted = Responder(
            m.cfg,
            f"{m.cfg.namespace}.scripted.generate",
            module="tests.integration.scripted_worker",
        )
        try:
            for name in (PLAIN, TOOLED, SCRIPTED):
                await processor.wait_model(name)
            yield m, processor
        finally:
            scripted.stop()


def client(processor: Processor) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=processor.v1, api_key="unused", max_retries=0, timeout=30)


async def test_tools_are_refused_for_a_model_without_a_parser(
    tools_mesh: tuple[Mesh, Processor],
) -> None:
    _, processor = tools_mesh
    async with client(processor) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model=PLAIN, messages=ASK, tools=TOOLS, max_tokens=4)
        body: Any = info.value.body
        assert body["param"] == "tools" and "tool-call parser" in body["message"]
        # tool_choice "none" or "auto" without tools asks for nothing: served.
        plain = await c.chat.completions.create(
            model=PLAIN, messages=ASK, tool_choice="none", max_tokens=4
        )
        assert plain.choices[0].message.content


async def test_tools_are_accepted_for_a_model_with_a_parser(
    tools_mesh: tuple[Mesh, Processor],
) -> None:
    _, processor = tools_mesh
    async with client(processor) as c:
        resp = await c.chat.completions.create(
            model=TOOLED, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0
        )
        # The simulator writes words: no call in them, so the words are the content.
        choice = resp.choices[0]
        assert choice.message.content and not choice.message.tool_calls
        assert choice.finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model=TOOLED,
                messages=ASK,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        body: Any = info.value.body
        assert body["param"] == "tool_choice"


async def test_a_hermes_call_comes_back_as_tool_calls_unary_and_streamed(
    tools_mesh: tuple[Mesh, Processor],
) -> None:
    _, processor = tools_mesh
    async with client(processor) as c:
        resp = await c.chat.completions.create(model=SCRIPTED, messages=ASK, tools=TOOLS)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        call: Any = calls[0]
        assert call.type == "function" and call.id
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        stream = await c.chat.completions.create(
            model=SCRIPTED, messages=ASK, tools=TOOLS, stream=True
        )
        content: list[str] = []
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        finish = None
        async for chunk in stream:
            for ch in chunk.choices:
                content.append(ch.delta.content or "")
                for d in ch.delta.tool_calls or []:
                    if d.function and d.function.name:
                        names[d.index] = d.function.name
                    if d.function and d.function.arguments:
                        arguments[d.index] = arguments.get(d.index, "") + d.function.arguments
                finish = ch.finish_reason or finish
        assert "".join(content) == "Let me check."
        assert names == {0: "get_weather"}
        assert arguments == {0: call.function.arguments}
        assert finish == "tool_calls"

        # n > 1: each choice is parsed on its own.
        both = await c.chat.completions.create(model=SCRIPTED, messages=ASK, tools=TOOLS, n=2)
        assert [ch.finish_reason for ch in both.choices] == ["tool_calls", "tool_calls"]
        assert all(len(ch.message.tool_calls or []) == 1 for ch in both.choices)


async def test_required_sends_a_json_schema_guide_and_reads_the_calls_back(
    tools_mesh: tuple[Mesh, Processor],
) -> None:
    # The scripted worker answers a JSON guide with a constrained call array (and anything
    # else with Hermes text): a call to Oslo shows the guide reached the worker.
    _, processor = tools_mesh
    async with client(processor) as c:
        resp = await c.chat.completions.create(
            model=SCRIPTED, messages=ASK, tools=TOOLS, tool_choice="required"
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        calls: Any = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather"]
        assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}


async def test_reasoning_is_split_unary_and_streamed(
    tools_mesh: tuple[Mesh, Processor],
) -> None:
    _, processor = tools_mesh
    think = [{"role": "user", "content": "think, then say hello"}]
    async with client(processor) as c:
        resp = await c.chat.completions.create(model=SCRIPTED, messages=think)
        message: Any = resp.choices[0].message
        assert message.reasoning_content == "The user greets me."
        assert message.content == "Hello there!"
        assert resp.choices[0].finish_reason == "stop"

        stream = await c.chat.completions.create(model=SCRIPTED, messages=think, stream=True)
        reasoning, content = [], []
        async for chunk in stream:
            for ch in chunk.choices:
                delta: Any = ch.delta
                reasoning.append(getattr(delta, "reasoning_content", None) or "")
                content.append(delta.content or "")
        assert ("".join(reasoning), "".join(content)) == ("The user greets me.", "Hello there!")

        off = await c.chat.completions.create(
            model=SCRIPTED,
            messages=think,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        off_message: Any = off.choices[0].message
        assert getattr(off_message, "reasoning_content", None) is None
        assert off_message.content.startswith("<think>")
