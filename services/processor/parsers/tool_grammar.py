"""The structured-output grammar that forces a tool call, and the reader of its output.

``tool_choice="required"`` and a named function must yield a call whose arguments validate
against the function's parameters, whatever the model would write. As vLLM and SGLang do,
the processor then asks the engine for JSON constrained by :func:`tool_call_schema`: one
``{"name": ..., "parameters": {...}}`` object (the name one of the offered functions, the
parameters that function's schema), or, with ``parallel_tool_calls``, a non-empty array of
them. :data:`CONSTRAINED_CALLS` reads that output, unary or streamed, like any tool-call
format. Pure functions: no I/O, no engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .json_scan import JsonEndScanner
from .tool_base import (
    INVALID,
    NEED_MORE,
    Parsed,
    Region,
    RegionResult,
    ToolCallFormat,
    call_from_json_text,
    call_from_object,
)

__all__ = ["CONSTRAINED_CALLS", "ToolChoiceError", "function_names", "tool_call_schema"]

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolChoiceError(ValueError):
    """``tools`` or ``tool_choice`` is unusable; ``param`` names the field (for a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each offered function's parameters schema, by name."""
    out: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type") != "function"
            or not isinstance(function, Mapping)
        ):
            raise ToolChoiceError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolChoiceError(f"tools[{i}].function.name must be a non-empty string", "tools")
        parameters = function.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(parameters, Mapping):
            raise ToolChoiceError(f"tools[{i}].function.parameters must be an object", "tools")
        if name in out:
            raise ToolChoiceError(f"tools has two functions named {name!r}", "tools")
        out[name] = parameters
    return out


def function_names(tools: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The names of the offered functions (a call to any other is not a call)."""
    return frozenset(_functions(tools))


def _call_schema(name: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    # A one-value enum rather than const: every grammar backend (xgrammar, llguidance,
    # outlines) supports enum.
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]}, "parameters": dict(parameters)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def tool_call_schema(
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any] | None,
    *,
    parallel_tool_calls: bool = True,
) -> dict[str, Any] | None:
    """The JSON schema that forces the call(s) ``tool_choice`` asks for; ``None`` when it
    forces nothing (``"auto"``, ``"none"``, or no choice).

    ``"required"``: one call to any offered function, or a non-empty array of calls when
    ``parallel_tool_calls``. A named function (``{"type": "function", "function": {"name":
    ...}}``): one call to it. Raises :class:`ToolChoiceError` for unusable input."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    functions = _functions(tools)
    if tool_choice == "required":
        if not functions:
            raise ToolChoiceError("tool_choice 'required' needs at least one tool", "tool_choice")
        calls = [_call_schema(name, params) for name, params in functions.items()]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if not parallel_tool_calls:
            return one
        return {"type": "array", "items": one, "minItems": 1}
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolChoiceError(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        if name not in functions:
            raise ToolChoiceError(
                f"tool_choice names {name!r}, which is not in tools", "tool_choice"
            )
        return _call_schema(name, functions[name])
    raise ToolChoiceError(
        f"tool_choice must be 'none', 'auto', 'required' or a function, not {tool_choice!r}",
        "tool_choice",
    )


class _ConstrainedRegion(Region):
    def __init__(self) -> None:
        self._scanner = JsonEndScanner(0)

    def parse(self, text: str, final: bool) -> RegionResult:
        end = self._scanner.end(text)
        if end is None:
            return NEED_MORE
        if text[0] == "{":
            call = call_from_json_text(text[:end], ("parameters", "arguments"))
            return INVALID if call is None else Parsed((call,), end)
        try:
            items = json.loads(text[:end])
        except (ValueError, RecursionError):
            return INVALID
        calls = [call_from_object(item, ("parameters", "arguments")) for item in items]
        if not calls or any(c is None for c in calls):
            return INVALID
        return Parsed(tuple(c for c in calls if c is not None), end)


class _ConstrainedFormat(ToolCallFormat):
    """The output :func:`tool_call_schema` forces: a call object, or an array of them."""

    name = "constrained"

    def bare_open(self, text: str, *, after_call: bool) -> bool | None:
        return not after_call and text[0] in "{["

    def region(self, marker: str | None) -> Region:
        return _ConstrainedRegion()


CONSTRAINED_CALLS: ToolCallFormat = _ConstrainedFormat()
"""Reads output constrained by :func:`tool_call_schema` (not a model format: not registered)."""
