"""Request fields end to end inside the processor: the served / refused / ignored table
(services/processor/fields.py), structured-output guides, logit_bias, and the output fields
(skip_special_tokens, include_stop_str_in_output, echo) in the assembler.

The guides are followed down to SGLang's ``sampling_params`` (shared/engine/mapping.py), the
keywords a worker hands its engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proto.discovery import ModelCard
from proto.openai import ChatCompletionRequest, CompletionRequest, RequestError
from proto.response import EngineOutput, FinishReason
from services.processor.fields import CHAT_FIELDS, decode_openai, unknown_fields
from services.processor.preprocess import ModelPreprocessor
from services.processor.respond import OutputAssembler
from shared.engine.mapping import to_generate_kwargs
from shared.model import prepare_default_model

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def refusal(body: bytes, type_: type[Any] = ChatCompletionRequest) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_openai(body, type_)
    assert info.value.status == 400
    return info.value


@pytest.fixture(scope="module")
def pre() -> ModelPreprocessor:
    path: Path = prepare_default_model()
    return ModelPreprocessor.from_card(ModelCard(name="smol", model_path=str(path)))


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("store", True),
        ("service_tier", "flex"),
    ],
)
def test_unserved_openai_fields_are_refused_by_name(field: str, value: Any) -> None:
    err = refusal(chat(**{field: value}))
    assert err.param == field
    assert f"'{field}'" in err.message and "not supported" in err.message


def test_legacy_function_fields_point_to_tools() -> None:
    assert "use 'tools'" in refusal(chat(functions=[{"name": "f"}])).message


def test_tool_fields_are_declared_not_screened() -> None:
    # Whether the model serves them is the card's business (chat_output.chat_tools).
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    req, ignored = decode_openai(
        chat(tools=tools, tool_choice="required", parallel_tool_calls=False),
        ChatCompletionRequest,
    )
    assert ignored == [] and req.tools == tools and req.tool_choice == "required"
    assert req.parallel_tool_calls is False


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": []},
        {"tools": None},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"parallel_tool_calls": True},
        {"modalities": ["text"]},
        {"store": False},
        {"service_tier": "auto"},
        {"metadata": {"team": "a"}},
        {"prompt_cache_key": "k"},
        {"safety_identifier": "u1"},
        {"user": "u1"},
    ],
)
def test_openai_fields_that_ask_for_nothing_are_accepted(fields: dict[str, Any]) -> None:
    _, ignored = decode_openai(chat(**fields), ChatCompletionRequest)
    assert ignored == []


def test_fields_nobody_defines_are_reported_not_refused() -> None:
    body = chat(x_vendor=1, temperature=0.5, another={"deep": [1, 2]})
    req, ignored = decode_openai(body, ChatCompletionRequest)
    assert ignored == ["x_vendor", "another"]
    assert req.temperature == 0.5
    # They never change the request.
    assert req == decode_openai(chat(temperature=0.5), ChatCompletionRequest)[0]


def test_declared_fields_are_never_reported() -> None:
    body = completion(echo=False, suffix="", best_of=1, logit_bias={"5": 1}, regex="a+")
    assert unknown_fields(body, CompletionRequest) == []
    # A chat field is nobody's standard on /v1/completions (chat_template_kwargs) and vice
    # versa (echo on chat).
    assert unknown_fields(completion(chat_template_kwargs={}), CompletionRequest) == [
        "chat_template_kwargs"
    ]
    assert unknown_fields(chat(echo=True), ChatCompletionRequest) == ["echo"]


def test_every_table_entry_is_undeclared() -> None:
    # A table entry for a field the struct declares would never be consulted.
    declared = set(ChatCompletionRequest.__struct_encode_fields__)
    assert not declared & set(CHAT_FIELDS)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 2}, "echo"),
        ({"suffix": "x"}, "suffix"),
    ],
)
def test_completion_refusals(fields: dict[str, Any], param: str) -> None:
    assert refusal(completion(**fields), CompletionRequest).param == param


# -- structured output ------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array"}},
    "required": ["name"],
}


def sglang_params(pre: ModelPreprocessor, body: bytes) -> dict[str, Any]:
    """What the worker hands the engine for this chat body."""
    req, _ = decode_openai(body, ChatCompletionRequest)
    preq = pre.preprocess_chat(req)
    kwargs = to_generate_kwargs(preq, rid="r", disaggregation_mode="null", dp_rank=None)
    params: dict[str, Any] = kwargs["sampling_params"]
    return params


@pytest.mark.parametrize(
    ("fields", "key", "value"),
    [
        ({"response_format": {"type": "json_object"}}, "json_schema", {"type": "object"}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
                }
            },
            "json_schema",
            SCHEMA,
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
            "json_schema",
            {"type": "object"},
        ),
        ({"regex": "[0-9]{3}"}, "regex", "[0-9]{3}"),
        ({"ebnf": 'root ::= "yes" | "no"'}, "ebnf", 'root ::= "yes" | "no"'),
        ({"guided_json": json.dumps(SCHEMA)}, "json_schema", SCHEMA),
        ({"json_schema": json.dumps(SCHEMA)}, "json_schema", SCHEMA),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
        ({"guided_regex": "a|b"}, "regex", "a|b"),
        ({"guided_choice": ["yes", "no"]}, "regex", "(yes|no)"),
        ({"guided_grammar": "root ::= 'x'"}, "ebnf", "root ::= 'x'"),
    ],
)
def test_guides_reach_sglang_parameters(
    pre: ModelPreprocessor, fields: dict[str, Any], key: str, value: Any
) -> None:
    params = sglang_params(pre, chat(**fields))
    got = params[key]
    assert (json.loads(got) if key == "json_schema" else got) == value
    others = {"json_schema", "regex", "ebnf", "structural_tag"} - {key}
    assert not others & set(params)


def test_structural_tag_reaches_sglang_as_json(pre: ModelPreprocessor) -> None:
    tag = {"type": "structural_tag", "structures": [], "triggers": []}
    assert json.loads(sglang_params(pre, chat(structural_tag=tag))["structural_tag"]) == tag


def test_text_format_and_no_format_ask_for_no_guide(pre: ModelPreprocessor) -> None:
    for body in (chat(response_format={"type": "text"}), chat()):
        params = sglang_params(pre, body)
        assert not {"json_schema", "regex", "ebnf", "structural_tag"} & set(params)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
        ({"regex": "a", "ebnf": "root ::= 'a'"}, "ebnf"),
        ({"guided_choice": ["a"], "structural_tag": "{}"}, "guided_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"json_schema": "3"}, "json_schema"),
        ({"json_schema": "{}", "regex": "a"}, "regex"),
        ({"guided_choice": []}, "guided_choice"),
    ],
)
def test_bad_guides_are_400s_naming_the_field(fields: dict[str, Any], param: str) -> None:
    err = refusal(chat(**fields))
    assert err.param == param, err.message


# -- logit_bias -------------------------------------------------------------------------------


def test_logit_bias_reaches_the_engine(pre: ModelPreprocessor) -> None:
    params = sglang_params(pre, chat(logit_bias={"42": 5.5, "7": -100}))
    assert params["logit_bias"] == {"42": 5.5, "7": -100.0}
    assert "logit_bias" not in sglang_params(pre, chat())


@pytest.mark.parametrize(
    ("bias", "needle"),
    [
        ({"abc": 1}, "not a token id"),
        ({"-1": 1}, "not a token id"),
        ({"99999999": 1}, "not a token id"),
        ({"5": 101}, "<= 100"),
        ({"5": -100.5}, ">= -100"),
    ],
)
def test_bad_logit_bias_is_a_400(pre: ModelPreprocessor, bias: dict[str, Any], needle: str) -> None:
    with pytest.raises(RequestError) as info:
        sglang_params(pre, chat(logit_bias=bias))
    assert info.value.param == "logit_bias"
    assert needle in info.value.message


# -- output fields ----------------------------------------------------------------------------


def assemble(assembler: OutputAssembler, ids: list[int], reason: FinishReason, stop: Any) -> str:
    out = EngineOutput(token_ids=ids, finish_reason=reason, stop_reason=stop)
    deltas = assembler.feed(0, [out]) + assembler.finish_all()
    return "".join(d.text for d in deltas)


def test_skip_special_tokens_per_request(pre: ModelPreprocessor) -> None:
    special = pre.tokenizer.token_to_id("<|im_end|>")
    ids = [*pre.encode(" hi", add_special_tokens=False), special]
    ids += pre.encode(" there", add_special_tokens=False)
    prompt = pre.encode("Say", add_special_tokens=False)
    kept = assemble(
        OutputAssembler(pre, [prompt], skip_special_tokens=False), ids, FinishReason.LENGTH, None
    )
    skipped = assemble(OutputAssembler(pre, [prompt]), ids, FinishReason.LENGTH, None)
    assert kept == " hi<|im_end|> there"
    assert skipped == " hi there"


def test_include_stop_str_in_output(pre: ModelPreprocessor) -> None:
    ids = pre.encode(" one two three four", add_special_tokens=False)
    prompt = pre.encode("Count:", add_special_tokens=False)
    cut = assemble(OutputAssembler(pre, [prompt], stop=["three"]), ids, FinishReason.LENGTH, None)
    kept = assemble(
        OutputAssembler(pre, [prompt], stop=["three"], include_stop=True),
        ids,
        FinishReason.LENGTH,
        None,
    )
    assert cut == " one two "
    assert kept == " one two three"
    req, _ = decode_openai(completion(no_stop_trim=True), CompletionRequest)
    assert req.keep_stop()  # SGLang's name for the same
    # A user stop token: trimmed by default, kept on request.
    last = ids[-1]
    trimmed = assemble(OutputAssembler(pre, [prompt]), ids, FinishReason.STOP, last)
    keeping = OutputAssembler(pre, [prompt], include_stop=True)
    whole = assemble(keeping, ids, FinishReason.STOP, last)
    assert trimmed == " one two three"
    assert whole == " one two three four"


def test_echo_prefixes_each_choice_once(pre: ModelPreprocessor) -> None:
    prompt = pre.encode("Once upon", add_special_tokens=False)
    ids = pre.encode(" a time", add_special_tokens=False)
    assembler = OutputAssembler(pre, [prompt, prompt], echo=["Once upon", "Once upon"])
    first = assembler.feed(0, [EngineOutput(token_ids=ids[:1])])
    rest = assembler.feed(
        0, [EngineOutput(token_ids=ids[1:], finish_reason=FinishReason.LENGTH)]
    ) + assembler.feed(1, [EngineOutput(token_ids=ids, finish_reason=FinishReason.LENGTH)])
    texts = ["".join(d.text for d in [*first, *rest] if d.index == i) for i in (0, 1)]
    assert texts == ["Once upon a time", "Once upon a time"]


def test_message_fields_get_the_same_screen() -> None:
    def body(**extra: Any) -> bytes:
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x", **extra},
        ]
        return json.dumps({"model": "m", "messages": messages}).encode()

    err = refusal(body(refusal="I cannot help with that"))
    assert err.param == "messages[1].refusal"
    assert refusal(body(function_call={"name": "f"})).param == "messages[1].function_call"
    assert refusal(body(audio={"id": "a1"})).param == "messages[1].audio"
    assert decode_openai(body(refusal=None, audio=None), ChatCompletionRequest)[1] == []
    _, ignored = decode_openai(body(weight=2, extra=1), ChatCompletionRequest)
    assert ignored == ["messages[].weight", "messages[].extra"]


def test_openapi_documents_the_extras_and_the_refused_fields() -> None:
    from services.processor.openapi import openapi_document

    doc = openapi_document()
    chat_props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    completion_props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    extras = (
        "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
        "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
        "regex", "ebnf", "structural_tag",
    )  # fmt: skip
    for props in (chat_props, completion_props):
        for name in extras:
            assert "Extra (SGLang/vLLM)" in json.dumps(props[name]), name
        assert "logit_bias" in props and "response_format" in props
    assert "echo" in completion_props
    note = doc["paths"]["/v1/chat/completions"]["post"]["description"]
    for name in ("functions", "audio", "prediction", "web_search_options"):
        assert name in note
