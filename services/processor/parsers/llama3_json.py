"""Llama 3.1/3.2 JSON calls: ``{"name": ..., "parameters": {...}}``.

Llama 3.1 and 3.2 answer a tool-using turn with a bare JSON object as the whole output, or
after the ``<|python_tag|>`` token; several calls are separated by ``;``. Because there may
be no marker, a call region opens only where the output (or the text right after a call)
starts with ``{`` (or ``;`` after a call): a JSON object in the middle of prose is prose, and
a leading JSON object that is not a call (an answer in JSON) is content.
"""

from __future__ import annotations

from .tool_base import (
    JsonCallScan,
    Parsed,
    Region,
    RegionResult,
    ToolCallFormat,
    skip_whitespace,
)

__all__ = ["Llama3JsonFormat"]

PYTHON_TAG = "<|python_tag|>"


class _JsonCallRegion(Region):
    def __init__(self, marker: str | None) -> None:
        self._marker = marker
        self._call = JsonCallScan(("parameters", "arguments"))

    def parse(self, text: str, final: bool) -> RegionResult:
        start = skip_whitespace(text, len(self._marker or ""))
        if self._marker is None and start < len(text) and text[start] == ";":
            start = skip_whitespace(text, start + 1)
            if start == len(text) and final:
                return Parsed((), len(text))  # a trailing separator after the last call
        found = self._call.scan(text, start)
        if not isinstance(found, tuple):
            return found
        call, end = found
        return Parsed((call,), end)


class Llama3JsonFormat(ToolCallFormat):
    """Bare or ``<|python_tag|>``-prefixed JSON objects, ``;``-separated."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def bare_open(self, text: str, *, after_call: bool) -> bool | None:
        return text[0] == "{" or (after_call and text[0] == ";")

    def region(self, marker: str | None) -> Region:
        return _JsonCallRegion(marker)
