"""Output assembly (services/processor/respond.py): text, stop strings, finish reasons, usage.

The property test is the issue's: for random token sequences, cut into random batches, the
concatenated streamed text equals the full decode (cut at the first stop string, if any).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.discovery import ModelCard
from proto.response import (
    CompletionUsage,
    EngineOutput,
    FinishReason,
    PromptTokensDetails,
    TopLogprob,
)
from services.processor.preprocess import ModelPreprocessor
from services.processor.respond import (
    EngineFailure,
    OutputAssembler,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
)
from shared.model import prepare_default_model


@pytest.fixture(scope="module")
def pre() -> ModelPreprocessor:
    path: Path = prepare_default_model()
    return ModelPreprocessor.from_card(ModelCard(name="smol", model_path=str(path)))


def expected_text(full: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Reference semantics: the stop that ends first (ties: the longer) cuts the text."""
    for end in range(1, len(full) + 1):
        ending = [s for s in stops if full[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return full[: end - len(stop)], True
    return full, False


def run(
    assembler: OutputAssembler, batches: list[list[EngineOutput]], index: int = 0
) -> tuple[str, str | None]:
    text, finish = [], None
    for batch in batches:
        for delta in assembler.feed(index, batch):
            text.append(delta.text)
            finish = delta.finish_reason or finish
        if assembler.done:
            break
    for delta in assembler.finish_all():
        text.append(delta.text)
        finish = delta.finish_reason or finish
    return "".join(text), finish


def split(ids: list[int], cuts: list[int], final: EngineOutput) -> list[list[EngineOutput]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    outs = [EngineOutput(token_ids=ids[a:b]) for a, b in itertools.pairwise(points)]
    outs.append(final)
    # Random batching of the outputs too: several outputs per batch, as the dispatcher sends.
    batches: list[list[EngineOutput]] = []
    for i, out in enumerate(outs):
        if batches and i % 3 == 1:
            batches[-1].append(out)
        else:
            batches.append([out])
    return batches


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_streamed_text_equals_full_decode(
    pre: ModelPreprocessor, data: st.DataObject
) -> None:
    vocab = pre.vocab_size
    prompt = pre.encode("The quick brown fox", add_special_tokens=False)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40), label="ids")
    cuts = data.draw(st.lists(st.integers(0, 100), max_size=12), label="cuts")
    full = pre.tokenizer.decode([*prompt, *ids], skip_special_tokens=True)
    base = pre.tokenizer.decode(prompt, skip_special_tokens=True)
    assert full.startswith(base)
    generated = full[len(base) :]
    stops: list[str] = []
    if generated and data.draw(st.booleans(), label="with stop"):
        a = data.draw(st.integers(0, len(generated) - 1))
        b = data.draw(st.integers(a + 1, min(len(generated), a + 6)))
        stops = [generated[a:b]]
    if generated and data.draw(st.booleans(), label="with held tail"):
        # A stop that begins with the text's tail but never completes: the tail is held
        # back until the end of the stream, then released.
        stops.append(generated[-3:] + "\x00")
    stops += data.draw(st.lists(st.text(min_size=1, max_size=4), max_size=2), label="stops")
    assembler = OutputAssembler(pre, [prompt], stop=stops or None, keep_text=True)
    final = EngineOutput(token_ids=[], finish_reason=FinishReason.LENGTH)
    text, finish = run(assembler, split(ids, cuts, final))
    want, stopped = expected_text(generated, stops)
    assert text == want
    assert finish == ("stop" if stopped else "length")
    assert "".join(assembler.choices[0].text) == want


def test_matched_stop_token_and_eos_are_not_text(pre: ModelPreprocessor) -> None:
    hello = pre.encode(" hello", add_special_tokens=False)
    world = pre.encode(" world", add_special_tokens=False)
    eos = pre.eos_token_ids[0]
    assembler = OutputAssembler(pre, [[1, 2]])
    text, finish = run(
        assembler,
        [
            [EngineOutput(token_ids=hello)],
            [EngineOutput(token_ids=[*world, eos], finish_reason=FinishReason.STOP)],
        ],
    )
    assert (text, finish) == (" hello world", "stop")
    assert assembler.completion_tokens == len(hello) + len(world) + 1
    # A user stop token that is an ordinary word: reported by the engine as stop_reason.
    stop_id = world[-1]
    assembler = OutputAssembler(pre, [[1, 2]])
    out = EngineOutput(
        token_ids=[*hello, stop_id], finish_reason=FinishReason.STOP, stop_reason=stop_id
    )
    assert run(assembler, [[out]]) == (" hello", "stop")


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        (FinishReason.LENGTH, "length"),
        (FinishReason.EOS, "stop"),
        (FinishReason.CONTENT_FILTER, "content_filter"),
    ],
)
def test_finish_reasons(pre: ModelPreprocessor, reason: FinishReason, finish: str) -> None:
    assembler = OutputAssembler(pre, [[1]])
    out = EngineOutput(token_ids=pre.encode(" a", add_special_tokens=False), finish_reason=reason)
    assert run(assembler, [[out]])[1] == finish


@pytest.mark.parametrize("reason", [FinishReason.CANCELLED, FinishReason.ERROR])
def test_engine_abort_is_an_error(pre: ModelPreprocessor, reason: FinishReason) -> None:
    assembler = OutputAssembler(pre, [[1]])
    with pytest.raises(EngineFailure):
        assembler.feed(0, [EngineOutput(token_ids=[5], finish_reason=reason)])


def test_usage_counts_each_prompt_once_and_first_cache_report(pre: ModelPreprocessor) -> None:
    # n=2 on one 3-token prompt: two streams, cache reported by the first only.
    assembler = OutputAssembler(pre, [[1, 2, 3], [1, 2, 3]], prompt_tokens=3, cache_owners=[0])

    def usage(cached: int) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=3,
            completion_tokens=1,
            total_tokens=4,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    assembler.feed(0, [EngineOutput(token_ids=[5], completion_usage=usage(2))])
    # A later report (e.g. after a migration, counting generated tokens as cached) is ignored.
    assembler.feed(0, [EngineOutput(token_ids=[6], completion_usage=usage(4))])
    assembler.feed(1, [EngineOutput(token_ids=[5, 6, 7], completion_usage=usage(3))])
    u = assembler.usage()
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 5, 8)
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 2


def test_choices_finish_independently_and_ignore_late_output(pre: ModelPreprocessor) -> None:
    a = pre.encode(" yes", add_special_tokens=False)
    assembler = OutputAssembler(pre, [[1], [1]], stop=["yes"])
    assert [d.text for d in assembler.feed(0, [EngineOutput(token_ids=a)])] == [" "]
    assert assembler.choices[0].done and not assembler.done
    assert assembler.feed(0, [EngineOutput(token_ids=a)]) == []
    deltas = assembler.finish_all()  # the stream of choice 1 ended without a finish reason
    assert [(d.index, d.finish_reason) for d in deltas] == [(1, "stop")]
    assert assembler.done


def test_rendering_chat_and_completion(pre: ModelPreprocessor) -> None:
    ids = pre.encode(" hi there", add_special_tokens=False)
    out = EngineOutput(
        token_ids=ids,
        finish_reason=FinishReason.LENGTH,
        log_probs=[-0.5] * len(ids),
        top_logprobs=[[TopLogprob(rank=1, token_id=t, logprob=-0.5)] for t in ids],
    )
    assembler = OutputAssembler(pre, [[1]], logprobs=True, keep_text=True)
    deltas = assembler.feed(0, [out])
    chunk = chat_chunk("id", 1, "m", deltas, True)
    choice = chunk.choices[0]
    assert choice.delta.role == "assistant" and choice.delta.content == " hi there"
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert "".join(t.token for t in choice.logprobs.content) == " hi there"
    offsets = [0]
    comp = completion_chunk("id", 1, "m", deltas, True, offsets)
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.text_offset[0] == 0 and offsets == [len(" hi there")]
    assert chat_response("id", 1, "m", assembler, False).choices[0].message.content == " hi there"
    resp = completion_response("id", 1, "m", assembler, True)
    assert resp.choices[0].text == " hi there" and resp.choices[0].logprobs is not None
