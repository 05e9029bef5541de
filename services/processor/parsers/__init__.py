"""Tool-call and reasoning parsers for model output (``--dyn-tool-call-parser``,
``--dyn-reasoning-parser``): turn a model's text into OpenAI ``tool_calls`` and
``reasoning_content``, whole or streamed. See :mod:`.tool_base` and :mod:`.reasoning`."""

from .reasoning import ReasoningFormat, ReasoningSplit, ReasoningStreamer
from .registry import (
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    UnknownParserError,
    reasoning_parser,
    reasoning_parser_names,
    tool_call_parser,
    tool_call_parser_names,
)
from .tool_base import (
    ToolCallFormat,
    ToolCallStreamer,
    ToolParseResult,
    ToolStreamDelta,
    assemble_tool_calls,
)
from .tool_grammar import CONSTRAINED_CALLS, ToolChoiceError, function_names, tool_call_schema

__all__ = [
    "CONSTRAINED_CALLS",
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "ReasoningFormat",
    "ReasoningSplit",
    "ReasoningStreamer",
    "ToolCallFormat",
    "ToolCallStreamer",
    "ToolChoiceError",
    "ToolParseResult",
    "ToolStreamDelta",
    "UnknownParserError",
    "assemble_tool_calls",
    "function_names",
    "reasoning_parser",
    "reasoning_parser_names",
    "tool_call_parser",
    "tool_call_parser_names",
    "tool_call_schema",
]
