"""Every refusal and failure as the HTTP answer it becomes: status, OpenAI error body, headers.

:func:`failure_for` maps whatever a request raised -- bad input, an unknown model, a busy or
absent worker, an engine failure, a bug -- to one :class:`Failure`, so every endpoint answers
errors in the API's format and a bug is a logged 500, never aiohttp's plain-text page.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proto.openai import RequestError, error_body
from proto.plane import ErrorCode
from services.processor import metrics
from services.processor.respond import EngineFailure
from shared.router import BusyError
from shared.runtime import MeshError

__all__ = ["JSON", "STATUS_BY_CODE", "Failure", "failure_for"]

log = logging.getLogger(__name__)

JSON = "application/json"

# Request-plane failures as HTTP statuses: the client's fault, a busy or absent worker
# (try again), or a fault on our side.
STATUS_BY_CODE = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.NO_RESPONDERS: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.RESPONDER_GONE: 503,
    ErrorCode.TRANSPORT: 503,
    ErrorCode.TIMEOUT: 504,
}


class Failure(Exception):
    """An error to answer with: status, OpenAI body, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type_: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, param=param, type_=type_)
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)

    def response(self) -> web.Response:
        return web.Response(
            body=self.body, status=self.status, content_type=JSON, headers=self.headers
        )


def failure_for(exc: BaseException, retry_after: int) -> Failure:
    """The answer to ``exc``; ``retry_after`` (seconds) goes on every 503."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, BusyError):
        metrics.rejected.labels("busy").inc()
        return Failure(503, str(exc), retry_after=retry_after)
    if isinstance(exc, MeshError):
        status = STATUS_BY_CODE.get(exc.code, 500)
        retry = retry_after if status == 503 else None
        message = exc.message if status == 400 else f"{exc.message} ({exc.code.value})"
        return Failure(status, message, retry_after=retry)
    if isinstance(exc, EngineFailure):
        return Failure(500, str(exc))
    if isinstance(exc, RequestError):
        retry = retry_after if exc.status == 503 else None
        return Failure(exc.status, exc.message, param=exc.param, type_=exc.type, retry_after=retry)
    log.exception("request failed", exc_info=exc)
    return Failure(500, f"Internal error: {type(exc).__name__}")
