"""Pythonic calls: ``[get_weather(city="Paris"), get_time(tz="CET")]``.

Llama 3.2 (with the pythonic template) and Llama 4 answer a tool-using turn with a Python
list of calls with keyword arguments, as the whole output, or between Llama 4's
``<|python_start|>`` and ``<|python_end|>``. The list is read with :mod:`ast` and each
argument converted from literal syntax only (strings, numbers, booleans, ``None``, lists,
tuples, dicts; JSON's ``true``/``false``/``null`` too): nothing is ever evaluated. Whether a
bare leading ``[`` is a call list or prose (``[1] See...``) is known only at the end of the
output, so such an output is held back until then.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from .tool_base import (
    INVALID,
    NEED_MORE,
    Parsed,
    ParsedCall,
    Region,
    RegionResult,
    ToolCallFormat,
)

__all__ = ["PythonicFormat", "parse_pythonic_calls"]

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _NotLiteral(ValueError):
    pass


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | str | int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral(repr(value))
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            if key_node is None:  # **mapping
                raise _NotLiteral("dict unpacking")
            key = _literal(key_node)
            if not isinstance(key, str):
                raise _NotLiteral("non-string key")
            out[key] = _literal(value_node)
        return out
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    ):
        number = _literal(node.operand)
        return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotLiteral(type(node).__name__)


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def parse_pythonic_calls(source: str) -> tuple[ParsedCall, ...] | None:
    """The calls in ``[f(a=1), g(b="x")]``, or ``None`` if ``source`` is not such a list."""
    source = source.strip()
    if not (source.startswith("[") and source.endswith("]")):
        return None
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls: list[ParsedCall] = []
    for element in tree.body.elts:
        if not isinstance(element, ast.Call) or element.args:
            return None
        name = _dotted_name(element.func)
        if name is None:
            return None
        arguments: dict[str, Any] = {}
        for keyword in element.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            try:
                arguments[keyword.arg] = _literal(keyword.value)
            except (_NotLiteral, RecursionError):
                return None
        calls.append(ParsedCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))
    return tuple(calls)


class _PythonicRegion(Region):
    def __init__(self, marker: str | None) -> None:
        self._marker = marker

    def parse(self, text: str, final: bool) -> RegionResult:
        if self._marker is None:
            if not final:
                return NEED_MORE
            body, consumed = text, len(text)
        else:
            end = text.find(PYTHON_END, len(self._marker))
            if end == -1:
                if not final:
                    return NEED_MORE
                body, consumed = text[len(self._marker) :], len(text)
            else:
                body, consumed = text[len(self._marker) : end], end + len(PYTHON_END)
        calls = parse_pythonic_calls(body)
        return INVALID if calls is None else Parsed(calls, consumed)


class PythonicFormat(ToolCallFormat):
    """A Python list of keyword-argument calls, bare or in ``<|python_start|>`` tags."""

    name = "pythonic"
    markers = (PYTHON_START,)

    def bare_open(self, text: str, *, after_call: bool) -> bool | None:
        return not after_call and text[0] == "["

    def region(self, marker: str | None) -> Region:
        return _PythonicRegion(marker)
