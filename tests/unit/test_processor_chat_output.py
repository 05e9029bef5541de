"""Tool calls and reasoning in chat responses (services/processor/chat_output.py and its use in
respond.py): the request checked against the model card, and recorded model output, token by
token through the real tokenizer, assembled into unary messages and stream deltas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proto.discovery import ModelCard
from proto.openai import ChatCompletionRequest, RequestError
from proto.response import EngineOutput, FinishReason
from services.processor.chat_output import ChatParsing, chat_tools
from services.processor.parsers.tool_base import assemble_tool_calls
from services.processor.preprocess import ModelPreprocessor
from services.processor.respond import (
    OutputAssembler,
    chat_chunk,
    chat_response,
)
from shared.model import prepare_default_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL_TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def pre() -> ModelPreprocessor:
    path: Path = prepare_default_model()
    return ModelPreprocessor.from_card(ModelCard(name="smol", model_path=str(path)))


def card(tool: str | None = "hermes", reasoning: str | None = None) -> ModelCard:
    return ModelCard(name="m", tool_call_parser=tool, reasoning_parser=reasoning)


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)


# -- the request against the card -------------------------------------------------------------


def test_tools_on_a_model_without_a_parser_are_refused_naming_tools() -> None:
    with pytest.raises(RequestError) as info:
        chat_tools(request(tools=TOOLS), card(tool=None))
    assert info.value.param == "tools" and "tool-call parser" in str(info.value)
    with pytest.raises(RequestError) as info:
        chat_tools(request(tool_choice="required"), card(tool=None))
    assert info.value.param == "tool_choice"


def test_no_tools_needs_no_parser() -> None:
    parsing = chat_tools(request(tool_choice="auto"), card(tool=None))
    assert not parsing.active and parsing.guide is None


def test_auto_uses_the_cards_parser_without_a_guide() -> None:
    parsing = chat_tools(request(tools=TOOLS), card())
    assert parsing.tool_format is not None and parsing.tool_format.name == "hermes"
    assert parsing.guide is None and parsing.known_names == {"get_weather"}


def test_none_parses_no_calls() -> None:
    parsing = chat_tools(request(tools=TOOLS, tool_choice="none"), card())
    assert parsing.tool_format is None and parsing.guide is None


@pytest.mark.parametrize(
    ("choice", "parallel", "top"),
    [
        ("required", None, "array"),
        ("required", False, "object"),
        ({"type": "function", "function": {"name": "get_weather"}}, None, "object"),
    ],
)
def test_required_and_named_send_a_json_schema_guide(
    choice: Any, parallel: bool | None, top: str
) -> None:
    parsing = chat_tools(
        request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel), card()
    )
    assert parsing.guide is not None and parsing.guide.json["type"] == top
    assert parsing.tool_format is not None and parsing.tool_format.name == "constrained"


def test_bad_tool_choice_is_a_400_naming_it() -> None:
    for choice in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(RequestError) as info:
            chat_tools(request(tools=TOOLS, tool_choice=choice), card())
        assert info.value.param == "tool_choice"


def test_a_forced_call_with_another_constraint_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        chat_tools(
            request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
            card(),
        )
    assert info.value.param == "tool_choice"


def test_mistral_marker_keeps_special_tokens() -> None:
    parsing = chat_tools(request(tools=TOOLS), card(tool="mistral"), frozenset({"[TOOL_CALLS]"}))
    assert parsing.keep_special_tokens
    assert not chat_tools(request(tools=TOOLS), card(), frozenset({"<s>"})).keep_special_tokens


def test_tools_are_rendered_and_the_guide_reaches_the_engine_request(
    pre: ModelPreprocessor,
) -> None:
    req = request(tools=TOOLS, tool_choice="required")
    parsing = chat_tools(req, card())
    preq = pre.preprocess_chat(req, parsing.guide)
    assert preq.sampling_options.guided_decoding == parsing.guide
    # A template that renders the tools (as Qwen's and Hermes' do): they reach the prompt.
    template = (
        "{% for t in tools or [] %}<tools>{{ t.function.name }}</tools>{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    tooled = ModelPreprocessor(card=pre.card, tokenizer=pre.tokenizer, chat_template=template)
    prompt = tooled.tokenizer.decode(tooled.preprocess_chat(req).token_ids)
    assert prompt.startswith("<tools>get_weather</tools>user: hi")
    assert "<tools>" not in tooled.tokenizer.decode(tooled.preprocess_chat(request()).token_ids)


# -- recorded output through the assembler ----------------------------------------------------


def assemble(
    pre: ModelPreprocessor, parsing: ChatParsing, text: str, *, stream: bool
) -> tuple[OutputAssembler, list[Any]]:
    ids = pre.encode(text, add_special_tokens=False)
    assembler = OutputAssembler(pre, [[1, 2, 3]], keep_text=not stream, parsing=parsing)
    deltas = []
    for tid in ids:
        deltas += assembler.feed(0, [EngineOutput(token_ids=[tid])])
    deltas += assembler.feed(0, [EngineOutput(token_ids=[], finish_reason=FinishReason.EOS)])
    deltas += assembler.finish_all()
    return assembler, deltas


def test_a_hermes_call_comes_back_as_tool_calls_unary_and_streamed(
    pre: ModelPreprocessor,
) -> None:
    parsing = chat_tools(request(tools=TOOLS), card())
    assembler, _ = assemble(pre, parsing, CALL_TEXT, stream=False)
    response = chat_response("r", 0, "m", assembler, False)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert isinstance(message.tool_calls, list) and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    _, deltas = assemble(pre, parsing, CALL_TEXT, stream=True)
    chunks = [msgspec.to_builtins(chat_chunk("r", 0, "m", [d], False)) for d in deltas]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == "Let me check."
    assert all("<tool_call>" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks)
    streamed = assemble_tool_calls(d for delta in deltas for d in delta.tool_calls)
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_plain_text_with_tools_stays_content(pre: ModelPreprocessor) -> None:
    parsing = chat_tools(request(tools=TOOLS), card())
    assembler, _ = assemble(pre, parsing, "No tool needed.", stream=False)
    choice = chat_response("r", 0, "m", assembler, False).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == "No tool needed."
    assert choice.message.tool_calls is msgspec.UNSET


def test_required_output_is_read_back_as_calls(pre: ModelPreprocessor) -> None:
    parsing = chat_tools(request(tools=TOOLS, tool_choice="required"), card())
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    assembler, _ = assemble(pre, parsing, text, stream=False)
    choice = chat_response("r", 0, "m", assembler, False).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert isinstance(choice.message.tool_calls, list)
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Oslo"}


THINK_TEXT = "<think>\nThe user greets me.\n</think>\n\nHello there!"


def test_reasoning_is_split_unary_and_streamed(pre: ModelPreprocessor) -> None:
    parsing = chat_tools(request(), card(tool=None, reasoning="qwen3"))
    assembler, _ = assemble(pre, parsing, THINK_TEXT, stream=False)
    message = chat_response("r", 0, "m", assembler, False).choices[0].message
    assert message.reasoning_content == "The user greets me."
    assert message.content == "Hello there!"

    _, deltas = assemble(pre, parsing, THINK_TEXT, stream=True)
    chunks = [msgspec.to_builtins(chat_chunk("r", 0, "m", [d], False)) for d in deltas]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert (reasoning, content) == ("The user greets me.", "Hello there!")


def test_thinking_off_leaves_everything_content(pre: ModelPreprocessor) -> None:
    req = request(chat_template_kwargs={"enable_thinking": False})
    parsing = chat_tools(req, card(tool=None, reasoning="qwen3"))
    assembler, _ = assemble(pre, parsing, THINK_TEXT, stream=False)
    message = chat_response("r", 0, "m", assembler, False).choices[0].message
    assert message.reasoning_content is msgspec.UNSET and message.content == THINK_TEXT


def test_reasoning_then_a_tool_call(pre: ModelPreprocessor) -> None:
    parsing = chat_tools(request(tools=TOOLS), card(reasoning="qwen3"))
    text = "<think>Need the weather.</think>\n" + CALL_TEXT
    assembler, _ = assemble(pre, parsing, text, stream=False)
    choice = chat_response("r", 0, "m", assembler, False).choices[0]
    assert choice.message.reasoning_content == "Need the weather."
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."


def test_a_prompt_that_opens_the_thinking_starts_the_output_in_reasoning(
    pre: ModelPreprocessor,
) -> None:
    parsing = chat_tools(request(), card(tool=None, reasoning="qwen3"))
    assert parsing.after_prompt("<|im_start|>assistant\n") is parsing
    opened = parsing.after_prompt("<|im_start|>assistant\n<think>\n")
    assert opened.in_reasoning is True
    assembler, _ = assemble(pre, opened, "Thinking hard.</think>The answer.", stream=False)
    message = chat_response("r", 0, "m", assembler, False).choices[0].message
    assert (message.reasoning_content, message.content) == ("Thinking hard.", "The answer.")
