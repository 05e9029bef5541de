"""``/openapi.json``: the processor's API, generated from the msgspec structs it decodes and
encodes, so the document cannot drift from what the server accepts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from proto.embedding import EmbeddingRequest, EmbeddingResponse
from proto.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    ModelObject,
)
from services.processor.fields import CHAT_FIELDS, COMPLETION_FIELDS, Unserved

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(type_: type[Any]) -> dict[str, str]:
    return {"$ref": _REF.format(name=type_.__name__)}


def _json(type_: type[Any]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(type_)}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"description": "an OpenAI-style error", "content": _json(ErrorResponse)}
        for status in statuses
    }


def _fields_note(table: Mapping[str, Unserved]) -> str:
    refused = sorted(name for name, u in table.items() if u.reason)
    free = sorted(name for name, u in table.items() if not u.reason)
    parts = []
    if refused:
        parts.append(
            "These OpenAI fields are refused with a 400 naming them unless their value asks "
            "for nothing (e.g. an empty list, false, 'none'): " + ", ".join(refused) + "."
        )
    if free:
        parts.append("Accepted without effect: " + ", ".join(free) + ".")
    parts.append(
        "Fields marked 'Extra (SGLang/vLLM)' are not OpenAI's. Any other field is ignored, "
        "with a warning in the log and the counter sglmesh_processor_ignored_fields_total."
    )
    return " ".join(parts)


def _generate_op(
    summary: str,
    request: type[Any],
    response: type[Any],
    chunk: type[Any],
    fields: Mapping[str, Unserved],
) -> Any:
    return {
        "post": {
            "summary": summary,
            "description": _fields_note(fields),
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": f'a {response.__name__}, or with "stream": true a '
                    f"text/event-stream of {chunk.__name__} events ending with data: [DONE]",
                    "content": {
                        **_json(response),
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(400, 404, 413, 500, 503),
            },
        }
    }


def _status_op(summary: str) -> Any:
    plain = {"application/json": {"schema": {"type": "object"}}}
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "ok", "content": plain},
                "503": {"description": "not ready", "content": plain},
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    types = [
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionChunk,
        CompletionRequest,
        CompletionResponse,
        CompletionChunk,
        EmbeddingRequest,
        EmbeddingResponse,
        ModelList,
        ModelObject,
        ErrorResponse,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sglmesh processor",
            "version": "1",
            "description": "OpenAI-compatible ingress of an sglmesh deployment",
        },
        "paths": {
            "/v1/chat/completions": _generate_op(
                "Create a chat completion",
                ChatCompletionRequest,
                ChatCompletionResponse,
                ChatCompletionChunk,
                CHAT_FIELDS,
            ),
            "/v1/completions": _generate_op(
                "Create a text completion",
                CompletionRequest,
                CompletionResponse,
                CompletionChunk,
                COMPLETION_FIELDS,
            ),
            "/v1/embeddings": {
                "post": {
                    "summary": "Create embeddings (embedding models only)",
                    "requestBody": {"required": True, "content": _json(EmbeddingRequest)},
                    "responses": {
                        "200": {"description": "the vectors", "content": _json(EmbeddingResponse)},
                        **_errors(400, 404, 413, 500, 503),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "List the models that can be served now",
                    "responses": {"200": {"description": "models", "content": _json(ModelList)}},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "Retrieve a model",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the model", "content": _json(ModelObject)},
                        **_errors(404, 503),
                    },
                }
            },
            "/health": _status_op("Ready when at least one model is servable"),
            "/live": _status_op("Alive unless shutting down"),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
        },
        "components": {"schemas": components},
    }
