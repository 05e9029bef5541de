"""``write_stream``: what goes out in which socket write, over real HTTP.

Each write to a local client is a syscall and a wake-up of its reader, so the stream's last
events ride with the end of the body; these tests hold that, and that the client reads the
same events either way.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proto.discovery import ModelCard
from proto.response import EngineOutput, FinishReason
from services.processor import writers
from services.processor.preprocess import ModelPreprocessor
from services.processor.respond import OutputAssembler
from services.processor.tracking import RequestTracker
from shared.model import prepare_default_model


@pytest.fixture(scope="module")
def pre() -> ModelPreprocessor:
    path: Path = prepare_default_model()
    return ModelPreprocessor.from_card(ModelCard(name="smol", model_path=str(path)))


class _Recorded(writers._SseResponse):
    """Records each body write and the end of the body, as the handler made them."""

    calls: list[tuple[str, bytes]] = []

    async def write(self, data: Any) -> None:
        _Recorded.calls.append(("write", bytes(data)))
        await super().write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._eof_sent:  # aiohttp ends every response again once the handler returns
            _Recorded.calls.append(("eof", bytes(data)))
        await super().write_eof(data)


async def _stream(
    pre: ModelPreprocessor,
    batches: list[list[EngineOutput]],
    monkeypatch: pytest.MonkeyPatch,
    *,
    fail_after: bool = False,
) -> tuple[list[tuple[str, bytes]], bytes]:
    monkeypatch.setattr(writers, "_SseResponse", _Recorded)
    _Recorded.calls = []

    async def outputs() -> AsyncGenerator[tuple[int, list[EngineOutput]], None]:
        for batch in batches[1:]:
            yield 0, batch
        if fail_after:
            raise RuntimeError("the worker went away")

    async def handler(request: web.Request) -> web.StreamResponse:
        assembler = OutputAssembler(pre, [[1, 2, 3]])
        gen = writers.Generation(
            rid="chatcmpl-1",
            created=1,
            model="smol",
            chat=True,
            logprobs=False,
            include_usage=True,
            assembler=assembler,
            tracker=RequestTracker("chat_completions"),
            outputs=outputs(),
            first=(0, batches[0]),
            retry_after=1,
        )
        return await writers.write_stream(request, gen)

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        resp: aiohttp.ClientResponse = await client.post("/")
        assert resp.status == 200
        body = await resp.read()
    return _Recorded.calls, body


def _events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


async def test_the_last_tokens_go_out_with_the_end_of_the_body(
    pre: ModelPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello, world = pre.encode("Hello", False), pre.encode(" world", False)
    batches = [
        [EngineOutput(token_ids=hello)],
        [EngineOutput(token_ids=world)],
        [EngineOutput(token_ids=pre.encode("!", False), finish_reason=FinishReason.LENGTH)],
    ]
    calls, body = await _stream(pre, batches, monkeypatch)
    # The first two batches as they came; the last one, the usage event and [DONE] in one.
    assert [kind for kind, _ in calls] == ["write", "write", "eof"]
    assert b"Hello" in calls[0][1] and b" world" in calls[1][1]
    last = _events(calls[2][1])
    assert len(last) == 3
    assert b'"!"' in last[0] and b'"finish_reason":"length"' in last[0]
    assert b'"usage"' in last[1]
    assert last[2] == b"data: [DONE]"
    # What the client read is every event, in order.
    assert _events(body) == [*_events(calls[0][1]), *_events(calls[1][1]), *last]


async def test_an_answer_in_one_batch_is_one_write(
    pre: ModelPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [[EngineOutput(token_ids=pre.encode("Hi", False), finish_reason=FinishReason.STOP)]]
    calls, body = await _stream(pre, batches, monkeypatch)
    assert [kind for kind, _ in calls] == ["eof"]
    events = _events(body)
    assert b'"Hi"' in events[0] and events[-1] == b"data: [DONE]"


async def test_an_error_after_the_first_tokens_is_an_error_event(
    pre: ModelPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [[EngineOutput(token_ids=pre.encode("Hello", False))]]
    calls, body = await _stream(pre, batches, monkeypatch, fail_after=True)
    assert [kind for kind, _ in calls] == ["write", "eof"]
    events = _events(body)
    assert b"Hello" in events[0]
    assert events[-1].startswith(b"data: ") and b'"error"' in events[-1]
