"""Hermes-style calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

NousResearch's Hermes 2 Pro / 3 and Qwen 2.5 (and QwQ, Qwen3) write each call as one JSON
object between ``<tool_call>`` tags, usually on lines of their own, several calls one after
another. The JSON's end is found by bracket counting, so a ``</tool_call>`` inside an
argument string does not cut the call short. A complete call whose closing tag never came
(the output ended first) is still a call.
"""

from __future__ import annotations

from .tool_base import (
    INVALID,
    NEED_MORE,
    JsonCallScan,
    Parsed,
    Region,
    RegionResult,
    ToolCallFormat,
    skip_whitespace,
)

__all__ = ["HermesFormat", "TaggedJsonRegion"]


class TaggedJsonRegion(Region):
    """``<open> {json call} <close>``: one call between two tags."""

    def __init__(self, open_tag: str, close_tag: str) -> None:
        self._open = open_tag
        self._close = close_tag
        self._call = JsonCallScan()

    def parse(self, text: str, final: bool) -> RegionResult:
        found = self._call.scan(text, skip_whitespace(text, len(self._open)))
        if not isinstance(found, tuple):
            return found
        call, end = found
        after = skip_whitespace(text, end)
        rest = text[after:]
        if rest.startswith(self._close):
            return Parsed((call,), after + len(self._close))
        if self._close.startswith(rest):
            return Parsed((call,), len(text)) if final else NEED_MORE
        return INVALID


class HermesFormat(ToolCallFormat):
    """``<tool_call>{...}</tool_call>``, as Hermes and Qwen 2.5 write it."""

    def __init__(self, name: str = "hermes") -> None:
        self.name = name
        self.markers = ("<tool_call>",)

    def region(self, marker: str | None) -> Region:
        return TaggedJsonRegion("<tool_call>", "</tool_call>")
