"""The names ``--dyn-tool-call-parser`` and ``--dyn-reasoning-parser`` accept.

Workers take these flags (the name goes into the model card) and the processor runs the
parsers, and services never import each other, so the names live here; the processor's
registry (``services/processor/parsers/registry.py``) is tested to hold exactly these.
The converters are for :class:`shared.flags.Flag`: a bad name is a one-line error listing the
valid ones.
"""

from __future__ import annotations

__all__ = [
    "REASONING_PARSER_NAMES",
    "TOOL_CALL_PARSER_NAMES",
    "reasoning_parser_name",
    "tool_call_parser_name",
]

TOOL_CALL_PARSER_NAMES: tuple[str, ...] = ("hermes", "llama3_json", "mistral", "pythonic", "qwen25")
REASONING_PARSER_NAMES: tuple[str, ...] = ("deepseek_r1", "qwen3")


def _checked(kind: str, names: tuple[str, ...], text: str) -> str:
    name = text.strip()
    if name not in names:
        raise ValueError(f"unknown {kind} parser {name!r}; choose one of: {', '.join(names)}")
    return name


def tool_call_parser_name(text: str) -> str:
    """A ``--dyn-tool-call-parser`` value, checked."""
    return _checked("tool-call", TOOL_CALL_PARSER_NAMES, text)


def reasoning_parser_name(text: str) -> str:
    """A ``--dyn-reasoning-parser`` value, checked."""
    return _checked("reasoning", REASONING_PARSER_NAMES, text)
