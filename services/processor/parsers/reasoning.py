"""Splitting a reasoning model's output into ``reasoning_content`` and ``content``.

Reasoning models think between ``<think>`` and ``</think>`` before they answer. A
:class:`ReasoningFormat` names the tags and whether the output starts inside the thinking:
DeepSeek-R1's template opens ``<think>`` in the prompt, so its output may begin with the
thinking itself (R1-0528 repeats the opening tag, which is then skipped); Qwen3 writes the
opening tag itself, and writes none when ``enable_thinking=False`` is passed in
``chat_template_kwargs`` (then everything is content). Some models leave the thinking
without closing it, straight into a tool call (Qwen3 with ``<tool_call>``): such *implicit
ends* finish the reasoning and stay in the content for the tool-call parser.

Both entry points give the same result for the same text (tested on random chunkings):

- reasoning is stripped of surrounding whitespace, and so is the start of the content after
  it; an output whose thinking is never closed (cut off by ``max_tokens``) is all reasoning;
- the streaming splitter holds back a trailing piece that could be the start of a tag (so
  no tag fragment ever reaches either field) and trailing whitespace inside the reasoning.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ReasoningFormat", "ReasoningSplit", "ReasoningStreamer"]


@dataclass(slots=True)
class ReasoningSplit:
    """Reasoning text and content text: a whole output's, or one streamed piece's."""

    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """One family's thinking tags. Stateless: :meth:`streamer` makes the per-output state."""

    name: str
    start: str = "<think>"
    end: str = "</think>"
    starts_in_reasoning: bool = False  # the prompt opened the thinking block
    implicit_ends: tuple[str, ...] = ()  # markers that end the thinking and stay in content
    thinking_switch: str | None = None  # the chat_template_kwargs key that turns thinking off

    def thinking_enabled(self, chat_template_kwargs: Mapping[str, Any] | None) -> bool:
        """Whether the request leaves thinking on (``enable_thinking=False`` turns it off for
        formats that honour that switch)."""
        if self.thinking_switch is None or not chat_template_kwargs:
            return True
        return chat_template_kwargs.get(self.thinking_switch, True) is not False

    def _initial(
        self, chat_template_kwargs: Mapping[str, Any] | None, in_reasoning: bool | None
    ) -> _State:
        if not self.thinking_enabled(chat_template_kwargs):
            return _State.CONTENT
        if in_reasoning if in_reasoning is not None else self.starts_in_reasoning:
            return _State.MAYBE_OPEN_IN_REASONING
        return _State.MAYBE_OPEN

    def streamer(
        self,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        in_reasoning: bool | None = None,
    ) -> ReasoningStreamer:
        """A streaming splitter for one output. ``in_reasoning`` overrides whether the output
        starts inside the thinking (the processor knows when its prompt ended with an open
        tag, see :meth:`prompt_opens_reasoning`)."""
        return ReasoningStreamer(self, self._initial(chat_template_kwargs, in_reasoning))

    def split(
        self,
        text: str,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        in_reasoning: bool | None = None,
    ) -> ReasoningSplit:
        """Split a whole output into reasoning and content."""
        state = self._initial(chat_template_kwargs, in_reasoning)
        if state is _State.CONTENT:
            return ReasoningSplit(content=text)
        stripped = text.lstrip()
        if stripped.startswith(self.start):
            rest = stripped[len(self.start) :]
        elif state is _State.MAYBE_OPEN_IN_REASONING:
            rest = text
        else:
            return ReasoningSplit(content=text)
        index, marker = _first_marker(rest, (self.end, *self.implicit_ends))
        if index == -1:
            return ReasoningSplit(reasoning=rest.strip())
        after = index + len(marker) if marker == self.end else index
        return ReasoningSplit(reasoning=rest[:index].strip(), content=rest[after:].lstrip())

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        """Whether a rendered prompt ends inside an open thinking block (its last start tag
        comes after its last end tag), so that the output starts as reasoning."""
        opened = prompt.rfind(self.start)
        return opened != -1 and opened > prompt.rfind(self.end)


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    best, found = -1, ""
    for m in markers:
        i = text.find(m)
        if i != -1 and (best == -1 or i < best):
            best, found = i, m
    return best, found


def _partial_length(text: str, markers: tuple[str, ...]) -> int:
    longest = max(len(m) for m in markers) - 1
    for k in range(min(longest, len(text)), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class _State(enum.Enum):
    MAYBE_OPEN = enum.auto()  # the output may open with the start tag
    MAYBE_OPEN_IN_REASONING = enum.auto()  # already reasoning; a start tag may be repeated
    REASONING = enum.auto()
    CONTENT_START = enum.auto()  # right after the reasoning: leading whitespace is dropped
    CONTENT = enum.auto()


class ReasoningStreamer:
    """Splits one output fed as text deltas; see the module docstring for the rules."""

    def __init__(self, fmt: ReasoningFormat, state: _State) -> None:
        self._fmt = fmt
        self._state = state
        self._buf = ""
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._ends = (fmt.end, *fmt.implicit_ends)

    @property
    def in_reasoning(self) -> bool:
        """Whether the output is (or may still be) inside the thinking."""
        return self._state is not _State.CONTENT and self._state is not _State.CONTENT_START

    def feed(self, text: str) -> ReasoningSplit:
        """Take the next piece of output; return what can be emitted now."""
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ReasoningSplit:
        """The output has ended: emit what is held back."""
        return self._run(final=True)

    def _run(self, final: bool) -> ReasoningSplit:
        out = ReasoningSplit()
        while self._step(final, out):
            pass
        return out

    def _step(self, final: bool, out: ReasoningSplit) -> bool:
        state = self._state
        if state is _State.MAYBE_OPEN or state is _State.MAYBE_OPEN_IN_REASONING:
            stripped = self._buf.lstrip()
            start = self._fmt.start
            if stripped.startswith(start):
                self._buf = stripped[len(start) :]
                self._state = _State.REASONING
                return True
            if (stripped == "" or start.startswith(stripped)) and not final:
                return False
            self._state = (
                _State.REASONING if state is _State.MAYBE_OPEN_IN_REASONING else (_State.CONTENT)
            )
            return True
        if state is _State.REASONING:
            return self._reasoning(final, out)
        if state is _State.CONTENT_START:
            stripped = self._buf.lstrip()
            self._buf = stripped
            if not stripped:
                return False
            self._state = _State.CONTENT
            return True
        out.content += self._buf
        self._buf = ""
        return False

    def _emit_reasoning(self, text: str, out: ReasoningSplit) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        out.reasoning += text

    def _reasoning(self, final: bool, out: ReasoningSplit) -> bool:
        index, marker = _first_marker(self._buf, self._ends)
        if index != -1:
            self._emit_reasoning(self._buf[:index].rstrip(), out)
            after = index + len(marker) if marker == self._fmt.end else index
            self._buf = self._buf[after:]
            self._state = _State.CONTENT_START
            return True
        if final:
            self._emit_reasoning(self._buf.rstrip(), out)
            self._buf = ""
            return False
        hold = _partial_length(self._buf, self._ends)
        emit = self._buf[: len(self._buf) - hold].rstrip()
        self._emit_reasoning(emit, out)
        self._buf = self._buf[len(emit) :]
        return False
