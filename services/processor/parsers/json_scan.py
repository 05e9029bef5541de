"""Find where a JSON object or array ends in text that is still arriving.

Tool calls are embedded in free text, so a parser must know where a call's JSON ends before
it can decode it, and must tell "not finished yet" from "finished". ``JsonEndScanner`` counts
brackets outside strings (honouring escapes) and resumes where it stopped, so feeding a long
call one character at a time costs linear, not quadratic, time. It only finds the end; the
caller decodes the slice with :mod:`json`, which judges validity.
"""

from __future__ import annotations

__all__ = ["JsonEndScanner"]

_OPEN = frozenset("{[")
_CLOSE = frozenset("}]")


class JsonEndScanner:
    """The end of the JSON object or array starting at ``start`` in a growing text."""

    __slots__ = ("_depth", "_end", "_escape", "_in_string", "_pos", "_start")

    def __init__(self, start: int) -> None:
        self._start = start
        self._pos = start
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._end: int | None = None

    def end(self, text: str) -> int | None:
        """The index just past the value's closing bracket, or ``None`` while it is open.

        ``text`` must extend the text of earlier calls (it only ever grows at the end)."""
        if self._end is not None:
            return self._end
        pos, depth = self._pos, self._depth
        in_string, escape = self._in_string, self._escape
        n = len(text)
        while pos < n:
            ch = text[pos]
            pos += 1
            if in_string:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in _OPEN:
                depth += 1
            elif ch in _CLOSE:
                depth -= 1
                if depth <= 0:
                    self._end = pos
                    return pos
        self._pos, self._depth = pos, depth
        self._in_string, self._escape = in_string, escape
        return None
