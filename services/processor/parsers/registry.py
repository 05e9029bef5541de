"""The parsers by name: ``--dyn-tool-call-parser`` and ``--dyn-reasoning-parser`` values.

The names are the reference's (Dynamo's), so a model card or a deployment written for it
selects the same parser here. A new format is one more entry, not another branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .hermes import HermesFormat
from .llama3_json import Llama3JsonFormat
from .mistral import MistralFormat
from .pythonic import PythonicFormat
from .reasoning import ReasoningFormat
from .tool_base import ToolCallFormat

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "UnknownParserError",
    "reasoning_parser",
    "reasoning_parser_names",
    "tool_call_parser",
    "tool_call_parser_names",
]


class UnknownParserError(ValueError):
    """A parser name that is not registered; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown {kind} parser {name!r}; choose one of: {', '.join(known)}")
        self.name = name


def _by_name(formats: list[ToolCallFormat]) -> Mapping[str, ToolCallFormat]:
    return MappingProxyType({f.name: f for f in formats})


TOOL_CALL_PARSERS: Mapping[str, ToolCallFormat] = _by_name(
    [
        HermesFormat("hermes"),
        HermesFormat("qwen25"),  # Qwen 2.5 writes Hermes' format
        Llama3JsonFormat(),
        MistralFormat(),
        PythonicFormat(),
    ]
)

REASONING_PARSERS: Mapping[str, ReasoningFormat] = MappingProxyType(
    {
        f.name: f
        for f in (
            ReasoningFormat("deepseek_r1", starts_in_reasoning=True),
            ReasoningFormat(
                "qwen3", implicit_ends=("<tool_call>",), thinking_switch="enable_thinking"
            ),
        )
    }
)


def tool_call_parser_names() -> tuple[str, ...]:
    """The registered tool-call parser names, sorted (for ``choices`` and ``--help``)."""
    return tuple(sorted(TOOL_CALL_PARSERS))


def reasoning_parser_names() -> tuple[str, ...]:
    """The registered reasoning parser names, sorted."""
    return tuple(sorted(REASONING_PARSERS))


def tool_call_parser(name: str) -> ToolCallFormat:
    """The tool-call format registered as ``name``; :class:`UnknownParserError` if none."""
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        raise UnknownParserError("tool-call", name, tool_call_parser_names()) from None


def reasoning_parser(name: str) -> ReasoningFormat:
    """The reasoning format registered as ``name``; :class:`UnknownParserError` if none."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise UnknownParserError("reasoning", name, reasoning_parser_names()) from None
