"""Request -> ``async_generate`` keywords, stream items -> ``EngineOutput``, and the SGLang
adapter's plumbing over a stand-in ``sgl.Engine`` (no GPU, no sglang needed)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proto.request import (
    BootstrapInfo,
    GuidedDecodingOptions,
    OutputOptions,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from proto.response import FinishReason, TopLogprob
from shared.engine.args import EngineArgs
from shared.engine.mapping import (
    DP_RANK_UNSET,
    EngineError,
    OutputMapper,
    to_generate_kwargs,
)
from shared.engine.sglang_engine import GENERATE_KWARGS, SglangEngine
from shared.runtime.errors import InvalidRequestError, OverloadedError

BOOT = BootstrapInfo(bootstrap_host="10.0.0.5", bootstrap_port=8998, bootstrap_room=12345)


@pytest.fixture(autouse=True)
def _restore_bootstrap_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # SglangEngine.start() exports the bootstrap timeout for SGLang's schedulers; keep that
    # from leaking into other tests.
    monkeypatch.setenv("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "300")


def req(**kw: Any) -> PreprocessedRequest:
    kw.setdefault("token_ids", [1, 2, 3])
    return PreprocessedRequest(**kw)


# --------------------------------------------------------------------------------------------
# to_generate_kwargs


def test_minimal_request_keeps_max_new_tokens_none() -> None:
    assert to_generate_kwargs(req(), rid="r1", disaggregation_mode="null", dp_rank=None) == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": None},
        "rid": "r1",
        "stream": True,
    }


def test_full_sampling_mapping() -> None:
    r = req(
        stop_conditions=StopConditions(
            max_tokens=64,
            min_tokens=2,
            stop_token_ids=[7, 8],
            stop_token_ids_hidden=[8, 2],
            ignore_eos=False,
            stop=["###"],
        ),
        sampling_options=SamplingOptions(
            n=2,
            temperature=0.7,
            top_p=0.9,
            top_k=-1,
            min_p=0.05,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            repetition_penalty=1.1,
            seed=42,
            best_of=3,
        ),
    )
    kwargs = to_generate_kwargs(r, rid="abc", disaggregation_mode="null", dp_rank=None)
    assert kwargs == {
        "input_ids": [1, 2, 3],
        "sampling_params": {
            "max_new_tokens": 64,
            "min_new_tokens": 2,
            "stop_token_ids": [7, 8, 2],
            "ignore_eos": False,
            "n": 2,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": -1,
            "min_p": 0.05,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "repetition_penalty": 1.1,
            "sampling_seed": 42,
        },
        "rid": "abc",
        "stream": True,
    }


def test_empty_stop_lists_become_none_and_are_dropped() -> None:
    r = req(stop_conditions=StopConditions(stop_token_ids=[], stop_token_ids_hidden=[]))
    params = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=None)
    assert params["sampling_params"] == {"max_new_tokens": None}


def test_min_tokens_with_skip_tokenizer_init_follows_the_reference() -> None:
    r = req(stop_conditions=StopConditions(max_tokens=9, min_tokens=3, stop_token_ids=[5]))
    kwargs = to_generate_kwargs(
        r, rid="r", disaggregation_mode="null", dp_rank=None, skip_tokenizer_init=True
    )
    assert kwargs["sampling_params"] == {"max_new_tokens": 9, "ignore_eos": True}


def test_logprobs() -> None:
    r = req(output_options=OutputOptions(logprobs=3))
    kwargs = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=None)
    assert kwargs["return_logprob"] is True
    assert kwargs["top_logprobs_num"] == 3
    assert "logprob_start_len" not in kwargs
    r = req(output_options=OutputOptions(logprobs=0))
    kwargs = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=None)
    assert (kwargs["return_logprob"], kwargs["top_logprobs_num"]) == (True, 0)
    r = req(output_options=OutputOptions(logprobs=2, prompt_logprobs=5))
    kwargs = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=None)
    assert (kwargs["top_logprobs_num"], kwargs["logprob_start_len"]) == (5, 0)


def test_guided_decoding() -> None:
    def params(guide: GuidedDecodingOptions) -> dict[str, Any]:
        r = req(sampling_options=SamplingOptions(guided_decoding=guide))
        sp = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=None)
        return dict(sp["sampling_params"])

    assert params(GuidedDecodingOptions(json={"type": "object"}))["json_schema"] == (
        '{"type": "object"}'
    )
    assert params(GuidedDecodingOptions(choice=["a.b", "c"]))["regex"] == r"(a\.b|c)"
    assert params(GuidedDecodingOptions(regex="[0-9]+"))["regex"] == "[0-9]+"
    assert params(GuidedDecodingOptions(grammar="root ::= 'x'"))["ebnf"] == "root ::= 'x'"


def test_disagg_prefill() -> None:
    r = req(
        stop_conditions=StopConditions(max_tokens=100),
        bootstrap_info=BOOT,
        routing=RoutingHints(dp_rank=1),
    )
    assert to_generate_kwargs(r, rid="p1", disaggregation_mode="prefill", dp_rank=None) == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 1},
        "rid": "p1",
        "stream": True,
        "bootstrap_host": "10.0.0.5",
        "bootstrap_port": 8998,
        "bootstrap_room": 12345,
        "data_parallel_rank": 1,
    }


def test_disagg_decode() -> None:
    r = req(
        stop_conditions=StopConditions(max_tokens=100),
        bootstrap_info=BOOT,
        routing=RoutingHints(dp_rank=0, prefill_dp_rank=1),
    )
    assert to_generate_kwargs(r, rid="d1", disaggregation_mode="decode", dp_rank=None) == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 100},
        "rid": "d1",
        "stream": True,
        "bootstrap_host": "10.0.0.5",
        "bootstrap_port": 8998,
        "bootstrap_room": 12345,
        "data_parallel_rank": 0,
    }


@pytest.mark.parametrize(
    ("mode", "request_", "needle"),
    [
        ("decode", req(), "bootstrap_info is required"),
        (
            "decode",
            req(bootstrap_info=BOOT, annotations=["x-bypass-remote-prefill"]),
            "x-bypass-remote-prefill",
        ),
        ("decode", req(bootstrap_info=BOOT, sampling_options=SamplingOptions(n=2)), "n=1"),
        ("prefill", req(bootstrap_info=BOOT, sampling_options=SamplingOptions(n=3)), "n=1"),
        ("null", PreprocessedRequest(token_ids=[]), "token_ids"),
    ],
)
def test_invalid_requests(mode: str, request_: PreprocessedRequest, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        to_generate_kwargs(request_, rid="r", disaggregation_mode=mode, dp_rank=None)


def test_dp_rank_sources() -> None:
    def rank(r: PreprocessedRequest, dp_rank: int | None) -> int | None:
        kwargs = to_generate_kwargs(r, rid="r", disaggregation_mode="null", dp_rank=dp_rank)
        return kwargs.get("data_parallel_rank")

    assert rank(req(), None) is None
    assert rank(req(), 3) == 3
    assert rank(req(routing=RoutingHints(dp_rank=2)), 3) == 2
    assert rank(req(routing=RoutingHints(dp_rank=DP_RANK_UNSET)), None) is None
    assert rank(req(routing=RoutingHints(dp_rank=DP_RANK_UNSET)), 1) == 1


# --------------------------------------------------------------------------------------------
# OutputMapper


def item(
    ids: list[int],
    *,
    finish: Any = None,
    prompt: int | None = 10,
    completion: int = 1,
    cached: int | None = 4,
    index: int | None = None,
    **meta: Any,
) -> dict[str, Any]:
    meta_info: dict[str, Any] = {"id": "rid", "finish_reason": finish, **meta}
    if prompt is not None:
        meta_info.update(prompt_tokens=prompt, completion_tokens=completion)
        if cached is not None:
            meta_info["cached_tokens"] = cached
    out: dict[str, Any] = {"text": "", "output_ids": ids, "meta_info": meta_info}
    if index is not None:
        out["index"] = index
    return out


def test_usage_on_first_on_change_and_on_final() -> None:
    m = OutputMapper(req())
    first = m.map(item([5], completion=1))
    assert first is not None and first.token_ids == [5]
    assert first.completion_usage is not None
    assert first.completion_usage.prompt_tokens == 10
    assert first.completion_usage.completion_tokens == 1
    assert first.completion_usage.total_tokens == 11
    assert first.completion_usage.prompt_tokens_details is not None
    assert first.completion_usage.prompt_tokens_details.cached_tokens == 4
    assert first.engine_data is None and first.finish_reason is None

    second = m.map(item([6, 7], completion=3))
    assert second is not None and second.token_ids == [6, 7]
    assert second.completion_usage is None  # nothing changed

    changed = m.map(item([8], completion=4, cached=6))
    assert changed is not None and changed.completion_usage is not None
    assert changed.completion_usage.prompt_tokens_details is not None
    assert changed.completion_usage.prompt_tokens_details.cached_tokens == 6

    last = m.map(item([9], completion=5, cached=6, finish={"type": "length", "length": 5}))
    assert last is not None
    assert last.finish_reason is FinishReason.LENGTH
    assert last.completion_usage is not None and last.completion_usage.completion_tokens == 5
    assert last.engine_data == {"kv_cache_hit": {"prompt_tokens": 10, "reused_tokens": 6}}
    assert last.kv_cache_hit() is not None


def test_empty_non_final_chunk_is_skipped() -> None:
    m = OutputMapper(req())
    assert m.map(item([])) is None
    first = m.map(item([5]))
    assert first is not None and first.completion_usage is not None  # still "first"


def test_empty_final_chunk_is_kept() -> None:
    m = OutputMapper(req())
    m.map(item([5]))
    last = m.map(item([], finish={"type": "stop", "matched": 2}, completion=1))
    assert last is not None and last.token_ids == [] and last.finish_reason is FinishReason.STOP


def test_kv_cache_hit_not_on_decode_nor_for_n_above_one() -> None:
    final = {"type": "length", "length": 1}
    decode = OutputMapper(req(bootstrap_info=BOOT), disaggregation_mode="decode")
    out = decode.map(item([5], finish=final))
    assert out is not None and out.engine_data is None
    multi = OutputMapper(req(sampling_options=SamplingOptions(n=2)))
    out = multi.map(item([5], finish=final, index=1))
    assert out is not None and out.engine_data is None and out.index == 1


def test_prefill_leg_reports_only_the_cache_hit() -> None:
    prefill = OutputMapper(req(bootstrap_info=BOOT), disaggregation_mode="prefill")
    assert prefill.map(item([5])) is None  # the decode leg streams the tokens
    out = prefill.map(item([], finish={"type": "length", "length": 1}, cached=None))
    assert out is not None
    assert out.token_ids == [] and out.finish_reason is None and out.completion_usage is None
    assert out.engine_data == {"kv_cache_hit": {"prompt_tokens": 10, "reused_tokens": 0}}
    cancelled = OutputMapper(req(bootstrap_info=BOOT), disaggregation_mode="prefill")
    assert cancelled.map(item([5], finish={"type": "abort", "message": "gone"})) is None
    failed = OutputMapper(req(bootstrap_info=BOOT), disaggregation_mode="prefill")
    with pytest.raises(InvalidRequestError):
        failed.map(item([], finish={"type": "abort", "message": "bad", "status_code": 400}))


def test_finish_reasons_and_stop_reason() -> None:
    r = req(stop_conditions=StopConditions(stop_token_ids=[7], stop_token_ids_hidden=[2, 9]))

    def finish(reason: Any) -> tuple[FinishReason | None, Any]:
        out = OutputMapper(r).map(item([5], finish=reason))
        assert out is not None
        return out.finish_reason, out.stop_reason

    # EOS: SGLang's "stop" with the EOS id; not a user stop token, so no stop_reason
    assert finish({"type": "stop", "matched": 2}) == (FinishReason.STOP, None)
    assert finish({"type": "stop", "matched": 7}) == (FinishReason.STOP, 7)
    assert finish({"type": "stop", "matched": 9}) == (FinishReason.STOP, None)
    assert finish({"type": "stop", "matched": "###"}) == (FinishReason.STOP, "###")
    assert finish({"type": "stop", "matched": [3, 4]}) == (FinishReason.STOP, [3, 4])
    assert finish({"type": "stop"}) == (FinishReason.STOP, None)
    assert finish({"type": "length", "length": 5}) == (FinishReason.LENGTH, None)
    assert finish({"type": "abort", "message": "client gone"}) == (FinishReason.CANCELLED, None)
    assert finish({"type": "abort_by_user"}) == (FinishReason.CANCELLED, None)
    assert finish("stop") == (FinishReason.STOP, None)


def test_abort_drops_the_repeated_token() -> None:
    m = OutputMapper(req())
    m.map(item([5]))
    out = m.map(item([5], finish={"type": "abort", "message": "x"}, prompt=None))
    assert out is not None and out.token_ids == [] and out.finish_reason is FinishReason.CANCELLED


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidRequestError),
        (503, OverloadedError),
        (429, OverloadedError),
        (500, EngineError),
    ],
)
def test_abort_with_status_raises(status: int, error: type[Exception]) -> None:
    m = OutputMapper(req())
    reason = {"type": "abort", "message": "input too long", "status_code": status}
    with pytest.raises(error, match="input too long"):
        m.map(item([], finish=reason))


def test_abort_with_err_type_only_is_an_engine_error() -> None:
    with pytest.raises(EngineError) as exc:
        OutputMapper(req()).map(item([], finish={"type": "abort", "err_type": "OOM"}))
    assert exc.value.err_type == "OOM"


def test_logprobs_mapping() -> None:
    r = req(output_options=OutputOptions(logprobs=2))
    m = OutputMapper(r)
    out = m.map(
        item(
            [5, 6],
            output_token_logprobs=[(-0.5, 5, None), (-1.0, 6, "six")],
            output_top_logprobs=[
                [(-0.5, 5, None), (-2.0, 9, None)],
                [(-1.0, 6, "six"), (-1.5, 4, "four")],
            ],
        )
    )
    assert out is not None
    assert out.log_probs == [-0.5, -1.0]
    assert out.top_logprobs == [
        [
            TopLogprob(rank=1, token_id=5, token="token_id:5", logprob=-0.5),
            TopLogprob(rank=2, token_id=9, token="token_id:9", logprob=-2.0),
        ],
        [
            TopLogprob(rank=1, token_id=6, token="six", logprob=-1.0),
            TopLogprob(rank=2, token_id=4, token="four", logprob=-1.5),
        ],
    ]
    # not asked: not reported
    plain = OutputMapper(req()).map(item([5], output_token_logprobs=[(-0.5, 5, None)]))
    assert plain is not None and plain.log_probs is None


def test_prompt_logprobs_on_final_chunk() -> None:
    m = OutputMapper(req(output_options=OutputOptions(prompt_logprobs=1)))
    first = m.map(
        item(
            [5],
            input_token_logprobs=[(None, 1, None), (-0.25, 2, None), (-3.0, 3, "c")],
            input_top_logprobs=[None, [(-0.1, 8, None)], [(-0.2, 9, "z")]],
        )
    )
    assert first is not None and first.engine_data is None
    last = m.map(item([6], finish={"type": "length", "length": 2}))
    assert last is not None and last.engine_data is not None
    assert last.engine_data["prompt_logprobs"] == [
        None,
        {"2": {"logprob": -0.25}, "8": {"logprob": -0.1}},
        {
            "3": {"logprob": -3.0, "decoded_token": "c"},
            "9": {"logprob": -0.2, "decoded_token": "z"},
        },
    ]


def test_round_trip_through_msgpack() -> None:
    import msgspec

    from proto.response import EngineOutput

    out = OutputMapper(req()).map(item([5], finish={"type": "stop", "matched": 2}))
    assert out is not None
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=EngineOutput)
    assert decoded == out


# --------------------------------------------------------------------------------------------
# The SGLang adapter over a stand-in engine


class FakeTokenizerManager:
    def __init__(self) -> None:
        self.rid_to_state: dict[str, object] = {}
        self.aborted: list[tuple[str, bool]] = []
        self.flushed = 0
        self.context_len = 8192
        self.handle_loop_started = False

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append((rid, abort_all))

    async def flush_cache(self) -> Any:
        self.flushed += 1

        class Result:
            success = True

        return Result()

    async def get_internal_state(self) -> list[dict[str, Any]]:
        return [{"effective_max_running_requests_per_dp": 48}]

    def auto_create_handle_loop(self) -> None:
        # What SGLang does the first time it serves a request.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        self.handle_loop_started = True


class FakeSchedulerInit:
    scheduler_infos = [{"max_total_num_tokens": 50000, "max_req_input_len": 8000}]


class FakeServerArgs:
    page_size = 16
    max_running_requests = None
    max_prefill_tokens = 16384
    context_length = None
    dp_size = 1
    disaggregation_bootstrap_port = 9000

    def resolved_dict(self) -> dict[str, Any]:
        return {"page_size": 32}


class FakeSgl:
    def __init__(self, server_args: Any) -> None:
        self.server_args = FakeServerArgs()
        self.tokenizer_manager = FakeTokenizerManager()
        self._scheduler_init_result = FakeSchedulerInit()
        self.calls: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.shut = False

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        input_ids: Any = None,
        return_logprob: bool = False,
        logprob_start_len: Any = None,
        top_logprobs_num: Any = None,
        stream: bool = False,
        bootstrap_host: Any = None,
        bootstrap_port: Any = None,
        bootstrap_room: Any = None,
        routed_dp_rank: Any = None,
        disagg_prefill_dp_rank: Any = None,
        data_parallel_rank: Any = None,
        rid: Any = None,
        *,
        cache_salt: Any = None,
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(
            {k: v for k, v in locals().items() if k != "self" and v is not None and v is not False}
        )
        items, error = list(self.items), self.error

        async def gen() -> AsyncIterator[dict[str, Any]]:
            for it in items:
                yield it
            if error is not None:
                raise error

        return gen()

    async def async_encode(self, prompt: Any, rid: Any = None) -> Any:
        self.encoded = (prompt, rid)
        if rid is not None and isinstance(prompt, list):
            return [{"embedding": [0.1], "meta_info": {"id": r}} for r in rid]
        if rid == "hang-0":
            await asyncio.sleep(3600)
        return {"embedding": [0.1, 0.2], "meta_info": {"prompt_tokens": 2}}

    def shutdown(self) -> None:
        self.shut = True


def engine_args(**kw: Any) -> EngineArgs:
    return EngineArgs(model_path="/m", served_model_name=["m", "alias"], server_args=object(), **kw)


async def started(**kw: Any) -> tuple[SglangEngine, FakeSgl]:
    holder: list[FakeSgl] = []

    def factory(sa: Any) -> FakeSgl:
        holder.append(FakeSgl(sa))
        return holder[0]

    eng = SglangEngine(engine_args(**kw), engine_factory=factory)
    await eng.start()
    return eng, holder[0]


def test_adapter_needs_server_args() -> None:
    with pytest.raises(ValueError, match="ServerArgs"):
        SglangEngine(EngineArgs(model_path="/m", served_model_name=["m"]))


async def test_adapter_info_from_engine() -> None:
    eng, fake = await started(
        disaggregation_mode="prefill",
        kv_events_config='{"publisher": "zmq", "endpoint": "tcp://*:5557"}',
    )
    info = eng.info
    assert info.engine == "sglang"
    assert info.served_model_name == "m"
    assert info.page_size == 32  # the resolved value wins over the raw field
    assert info.max_total_tokens == 50000
    assert info.max_running_requests == 48
    assert info.context_length == 8192
    assert info.disaggregation_mode == "prefill"
    assert info.bootstrap_port == 9000
    assert info.bootstrap_host
    assert info.kv_events_endpoints == ["tcp://127.0.0.1:5557"]
    # SGLang's SIGTERM handler was captured, not installed
    assert fake.tokenizer_manager.handle_loop_started
    assert [sig for sig, _cb, _a in eng.deferred_signal_handlers] == [signal.SIGTERM]
    await eng.shutdown()
    assert fake.shut


async def test_adapter_passes_kwargs_through() -> None:
    eng, fake = await started()
    fake.items = [
        item([5]),
        item([6], finish={"type": "stop", "matched": 2}),
    ]
    kwargs = to_generate_kwargs(
        req(bootstrap_info=BOOT, routing=RoutingHints(dp_rank=1)),
        rid="r9",
        disaggregation_mode="decode",
        dp_rank=None,
    )
    got = [x async for x in eng.async_generate(**kwargs, disagg_prefill_dp_rank=0)]
    assert [g["output_ids"] for g in got] == [[5], [6]]
    call = fake.calls[0]
    assert set(call) <= GENERATE_KWARGS
    assert call == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": None},
        "rid": "r9",
        "stream": True,
        "bootstrap_host": "10.0.0.5",
        "bootstrap_port": 8998,
        "bootstrap_room": 12345,
        "routed_dp_rank": 1,
        "disagg_prefill_dp_rank": 0,
    }
    assert fake.tokenizer_manager.aborted == []  # finished normally


async def test_adapter_rejects_unknown_keywords() -> None:
    eng, _fake = await started()
    with pytest.raises(TypeError, match="lora_path"):
        async for _ in eng.async_generate(
            input_ids=[1], sampling_params={}, rid="r", lora_path="x"
        ):
            pass


async def test_adapter_maps_value_error_to_invalid_request() -> None:
    eng, fake = await started()
    fake.error = ValueError("The input (9000 tokens) is longer than the context length")
    with pytest.raises(InvalidRequestError, match="context length"):
        async for _ in eng.async_generate(input_ids=[1], sampling_params={}, rid="r"):
            pass


async def test_adapter_aborts_when_the_consumer_leaves() -> None:
    eng, fake = await started()
    fake.items = [item([5]), item([6])]
    stream = eng.async_generate(input_ids=[1], sampling_params={}, rid="gone")
    assert (await stream.__anext__())["output_ids"] == [5]
    await stream.aclose()  # type: ignore[attr-defined]
    assert fake.tokenizer_manager.aborted == [("gone", False)]


async def test_adapter_control_calls() -> None:
    eng, fake = await started()
    eng.abort_request("r1")
    assert fake.tokenizer_manager.aborted == [("r1", False)]
    assert await eng.flush_cache() is True
    fake.tokenizer_manager.rid_to_state = {"a": 1, "b": 2}
    assert eng.num_active_requests() == 2
    assert await eng.async_encode(prompt="hi") == [
        {"embedding": [0.1, 0.2], "meta_info": {"prompt_tokens": 2}}
    ]
    with pytest.raises(InvalidRequestError):
        await eng.async_encode()
    # A batch gets one SGLang rid per input ("{rid}-{i}", as the reference's batches), and a
    # caller that goes away aborts them.
    got = await eng.async_encode(prompt=["a", "b"], rid="req")
    assert [item["meta_info"]["id"] for item in got] == ["req-0", "req-1"]
    task = asyncio.create_task(eng.async_encode(prompt="x", rid="hang"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.tokenizer_manager.aborted[-1] == ("hang-0", False)
