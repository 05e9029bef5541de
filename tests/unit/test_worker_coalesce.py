"""``coalesce_outputs``: which token chunks waiting for one frame merge, and into what."""

from __future__ import annotations

import copy

import msgspec

from proto.response import CompletionUsage, EngineOutput, FinishReason, TopLogprob
from shared.worker.coalesce import coalesce_outputs


def tokens(*ids: int, **fields: object) -> EngineOutput:
    return EngineOutput(token_ids=list(ids), **fields)  # type: ignore[arg-type]


def test_a_run_of_token_chunks_becomes_one_with_the_last_ones_finish_and_usage() -> None:
    usage = CompletionUsage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    data = {"kv_cache_hit": {"prompt_tokens": 3, "reused_tokens": 0}}
    chunks = [
        tokens(1),
        tokens(2),
        tokens(3, 4),
        tokens(5, finish_reason=FinishReason.STOP, stop_reason=5, completion_usage=usage,
               engine_data=data),
    ]  # fmt: skip
    before = copy.deepcopy(chunks)
    (merged,) = coalesce_outputs(chunks)
    assert merged == tokens(
        1, 2, 3, 4, 5, finish_reason=FinishReason.STOP, stop_reason=5, completion_usage=usage,
        engine_data=data,
    )  # fmt: skip
    assert chunks == before  # the handler's chunks are not changed


def test_nothing_joins_a_finished_chunk_and_choices_stay_apart() -> None:
    chunks = [
        tokens(1, index=0),
        tokens(7, index=1),
        tokens(2, index=0),
        tokens(3, index=0, finish_reason=FinishReason.LENGTH),
        tokens(4, index=0),
    ]
    assert coalesce_outputs(chunks) == [
        tokens(1, index=0),
        tokens(7, index=1),
        tokens(2, 3, index=0, finish_reason=FinishReason.LENGTH),
        tokens(4, index=0),
    ]


def test_chunks_with_data_or_text_keep_their_place() -> None:
    bootstrap = tokens(9, disaggregated_params={"bootstrap_room": 1})
    text = tokens(2, text="hi")
    data = tokens(1, engine_data={"x": 1})
    chunks = [data, tokens(2), bootstrap, tokens(3), text, tokens(4), tokens(5)]
    merged = [data, tokens(2), bootstrap, tokens(3), text, tokens(4, 5)]
    assert coalesce_outputs(chunks) == merged


def test_logprobs_concatenate_and_a_chunk_without_them_does_not_join() -> None:
    top = [
        [TopLogprob(rank=1, token_id=1, logprob=-0.1)],
        [TopLogprob(rank=1, token_id=2, logprob=-0.2)],
    ]
    chunks = [
        tokens(1, log_probs=[-0.1], top_logprobs=top[:1]),
        tokens(2, log_probs=[-0.2], top_logprobs=top[1:]),
        tokens(3),
    ]
    assert coalesce_outputs(chunks) == [
        tokens(1, 2, log_probs=[-0.1, -0.2], top_logprobs=top),
        tokens(3),
    ]


def test_what_is_not_an_engine_output_passes_through() -> None:
    raw = msgspec.Raw(b"\x80")
    chunks = [tokens(1), raw, tokens(2), tokens(3), {"token_ids": [4]}]
    assert coalesce_outputs(chunks) == [tokens(1), raw, tokens(2, 3), {"token_ids": [4]}]


def test_the_merged_stream_carries_the_same_tokens_on_the_wire() -> None:
    chunks = [tokens(i) for i in range(64)]
    chunks[-1].finish_reason = FinishReason.LENGTH
    encoded = [msgspec.msgpack.encode(c) for c in coalesce_outputs(chunks)]
    decoded = [msgspec.msgpack.decode(b, type=EngineOutput) for b in encoded]
    assert len(decoded) == 1
    assert decoded[0].token_ids == list(range(64))
    assert decoded[0].finish_reason is FinishReason.LENGTH
