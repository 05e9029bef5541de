"""OpenAI request decoding/validation, error bodies and response encoding (proto/openai.py)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from proto.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    CompletionRequest,
    ContentPart,
    ModelList,
    ModelObject,
    PromptTokensDetails,
    RequestError,
    Usage,
    decode_request,
    error_body,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def chat_error(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_request(body, ChatCompletionRequest)
    assert info.value.status == 400
    return info.value


def completion_error(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_request(body, CompletionRequest)
    assert info.value.status == 400
    return info.value


def test_valid_chat_request_with_extras() -> None:
    body = chat(
        max_tokens=10,
        temperature=0.5,
        top_p=0.9,
        top_k=0,
        stop="x",
        logprobs=True,
        top_logprobs=3,
        stream=True,
        stream_options={"include_usage": True},
        tools=[{"type": "function"}],  # the processor refuses it (fields.py), not the decoder
        some_vendor_field={"a": 1},
    )
    req = decode_request(body, ChatCompletionRequest)
    assert req.messages == [ChatMessage(role="user", content="hi")]
    assert req.effective_top_k() == -1
    assert req.stop_list() == ["x"]
    assert req.include_usage()
    assert req.effective_max_tokens() == 10
    assert decode_request(chat(max_tokens=5, max_completion_tokens=7), ChatCompletionRequest)
    assert (
        decode_request(
            chat(max_tokens=5, max_completion_tokens=7), ChatCompletionRequest
        ).effective_max_tokens()
        == 7
    )


def test_content_parts() -> None:
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        }
    ).encode()
    req = decode_request(body, ChatCompletionRequest)
    assert req.messages[0].text() == "a\nb"
    assert ChatMessage(role="assistant").text() == ""
    with pytest.raises(RequestError, match="image_url"):
        ChatMessage(role="user", content=[ContentPart(type="image_url")]).text()


def test_invalid_json() -> None:
    err = chat_error(b'{"model": "m", "messages": [')
    assert "Invalid JSON" in err.message
    assert chat_error(b"").message.startswith("Invalid JSON")


def test_invalid_utf8() -> None:
    err = chat_error(b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert "UTF-8" in err.message


def test_not_an_object() -> None:
    err = chat_error(b"[1, 2]")
    assert err.param is None
    assert "object" in err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": 3}, "model"),
    ],
)
def test_chat_validation_names_param(fields: dict[str, Any], param: str) -> None:
    err = chat_error(chat(**fields))
    assert err.param == param, err.message
    assert param.split("[")[0].split(".")[0] in err.message.lower()


def test_missing_fields() -> None:
    err = chat_error(b'{"messages": [{"role": "user", "content": "x"}]}')
    assert err.param == "model"
    assert err.message == "Missing required field 'model'"
    err = chat_error(b'{"model": "m"}')
    assert err.param == "messages"


def test_completion_prompt_shapes() -> None:
    def prompts(prompt: Any) -> list[str | list[int]]:
        return decode_request(completion(prompt=prompt), CompletionRequest).prompts()

    assert prompts("hi") == ["hi"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1, 2], [3]]) == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": [[1], ["a"]]}, "prompt[1]"),
        ({"prompt": [[1], 2]}, "prompt[1]"),
        ({"prompt": [{"a": 1}]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"n": 0}, "n"),
    ],
)
def test_completion_validation_names_param(fields: dict[str, Any], param: str) -> None:
    err = completion_error(completion(**fields))
    assert err.param == param, err.message


def test_echo_and_suffix_messages_are_clear() -> None:
    assert "prompt logprobs" in completion_error(completion(echo=True, logprobs=0)).message
    assert "not supported" in completion_error(completion(suffix="x")).message
    # echo=false and an empty suffix are harmless.
    assert decode_request(completion(echo=False, suffix=""), CompletionRequest)


def test_error_body_shape() -> None:
    body = json.loads(error_body(400, "bad thing", param="temperature"))
    assert body == {
        "error": {
            "message": "bad thing",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": 400,
        }
    }
    body = json.loads(error_body(404, "no such model"))
    assert body["error"]["type"] == "not_found_error"
    assert body["error"]["param"] is None
    assert json.loads(error_body(503, "x", type_="overloaded"))["error"]["type"] == "overloaded"
    assert json.loads(error_body(502, "x"))["error"]["type"] == "server_error"
    err = RequestError("nope", param="n")
    assert json.loads(err.to_body())["error"] == {
        "message": "nope",
        "type": "invalid_request_error",
        "param": "n",
        "code": 400,
    }


def test_response_encoding() -> None:
    usage = Usage(
        prompt_tokens=3,
        completion_tokens=2,
        total_tokens=5,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=1),
    )
    resp = ChatCompletionResponse(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[
            ChatChoice(index=0, message=ChatResponseMessage(content="ok"), finish_reason="stop")
        ],
        usage=usage,
    )
    data = json.loads(msgspec.json.encode(resp))
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert "system_fingerprint" not in data

    chunk = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant"))],
    )
    data = json.loads(msgspec.json.encode(chunk))
    assert data["object"] == "chat.completion.chunk"
    assert "usage" not in data
    assert data["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant"},
        "finish_reason": None,
        "logprobs": None,
    }
    models = json.loads(msgspec.json.encode(ModelList(data=[ModelObject(id="m", created=5)])))
    assert models == {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 5, "owned_by": "sglmesh"}],
    }
