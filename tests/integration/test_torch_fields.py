"""Request fields whose effect shows in real model output: one torch worker over
SmolLM2-135M-Instruct's real weights behind the processor, greedy decoding, short outputs.

- ``logit_bias`` reaches the engine (a +100 bias on a special token makes the model say
  nothing else), and ``skip_special_tokens`` decides per request whether it is in the text;
- ``include_stop_str_in_output`` keeps the stop string the model really produced;
- ``echo`` puts the prompt before the completion, which is unchanged;
- ``response_format`` reaches the engine as SGLang's ``json_schema``, which the torch engine
  enforces: the output validates against the schema (json_object too).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import pytest

from shared.infra import EtcdServer, NatsServer
from tests.integration.processor_mesh import Processor, mesh
from tests.real_model import MODEL_NAME, PROMPTS, model_dir

pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(400)

SPECIAL = 3  # <repo_name>: a special token that is neither BOS nor EOS


@pytest.fixture(scope="module")
async def processor(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Processor]:
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("torch-fields")) as m:
        p = m.add_processor()
        # A tool-call parser in the card: tools are accepted, forced calls are guided.
        tools = ("--dyn-tool-call-parser", "hermes")
        await m.add_workers(model_dir(), tools, served=MODEL_NAME, engine="torch")
        await p.wait_model(MODEL_NAME)
        yield p


async def post(processor: Processor, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.post(f"{processor.v1}/{path}", json={"model": MODEL_NAME, **body}) as resp,
    ):
        return resp.status, await resp.json()


async def ok(processor: Processor, path: str, body: dict[str, Any]) -> Any:
    status, payload = await post(processor, path, body)
    assert status == 200, payload
    return payload


async def test_logit_bias_and_skip_special_tokens(processor: Processor) -> None:
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logit_bias": {SPECIAL: 100}}
    kept = await ok(processor, "completions", {**body, "skip_special_tokens": False})
    assert kept["choices"][0]["text"] == "<repo_name>" * 3
    skipped = await ok(processor, "completions", body)
    assert skipped["choices"][0]["text"] == ""
    assert skipped["usage"]["completion_tokens"] == 3
    unbiased = await ok(processor, "completions", {**body, "logit_bias": {}})
    assert "<repo_name>" not in unbiased["choices"][0]["text"]


async def test_include_stop_str_in_output(processor: Processor) -> None:
    body = {"messages": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": ["Paris"]}
    cut = await ok(processor, "chat/completions", body)
    assert cut["choices"][0]["message"]["content"] == "The capital of France is "
    kept = await ok(processor, "chat/completions", {**body, "include_stop_str_in_output": True})
    assert kept["choices"][0]["message"]["content"] == "The capital of France is Paris"
    assert kept["choices"][0]["finish_reason"] == "stop"


async def test_echo(processor: Processor) -> None:
    prompt = "The capital of France is"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
    plain = (await ok(processor, "completions", body))["choices"][0]["text"]
    echoed = (await ok(processor, "completions", {**body, "echo": True}))["choices"][0]["text"]
    assert plain
    assert echoed == prompt + plain


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string", "enum": ["France", "Spain"]},
        "facts": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}


async def test_response_format_reaches_the_engine_as_json_schema(processor: Processor) -> None:
    body = {
        "messages": PROMPTS[0],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    }
    status, payload = await post(processor, "chat/completions", body)
    assert status == 200, payload
    answer = json.loads(payload["choices"][0]["message"]["content"])
    jsonschema.validate(answer, SCHEMA)
    # json_object: any JSON object, enforced the same way.
    body["response_format"] = {"type": "json_object"}
    status, payload = await post(processor, "chat/completions", body)
    assert status == 200, payload
    assert isinstance(json.loads(payload["choices"][0]["message"]["content"]), dict)


def token_id(text: str) -> int:
    from tokenizers import Tokenizer

    ids: list[int] = Tokenizer.from_file(str(model_dir() / "tokenizer.json")).encode(text).ids
    assert len(ids) == 1, ids
    return ids[0]


async def test_stop_token_ids(processor: Processor) -> None:
    paris = token_id(" Paris")
    body = {
        "messages": PROMPTS[0],
        "max_tokens": 16,
        "temperature": 0,
        "stop_token_ids": [paris],
    }
    cut = await ok(processor, "chat/completions", body)
    assert cut["choices"][0]["message"]["content"] == "The capital of France is"
    assert cut["choices"][0]["finish_reason"] == "stop"
    kept = await ok(processor, "chat/completions", {**body, "include_stop_str_in_output": True})
    assert kept["choices"][0]["message"]["content"] == "The capital of France is Paris"


async def test_min_tokens_holds_eos_back(processor: Processor) -> None:
    # A +100 bias on EOS ends the output at once, unless min_tokens holds it back.
    body = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "logit_bias": {2: 100}}
    at_once = await ok(processor, "completions", body)
    assert at_once["usage"]["completion_tokens"] <= 1
    held = await ok(processor, "completions", {**body, "min_tokens": 4})
    assert 4 <= held["usage"]["completion_tokens"] <= 5
    assert held["choices"][0]["finish_reason"] == "stop"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
async def test_forced_tool_calls_are_valid_calls_on_the_real_model(
    processor: Processor, choice: Any
) -> None:
    """The real model, sampled, forced to call: every call names an offered function and its
    arguments validate against that function's parameters."""
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}],
        "tools": [WEATHER, TIME],
        "tool_choice": choice,
        "max_tokens": 64,
        "temperature": 0.8,
        "seed": 7,
        "n": 4,
    }
    payload = await ok(processor, "chat/completions", body)
    for c in payload["choices"]:
        assert c["finish_reason"] == "tool_calls", c
        calls = c["message"]["tool_calls"]
        assert calls, c
        for call in calls:
            name = call["function"]["name"]
            if isinstance(choice, dict):
                assert name == "get_time"
            jsonschema.validate(json.loads(call["function"]["arguments"]), tools[name])
