"""Reasoning parsers (services/processor/parsers/reasoning.py): recorded outputs of
DeepSeek-R1 and Qwen3, unary and streamed in every chunking, thinking switched off."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.processor.parsers import (
    REASONING_PARSERS,
    ReasoningFormat,
    UnknownParserError,
    reasoning_parser,
    reasoning_parser_names,
    tool_call_parser,
)
from shared.parser_names import REASONING_PARSER_NAMES, reasoning_parser_name

# No example database: the run writes nothing into the working tree.
HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Case:
    parser: str
    text: str
    reasoning: str
    content: str
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.parser}, {self.text[:40]!r}, {self.options})"


QWEN3_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

CASES = [
    # ---- deepseek_r1: the template opens <think> in the prompt
    Case(  # DeepSeek-R1: the output starts inside the thinking
        "deepseek_r1",
        "Okay, the user asks for 2+2. Adding them gives 4.\n</think>\n\nThe answer is **4**.",
        "Okay, the user asks for 2+2. Adding them gives 4.",
        "The answer is **4**.",
    ),
    Case(  # DeepSeek-R1-0528 repeats the opening tag
        "deepseek_r1",
        "<think>\nLet me think about this step by step.\n\nFirst, {x: 1}.\n</think>\n\n42",
        "Let me think about this step by step.\n\nFirst, {x: 1}.",
        "42",
    ),
    Case(  # cut off by max_tokens while thinking: all reasoning
        "deepseek_r1",
        "I need the primes below 100: 2, 3, 5, 7, 11, ",
        "I need the primes below 100: 2, 3, 5, 7, 11,",
        "",
    ),
    Case(  # tags in the answer are the answer's
        "deepseek_r1",
        "Hmm.</think>Use the <think> tag like </think> this.",
        "Hmm.",
        "Use the <think> tag like </think> this.",
    ),
    Case("deepseek_r1", "thinking about </thi", "thinking about </thi", ""),
    Case("deepseek_r1", "<think>\n\n</think>\n\nHello!", "", "Hello!"),
    Case("deepseek_r1", "<thi", "<thi", ""),
    Case(  # DeepSeek-R1 ignores enable_thinking
        "deepseek_r1",
        "Short.</think>Done.",
        "Short.",
        "Done.",
        {"chat_template_kwargs": {"enable_thinking": False}},
    ),
    Case(  # the processor says the prompt did not open a thinking block
        "deepseek_r1",
        "No thinking here.</think> Odd.",
        "",
        "No thinking here.</think> Odd.",
        {"in_reasoning": False},
    ),
    # ---- qwen3: writes its own <think>, none when enable_thinking=False
    Case(
        "qwen3",
        "<think>\nOkay, the user wants the weather in Paris. I should call get_weather.\n"
        "</think>\n\n" + QWEN3_CALL,
        "Okay, the user wants the weather in Paris. I should call get_weather.",
        QWEN3_CALL,
    ),
    Case(
        "qwen3",
        "<think>\nThe user greets me. Reply in kind — «bonjour» 🙂.\n</think>\n\nBonjour ! 🙂",
        "The user greets me. Reply in kind — «bonjour» 🙂.",
        "Bonjour ! 🙂",
    ),
    Case(  # thinking switched off: no tags, everything is content
        "qwen3",
        "Bonjour ! Comment puis-je vous aider ?",
        "",
        "Bonjour ! Comment puis-je vous aider ?",
        {"chat_template_kwargs": {"enable_thinking": False}},
    ),
    Case(  # switched off, even if the model writes tags anyway
        "qwen3",
        "<think>x</think>y",
        "",
        "<think>x</think>y",
        {"chat_template_kwargs": {"enable_thinking": False}},
    ),
    Case(
        "qwen3",
        "<think>x</think>y",
        "x",
        "y",
        {"chat_template_kwargs": {"enable_thinking": True, "other": 1}},
    ),
    Case("qwen3", "Hello there!", "", "Hello there!"),
    Case(  # straight from thinking into a tool call, without </think>
        "qwen3",
        "<think>\nI'll call the tool.\n" + QWEN3_CALL,
        "I'll call the tool.",
        QWEN3_CALL,
    ),
    Case("qwen3", "\n\n<think>x</think>\n\ny  ", "x", "y  "),
    Case("qwen3", "<thi", "", "<thi"),
    Case("qwen3", "  <thinking>not a tag</thinking>", "", "  <thinking>not a tag</thinking>"),
    Case("qwen3", "<think>never closed <tool_ca", "never closed <tool_ca", ""),
    Case(  # Qwen3-Thinking-2507: the prompt ends with an open <think>
        "qwen3",
        "The user asks about Rome.\n</think>\n\nRome is the capital of Italy.",
        "The user asks about Rome.",
        "Rome is the capital of Italy.",
        {"in_reasoning": True},
    ),
]


def _stream(case: Case, chunks: list[str]) -> tuple[str, str]:
    streamer = reasoning_parser(case.parser).streamer(**case.options)
    reasoning: list[str] = []
    content: list[str] = []
    for chunk in [*chunks, None]:
        out = streamer.feed(chunk) if chunk is not None else streamer.finish()
        reasoning.append(out.reasoning)
        content.append(out.content)
    return "".join(reasoning), "".join(content)


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}-{i}" for i, c in enumerate(CASES)])
def test_unary_split_of_recorded_outputs(case: Case) -> None:
    result = reasoning_parser(case.parser).split(case.text, **case.options)
    assert (result.reasoning, result.content) == (case.reasoning, case.content)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}-{i}" for i, c in enumerate(CASES)])
def test_one_character_stream_matches_unary(case: Case) -> None:
    assert _stream(case, list(case.text)) == (case.reasoning, case.content)


@HYPOTHESIS
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_random_chunkings_match_unary(case: Case, cuts: list[int]) -> None:
    assert _stream(case, _chunks(case.text, cuts)) == (case.reasoning, case.content)


PIECES = ["<think>", "</think>", "<tool_call>", "<", "</", "<thi", "think>", " ", "\n", "a", "b."]


@HYPOTHESIS
@given(
    name=st.sampled_from(sorted(REASONING_PARSERS)),
    in_reasoning=st.sampled_from([None, True, False]),
    pieces=st.lists(st.sampled_from(PIECES), max_size=14),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_random_outputs_stream_like_unary(
    name: str, in_reasoning: bool | None, pieces: list[str], cuts: list[int]
) -> None:
    text = "".join(pieces)
    case = Case(name, text, "", "", {"in_reasoning": in_reasoning})
    unary = reasoning_parser(name).split(text, in_reasoning=in_reasoning)
    assert _stream(case, _chunks(text, cuts)) == (unary.reasoning, unary.content)


def test_no_tag_fragment_is_emitted_early() -> None:
    streamer = reasoning_parser("qwen3").streamer()
    out = streamer.feed("<th")
    assert (out.reasoning, out.content) == ("", "")
    out = streamer.feed("ink>\nStep one. </th")
    assert (out.reasoning, out.content) == ("Step one.", "")
    assert streamer.in_reasoning
    out = streamer.feed("ink>\n\nAnswer")
    assert (out.reasoning, out.content) == ("", "Answer")
    assert not streamer.in_reasoning


def test_thinking_then_tool_call_feeds_the_tool_parser() -> None:
    """The processor's order: reasoning first, then the tool-call parser on the content."""
    split = reasoning_parser("qwen3").split("<think>\nNeed the weather.\n</think>\n\n" + QWEN3_CALL)
    calls = tool_call_parser("hermes").parse(split.content).tool_calls
    assert split.reasoning == "Need the weather."
    assert [c.function.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<\uff5cAssistant\uff5c>", False),  # DeepSeek-R1-0528: no open tag
        ("old <think>a</think> turn, then <think>", True),
    ],
)
def test_prompt_opens_reasoning(prompt: str, opens: bool) -> None:
    assert reasoning_parser("qwen3").prompt_opens_reasoning(prompt) is opens


def test_thinking_switch() -> None:
    qwen3 = reasoning_parser("qwen3")
    assert qwen3.thinking_enabled(None)
    assert qwen3.thinking_enabled({})
    assert qwen3.thinking_enabled({"enable_thinking": True})
    assert not qwen3.thinking_enabled({"enable_thinking": False})
    assert reasoning_parser("deepseek_r1").thinking_enabled({"enable_thinking": False})


def test_registry_has_the_reference_names() -> None:
    assert set(reasoning_parser_names()) >= {"deepseek_r1", "qwen3"}
    assert all(isinstance(f, ReasoningFormat) for f in REASONING_PARSERS.values())
    with pytest.raises(UnknownParserError, match=r"unknown reasoning parser 'r2'.*deepseek_r1"):
        reasoning_parser("r2")


def test_worker_flag_names_are_the_registry() -> None:
    assert reasoning_parser_names() == REASONING_PARSER_NAMES
    assert reasoning_parser_name("qwen3") == "qwen3"
    with pytest.raises(ValueError, match=r"^unknown reasoning parser 'r2'; choose one of: deep"):
        reasoning_parser_name("r2")
