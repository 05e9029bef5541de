"""Which request fields the processor serves, refuses or ignores: no field is dropped silently.

The request structs (``proto.openai``) declare every field the processor implements, so
msgspec decodes those and skips all others. This module looks at the skipped ones:

- a field OpenAI defines for the endpoint but we do not serve (legacy ``functions``, audio,
  predicted outputs, ...) is refused with a 400 naming it, unless its value asks for nothing
  (``functions: []``, ``store: false``, ``modalities: ["text"]``): answering without it would
  hand back something other than what was asked for;
- a field OpenAI defines that has no effect on the output here (``metadata``,
  ``prompt_cache_key``...) is accepted;
- any other field is nobody's standard (a vendor extra): it is ignored, with one warning per
  request naming the fields and the counter ``sglmesh_processor_ignored_fields_total{field}``.

Chat messages get the same screen (``MESSAGE_FIELDS``; an unknown key is reported as
``messages[].key``). Nested objects further down (content parts, ``stream_options``...) are
not screened.

The top-level keys are read once more from the body with ``msgspec.Raw`` values, which only
delimits them; a refused field's value is decoded only to tell "asks for nothing" apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from proto.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    RequestError,
    decode_request,
)

__all__ = [
    "CHAT_FIELDS",
    "COMPLETION_FIELDS",
    "MESSAGE_FIELDS",
    "Unserved",
    "decode_openai",
    "unknown_fields",
]

RequestT = TypeVar("RequestT", bound=msgspec.Struct)

_TOOLS = "use 'tools' and 'tool_choice' (served for models with a tool-call parser)"


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


def _anything(value: Any) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Unserved:
    """An OpenAI field the processor does not implement: ``accepts(value)`` says whether the
    value asks for nothing we would drop; otherwise the request is refused with ``reason``."""

    accepts: Callable[[Any], bool]
    reason: str


# Chat completions: every OpenAI field not declared on ChatCompletionRequest.
CHAT_FIELDS: Mapping[str, Unserved] = {
    # ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are declared on the request and
    # checked against the model card (``chat_output.chat_tools``); the legacy spelling is not.
    "functions": Unserved(_empty, _TOOLS),
    "function_call": Unserved(_one_of("none", "auto"), _TOOLS),
    "audio": Unserved(_absent, "audio output is not supported"),
    "modalities": Unserved(_one_of(["text"]), "only the 'text' output modality is supported"),
    "prediction": Unserved(_absent, "predicted outputs are not supported"),
    "web_search_options": Unserved(_absent, "web search is not supported"),
    "reasoning_effort": Unserved(_absent, "reasoning effort is not adjustable for this model"),
    "verbosity": Unserved(_absent, "verbosity is not adjustable for this model"),
    "store": Unserved(_one_of(False), "stored completions are not supported"),
    "service_tier": Unserved(
        _one_of("auto", "default"), "only the 'auto' and 'default' service tiers exist here"
    ),
    # No effect on the output, whatever the value.
    "metadata": Unserved(_anything, ""),
    "prompt_cache_key": Unserved(_anything, ""),  # prefix caching is automatic
    "safety_identifier": Unserved(_anything, ""),
}

# Chat messages: OpenAI's message fields that ChatMessage does not declare.
MESSAGE_FIELDS: Mapping[str, Unserved] = {
    "refusal": Unserved(_absent, "a refusal in the conversation cannot be shown to the model"),
    "audio": Unserved(_absent, "audio in the conversation is not supported"),
    "function_call": Unserved(_absent, _TOOLS),
}

# Text completions (the legacy API): every OpenAI field is declared but for these.
COMPLETION_FIELDS: Mapping[str, Unserved] = {
    "metadata": Unserved(_anything, ""),
}

_TABLES: dict[type[Any], Mapping[str, Unserved]] = {
    ChatCompletionRequest: CHAT_FIELDS,
    CompletionRequest: COMPLETION_FIELDS,
}

_keys_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_declared: dict[type[Any], frozenset[str]] = {}


class _Messages(msgspec.Struct):
    messages: list[dict[str, msgspec.Raw]]


_messages_decoder = msgspec.json.Decoder(_Messages)
_MESSAGE_DECLARED = frozenset(ChatMessage.__struct_encode_fields__)


def unknown_fields(body: bytes, type_: type[Any]) -> list[str]:
    """The top-level fields of ``body`` that ``type_`` does not declare and no table accepts.

    Raises :class:`RequestError` for a refused OpenAI field. ``body`` must already have
    decoded as ``type_`` (so it is a JSON object)."""
    declared = _declared.get(type_)
    if declared is None:
        declared = _declared[type_] = frozenset(type_.__struct_encode_fields__)
    table = _TABLES.get(type_, {})
    ignored: list[str] = []
    for key, raw in _keys_decoder.decode(body).items():
        if key in declared:
            continue
        unserved = table.get(key)
        if unserved is None:
            ignored.append(key)
            continue
        if unserved.accepts is _anything:
            continue
        value = msgspec.json.decode(raw)
        if not unserved.accepts(value):
            raise RequestError(f"'{key}' is not supported: {unserved.reason}", param=key)
    if type_ is ChatCompletionRequest:
        ignored.extend(_message_fields(body))
    return ignored


def _message_fields(body: bytes) -> list[str]:
    """The same screen over each chat message: unknown keys come back as ``messages[].key``."""
    messages = _messages_decoder.decode(body).messages
    ignored: dict[str, None] = {}
    for i, message in enumerate(messages):
        for key, raw in message.items():
            if key in _MESSAGE_DECLARED:
                continue
            unserved = MESSAGE_FIELDS.get(key)
            if unserved is None:
                ignored.setdefault(f"messages[].{key}", None)
                continue
            if not unserved.accepts(msgspec.json.decode(raw)):
                param = f"messages[{i}].{key}"
                raise RequestError(f"'{param}' is not supported: {unserved.reason}", param=param)
    return list(ignored)


def decode_openai(body: bytes, type_: type[RequestT]) -> tuple[RequestT, list[str]]:
    """Decode and validate a chat or completion body: the request and the names of the
    fields ignored as nobody's standard. Raises :class:`RequestError` (400)."""
    request = decode_request(body, type_)
    return request, unknown_fields(body, type_)
