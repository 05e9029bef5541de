"""Structured logging for every mesh process.

Why: a mesh request crosses several processes, so logs are only useful if a collector can
merge and filter them. ``json`` (the default) writes one JSON object per line to stderr with
the same keys everywhere -- ``ts``, ``level``, ``logger``, ``msg``, ``service``, ``pid``, the
caller's ``extra={...}`` fields and ``exc`` for a traceback -- so ``service`` and the request
ids passed as extras can be filtered on. ``text`` is for a human at a terminal.

Encoding must never lose a log line: values JSON cannot represent are written as ``str()``
and, failing that, ``repr()``. An ``extra`` key that collides with a core key is kept under
``extra_<key>`` rather than overwriting it.

The handler writes to whatever ``sys.stderr`` is at the time of the call, not at
configuration time, so redirection (pytest's capture, a supervisor swapping streams) works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

__all__ = ["NOISY_LOGGERS", "JsonFormatter", "TextFormatter", "configure_logging"]

# Chatty at INFO (connection churn, per-request access lines) and rarely what an operator
# is looking for; shown again when the level is debug.
NOISY_LOGGERS = (
    "nats",
    "grpc",
    "aetcd",
    "aiohttp.access",
    "urllib3",
    "httpx",
    "httpcore",
    "filelock",
)

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_KEYS = frozenset({"ts", "level", "logger", "msg", "service", "pid", "exc", "stack"})

_encoder = msgspec.json.Encoder(enc_hook=str)


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    try:
        # A trailing newline (warnings.formatwarning adds one) would only split text output.
        return record.getMessage().rstrip("\n")
    except Exception:  # a bad %-format in a log call must not drop the line
        return f"{record.msg!r} % {record.args!r}"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        extras[f"extra_{key}" if key in _CORE_KEYS else key] = value
    return extras


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler bound to the current ``sys.stderr`` on every write."""

    _sglmesh = True  # marks our handler so reconfiguring replaces it instead of adding one

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler assigns it in __init__ and setStream; always follow sys.stderr


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring for the keys."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
            "service": self.service,
            # A forked child inherits the formatter; record.process is the writer's own pid.
            "pid": record.process if record.process is not None else self.pid,
        }
        extras = _extras(record)
        entry.update(extras)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encode(entry, extras)


def _encode(entry: dict[str, Any], extras: dict[str, Any]) -> str:
    try:
        return _encoder.encode(entry).decode()
    except Exception:
        pass
    # Some extra is not encodable (a circular structure, a __str__ that raises, keys of odd
    # types): degrade only the offending values so the rest keep their structure.
    for key, value in extras.items():
        try:
            _encoder.encode(value)
        except Exception:
            entry[f"extra_{key}" if key in _CORE_KEYS else key] = _jsonable(value)
    return json.dumps(entry, default=_safe_repr, ensure_ascii=False, separators=(",", ":"))


def _jsonable(value: object) -> object:
    try:
        # The stdlib copes with some shapes msgspec refuses (e.g. mixed-type dict keys).
        return json.loads(json.dumps(value, default=str))
    except Exception:
        return _safe_repr(value)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger [service] msg key=value ...`` with a traceback on following lines."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name]
        if self.service:
            parts.append(f"[{self.service}]")
        parts.append(_message(record))
        for key, value in _extras(record).items():
            parts.append(f"{key}={_safe_text(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _safe_text(value: object) -> str:
    try:
        text = str(value)
    except Exception:
        return _safe_repr(value)
    return repr(text) if (not text or any(c.isspace() for c in text)) else text


def configure_logging(
    level: str = "info", fmt: str = "json", *, service: str | None = None
) -> None:
    """Send all logs to stderr as ``fmt`` ("json" or "text") at ``level``.

    Safe to call again (e.g. once early with defaults, again after parsing flags): the
    previous handler installed here is replaced, never duplicated, and handlers installed
    by others (pytest's caplog, for one) are left alone. Raises ``ValueError`` for an
    unknown level or format.
    """
    numeric = _LEVELS.get(level.strip().lower())
    if numeric is None:
        raise ValueError(
            f"unknown log level {level!r}; expected one of debug, info, warning, error, critical"
        )
    fmt_name = fmt.strip().lower()
    formatter: logging.Formatter
    if fmt_name == "json":
        formatter = JsonFormatter(service)
    elif fmt_name == "text":
        formatter = TextFormatter(service)
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected json or text")

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sglmesh", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)

    # NOTSET lets them follow the root again when reconfigured to debug; max() because a
    # logger's own level is the only check on propagation, so WARNING under an ERROR root
    # would let their warnings through.
    noisy_level = logging.NOTSET if numeric <= logging.DEBUG else max(logging.WARNING, numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy_level)
    # warnings.warn(...) then arrives as a structured record instead of a raw stderr line.
    logging.captureWarnings(True)
