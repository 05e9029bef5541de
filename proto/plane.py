"""Request-plane frames: what travels on NATS between a client and an endpoint instance.

A request is one NATS message to the endpoint's subject with ``reply`` set to a per-stream
subject under the caller's inbox. The responder answers on that reply subject with a
sequence of :class:`Frame` s numbered from 0. The first frame (seq 0) always carries
``instance_id``: it is the acknowledgement that names the instance, so the caller can cancel
it, grant it credit, and notice if it vanishes from discovery.

- ``ACK``: a bare acknowledgement, sent only when the handler has produced nothing by the
  next event-loop iteration (a fast handler's first chunk acknowledges in the same write).
- ``DATA``: one or more chunks. Chunks are coalesced into one frame when the caller has not
  granted credit for more frames (it is behind), so a slow caller costs fewer messages.
- ``HEARTBEAT``: sent on a stream that has been quiet for the heartbeat interval.
- ``END``: the last frame; may carry the final chunks.
- ``ERROR``: the last frame; carries an :class:`ErrorBody`.

The caller talks back to the instance on its control subject with :class:`Control` messages
(cancel, credit). When the request names the caller's response server (``reply_addr``), the
same frames travel on a direct TCP connection instead, as :class:`StreamFrame` s after a
:class:`StreamHello`, and the caller's controls come back on that connection. Every frame is
a msgpack array so the per-chunk overhead is a few bytes; chunks stay as raw msgpack
(``msgspec.Raw``) until the consumer decodes them with its own type.
"""

from __future__ import annotations

import enum

import msgspec


class FrameKind(enum.IntEnum):
    ACK = 0
    DATA = 1
    HEARTBEAT = 2
    END = 3
    ERROR = 4


class ErrorCode(enum.StrEnum):
    """Why a stream failed. ``RETRYABLE_CODES`` says which ones another instance may fix."""

    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    NO_RESPONDERS = "no_responders"
    RESPONDER_GONE = "responder_gone"
    STREAM_GAP = "stream_gap"
    TRANSPORT = "transport"
    TIMEOUT = "timeout"
    INVALID_REQUEST = "invalid_request"
    HANDLER_ERROR = "handler_error"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


RETRYABLE_CODES = frozenset(
    {
        ErrorCode.OVERLOADED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.NO_RESPONDERS,
        ErrorCode.RESPONDER_GONE,
        ErrorCode.STREAM_GAP,
        ErrorCode.TRANSPORT,
        ErrorCode.TIMEOUT,
    }
)


class ErrorBody(msgspec.Struct, array_like=True, frozen=True):
    code: ErrorCode
    message: str
    retryable: bool


class RequestEnvelope(msgspec.Struct, array_like=True):
    """What the caller publishes to an endpoint subject.

    ``body`` is the handler's request, already msgpack-encoded by the caller, so the runtime
    never decodes it twice. ``window`` is the initial credit: how many frames the responder
    may send before it must wait for a ``Control.CREDIT``.
    """

    request_id: str
    body: msgspec.Raw
    window: int = 0
    # The caller's response server ("host:port", see ``shared.runtime.response_plane``) and
    # the token a connection to it must present; empty: answer on the NATS reply subject.
    reply_addr: str = ""
    reply_token: str = ""


class Frame(msgspec.Struct, array_like=True):
    seq: int
    kind: FrameKind
    chunks: list[msgspec.Raw] = []
    error: ErrorBody | None = None
    instance_id: int | None = None


class StreamHello(msgspec.Struct, array_like=True, frozen=True):
    """The first message a responder sends on a direct response connection: the caller's
    token (from the request envelope, so only an instance the caller addressed over the
    authenticated request plane has it) and the responder's instance id."""

    token: str
    instance_id: int


class StreamFrame(msgspec.Struct, array_like=True):
    """A :class:`Frame` on a direct response connection, naming its stream (the suffix of
    the NATS reply subject the request carried)."""

    stream_id: str
    frame: Frame


class ControlKind(enum.IntEnum):
    CANCEL = 0
    CREDIT = 1
    # Liveness probe: sent as a NATS request; the instance answers with an empty reply. NATS
    # answers "no responders" at once for an instance whose connection is gone.
    PING = 2


class Control(msgspec.Struct, array_like=True):
    """Caller -> instance, on the instance's control subject.

    For ``CREDIT``, ``value`` is the highest frame seq the caller has consumed.
    """

    request_id: str
    kind: ControlKind
    value: int = 0
