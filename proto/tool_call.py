"""OpenAI's tool-call shapes, as a chat response carries them.

``ToolCall`` is one complete call in a unary message (``message.tool_calls``);
``ToolCallDelta`` is one piece of a streamed call (``delta.tool_calls``): the first piece of
a call has its ``index``, ``id``, ``type`` and ``function.name``, later pieces only ``index``
and ``function.arguments`` fragments. Concatenating a call's fragments gives its arguments.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["FunctionCall", "FunctionCallDelta", "ToolCall", "ToolCallDelta"]


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None
