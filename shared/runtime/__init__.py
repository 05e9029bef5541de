"""The distributed runtime: NATS request plane, etcd lease discovery, endpoints and clients."""

from shared.router.mode import RouterMode
from shared.runtime.client import Client, ResponseStream
from shared.runtime.endpoint import Context, Endpoint, ServedEndpoint
from shared.runtime.errors import (
    InvalidRequestError,
    MeshError,
    NoInstancesError,
    NoRespondersError,
    OverloadedError,
    RemoteError,
    ResponderDeadError,
    ShuttingDownError,
    StreamGapError,
    TransportError,
)
from shared.runtime.runtime import DistributedRuntime

__all__ = [
    "Client",
    "Context",
    "DistributedRuntime",
    "Endpoint",
    "InvalidRequestError",
    "MeshError",
    "NoInstancesError",
    "NoRespondersError",
    "OverloadedError",
    "RemoteError",
    "ResponderDeadError",
    "ResponseStream",
    "RouterMode",
    "ServedEndpoint",
    "ShuttingDownError",
    "StreamGapError",
    "TransportError",
]
