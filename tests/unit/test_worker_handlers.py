"""The worker's request handlers over in-process simulated engines (no NATS, no etcd):
aggregated streams, stop tokens, the decode leg's rules, the prefill leg's bootstrap handshake
and a real prefill+decode pair, cancellation at every stage (the engine must free the request
and its KV), clear_kv_blocks, and the metrics hooks."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from proto.request import (
    FAKE_BOOTSTRAP_HOST,
    BootstrapInfo,
    OutputOptions,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from proto.response import KV_CACHE_HIT_KEY, EngineOutput, FinishReason
from services.decode.handler import DecodeHandler
from services.prefill.handler import PrefillHandler
from shared.engine.mapping import EngineError
from shared.engine.protocol import Engine
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.model import make_test_tokenizer
from shared.router.bootstrap import MAX_BOOTSTRAP_ROOM, choose_bootstrap_room
from shared.runtime.endpoint import Context, StopReason
from shared.runtime.errors import InvalidRequestError
from shared.worker import handlers
from shared.worker.handlers import ClearKvBlocksHandler

PROMPT = list(range(10, 50))  # 40 tokens: two full 16-token pages can be cached
SEED = 11

MakeEngine = Callable[..., Awaitable[SimEngine]]


class RecordingMetrics:
    """A ``WorkerMetricsHooks`` that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def request_started(self, role: str) -> None:
        self.calls.append(("request_started", (role,)))

    def request_finished(self, role: str, error_kind: str | None) -> None:
        self.calls.append(("request_finished", (role, error_kind)))

    def first_token(self, seconds: float) -> None:
        self.calls.append(("first_token", (seconds,)))

    def inter_token(self, seconds: float) -> None:
        self.calls.append(("inter_token", (seconds,)))

    def tokens(self, prompt: int, cached: int, generated: int) -> None:
        self.calls.append(("tokens", (prompt, cached, generated)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_test_tokenizer(tmp_path / "model")


@pytest.fixture
async def make_engine(model_dir: Path) -> AsyncIterator[MakeEngine]:
    started: list[SimEngine] = []

    async def make(**kw: Any) -> SimEngine:
        base: dict[str, Any] = {
            "model_path": str(model_dir),
            "speedup_ratio": 0.0,
            "random_seed": 0,
            "max_total_tokens": 16384,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": 0,
            "bootstrap_timeout": 5.0,
            "kv_bytes_per_token": 64,
        }
        base.update(kw)
        engine = SimEngine(SimConfig(**base))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.shutdown()


def request(
    max_tokens: int = 12,
    *,
    prompt: list[int] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_token_ids_hidden: list[int] | None = None,
    n: int | None = None,
    logprobs: int | None = None,
    bootstrap: BootstrapInfo | None = None,
    dp_rank: int | None = None,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=list(PROMPT if prompt is None else prompt),
        stop_conditions=StopConditions(
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            stop_token_ids_hidden=stop_token_ids_hidden,
        ),
        sampling_options=SamplingOptions(seed=SEED, n=n),
        output_options=OutputOptions(logprobs=logprobs),
        bootstrap_info=bootstrap,
        routing=RoutingHints(dp_rank=dp_rank) if dp_rank is not None else None,
    )


_ids = iter(range(1_000_000))


def context() -> Context:
    return Context(f"req-{next(_ids)}", 1)


def agen(stream: AsyncIterator[EngineOutput]) -> AsyncGenerator[EngineOutput, None]:
    """The handlers are async generators; the runtime closes them with ``aclose``."""
    return cast(AsyncGenerator[EngineOutput, None], stream)


async def collect(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def tokens_of(chunks: list[EngineOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def request_pages(engine: SimEngine) -> int:
    return sum(s.cache.pool.request_pages for s in engine.schedulers)


async def engine_reference(engine: SimEngine, max_tokens: int) -> list[int]:
    """The tokens the engine produces for ``PROMPT`` and ``SEED`` when driven directly."""
    ids: list[int] = []
    async for item in engine.async_generate(
        input_ids=list(PROMPT),
        sampling_params={"max_new_tokens": max_tokens, "sampling_seed": SEED},
        rid=f"ref-{next(_ids)}",
    ):
        ids.extend(item["output_ids"])
    return ids


# ----- aggregated -------------------------------------------------------------------------


async def test_aggregated_stream_usage_and_cache_hit(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    handler = DecodeHandler(engine, disaggregation_mode="null")
    expected = await engine_reference(engine, 12)
    await engine.flush_cache()  # start cold

    chunks = await collect(handler.generate(request(12), context()))
    assert tokens_of(chunks) == expected and len(expected) == 12
    first, last = chunks[0], chunks[-1]
    assert first.completion_usage is not None and first.completion_usage.prompt_tokens == 40
    assert first.completion_usage.prompt_tokens_details is not None
    assert first.completion_usage.prompt_tokens_details.cached_tokens == 0
    assert last.finish_reason is FinishReason.LENGTH and last.stop_reason is None
    assert last.completion_usage is not None
    assert last.completion_usage.completion_tokens == 12
    assert last.completion_usage.total_tokens == 52
    assert last.engine_data == {KV_CACHE_HIT_KEY: {"prompt_tokens": 40, "reused_tokens": 0}}
    assert all(c.finish_reason is None for c in chunks[:-1])

    # The same prompt again: its two full pages come from the prefix cache.
    chunks = await collect(handler.generate(request(12), context()))
    assert tokens_of(chunks) == expected
    for chunk in (chunks[0], chunks[-1]):
        assert chunk.completion_usage is not None
        assert chunk.completion_usage.prompt_tokens_details is not None
        assert chunk.completion_usage.prompt_tokens_details.cached_tokens == 32
    assert chunks[-1].engine_data is not None
    assert chunks[-1].engine_data[KV_CACHE_HIT_KEY] == {"prompt_tokens": 40, "reused_tokens": 32}
    assert engine.num_active_requests() == 0


async def test_stop_token_ids_and_logprobs(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    handler = DecodeHandler(engine, disaggregation_mode="null")
    ref = await engine_reference(engine, 20)
    stop = ref[5]
    cut = ref.index(stop) + 1

    chunks = await collect(handler.generate(request(20, stop_token_ids=[stop]), context()))
    assert tokens_of(chunks) == ref[:cut]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].stop_reason == stop

    # A hidden stop token (EOS variants the processor adds) stops but is not the reason.
    chunks = await collect(handler.generate(request(20, stop_token_ids_hidden=[stop]), context()))
    assert tokens_of(chunks) == ref[:cut]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].stop_reason is None

    chunks = await collect(handler.generate(request(6, logprobs=2), context()))
    assert tokens_of(chunks) == ref[:6]
    for chunk in chunks:
        if chunk.token_ids:
            assert chunk.log_probs is not None and len(chunk.log_probs) == len(chunk.token_ids)
            assert chunk.top_logprobs is not None
            assert all(len(top) == 2 for top in chunk.top_logprobs)


async def test_engine_rejection_is_invalid_request(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    handler = DecodeHandler(engine, disaggregation_mode="null")
    with pytest.raises(InvalidRequestError, match="context length"):
        await collect(handler.generate(request(5000), context()))
    with pytest.raises(InvalidRequestError, match="token_ids"):
        await collect(handler.generate(request(5, prompt=[]), context()))
    assert engine.num_active_requests() == 0


# ----- disaggregated decode ---------------------------------------------------------------


async def test_decode_requires_bootstrap_info_and_n1(make_engine: MakeEngine) -> None:
    engine = await make_engine(disaggregation_mode="decode")
    metrics = RecordingMetrics()
    handler = DecodeHandler(engine, disaggregation_mode="decode", metrics=metrics)
    with pytest.raises(InvalidRequestError, match="bootstrap_info"):
        await collect(handler.generate(request(), context()))
    boot = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=1, bootstrap_room=3)
    with pytest.raises(InvalidRequestError, match="n=1"):
        await collect(handler.generate(request(n=2, bootstrap=boot), context()))
    assert engine.num_active_requests() == 0
    assert (
        metrics.calls
        == [
            ("request_started", ("decode",)),
            ("request_finished", ("decode", "invalid_request")),
        ]
        * 2
    )
    with pytest.raises(ValueError):
        DecodeHandler(engine, disaggregation_mode="prefill")


async def test_decode_plain_engine_abort_follows_the_mapper(make_engine: MakeEngine) -> None:
    prefill = await make_engine(disaggregation_mode="prefill")
    decode = await make_engine(disaggregation_mode="decode", bootstrap_timeout=0.2)
    metrics = RecordingMetrics()
    handler = DecodeHandler(decode, disaggregation_mode="decode", metrics=metrics)
    port = prefill.info.bootstrap_port
    assert port is not None
    # No prefill ever fills this room: the KV transfer times out and the engine aborts.
    boot = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=77)
    chunks = await collect(handler.generate(request(bootstrap=boot), context()))
    assert tokens_of(chunks) == []
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert metrics.named("request_finished") == [("decode", "engine_abort")]
    assert decode.num_active_requests() == 0


# ----- prefill ----------------------------------------------------------------------------


def test_choose_bootstrap_room(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(200):
        room = choose_bootstrap_room()
        assert 0 <= room <= MAX_BOOTSTRAP_ROOM
        room = choose_bootstrap_room(3, 8)
        assert 0 <= room <= MAX_BOOTSTRAP_ROOM and room % 8 == 3
    # The largest and smallest draws stay in range.
    for draw in (MAX_BOOTSTRAP_ROOM, 0, 5):
        monkeypatch.setattr(random, "getrandbits", lambda _bits, d=draw: d)
        for rank in range(7):
            room = choose_bootstrap_room(rank, 7)
            assert 0 <= room <= MAX_BOOTSTRAP_ROOM and room % 7 == rank


async def test_prefill_bootstrap_chunk_comes_first(make_engine: MakeEngine) -> None:
    engine = await make_engine(disaggregation_mode="prefill")
    host, port = engine.info.bootstrap_host, engine.info.bootstrap_port
    assert host == "127.0.0.1" and port is not None
    handler = PrefillHandler(engine, bootstrap_host=host, bootstrap_port=port, dp_size=4)

    # Its own host/port and a room on the routed DP rank, before any engine work.
    gen = agen(handler.generate(request(dp_rank=2), context()))
    first = await anext(gen)
    assert first.token_ids == [] and first.finish_reason is None
    params = first.disaggregated_params
    assert params is not None and params.keys() == {
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
    }
    assert params["bootstrap_host"] == host and params["bootstrap_port"] == port
    assert 0 <= params["bootstrap_room"] <= MAX_BOOTSTRAP_ROOM
    assert params["bootstrap_room"] % 4 == 2
    assert engine.num_active_requests() == 0
    await gen.aclose()
    assert engine.num_active_requests() == 0

    # The processor's triple wins; invalid requests announce nothing.
    boot = BootstrapInfo(bootstrap_host="10.1.2.3", bootstrap_port=4242, bootstrap_room=99)
    gen = agen(handler.generate(request(bootstrap=boot), context()))
    first = await anext(gen)
    assert first.disaggregated_params == {
        "bootstrap_host": "10.1.2.3",
        "bootstrap_port": 4242,
        "bootstrap_room": 99,
    }
    await gen.aclose()
    with pytest.raises(InvalidRequestError, match="n=1"):
        await anext(handler.generate(request(n=2), context()))


async def test_prefill_health_check_runs_locally(make_engine: MakeEngine) -> None:
    engine = await make_engine(disaggregation_mode="prefill")
    port = engine.info.bootstrap_port
    assert port is not None
    metrics = RecordingMetrics()
    handler = PrefillHandler(
        engine, bootstrap_host="127.0.0.1", bootstrap_port=port, metrics=metrics
    )
    boot = BootstrapInfo(bootstrap_host=FAKE_BOOTSTRAP_HOST, bootstrap_port=port, bootstrap_room=0)
    chunks = await collect(handler.generate(request(max_tokens=1, bootstrap=boot), context()))
    assert len(chunks) == 2
    assert chunks[0].disaggregated_params is not None
    assert chunks[0].disaggregated_params["bootstrap_host"] == FAKE_BOOTSTRAP_HOST
    assert chunks[1].token_ids == [] and chunks[1].disaggregated_params is None
    assert chunks[1].engine_data == {KV_CACHE_HIT_KEY: {"prompt_tokens": 40, "reused_tokens": 0}}
    assert metrics.calls == [
        ("request_started", ("prefill",)),
        ("tokens", (40, 0, 0)),
        ("request_finished", ("prefill", None)),
    ]
    assert engine.num_active_requests() == 0


async def test_prefill_decode_pair_matches_aggregated(make_engine: MakeEngine) -> None:
    agg = await make_engine()
    prefill = await make_engine(disaggregation_mode="prefill")
    decode = await make_engine(disaggregation_mode="decode")
    assert prefill.info.bootstrap_host is not None and prefill.info.bootstrap_port is not None
    p_handler = PrefillHandler(
        prefill,
        bootstrap_host=prefill.info.bootstrap_host,
        bootstrap_port=prefill.info.bootstrap_port,
    )
    d_handler = DecodeHandler(decode, disaggregation_mode="decode")
    expected = tokens_of(
        await collect(
            DecodeHandler(agg, disaggregation_mode="null").generate(request(10), context())
        )
    )
    assert len(expected) == 10

    # The processor's synchronous path: the prefill's first chunk names the room.
    p_gen = agen(p_handler.generate(request(10), context()))
    first = await anext(p_gen)
    params = first.disaggregated_params
    assert params is not None and params["bootstrap_port"] == prefill.info.bootstrap_port
    boot = BootstrapInfo(**params)
    p_rest = asyncio.ensure_future(collect(p_gen))
    d_chunks = await collect(d_handler.generate(request(10, bootstrap=boot), context()))
    p_chunks = await p_rest

    assert tokens_of(d_chunks) == expected
    assert d_chunks[-1].finish_reason is FinishReason.LENGTH
    assert d_chunks[-1].engine_data is None  # the prefill leg reports the cache hit
    assert len(p_chunks) == 1 and p_chunks[0].token_ids == []
    assert p_chunks[0].engine_data == {KV_CACHE_HIT_KEY: {"prompt_tokens": 40, "reused_tokens": 0}}
    for engine in (prefill, decode):
        assert engine.num_active_requests() == 0
        assert request_pages(engine) == 0


async def test_prefill_without_its_decode_peer_fails(make_engine: MakeEngine) -> None:
    engine = await make_engine(disaggregation_mode="prefill", bootstrap_timeout=0.2)
    assert engine.info.bootstrap_port is not None
    metrics = RecordingMetrics()
    handler = PrefillHandler(
        engine,
        bootstrap_host="127.0.0.1",
        bootstrap_port=engine.info.bootstrap_port,
        metrics=metrics,
    )
    gen = agen(handler.generate(request(), context()))
    assert (await anext(gen)).disaggregated_params is not None
    with pytest.raises(EngineError, match="prefill failed") as caught:
        await anext(gen)
    assert not caught.value.retryable
    assert metrics.named("request_finished") == [("prefill", "engine_error")]
    assert engine.num_active_requests() == 0 and request_pages(engine) == 0


# ----- cancellation -----------------------------------------------------------------------


async def _consume(
    stream: AsyncIterator[EngineOutput], seen: list[EngineOutput], first: asyncio.Event
) -> None:
    async for out in stream:
        seen.append(out)
        first.set()


async def test_cancel_mid_stream_aborts_and_frees_kv(make_engine: MakeEngine) -> None:
    engine = await make_engine(speedup_ratio=1.0)
    metrics = RecordingMetrics()
    handler = DecodeHandler(engine, disaggregation_mode="null", metrics=metrics)
    ctx = context()
    seen: list[EngineOutput] = []
    first = asyncio.Event()
    task = asyncio.ensure_future(_consume(handler.generate(request(1900), ctx), seen, first))
    ctx._task = task  # as the runtime does: a stop cancels the handler's task
    await asyncio.wait_for(first.wait(), 2)
    assert engine.num_active_requests() == 1 and request_pages(engine) > 0
    started = time.monotonic()
    ctx._stop(StopReason.CALLER)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    await until(lambda: engine.num_active_requests() == 0)
    await until(lambda: request_pages(engine) == 0)
    assert seen and seen[-1].finish_reason is None and len(tokens_of(seen)) < 1900
    assert engine.schedulers[0].stats.aborted == 1
    assert metrics.named("request_finished") == [("aggregated", "cancelled")]


async def test_stop_seen_between_items_aborts(make_engine: MakeEngine) -> None:
    engine = await make_engine(speedup_ratio=1.0)  # ~5 ms per token: 1900 take ~10 s
    metrics = RecordingMetrics()
    handler = DecodeHandler(engine, disaggregation_mode="null", metrics=metrics)
    ctx = context()  # no task attached: the handler must notice the stop itself
    count = 0
    with pytest.raises(asyncio.CancelledError):
        async for _ in handler.generate(request(1900), ctx):
            count += 1
            if count == 3:
                ctx._stop(StopReason.SHUTDOWN)
                started = time.monotonic()
    assert count == 3
    # Aborted, not drained to its natural end (nor to the drain's 1 s bound).
    assert time.monotonic() - started < 0.5
    assert engine.num_active_requests() == 0 and request_pages(engine) == 0
    assert metrics.named("request_finished") == [("aggregated", "shutting_down")]


async def test_closing_the_generator_aborts(make_engine: MakeEngine) -> None:
    # The runtime aclose()s the handler when it is cancelled while the handler sits at a yield.
    engine = await make_engine(speedup_ratio=1.0)
    handler = DecodeHandler(engine, disaggregation_mode="null")
    gen = agen(handler.generate(request(1900), context()))
    assert (await anext(gen)).token_ids
    assert engine.num_active_requests() == 1
    started = time.monotonic()
    await gen.aclose()
    assert time.monotonic() - started < 0.5
    assert engine.num_active_requests() == 0 and request_pages(engine) == 0
    assert engine.schedulers[0].stats.aborted == 1


async def test_cancel_before_the_first_token(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    handler = DecodeHandler(engine, disaggregation_mode="null")
    await engine.pause_generation()  # the request stays queued: nothing is emitted
    try:
        seen: list[EngineOutput] = []
        task = asyncio.ensure_future(
            _consume(handler.generate(request(), context()), seen, asyncio.Event())
        )
        await until(lambda: engine.num_active_requests() == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == []
        assert engine.num_active_requests() == 0
    finally:
        await engine.continue_generation()


async def test_cancel_decode_waiting_for_its_kv(make_engine: MakeEngine) -> None:
    prefill = await make_engine(disaggregation_mode="prefill")
    decode = await make_engine(disaggregation_mode="decode")
    port = prefill.info.bootstrap_port
    assert port is not None
    handler = DecodeHandler(decode, disaggregation_mode="decode")
    boot = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=555)
    task = asyncio.ensure_future(collect(handler.generate(request(bootstrap=boot), context())))
    await until(lambda: decode.num_active_requests() == 1)
    await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    await until(lambda: decode.num_active_requests() == 0)


async def test_cancel_prefill_while_it_waits_for_decode(make_engine: MakeEngine) -> None:
    engine = await make_engine(disaggregation_mode="prefill")
    assert engine.info.bootstrap_port is not None
    metrics = RecordingMetrics()
    handler = PrefillHandler(
        engine,
        bootstrap_host="127.0.0.1",
        bootstrap_port=engine.info.bootstrap_port,
        metrics=metrics,
    )
    seen: list[EngineOutput] = []
    first = asyncio.Event()
    task = asyncio.ensure_future(_consume(handler.generate(request(), context()), seen, first))
    await asyncio.wait_for(first.wait(), 2)
    # The prefill computed its KV and now holds it for a decode peer that never comes.
    await until(lambda: engine.num_active_requests() == 1 and request_pages(engine) > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: engine.num_active_requests() == 0 and request_pages(engine) == 0)
    assert len(seen) == 1  # the bootstrap chunk; no cache-hit chunk for a cancelled prefill
    assert metrics.named("request_finished") == [("prefill", "cancelled")]


class WedgedEngine:
    """An engine that ignores aborts: its stream never ends by itself (a hung engine)."""

    def __init__(self, *, emit_first: bool) -> None:
        self.emit_first = emit_first
        self.rids: list[str] = []
        self.aborted: list[str] = []
        self.stream_closed = False

    async def async_generate(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.rids.append(kwargs["rid"])
        try:
            if self.emit_first:
                meta = {"id": kwargs["rid"], "finish_reason": None, "prompt_tokens": 40}
                yield {"text": "", "output_ids": [7], "index": 0, "meta_info": meta}
            await asyncio.Event().wait()
        finally:
            self.stream_closed = True

    def abort_request(self, rid: str) -> None:
        self.aborted.append(rid)


async def test_abort_goes_out_before_the_first_token() -> None:
    engine = WedgedEngine(emit_first=False)
    handler = DecodeHandler(cast(Engine, engine), disaggregation_mode="null")
    task = asyncio.ensure_future(collect(handler.generate(request(), context())))
    await until(lambda: bool(engine.rids))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(engine.rids[0]) == 32  # a fresh uuid4 hex, not the mesh request id
    assert engine.aborted and set(engine.aborted) == {engine.rids[0]}
    assert engine.stream_closed


async def test_drain_after_abort_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "ABORT_DRAIN_SECONDS", 0.1)
    engine = WedgedEngine(emit_first=True)
    metrics = RecordingMetrics()
    handler = DecodeHandler(cast(Engine, engine), disaggregation_mode="null", metrics=metrics)
    gen = agen(handler.generate(request(), context()))
    assert (await anext(gen)).token_ids == [7]
    started = time.monotonic()
    await gen.aclose()
    assert 0.1 <= time.monotonic() - started < 0.6
    assert engine.aborted and set(engine.aborted) == {engine.rids[0]}
    assert engine.stream_closed
    assert metrics.named("request_finished") == [("aggregated", "cancelled")]

    # As in the runtime: its task is cancelled while it publishes a chunk (the handler sits
    # at a yield), and it closes the handler from its finally, still inside the cancelled task.
    engine = WedgedEngine(emit_first=True)
    handler = DecodeHandler(cast(Engine, engine), disaggregation_mode="null")
    got_chunk = asyncio.Event()

    async def runtime_like() -> None:
        gen = agen(handler.generate(request(), context()))
        try:
            async for _ in gen:
                got_chunk.set()
                await asyncio.sleep(30)  # "publishing"
        finally:
            await gen.aclose()

    task = asyncio.ensure_future(runtime_like())
    await asyncio.wait_for(got_chunk.wait(), 2)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0.1 <= time.monotonic() - started < 0.6
    assert engine.aborted and engine.stream_closed


# ----- clear_kv_blocks --------------------------------------------------------------------


async def test_clear_kv_blocks(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    clear = ClearKvBlocksHandler(engine)
    handler = DecodeHandler(engine, disaggregation_mode="null")
    await collect(handler.generate(request(), context()))
    assert engine.schedulers[0].cache.cached_pages > 0

    gen = agen(handler.generate(request(1900), context()))
    await anext(gen)
    replies = [r async for r in clear.generate({}, context())]
    assert replies == [
        {"status": "error", "message": "refusing to clear the KV cache: 1 requests active"}
    ]
    await gen.aclose()

    replies = [r async for r in clear.generate({}, context())]
    assert len(replies) == 1 and replies[0]["status"] == "success"
    assert engine.schedulers[0].cache.cached_pages == 0


# ----- metrics ----------------------------------------------------------------------------


async def test_metrics_hooks(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    metrics = RecordingMetrics()
    handler = DecodeHandler(engine, disaggregation_mode="null", metrics=metrics)
    chunks = await collect(handler.generate(request(12), context()))
    token_chunks = [c for c in chunks if c.token_ids]
    assert metrics.calls[0] == ("request_started", ("aggregated",))
    assert metrics.calls[-1] == ("request_finished", ("aggregated", None))
    ttft = metrics.named("first_token")
    assert len(ttft) == 1 and ttft[0][0] >= 0
    itl = metrics.named("inter_token")
    assert len(itl) == len(token_chunks) - 1 and all(s >= 0 for (s,) in itl)
    assert metrics.named("tokens") == [(40, 0, 12)]
