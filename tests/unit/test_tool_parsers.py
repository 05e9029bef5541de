"""Tool-call parsers (services/processor/parsers): recorded outputs of each format, unary and
streamed in every chunking, malformed calls as content, the registry and the grammar."""

from __future__ import annotations

import itertools
import json
import keyword
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.tool_call import ToolCall, ToolCallDelta
from services.processor.parsers import (
    CONSTRAINED_CALLS,
    TOOL_CALL_PARSERS,
    ToolCallFormat,
    ToolChoiceError,
    UnknownParserError,
    assemble_tool_calls,
    function_names,
    tool_call_parser,
    tool_call_parser_names,
    tool_call_schema,
)
from shared.parser_names import TOOL_CALL_PARSER_NAMES, tool_call_parser_name

# No example database: the run writes nothing into the working tree.
HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def ids(index: int) -> str:
    return f"call_{index}"


@dataclass(frozen=True)
class Case:
    parser: str
    text: str
    content: str
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    call_ids: tuple[str | None, ...] | None = None  # the model's own ids, where it gives them

    def __repr__(self) -> str:  # hypothesis prints the case; keep it short
        return f"Case({self.parser}, {self.text[:40]!r})"


WEATHER_SF = {"location": "San Francisco, CA", "unit": "fahrenheit"}
CODE_ARGS = {
    "code": 'def f(x):\n    return {"a": [x, "}"]}  # </tool_call> [TOOL_CALLS]',
    "options": {"timeout": 10, "env": {"A": "{B}", "Q": 'say "hi" \\ bye'}},
}

CASES: list[Case] = [
    # ---- hermes (Hermes 2 Pro / Hermes 3): one call per <tool_call> block, on its own lines
    Case(
        "hermes",
        '<tool_call>\n{"name": "get_current_weather", "arguments": '
        '{"location": "San Francisco, CA", "unit": "fahrenheit"}}\n</tool_call>',
        "",
        (("get_current_weather", WEATHER_SF),),
    ),
    Case(
        "hermes",
        "I'll look up the weather in both cities for you.\n\n"
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}}\n'
        "</tool_call>\n"
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Tokyo"}}\n'
        "</tool_call>",
        "I'll look up the weather in both cities for you.",
        (
            ("get_current_weather", {"location": "Paris"}),
            ("get_current_weather", {"location": "Tokyo"}),
        ),
    ),
    Case(  # braces, quotes, escapes and the closing tag itself inside argument strings
        "hermes",
        "<tool_call>\n"
        + json.dumps({"name": "run_code", "arguments": CODE_ARGS})
        + "\n</tool_call>",
        "",
        (("run_code", CODE_ARGS),),
    ),
    Case(  # prose after the call is content, separated from the prose before it
        "hermes",
        "Checking.\n<tool_call>\n"
        '{"name": "lookup", "arguments": {"q": "Zürich 🚀"}}\n</tool_call>\n'
        "I have asked the lookup tool.",
        "Checking.\nI have asked the lookup tool.",
        (("lookup", {"q": "Zürich 🚀"}),),
    ),
    Case(  # the output ended before the closing tag: the complete call still counts
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n',
        "",
        (("get_time", {}),),
    ),
    Case(  # no arguments at all, and arguments double-encoded as a string
        "hermes",
        '<tool_call>{"name": "ping"}</tool_call><tool_call>{"name": "add", '
        '"arguments": "{\\"a\\": 1, \\"b\\": [2]}"}</tool_call>',
        "",
        (("ping", {}), ("add", {"a": 1, "b": [2]})),
    ),
    Case(  # malformed JSON (a brace missing): plain content, nothing lost
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
    ),
    Case(  # truncated by max_tokens in the middle of a call
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "argum',
        'Let me check.\n<tool_call>\n{"name": "get_weather", "argum',
    ),
    Case(  # valid JSON that is not a call, and everything after it
        "hermes",
        '<tool_call>\n{"function": "x"}\n</tool_call>\n<tool_call>{"name": "f"}</tool_call>',
        '<tool_call>\n{"function": "x"}\n</tool_call>\n<tool_call>{"name": "f"}</tool_call>',
    ),
    Case(  # a valid call, then garbage: the call stands, the garbage is content
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n<tool_call>oops',
        "<tool_call>oops",
        (("f", {"x": 1}),),
    ),
    Case(  # text between the JSON and the closing tag
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>',
    ),
    Case(  # things that look like the start of the marker but are not
        "hermes",
        "Use a <tool> tag; a < b, and <tool_ca is not a call. The end: <tool_c",
        "Use a <tool> tag; a < b, and <tool_ca is not a call. The end: <tool_c",
    ),
    Case("hermes", "  Plain answer, no tools.\n", "  Plain answer, no tools.\n"),
    # ---- qwen25 (Qwen2.5-Instruct, as in Qwen's function-calling docs)
    Case(
        "qwen25",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": '
        '{"location": "San Francisco, CA, USA"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_temperature_date", "arguments": '
        '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>',
        "",
        (
            ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            (
                "get_temperature_date",
                {"location": "San Francisco, CA, USA", "date": "2024-10-01"},
            ),
        ),
    ),
    Case(
        "qwen25",
        "To answer this I need the current time.\n<tool_call>\n"
        '{"name": "get_time", "arguments": {"timezone": "Asia/Shanghai"}}\n</tool_call>',
        "To answer this I need the current time.",
        (("get_time", {"timezone": "Asia/Shanghai"}),),
    ),
    # ---- llama3_json (Llama 3.1 / 3.2)
    Case(
        "llama3_json",
        '{"name": "get_current_conditions", "parameters": '
        '{"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
        "",
        (("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"}),),
    ),
    Case(
        "llama3_json",
        '<|python_tag|>{"name": "search", "parameters": {"query": "weather {today} \\"SF\\""}}',
        "",
        (("search", {"query": 'weather {today} "SF"'}),),
    ),
    Case(
        "llama3_json",
        'Let me search for that.<|python_tag|>{"name": "search", "parameters": {"query": "x"}}',
        "Let me search for that.",
        (("search", {"query": "x"}),),
    ),
    Case(  # parallel calls, ';'-separated, nested values
        "llama3_json",
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": '
        '{"x": [1, {"y": "}"}], "z": null}}',
        "",
        (("a", {}), ("b", {"x": [1, {"y": "}"}], "z": None})),
    ),
    Case(  # an answer in JSON is not a call
        "llama3_json",
        '{"answer": 42, "unit": "km"}',
        '{"answer": 42, "unit": "km"}',
    ),
    Case(  # a call-shaped object in the middle of prose is prose
        "llama3_json",
        'The payload is {"name": "x", "parameters": {}} as shown.',
        'The payload is {"name": "x", "parameters": {}} as shown.',
    ),
    Case(
        "llama3_json",
        '{"name": "a", "parameters": {"k": "v"}}\n\nDone.',
        "Done.",
        (("a", {"k": "v"}),),
    ),
    Case(
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Par',
        '{"name": "get_weather", "parameters": {"city": "Par',
    ),
    Case(  # Llama's built-in tool syntax is not a JSON call
        "llama3_json",
        '<|python_tag|>brave_search.call(query="sf weather")',
        '<|python_tag|>brave_search.call(query="sf weather")',
    ),
    # ---- mistral
    Case(  # Mistral 7B Instruct v0.3
        "mistral",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": '
        '{"location": "Paris, France", "format": "celsius"}}]',
        "",
        (("get_current_weather", {"location": "Paris, France", "format": "celsius"}),),
    ),
    Case(
        "mistral",
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": "[1, 2]"}, "id": "abcDEF123"}, '
        '{"name": "b", "arguments": {"nested": {"deep": ["]", "}"]}}}]',
        "",
        (("a", {"x": "[1, 2]"}), ("b", {"nested": {"deep": ["]", "}"]}})),
        ("abcDEF123", None),
    ),
    Case(  # tokenizer v11+ (Mistral Small 3.2): one [TOOL_CALLS]name[ARGS]{...} per call
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]'
        '{"tz": "Europe/Paris"}',
        "",
        (("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})),
    ),
    Case(
        "mistral",
        'Sure, checking.[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Lyon"}',
        "Sure, checking.",
        (("get_weather", {"city": "Lyon"}),),
        ("a1b2c3d4e",),
    ),
    Case(  # mismatched brackets: content
        "mistral",
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}]',
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}]',
    ),
    Case(
        "mistral",
        "Use [TOOL] or [ARGS] tags and [x] lists, even [TOOL_CALL",
        "Use [TOOL] or [ARGS] tags and [x] lists, even [TOOL_CALL",
    ),
    Case(
        "mistral",
        "[TOOL_CALLS]get weather[ARGS]{}",
        "[TOOL_CALLS]get weather[ARGS]{}",
    ),
    # ---- pythonic (Llama 3.2 pythonic template, Llama 4)
    Case(
        "pythonic",
        '[get_weather(city="San Francisco", metric="celsius")]',
        "",
        (("get_weather", {"city": "San Francisco", "metric": "celsius"}),),
    ),
    Case(
        "pythonic",
        '[get_weather(city="Paris"), get_time(timezone="Europe/Paris", verbose=True, '
        'tags=["a", "b]"], opts={"k": {"n": None}}, pair=(1, 2))]',
        "",
        (
            ("get_weather", {"city": "Paris"}),
            (
                "get_time",
                {
                    "timezone": "Europe/Paris",
                    "verbose": True,
                    "tags": ["a", "b]"],
                    "opts": {"k": {"n": None}},
                    "pair": [1, 2],
                },
            ),
        ),
    ),
    Case(
        "pythonic",
        '<|python_start|>[search(query="llama 4 \\"scout\\"")]<|python_end|>',
        "",
        (("search", {"query": 'llama 4 "scout"'}),),
    ),
    Case(
        "pythonic",
        "Let me check.<|python_start|>[clock.now()]<|python_end|>",
        "Let me check.",
        (("clock.now", {}),),
    ),
    Case(
        "pythonic",
        "[set_temp(value=-3.5, enabled=true, note=null, big=10**3)]",
        "[set_temp(value=-3.5, enabled=true, note=null, big=10**3)]",
    ),
    Case(
        "pythonic",
        "[set_temp(value=-3.5, enabled=true, note=null)]",
        "",
        (("set_temp", {"value": -3.5, "enabled": True, "note": None}),),
    ),
    Case("pythonic", "[1] See the reference above.", "[1] See the reference above."),
    Case(  # never evaluated
        "pythonic",
        '[delete(path=__import__("os").system("echo pwned"))]',
        '[delete(path=__import__("os").system("echo pwned"))]',
    ),
    Case("pythonic", "[f(1, 2)]", "[f(1, 2)]"),
    Case("pythonic", "[get_weather(city='Par", "[get_weather(city='Par"),
    Case("pythonic", "The answer is 4.", "The answer is 4."),
]


def _stream(fmt: ToolCallFormat, chunks: list[str], **kw: Any) -> tuple[str, list[ToolCallDelta]]:
    streamer = fmt.streamer(make_id=ids, **kw)
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for chunk in chunks:
        out = streamer.feed(chunk)
        content.append(out.content)
        deltas.extend(out.tool_calls)
    out = streamer.finish()
    content.append(out.content)
    deltas.extend(out.tool_calls)
    return "".join(content), deltas


def _check_delta_shape(deltas: list[ToolCallDelta]) -> None:
    """OpenAI's shape: a call's first delta has id, type and name; the rest only arguments."""
    seen: set[int] = set()
    for d in deltas:
        assert d.function is not None
        if d.index not in seen:
            assert d.index == len(seen), "calls are numbered in order from 0"
            seen.add(d.index)
            assert d.id and d.type == "function" and d.function.name
        else:
            assert d.id is None and d.type is None and d.function.name is None
            assert d.function.arguments is not None


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}-{i}" for i, c in enumerate(CASES)])
def test_unary_parse_of_recorded_outputs(case: Case) -> None:
    fmt = tool_call_parser(case.parser)
    result = fmt.parse(case.text, make_id=ids)
    assert result.content == case.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls] == [
        (name, args) for name, args in case.calls
    ]
    expected_ids = case.call_ids or (None,) * len(case.calls)
    for i, (call, model_id) in enumerate(zip(result.tool_calls, expected_ids, strict=True)):
        assert call.type == "function"
        assert call.id == (model_id or ids(i))
        assert isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}-{i}" for i, c in enumerate(CASES)])
def test_one_character_stream_reassembles_to_unary(case: Case) -> None:
    fmt = tool_call_parser(case.parser)
    content, deltas = _stream(fmt, list(case.text))
    _check_delta_shape(deltas)
    unary = fmt.parse(case.text, make_id=ids)
    assert content == unary.content
    assert assemble_tool_calls(deltas) == unary.tool_calls


@HYPOTHESIS
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_random_chunkings_reassemble_to_unary(case: Case, cuts: list[int]) -> None:
    fmt = tool_call_parser(case.parser)
    content, deltas = _stream(fmt, _chunks(case.text, cuts))
    _check_delta_shape(deltas)
    unary = fmt.parse(case.text, make_id=ids)
    assert content == unary.content
    assert assemble_tool_calls(deltas) == unary.tool_calls


# Random outputs made of the formats' own pieces: whatever the model writes, streaming in any
# chunking gives the unary result, and nothing raises.
PIECES = [
    '<tool_call>{"name": "f", "arguments": {"a": "}"}}</tool_call>',
    '\n<tool_call>\n{"name": "g"}\n</tool_call>\n',
    '[TOOL_CALLS]f[ARGS]{"x": [2]}',
    '[TOOL_CALLS] [{"name": "f", "arguments": {}}]',
    "<|python_start|>[f(a=1)]<|python_end|>",
    "<tool_call>",
    "</tool_call>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_start|>",
    "<|python_end|>",
    '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g", "parameters": {}}',
    '[{"name": "f", "arguments": {}}]',
    "[f(a=1)]",
    "g(b='x')",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ";",
    " ",
    "\n",
    "f",
    "text",
    "<",
    "<tool",
    "[TOOL",
]


@HYPOTHESIS
@given(
    name=st.sampled_from(sorted(TOOL_CALL_PARSERS)),
    pieces=st.lists(st.sampled_from(PIECES), max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_random_outputs_stream_like_unary(name: str, pieces: list[str], cuts: list[int]) -> None:
    fmt = tool_call_parser(name)
    text = "".join(pieces)
    unary = fmt.parse(text, make_id=ids)
    content, deltas = _stream(fmt, _chunks(text, cuts))
    _check_delta_shape(deltas)
    assert content == unary.content
    assert assemble_tool_calls(deltas) == unary.tool_calls
    for call in unary.tool_calls:
        assert isinstance(json.loads(call.function.arguments), dict)


def test_held_back_marker_start_never_reaches_content() -> None:
    streamer = tool_call_parser("hermes").streamer(make_id=ids)
    assert streamer.feed("Looking it up <tool_").content == "Looking it up"
    out = streamer.feed('call>{"name": "f", "arguments": {"q": "x"}}</tool_call>')
    assert out.content == ""
    assert [d.function.name for d in out.tool_calls if d.function] == ["f", None]
    assert streamer.calls_emitted == 1
    assert streamer.finish().content == ""


def test_call_to_a_function_the_request_did_not_offer_is_content() -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    fmt = tool_call_parser("hermes")
    assert fmt.parse(text, known_names={"get_weather"}).content == text
    assert fmt.parse(text, known_names={"rm_rf"}).tool_calls[0].function.name == "rm_rf"


def test_generated_ids_are_unique_and_in_each_models_form() -> None:
    text = '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "f"}</tool_call>'
    calls = tool_call_parser("hermes").parse(text).tool_calls
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    mistral = tool_call_parser("mistral").parse('[TOOL_CALLS] [{"name": "f", "arguments": {}}]')
    (call,) = mistral.tool_calls
    assert len(call.id) == 9 and call.id.isalnum()  # Mistral's template insists on this


def test_a_long_call_fed_one_character_at_a_time_is_linear() -> None:
    """The JSON end scanner resumes; 200 kB of arguments in 1-char deltas is quick."""
    big = {"blob": 'x{}[]"' * 40_000}
    text = "<tool_call>" + json.dumps({"name": "store", "arguments": big}) + "</tool_call>"
    content, deltas = _stream(tool_call_parser("hermes"), list(text))
    assert content == ""
    (call,) = assemble_tool_calls(deltas)
    assert json.loads(call.function.arguments) == big


def test_registry_has_the_reference_names() -> None:
    assert set(tool_call_parser_names()) >= {
        "hermes",
        "llama3_json",
        "mistral",
        "pythonic",
        "qwen25",
    }
    assert list(tool_call_parser_names()) == sorted(tool_call_parser_names())
    with pytest.raises(UnknownParserError, match=r"unknown tool-call parser 'nope'.*hermes"):
        tool_call_parser("nope")


def test_worker_flag_names_are_the_registry() -> None:
    """Workers check --dyn-tool-call-parser against shared/parser_names.py: the same set."""
    assert tool_call_parser_names() == TOOL_CALL_PARSER_NAMES
    assert tool_call_parser_name(" hermes ") == "hermes"
    with pytest.raises(ValueError, match=r"^unknown tool-call parser 'x'; choose one of: hermes"):
        tool_call_parser_name("x")


# ---- tool_choice grammar

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


def test_required_schema_is_one_of_the_functions_or_an_array_of_them() -> None:
    single = tool_call_schema(TOOLS, "required", parallel_tool_calls=False)
    assert single is not None
    weather, time = single["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert weather["properties"]["parameters"] == TOOLS[0]["function"]["parameters"]  # type: ignore[index]
    assert weather["required"] == ["name", "parameters"]
    assert weather["additionalProperties"] is False
    assert time["properties"]["parameters"] == {"type": "object", "properties": {}}
    parallel = tool_call_schema(TOOLS, "required", parallel_tool_calls=True)
    assert parallel == {"type": "array", "items": single, "minItems": 1}


def test_named_function_schema_forces_that_function() -> None:
    schema = tool_call_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert schema is not None
    assert schema["properties"]["name"]["enum"] == ["get_weather"]
    assert tool_call_schema(TOOLS, "auto") is None
    assert tool_call_schema(TOOLS, "none") is None
    assert tool_call_schema(TOOLS, None) is None


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        ([], "required", "tool_choice"),
        ([{"type": "retrieval"}], "required", "tools"),
        ([{"type": "function", "function": {"name": ""}}], "required", "tools"),
        ([TOOLS[0], TOOLS[0]], "required", "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "required", "tools"),
    ],
)
def test_unusable_tools_or_choice_name_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(ToolChoiceError) as info:
        tool_call_schema(tools, choice)
    assert info.value.param == param


def test_function_names() -> None:
    assert function_names(TOOLS) == {"get_weather", "get_time"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", "Oslo")]),
        (
            '[{"name": "get_weather", "parameters": {"city": "A{"}}, '
            '{"name": "get_weather", "parameters": {"city": "B]"}}]',
            [("get_weather", "A{"), ("get_weather", "B]")],
        ),
    ],
)
def test_constrained_output_reads_as_calls(text: str, expected: list[tuple[str, str]]) -> None:
    result = CONSTRAINED_CALLS.parse(text, make_id=ids)
    assert result.content == ""
    got = [(c.function.name, json.loads(c.function.arguments)["city"]) for c in result.tool_calls]
    assert got == expected
    content, deltas = _stream(CONSTRAINED_CALLS, list(text))
    assert content == "" and assemble_tool_calls(deltas) == result.tool_calls


def test_constrained_output_that_is_not_a_call_is_content() -> None:
    for text in ('{"city": "Oslo"}', "[]", '{"name": "f", "parameters": 3}', "not json"):
        result = CONSTRAINED_CALLS.parse(text)
        assert result.content == text and result.tool_calls == []


def test_tool_call_wire_shape() -> None:
    """What a client receives: OpenAI's field names, no nulls in deltas."""
    import msgspec

    (call,) = tool_call_parser("hermes").parse(CASES[0].text, make_id=ids).tool_calls
    assert isinstance(call, ToolCall)
    assert json.loads(msgspec.json.encode(call)) == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": json.dumps(WEATHER_SF)},
    }
    _, deltas = _stream(tool_call_parser("hermes"), [CASES[0].text])
    assert [json.loads(msgspec.json.encode(d)) for d in deltas] == [
        {
            "index": 0,
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": json.dumps(WEATHER_SF)}},
    ]


# ---- random arguments: nested JSON, strings full of brackets, quotes and escapes

_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(
    list("{}[]\"'\\<>/:;,=()\n ")
)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_CHARS, max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(_CHARS, max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
_IDENTIFIERS = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s)
)
_ARGS = st.dictionaries(_IDENTIFIERS, _VALUES, max_size=4)


def _python_literal(value: Any) -> str:
    if isinstance(value, dict):
        items = ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    return repr(value)


def _render(parser: str, calls: list[tuple[str, dict[str, Any]]], ascii_only: bool) -> str:
    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=ascii_only)

    if parser in ("hermes", "qwen25"):
        return "\n".join(
            f"<tool_call>\n{dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls
        )
    if parser == "llama3_json":
        return "<|python_tag|>" + "; ".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    if parser == "mistral":
        if ascii_only:
            return "".join(f"[TOOL_CALLS]{n}[ARGS]{dumps(a)}" for n, a in calls)
        return "[TOOL_CALLS] " + dumps([{"name": n, "arguments": a} for n, a in calls])
    assert parser == "pythonic"
    rendered = (
        f"{n}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in a.items()) + ")"
        for n, a in calls
    )
    return "[" + ", ".join(rendered) + "]"


@HYPOTHESIS
@given(
    parser=st.sampled_from(sorted(TOOL_CALL_PARSERS)),
    calls=st.lists(st.tuples(_IDENTIFIERS, _ARGS), min_size=1, max_size=3),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=25),
)
def test_any_arguments_come_back_exactly(
    parser: str, calls: list[tuple[str, dict[str, Any]]], ascii_only: bool, cuts: list[int]
) -> None:
    fmt = tool_call_parser(parser)
    text = _render(parser, calls, ascii_only)
    unary = fmt.parse(text, make_id=ids)
    assert unary.content == ""
    got = [(c.function.name, json.loads(c.function.arguments)) for c in unary.tool_calls]
    assert got == calls
    content, deltas = _stream(fmt, _chunks(text, cuts))
    assert content == "" and assemble_tool_calls(deltas) == unary.tool_calls
