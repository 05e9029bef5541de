"""The engine shared by every tool-call format: find call regions in model output, stream.

A model writes tool calls into its text in a format of its own (``<tool_call>{...}``,
``[TOOL_CALLS][...]``, ``[f(a=1)]``...). A :class:`ToolCallFormat` says only what is
particular to one format: the *markers* that open a call region anywhere in the text, whether
a region may open *bare* at the start of the output (a JSON object or Python list with no
marker), and how to read one region (a :class:`Region`). :class:`ToolCallStreamer` does the
rest, the same way for every format:

- Text outside calls is content. It is emitted as it arrives, except a trailing piece that
  could be the start of a marker (so no marker fragment ever leaks into content) and
  trailing whitespace: whitespace right before a call is dropped, and so is whitespace
  right after one unless content came before it (it then separates two pieces of prose).
- A call is emitted only once it is complete and valid, as two OpenAI deltas: ``index``,
  ``id``, ``type`` and ``function.name`` (with empty arguments), then the arguments. Holding
  a call back until it is whole costs a little latency but means a malformed or truncated
  call can still come back as plain content, and a streamed output always reassembles to
  exactly what the unary parse of the same text gives.
- A region that turns out malformed, or calls a function the request did not offer, is
  content, and so is all text after it (the output is no longer trusted to be calls).

The unary parse (:meth:`ToolCallFormat.parse`) runs the same streamer over the whole text.
"""

from __future__ import annotations

import enum
import json
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from proto.tool_call import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta

from .json_scan import JsonEndScanner

__all__ = [
    "INVALID",
    "NEED_MORE",
    "IdFactory",
    "JsonCallScan",
    "Parsed",
    "ParsedCall",
    "Region",
    "RegionResult",
    "ToolCallFormat",
    "ToolCallStreamer",
    "ToolParseResult",
    "ToolStreamDelta",
    "assemble_tool_calls",
    "call_from_json_text",
    "call_from_object",
    "skip_whitespace",
]

IdFactory = Callable[[int], str]
"""Makes the id of the call with the given index (its position in the response)."""


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One call read from the output: ``arguments`` is a JSON object as text."""

    name: str
    arguments: str
    id: str | None = None  # the model's own id, where its format has one


class _Signal(enum.Enum):
    NEED_MORE = "need more text"
    INVALID = "not a valid call"


NEED_MORE: Final = _Signal.NEED_MORE
INVALID: Final = _Signal.INVALID


@dataclass(frozen=True, slots=True)
class Parsed:
    """A region was read: its calls, and how many characters of its text it spans (> 0)."""

    calls: tuple[ParsedCall, ...]
    consumed: int


RegionResult = Parsed | _Signal


class Region(ABC):
    """One call region being read. Its text starts at the marker that opened it (or, for a
    bare opening, at the first character of the call) and grows as output arrives."""

    @abstractmethod
    def parse(self, text: str, final: bool) -> RegionResult:
        """Read the region from ``text``: ``NEED_MORE`` while it may still become valid
        (never when ``final``, meaning no more text will come), ``INVALID``, or
        :class:`Parsed`."""


@dataclass(slots=True)
class ToolStreamDelta:
    """What one piece of output turned into: content text and tool-call deltas."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(slots=True)
class ToolParseResult:
    """A whole output, parsed: the content outside calls, and the calls."""

    content: str
    tool_calls: list[ToolCall]


def skip_whitespace(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after ``pos``."""
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    return pos


def call_from_object(
    obj: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ParsedCall | None:
    """A call from a decoded ``{"name": ..., "arguments": {...}}``, or ``None`` if it is not one.

    The arguments may be under any of ``argument_keys``, may be absent (no arguments), or
    may be a JSON object encoded as a string (some models double-encode)."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in argument_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = obj.get("id")
    return ParsedCall(
        name=name,
        arguments=json.dumps(args, ensure_ascii=False),
        id=call_id if isinstance(call_id, str) and call_id else None,
    )


def call_from_json_text(
    text: str, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ParsedCall | None:
    """:func:`call_from_object` on JSON text; ``None`` if the text is not valid JSON."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return call_from_object(obj, argument_keys)


class JsonCallScan:
    """One JSON call object in a region of a growing text: where it starts (after the
    region's marker and separators, which the region skips), where it ends (bracket counting
    that resumes where it stopped) and the call it holds."""

    __slots__ = ("_keys", "_scanner")

    def __init__(self, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self._keys = argument_keys
        self._scanner: JsonEndScanner | None = None

    def scan(self, text: str, start: int) -> tuple[ParsedCall, int] | _Signal:
        """``(call, end)``, or NEED_MORE (the object is not complete yet) or INVALID (no
        object at ``start``, or not a call)."""
        if start == len(text):
            return NEED_MORE
        if text[start] != "{":
            return INVALID
        if self._scanner is None:
            self._scanner = JsonEndScanner(start)
        end = self._scanner.end(text)
        if end is None:
            return NEED_MORE
        call = call_from_json_text(text[start:end], self._keys)
        return INVALID if call is None else (call, end)


def _random_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallFormat(ABC):
    """One model family's way of writing tool calls. Stateless: a streamer holds the state."""

    name: str
    markers: tuple[str, ...] = ()

    def bare_open(self, text: str, *, after_call: bool) -> bool | None:
        """Whether a call region opens right here without a marker: at the start of the
        output, or right after a call. ``text`` starts with a non-space character; ``None``
        means it is too short to tell."""
        return False

    @abstractmethod
    def region(self, marker: str | None) -> Region:
        """A reader for a region opened by ``marker`` (``None``: a bare opening)."""

    def new_id(self, index: int) -> str:
        """A fresh call id, in the form the model's chat template expects back."""
        return _random_call_id(index)

    def streamer(
        self, *, known_names: Collection[str] | None = None, make_id: IdFactory | None = None
    ) -> ToolCallStreamer:
        """A streaming parser for one output. ``known_names``: the request's functions (a
        call to any other is content); ``make_id``: call ids (default: random)."""
        return ToolCallStreamer(self, known_names=known_names, make_id=make_id)

    def parse(
        self,
        text: str,
        *,
        known_names: Collection[str] | None = None,
        make_id: IdFactory | None = None,
    ) -> ToolParseResult:
        """Parse a whole output into content and calls."""
        streamer = self.streamer(known_names=known_names, make_id=make_id)
        first = streamer.feed(text)
        last = streamer.finish()
        return ToolParseResult(
            content=first.content + last.content,
            tool_calls=assemble_tool_calls([*first.tool_calls, *last.tool_calls]),
        )


def assemble_tool_calls(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """Complete calls from streamed deltas: what a client does with ``delta.tool_calls``."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None:
            ids[delta.index] = delta.id
        arguments.setdefault(delta.index, [])
        if delta.function is not None:
            if delta.function.name is not None:
                names[delta.index] = delta.function.name
            if delta.function.arguments is not None:
                arguments[delta.index].append(delta.function.arguments)
    return [
        ToolCall(
            id=ids.get(index, ""),
            function=FunctionCall(name=names.get(index, ""), arguments="".join(parts)),
        )
        for index, parts in sorted(arguments.items())
    ]


def _partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that is a proper start of a marker."""
    longest = max((len(m) for m in markers), default=1) - 1
    for k in range(min(longest, len(text)), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class _Mode(enum.Enum):
    SEGMENT_START = enum.auto()  # at the output's start or right after a call
    CONTENT = enum.auto()
    REGION = enum.auto()
    PASSTHROUGH = enum.auto()  # after a malformed region: everything is content


class ToolCallStreamer:
    """Parses one output fed as text deltas; see the module docstring for the rules."""

    def __init__(
        self,
        fmt: ToolCallFormat,
        *,
        known_names: Collection[str] | None = None,
        make_id: IdFactory | None = None,
    ) -> None:
        self._fmt = fmt
        self._known = None if known_names is None else frozenset(known_names)
        self._make_id = make_id or fmt.new_id
        self._buf = ""
        self._mode = _Mode.SEGMENT_START
        self._after_call = False
        self._region: Region | None = None
        self._region_ws = ""  # whitespace dropped before a region, restored if it is invalid
        self._next_index = 0
        self._finished = False
        self._content_seen = False  # some content was emitted before this feed

    def _has_content(self, content: list[str]) -> bool:
        return self._content_seen or any(content)

    @property
    def calls_emitted(self) -> int:
        """How many calls have been emitted so far (``finish_reason`` is ``tool_calls``
        when this is not zero)."""
        return self._next_index

    def feed(self, text: str) -> ToolStreamDelta:
        """Take the next piece of output; return what can be emitted now."""
        if self._finished:
            raise RuntimeError("feed after finish")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ToolStreamDelta:
        """The output has ended: emit everything still held back."""
        if self._finished:
            return ToolStreamDelta()
        out = self._run(final=True)
        self._finished = True
        return out

    def _run(self, final: bool) -> ToolStreamDelta:
        out = ToolStreamDelta()
        content: list[str] = []
        while self._step(final, content, out.tool_calls):
            pass
        out.content = "".join(content)
        self._content_seen = self._content_seen or bool(out.content)
        return out

    def _step(self, final: bool, content: list[str], calls: list[ToolCallDelta]) -> bool:
        """Advance once; ``True`` if another step may make progress."""
        if self._mode is _Mode.SEGMENT_START:
            return self._segment_start(final, content)
        if self._mode is _Mode.CONTENT:
            return self._content(final, content)
        if self._mode is _Mode.REGION:
            return self._read_region(final, content, calls)
        content.append(self._buf)
        self._buf = ""
        return False

    def _segment_start(self, final: bool, content: list[str]) -> bool:
        stripped = self._buf.lstrip()
        if not stripped:
            if final:
                if not self._after_call:
                    content.append(self._buf)
                self._buf = ""
            return False
        opens = self._fmt.bare_open(stripped, after_call=self._after_call)
        if opens is None:
            if not final:
                return False
            opens = False
        if opens:
            self._region_ws = "" if self._after_call else self._buf[: -len(stripped)]
            self._buf = stripped
            self._mode = _Mode.REGION
            self._region = self._fmt.region(None)
        else:
            if self._after_call and not self._has_content(content):
                self._buf = stripped
            self._mode = _Mode.CONTENT
        return True

    def _content(self, final: bool, content: list[str]) -> bool:
        markers = self._fmt.markers
        best = -1
        marker = ""
        for m in markers:
            i = self._buf.find(m)
            if i != -1 and (best == -1 or i < best or (i == best and len(m) > len(marker))):
                best, marker = i, m
        if best != -1:
            before = self._buf[:best]
            kept = before.rstrip()
            content.append(kept)
            self._region_ws = before[len(kept) :]
            self._buf = self._buf[best:]
            self._mode = _Mode.REGION
            self._region = self._fmt.region(marker)
            return True
        if final:
            content.append(self._buf)
            self._buf = ""
            return False
        hold = _partial_marker_length(self._buf, markers)
        emit = self._buf[: len(self._buf) - hold].rstrip()
        content.append(emit)
        self._buf = self._buf[len(emit) :]
        return False

    def _read_region(self, final: bool, content: list[str], calls: list[ToolCallDelta]) -> bool:
        assert self._region is not None
        result = self._region.parse(self._buf, final)
        if result is NEED_MORE:
            if not final:
                return False
            result = INVALID
        if (
            not isinstance(result, Parsed)
            or result.consumed <= 0
            or (self._known is not None and any(c.name not in self._known for c in result.calls))
        ):
            content.append(self._region_ws + self._buf)
            self._buf = ""
            self._region = None
            self._mode = _Mode.PASSTHROUGH
            return False
        for call in result.calls:
            index = self._next_index
            self._next_index += 1
            calls.append(
                ToolCallDelta(
                    index=index,
                    id=call.id or self._make_id(index),
                    type="function",
                    function=FunctionCallDelta(name=call.name, arguments=""),
                )
            )
            calls.append(
                ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.arguments))
            )
        self._buf = self._buf[result.consumed :]
        self._region = None
        self._region_ws = ""
        self._mode = _Mode.SEGMENT_START
        self._after_call = True
        return True
