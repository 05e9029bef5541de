"""Bad input to the processor's HTTP API: always a 4xx with an OpenAI error body, never a 500
or a hang. Named cases first, then 1,000 randomly mutated bodies (fixed seed).

Real processes: nats-server, etcd, one sim worker, one processor started with a small
``--max-body-bytes``. The worker ends its answers early (``--sim-output-len-mean 8``) so a
mutated body that lost its ``max_tokens`` still finishes at once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from tests.integration.processor_mesh import Processor, error_detail, mesh

MODEL = "tiny"
MAX_BODY = 8192

CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "you are a good assistant"},
        {"role": "user", "content": "tell me a story about a cat"},
    ],
    "max_tokens": 8,
}
COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": "once there was a dog", "max_tokens": 8}


@pytest.fixture(scope="module")
async def processor(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Processor]:
    tiny = make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")
    calm = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("input"), **calm) as m:
        p = m.add_processor("--max-body-bytes", str(MAX_BODY))
        await m.add_workers(tiny, ("--sim-output-len-mean", "8"), served=MODEL)
        await p.wait_model(MODEL)
        yield p


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def send(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes | dict[str, Any],
    method: str = "POST",
) -> tuple[int, str, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.request(
        method, url, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, resp.content_type, await resp.read()


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is _DELETE:
            del out[key]
        else:
            out[key] = value
    return out


_DELETE = object()
_DEEP = 5000  # nesting levels: far past any recursion limit, still a 10 kB body
_deep_json = b"[" * (_DEEP // 2) + b"]" * (_DEEP // 2)

# (id, path, body, expected status, expected param or None)
CASES: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    ("invalid-json", "chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not-an-object", "completions", b'["model", "tiny"]', 400, None),
    ("empty-body", "chat/completions", b"", 400, None),
    ("max-tokens-string", "chat/completions", with_(CHAT, max_tokens="ten"), 400, "max_tokens"),
    ("messages-string", "chat/completions", with_(CHAT, messages="hello"), 400, "messages"),
    ("model-number", "completions", with_(COMPLETION, model=7), 400, "model"),
    ("role-unknown", "chat/completions",
     with_(CHAT, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("stream-string", "completions", with_(COMPLETION, stream="yes"), 400, "stream"),
    ("prompt-dict", "completions", with_(COMPLETION, prompt={"text": "hi"}), 400, "prompt"),
    ("prompt-mixed-list", "completions", with_(COMPLETION, prompt=["hi", 3]), 400, "prompt"),
    ("prompt-token-out-of-vocab", "completions", with_(COMPLETION, prompt=[5, 10**6]), 400,
     "prompt"),
    ("negative-max-tokens", "chat/completions", with_(CHAT, max_tokens=-1), 400, "max_tokens"),
    ("zero-max-tokens", "completions", with_(COMPLETION, max_tokens=0), 400, "max_tokens"),
    ("empty-messages", "chat/completions", with_(CHAT, messages=[]), 400, "messages"),
    ("empty-prompt", "completions", with_(COMPLETION, prompt=""), 400, "prompt"),
    ("missing-model", "chat/completions", with_(CHAT, model=_DELETE), 400, "model"),
    ("missing-messages", "chat/completions", with_(CHAT, messages=_DELETE), 400, "messages"),
    ("missing-prompt", "completions", with_(COMPLETION, prompt=_DELETE), 400, "prompt"),
    ("n-zero", "chat/completions", with_(CHAT, n=0), 400, "n"),
    ("temperature-5", "chat/completions", with_(CHAT, temperature=5), 400, "temperature"),
    ("top-p-zero", "completions", with_(COMPLETION, top_p=0), 400, "top_p"),
    ("stop-list-too-long", "chat/completions",
     with_(CHAT, stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-empty-string", "completions", with_(COMPLETION, stop=["ok", ""]), 400, "stop[1]"),
    ("huge-max-tokens", "completions", with_(COMPLETION, max_tokens=2**70), 400, "max_tokens"),
    ("over-context", "completions", with_(COMPLETION, max_tokens=4096), 400, "max_tokens"),
    ("seed-too-big", "chat/completions", with_(CHAT, seed=2**64), 400, "seed"),
    ("min-tokens-too-big", "completions", with_(COMPLETION, min_tokens=2**64 + 1), 400,
     "min_tokens"),
    ("min-tokens-over-max-tokens", "chat/completions", with_(CHAT, min_tokens=100), 400, None),
    ("logprobs-too-many", "completions", with_(COMPLETION, logprobs=99), 400, "logprobs"),
    ("top-logprobs-without-logprobs", "chat/completions", with_(CHAT, top_logprobs=2), 400,
     "top_logprobs"),
    ("image-part", "chat/completions",
     with_(CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages"),
    ("nan", "chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, None),
    ("invalid-utf8", "chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe hi"}]}', 400, None),
    ("invalid-utf8-in-key", "completions", b'{"mo\xc3del": "tiny", "prompt": "hi"}', 400, None),
    # Valid but for the bytes of a field the processor ignores: still not UTF-8, still not JSON.
    ("invalid-utf8-in-unknown-field", "completions",
     b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "user\xff": "\xfe"}', 400, None),
    ("lone-surrogate-escape", "completions",
     b'{"model": "tiny", "prompt": "\\ud800 hi", "max_tokens": 2}', 400, None),
    ("unknown-model", "chat/completions", with_(CHAT, model="gpt-17"), 404, "model"),
    ("deeply-nested-unknown-field", "chat/completions",
     json.dumps(CHAT)[:-1].encode() + b', "junk": ' + _deep_json + b"}", 400, None),
    # OpenAI fields we do not serve: refused by name, never dropped (services/processor/fields.py).
    ("tools", "chat/completions",
     with_(CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("tool-choice-required", "chat/completions", with_(CHAT, tool_choice="required"), 400,
     "tool_choice"),
    ("functions", "chat/completions", with_(CHAT, functions=[{"name": "f"}]), 400, "functions"),
    ("audio", "chat/completions", with_(CHAT, audio={"voice": "alloy"}), 400, "audio"),
    ("modalities-audio", "chat/completions", with_(CHAT, modalities=["text", "audio"]), 400,
     "modalities"),
    ("prediction", "chat/completions",
     with_(CHAT, prediction={"type": "content", "content": "x"}), 400, "prediction"),
    ("web-search", "chat/completions", with_(CHAT, web_search_options={}), 400,
     "web_search_options"),
    ("store", "chat/completions", with_(CHAT, store=True), 400, "store"),
    ("best-of", "completions", with_(COMPLETION, best_of=4), 400, "best_of"),
    ("echo-with-logprobs", "completions", with_(COMPLETION, echo=True, logprobs=1), 400, "echo"),
    # Structured output and logit_bias, checked before any worker sees them.
    ("two-guides", "chat/completions",
     with_(CHAT, response_format={"type": "json_object"}, regex="[a-z]+"), 400, "regex"),
    ("schema-not-an-object", "chat/completions",
     with_(CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                        "schema": "object"}}),
     400, "response_format.json_schema.schema"),
    ("response-format-unknown-type", "chat/completions",
     with_(CHAT, response_format={"type": "yaml"}), 400, "response_format.type"),
    ("logit-bias-not-a-token", "completions", with_(COMPLETION, logit_bias={"cat": 5}), 400,
     "logit_bias"),
    ("logit-bias-out-of-vocab", "chat/completions", with_(CHAT, logit_bias={"100000": 5}), 400,
     "logit_bias"),
    ("logit-bias-too-big", "chat/completions", with_(CHAT, logit_bias={"5": 100.5}), 400,
     "logit_bias"),
    ("spaces-between-kept-specials", "completions",
     with_(COMPLETION, skip_special_tokens=False, spaces_between_special_tokens=True), 400,
     "spaces_between_special_tokens"),
    ("deeply-nested-content", "chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": ' + _deep_json + b"}]}",
     400, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
async def test_bad_request_gets_an_openai_error(
    processor: Processor,
    http: aiohttp.ClientSession,
    path: str,
    body: bytes | dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    got, content_type, payload = await send(http, f"{processor.v1}/{path}", body)
    assert got == status, payload[:500]
    assert content_type == "application/json"
    detail = error_detail(json.loads(payload))
    assert detail["code"] == status
    if param is not None:
        assert detail["param"] == param, detail
    expected_type = {400: "invalid_request_error"}.get(status)
    if expected_type is not None:
        assert detail["type"] == expected_type


async def test_oversized_body_is_413(processor: Processor, http: aiohttp.ClientSession) -> None:
    big = with_(COMPLETION, prompt="word " * MAX_BODY)
    for stream in (False, True):
        status, content_type, payload = await send(
            http, f"{processor.v1}/completions", with_(big, stream=stream)
        )
        assert status == 413, payload[:300]
        assert content_type == "application/json"
        assert str(MAX_BODY) in error_detail(json.loads(payload))["message"]
    # Just under the limit is fine.
    fits = with_(COMPLETION, prompt="word " * ((MAX_BODY - 200) // 5))
    status, _, payload = await send(http, f"{processor.v1}/completions", fits)
    assert status == 200, payload[:300]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/nope", 404),
        ("GET", "/v2/chat/completions", 404),
        ("GET", "/", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/health", 405),
    ],
)
async def test_unknown_routes_and_methods(
    processor: Processor, http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    got, content_type, payload = await send(http, f"{processor.base}{path}", b"{}", method)
    assert got == status, payload[:300]
    assert content_type == "application/json"
    assert error_detail(json.loads(payload))["code"] == status


async def test_vendor_fields_are_ignored_with_a_warning_and_a_count(
    processor: Processor, http: aiohttp.ClientSession
) -> None:
    field = "x_vendor_knob"
    before = await processor.metric("sglmesh_processor_ignored_fields_total", field=field)
    plain = with_(CHAT, seed=11, temperature=0.9)
    answers = []
    for body in (plain, with_(plain, x_vendor_knob={"turbo": True})):
        status, _, payload = await send(http, f"{processor.v1}/chat/completions", body)
        assert status == 200, payload[:300]
        answers.append(json.loads(payload)["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]  # ignored means no effect on the result
    after = await processor.metric("sglmesh_processor_ignored_fields_total", field=field)
    assert after == before + 1
    warnings = [
        line for line in processor.output(tail=200_000).splitlines() if "'x_vendor_knob'" in line
    ]
    assert len(warnings) == 1 and "ignoring request fields" in warnings[0], warnings


async def test_echo_puts_the_prompt_before_each_choice(
    processor: Processor, http: aiohttp.ClientSession
) -> None:
    body = with_(COMPLETION, seed=5, n=2)
    status, _, payload = await send(http, f"{processor.v1}/completions", body)
    assert status == 200, payload[:300]
    plain = [c["text"] for c in json.loads(payload)["choices"]]
    status, _, payload = await send(http, f"{processor.v1}/completions", with_(body, echo=True))
    assert status == 200, payload[:300]
    echoed = [c["text"] for c in json.loads(payload)["choices"]]
    assert echoed == [COMPLETION["prompt"] + text for text in plain]
    # Streamed: the prompt comes first, once per choice.
    status, _, payload = await send(
        http, f"{processor.v1}/completions", with_(body, echo=True, stream=True)
    )
    assert status == 200, payload[:300]
    texts = ["", ""]
    for part in payload.decode().split("\n\n"):
        if part.startswith("data: {"):
            for choice in json.loads(part.removeprefix("data: "))["choices"]:
                texts[choice["index"]] += choice["text"]
    assert texts == echoed


# -- fuzz --------------------------------------------------------------------------------------

_JUNK: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
    1e308, -1e308, 0.5, 1e-300, "", "x" * 200, "\u0000", "\ud800", "\U0001f600" * 5, [],
    {}, [1, 2, 3], [[1], [2]], ["a"] * 20, {"a": [1, {"b": None}]}, {"role": "user"},
    [{"role": "user"}], [{"type": "text", "text": 5}],
]  # fmt: skip
_NUMERIC_FIELDS = (
    "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p",
    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
    "logprobs", "top_logprobs",
)  # fmt: skip
_HUGE: list[Any] = [
    10**20, -(10**20), 2**63, 2**64 + 1, 1e300, -1e300, 1.5, -0.0, 2**31 - 1, 129, 0, -1,
]  # fmt: skip


def _base_bodies() -> list[tuple[str, dict[str, Any]]]:
    chat_variants: list[dict[str, Any]] = [
        {},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"n": 2, "seed": 3},
        {"stop": ["the", "and"], "temperature": 0.7, "top_p": 0.9},
        {"logprobs": True, "top_logprobs": 2},
        {"max_completion_tokens": 4, "max_tokens": _DELETE},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            }
        },
        {
            "logit_bias": {"5": 10},
            "skip_special_tokens": False,
            "stop": ["the"],
            "include_stop_str_in_output": True,
            "tool_choice": "none",
            "metadata": {"a": "b"},
        },
    ]
    completion_variants: list[dict[str, Any]] = [
        {},
        {"stream": True},
        {"prompt": ["one two", "three four"]},
        {"prompt": [30, 31, 32, 33]},
        {"prompt": [[30, 31], [40, 41, 42]], "stream": True},
        {"logprobs": 2, "seed": 9},
        {"stop": "dog", "n": 2},
        {"echo": True, "stream": True, "n": 2},
        {"regex": "[a-z]+", "best_of": 1},
    ]
    return [("chat/completions", with_(CHAT, **v)) for v in chat_variants] + [
        ("completions", with_(COMPLETION, **v)) for v in completion_variants
    ]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value (dict keys and list indices)."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        out.append((*prefix, key))
        if isinstance(child, dict | list) and child:
            out.extend(_paths(child, (*prefix, key)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


_DEEP_MARK = "<deeply nested junk>"


def _nested_junk(rng: random.Random, depth: int) -> Any:
    if depth <= 0:
        return rng.choice(_JUNK)
    if rng.random() < 0.5:
        return [_nested_junk(rng, depth - 1) for _ in range(rng.randrange(1, 3))]
    return {f"k{rng.randrange(99)}": _nested_junk(rng, depth - 1)}


def _mutate_doc(doc: Any, rng: random.Random) -> Any:
    op = rng.choices(range(5), weights=(3, 3, 3, 3, 1))[0]
    paths = _paths(doc) if isinstance(doc, dict | list) and doc else []
    if op == 0 and paths:  # delete a field (or list item)
        path = rng.choice(paths)
        del _parent(doc, path)[path[-1]]
    elif op == 1 and paths:  # swap a value's type
        path = rng.choice(paths)
        _parent(doc, path)[path[-1]] = copy.deepcopy(rng.choice(_JUNK))
    elif op == 2 and isinstance(doc, dict):  # a huge or edge number in a numeric field
        doc[rng.choice(_NUMERIC_FIELDS)] = rng.choice(_HUGE)
    elif op == 3 and isinstance(doc, dict):  # nested junk, in a new or an existing field
        key = rng.choice([*(p[0] for p in paths), "junk", "extra_body", "tools"])
        # Now and then far deeper than anything legitimate (spliced in after encoding).
        deep = rng.random() < 0.05
        doc[key] = _DEEP_MARK if deep else _nested_junk(rng, rng.randrange(1, 12))
    elif op == 4 and isinstance(doc, dict):  # the whole document replaced by one of its parts
        doc = copy.deepcopy(rng.choice([*doc.values(), doc]))
    return doc


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    op = rng.randrange(4)
    if op == 0 and data:  # flip a few bytes
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1:  # truncate
        del data[rng.randrange(len(data) + 1) :]
    elif op == 2:  # insert random bytes
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    else:  # duplicate a slice
        a = rng.randrange(len(data) + 1)
        b = rng.randrange(a, len(data) + 1)
        data[b:b] = data[a:b]
    return bytes(data)


def fuzz_cases(count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    bases = _base_bodies()
    cases = []
    for _ in range(count):
        path, base = rng.choice(bases)
        if rng.random() < 0.1:  # the other endpoint's body
            path = "completions" if path == "chat/completions" else "chat/completions"
        doc: Any = copy.deepcopy(base)
        for _ in range(rng.randrange(1, 4)):
            doc = _mutate_doc(doc, rng)
        raw = json.dumps(doc).encode()
        depth = rng.randrange(100, 3000)
        raw = raw.replace(json.dumps(_DEEP_MARK).encode(), b"[" * depth + b"]" * depth)
        if rng.random() < 0.4:
            for _ in range(rng.randrange(1, 3)):
                raw = _mutate_bytes(raw, rng)
        cases.append((path, raw))
    return cases


def _check_answer(status: int, content_type: str, payload: bytes) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    if status == 200:
        if content_type == "text/event-stream":
            lines = [ln for ln in payload.decode().split("\n\n") if ln.strip()]
            if not lines or lines[-1] != "data: [DONE]":
                events = [json.loads(ln.removeprefix("data: ")) for ln in lines]
                if not events or "error" not in events[-1]:
                    return "stream without [DONE] or error"
                if events[-1]["error"].get("code", 500) >= 500:
                    return f"stream ended with a server error: {events[-1]}"
            for ln in lines[:-1]:
                if "error" in json.loads(ln.removeprefix("data: ")):
                    return f"error event mid-stream: {ln[:200]}"
            return None
        body = json.loads(payload)
        return None if body.get("choices") else f"200 without choices: {body}"
    if 400 <= status < 500 or status == 503:
        if content_type != "application/json":
            return f"{status} with content type {content_type}"
        try:
            error_detail(json.loads(payload))
        except (AssertionError, ValueError) as exc:
            return f"{status} without an OpenAI error body: {exc}"
        return None
    return f"status {status}: {payload[:200]!r}"


async def test_fuzzed_bodies_never_get_a_500_or_a_hang(
    processor: Processor, http: aiohttp.ClientSession
) -> None:
    cases = fuzz_cases(1000, seed=0xF022)
    assert len({raw for _, raw in cases}) > 850  # the mutations really vary
    semaphore = asyncio.Semaphore(16)
    statuses: Counter[int] = Counter()
    problems: dict[str, list[bytes]] = {}

    async def one(path: str, raw: bytes) -> None:
        async with semaphore:
            try:
                status, content_type, payload = await send(http, f"{processor.v1}/{path}", raw)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem: str | None = f"{type(exc).__name__}: {exc}"
            else:
                statuses[status] += 1
                try:
                    problem = _check_answer(status, content_type, payload)
                except (ValueError, UnicodeDecodeError) as exc:
                    problem = f"unparseable {status} answer: {exc}"
        if problem is not None:
            problems.setdefault(problem[:120], []).append(raw[:300])

    started = time.monotonic()
    await asyncio.gather(*(one(path, raw) for path, raw in cases))
    elapsed = time.monotonic() - started
    summary = {k: (len(v), v[0]) for k, v in problems.items()}
    assert not problems, f"{sum(len(v) for v in problems.values())} bad answers: {summary}"
    # The mix really exercised both outcomes.
    assert statuses[200] >= 50 and statuses[400] >= 300, statuses
    assert elapsed < 45, elapsed

    # Still healthy, still serving.
    status, _, payload = await send(http, f"{processor.v1}/chat/completions", CHAT)
    assert status == 200, payload
    async with http.get(f"{processor.base}/health") as resp:
        assert resp.status == 200


# -- valid bodies with every field (hypothesis) ------------------------------------------------

_TOKEN = st.integers(4, 40)
_TEXT = st.text(alphabet="abcdefgh ", min_size=1, max_size=12)
_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
_FORMATS = st.sampled_from(
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": _SCHEMA, "strict": True}},
    ]
)
_SAMPLING: dict[str, Any] = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=3)),
    "stop_token_ids": st.lists(_TOKEN, max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": _TEXT,
    "logit_bias": st.dictionaries(_TOKEN.map(str), st.floats(-100, 100), max_size=3),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "response_format": _FORMATS,  # a constraint with regex (completions) is a 400
    "metadata": st.dictionaries(_TEXT, _TEXT, max_size=2),
    "x_vendor_extra": st.integers(),
}
_CHAT_ONLY: dict[str, Any] = {
    "max_completion_tokens": st.integers(1, 8),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "tools": st.just([]),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "parallel_tool_calls": st.booleans(),
    "modalities": st.just(["text"]),
    "store": st.just(False),
    "service_tier": st.sampled_from(["auto", "default"]),
    "prompt_cache_key": _TEXT,
    "chat_template_kwargs": st.just({}),
}
_COMPLETION_ONLY: dict[str, Any] = {
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "best_of": st.just(1),
    "regex": st.just("[a-z]+"),
}
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _TEXT}
)
_BODIES = st.one_of(
    st.tuples(
        st.just("chat/completions"),
        st.fixed_dictionaries(
            {"model": st.just(MODEL), "messages": st.lists(_MESSAGE, min_size=1, max_size=3)},
            optional={**_SAMPLING, **_CHAT_ONLY},
        ),
    ),
    st.tuples(
        st.just("completions"),
        st.fixed_dictionaries(
            {
                "model": st.just(MODEL),
                "prompt": st.one_of(_TEXT, st.lists(_TOKEN, min_size=1, max_size=6)),
            },
            optional={**_SAMPLING, **_COMPLETION_ONLY},
        ),
    ),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_BODIES)
def test_valid_bodies_with_every_field_never_get_a_5xx(
    processor: Processor, case: tuple[str, dict[str, Any]]
) -> None:
    path, body = case
    request = urllib.request.Request(
        f"{processor.v1}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, content_type, payload = (
                resp.status,
                resp.headers.get_content_type(),
                resp.read(),
            )
    except urllib.error.HTTPError as err:
        status, content_type, payload = err.code, err.headers.get_content_type(), err.read()
    problem = _check_answer(status, content_type, payload)
    assert problem is None, (problem, body)
    event(f"status {status}")
    if status != 200:
        event(error_detail(json.loads(payload)).get("param") or "no param")
