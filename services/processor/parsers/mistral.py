"""Mistral calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

Mistral 7B Instruct v0.3 and Mixtral write ``[TOOL_CALLS]`` and then a JSON array of calls.
Later models (tokenizer v11+: Mistral Small 3.2, Magistral, Devstral) write one
``[TOOL_CALLS]name[ARGS]{...}`` per call, optionally with ``[CALL_ID]id`` before ``[ARGS]``;
both are read. ``[TOOL_CALLS]`` is a special token, so the output must be detokenized with
special tokens kept for the marker to be seen. Mistral's chat template accepts only
9-character alphanumeric call ids, so that is what this format generates.
"""

from __future__ import annotations

import json
import secrets
import string

from .json_scan import JsonEndScanner
from .tool_base import (
    INVALID,
    NEED_MORE,
    Parsed,
    ParsedCall,
    Region,
    RegionResult,
    ToolCallFormat,
    call_from_object,
    skip_whitespace,
)

__all__ = ["MistralFormat"]

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")
_ID_CHARS = string.ascii_letters + string.digits
_MAX_ID = 64


class _MistralRegion(Region):
    def __init__(self) -> None:
        self._scanner: JsonEndScanner | None = None

    def _json_end(self, text: str, start: int) -> int | None:
        if self._scanner is None:
            self._scanner = JsonEndScanner(start)
        return self._scanner.end(text)

    def parse(self, text: str, final: bool) -> RegionResult:
        start = skip_whitespace(text, len(TOOL_CALLS))
        if start == len(text):
            return NEED_MORE
        if text[start] == "[":
            return self._array(text, start)
        return self._named(text, start)

    def _array(self, text: str, start: int) -> RegionResult:
        end = self._json_end(text, start)
        if end is None:
            return NEED_MORE
        try:
            items = json.loads(text[start:end])
        except (ValueError, RecursionError):
            return INVALID
        if not isinstance(items, list) or not items:
            return INVALID
        calls = [call_from_object(item) for item in items]
        if any(c is None for c in calls):
            return INVALID
        return Parsed(tuple(c for c in calls if c is not None), end)

    def _named(self, text: str, start: int) -> RegionResult:
        pos = start
        n = len(text)
        while pos < n and text[pos] in _NAME_CHARS:
            pos += 1
        if pos == n:
            return NEED_MORE
        name = text[start:pos]
        if not name:
            return INVALID
        call_id: str | None = None
        rest = text[pos:]
        if rest.startswith(CALL_ID):
            id_start = pos + len(CALL_ID)
            id_end = text.find(ARGS, id_start)
            if id_end == -1:
                return NEED_MORE if n - id_start <= _MAX_ID + len(ARGS) else INVALID
            call_id = text[id_start:id_end].strip() or None
            pos = id_end
            rest = text[pos:]
        elif CALL_ID.startswith(rest):
            return NEED_MORE
        if not rest.startswith(ARGS):
            return NEED_MORE if ARGS.startswith(rest) else INVALID
        args_start = skip_whitespace(text, pos + len(ARGS))
        if args_start == n:
            return NEED_MORE
        if text[args_start] != "{":
            return INVALID
        end = self._json_end(text, args_start)
        if end is None:
            return NEED_MORE
        try:
            args = json.loads(text[args_start:end])
        except (ValueError, RecursionError):
            return INVALID
        if not isinstance(args, dict):
            return INVALID
        return Parsed(
            (ParsedCall(name=name, arguments=json.dumps(args, ensure_ascii=False), id=call_id),),
            end,
        )


class MistralFormat(ToolCallFormat):
    """``[TOOL_CALLS]`` followed by a JSON array, or by ``name[ARGS]{...}``."""

    name = "mistral"
    markers = (TOOL_CALLS,)

    def region(self, marker: str | None) -> Region:
        return _MistralRegion()

    def new_id(self, index: int) -> str:
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
