"""Tool calls and reasoning for a chat request: what the model card's parsers make of its output.

A model whose card names a tool-call parser (``--dyn-tool-call-parser``) is served ``tools``;
one whose card names a reasoning parser (``--dyn-reasoning-parser``) gets its thinking split
into ``reasoning_content``. :func:`chat_tools` checks the request's tool fields against the
card (a clear 400 for ``tools`` on a model without a parser) and says how its output is read:

- ``tool_choice="none"``: the tools are rendered into the prompt, no call is parsed (OpenAI's
  and vLLM's reading);
- ``"auto"`` (the default with tools): the card's parser reads calls from the text;
- ``"required"`` or a named function: the engine is asked for JSON constrained by
  :func:`tool_call_schema` and that output is read back as calls.

:class:`ChatOutputParser` is the per-choice state: reasoning first, then the tool parser on
the content, fed the detokenized text piece by piece; streamed and unary output come from
the same calls, so a stream's deltas reassemble into the unary message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proto.discovery import ModelCard
from proto.openai import ChatCompletionRequest, RequestError
from proto.request import GuidedDecodingOptions
from proto.tool_call import ToolCallDelta
from services.processor.parsers.reasoning import ReasoningFormat, ReasoningStreamer
from services.processor.parsers.registry import reasoning_parser, tool_call_parser
from services.processor.parsers.tool_base import ToolCallFormat, ToolCallStreamer
from services.processor.parsers.tool_grammar import (
    CONSTRAINED_CALLS,
    ToolChoiceError,
    function_names,
    tool_call_schema,
)

__all__ = ["ChatOutputParser", "ChatParsing", "ParsedPiece", "chat_tools"]


@dataclass(frozen=True, slots=True)
class ChatParsing:
    """How one chat request's output is read (the same for each of its choices)."""

    tool_format: ToolCallFormat | None = None
    known_names: frozenset[str] | None = None
    reasoning: ReasoningFormat | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    guide: GuidedDecodingOptions | None = None  # the constrained call, for required/named
    keep_special_tokens: bool = False  # a format marker is a special token
    in_reasoning: bool | None = None  # the prompt opened the thinking (None: the format's rule)

    @property
    def active(self) -> bool:
        return self.tool_format is not None or self.reasoning is not None

    def parser(self) -> ChatOutputParser:
        return ChatOutputParser(self)

    def after_prompt(self, prompt_tail: str) -> ChatParsing:
        """This parsing for a rendered prompt ending in ``prompt_tail`` (its last tokens, special
        tokens kept): a template that leaves ``<think>`` open starts the output in reasoning."""
        if self.reasoning is None or not self.reasoning.prompt_opens_reasoning(prompt_tail):
            return self
        return dataclasses.replace(self, in_reasoning=True)


def _wants_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) or req.tool_choice not in (None, "none", "auto")


def _special_markers(fmt: ToolCallFormat, special_tokens: frozenset[str]) -> bool:
    return any(m in special_tokens for m in fmt.markers)


def chat_tools(
    req: ChatCompletionRequest, card: ModelCard, special_tokens: frozenset[str] = frozenset()
) -> ChatParsing:
    """The request's tool and reasoning handling on this model; :class:`RequestError` (400)
    for tool fields the model cannot serve or that are malformed. ``special_tokens``: the
    tokenizer's special tokens (a format whose marker is one needs them kept in the text)."""
    reasoning = reasoning_parser(card.reasoning_parser) if card.reasoning_parser else None
    kwargs = req.chat_template_kwargs
    if not _wants_tools(req):
        return ChatParsing(reasoning=reasoning, chat_template_kwargs=kwargs)
    if card.tool_call_parser is None:
        param = "tools" if req.tools else "tool_choice"
        raise RequestError(
            f"'{param}' is not supported: model {card.name!r} has no tool-call parser "
            "(its workers run without --dyn-tool-call-parser)",
            param=param,
        )
    tools = req.tools or []
    try:
        names = function_names(tools)
        schema = tool_call_schema(
            tools, req.tool_choice, parallel_tool_calls=req.parallel_tool_calls is not False
        )
    except ToolChoiceError as exc:
        raise RequestError(str(exc), param=exc.param) from None
    if req.tool_choice == "none":
        return ChatParsing(reasoning=reasoning, chat_template_kwargs=kwargs)
    if schema is not None:
        if req.guide() is not None:
            raise RequestError(
                "tool_choice 'required' or a named function cannot be combined with another "
                "output constraint",
                param="tool_choice",
            )
        return ChatParsing(
            tool_format=CONSTRAINED_CALLS,
            known_names=names,
            reasoning=reasoning,
            chat_template_kwargs=kwargs,
            guide=GuidedDecodingOptions(json=schema),
        )
    fmt = tool_call_parser(card.tool_call_parser)
    return ChatParsing(
        tool_format=fmt,
        known_names=names,
        reasoning=reasoning,
        chat_template_kwargs=kwargs,
        keep_special_tokens=_special_markers(fmt, special_tokens),
    )


@dataclass(slots=True)
class ParsedPiece:
    """What a piece of output became: reasoning, content and tool-call deltas."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ChatOutputParser:
    """One choice's output: reasoning split first, then tool calls read from the content."""

    def __init__(self, parsing: ChatParsing) -> None:
        self._reasoning: ReasoningStreamer | None = (
            parsing.reasoning.streamer(
                chat_template_kwargs=parsing.chat_template_kwargs,
                in_reasoning=parsing.in_reasoning,
            )
            if parsing.reasoning is not None
            else None
        )
        self._tools: ToolCallStreamer | None = (
            parsing.tool_format.streamer(known_names=parsing.known_names)
            if parsing.tool_format is not None
            else None
        )

    @property
    def calls_emitted(self) -> int:
        return self._tools.calls_emitted if self._tools is not None else 0

    def feed(self, text: str) -> ParsedPiece:
        """Take the next piece of detokenized output."""
        return self._step(text, final=False)

    def finish(self, text: str = "") -> ParsedPiece:
        """The last piece: emit everything held back."""
        return self._step(text, final=True)

    def _step(self, text: str, final: bool) -> ParsedPiece:
        out = ParsedPiece()
        content = text
        if self._reasoning is not None:
            split = self._reasoning.feed(text) if text else None
            reasoning = split.reasoning if split else ""
            content = split.content if split else ""
            if final:
                last = self._reasoning.finish()
                reasoning += last.reasoning
                content += last.content
            out.reasoning = reasoning
        if self._tools is None:
            out.content = content
            return out
        piece = self._tools.feed(content) if content else None
        out.content = piece.content if piece else ""
        if piece:
            out.tool_calls.extend(piece.tool_calls)
        if final:
            last_piece = self._tools.finish()
            out.content += last_piece.content
            out.tool_calls.extend(last_piece.tool_calls)
        return out
