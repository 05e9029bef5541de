"""Exceptions of the request plane.

Every failure a caller can see is a :class:`MeshError` with an :class:`ErrorCode`, so callers
decide by ``retryable`` (send it elsewhere: migration) rather than by message text. Handlers
raise the same classes to choose the error code their caller receives; any other exception
from a handler reaches the caller as a non-retryable ``handler_error``.
"""

from __future__ import annotations

from proto.plane import RETRYABLE_CODES, ErrorBody, ErrorCode


class MeshError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, retryable=self.retryable)


class NoRespondersError(MeshError):
    """Nobody is subscribed to the subject the request was sent to."""

    code = ErrorCode.NO_RESPONDERS


class NoInstancesError(NoRespondersError):
    """Discovery knows no instance of the endpoint (nothing was sent)."""


class ResponderDeadError(MeshError):
    """The responder went silent past the stream timeout, or left discovery mid-stream."""

    code = ErrorCode.RESPONDER_GONE


class StreamGapError(MeshError):
    """A frame was lost: the stream cannot be trusted any more."""

    code = ErrorCode.STREAM_GAP


class TransportError(MeshError):
    """The NATS connection is down or failed while the stream was open."""

    code = ErrorCode.TRANSPORT


class OverloadedError(MeshError):
    code = ErrorCode.OVERLOADED


class ShuttingDownError(MeshError):
    code = ErrorCode.SHUTTING_DOWN


class InvalidRequestError(MeshError):
    code = ErrorCode.INVALID_REQUEST


class RemoteError(MeshError):
    """An error frame from the responder. ``code`` and ``retryable`` are the remote's."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body.message, code=body.code)
        self._retryable = body.retryable

    @property
    def retryable(self) -> bool:
        return self._retryable
