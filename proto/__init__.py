"""Every message that crosses a process boundary, as ``msgspec.Struct`` (msgpack on NATS).

Services share these types and nothing else, so a change here is a wire change. Use the
shared :data:`ENCODER` and :func:`decoder` rather than building encoders per message: a
``Decoder`` compiles its type once, which is most of its cost.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar, overload

import msgspec

from proto.discovery import (
    EmbeddingInfo,
    InstanceRecord,
    ModelCard,
    ModelType,
    RuntimeConfig,
    WorkerType,
    ZmqEndpoints,
    instance_id_from_key,
    instance_key,
    instances_prefix,
    model_key,
    models_prefix,
)
from proto.embedding import (
    EmbeddingData,
    EmbeddingOutput,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    PreprocessedEmbeddingRequest,
)
from proto.kv_events import (
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    StorageMedium,
    decode_seq,
    encode_seq,
)
from proto.metrics import (
    SGLANG_KV_METRICS_CLASS,
    KvEventsMessage,
    KvMetrics,
    LoadMetrics,
    SglangKvMetrics,
)
from proto.plane import (
    RETRYABLE_CODES,
    Control,
    ControlKind,
    ErrorBody,
    ErrorCode,
    Frame,
    FrameKind,
    RequestEnvelope,
    StreamFrame,
    StreamHello,
)
from proto.request import (
    BYPASS_REMOTE_PREFILL_ANNOTATION,
    FAKE_BOOTSTRAP_HOST,
    BootstrapInfo,
    GuidedDecodingOptions,
    MultimodalData,
    OutputOptions,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from proto.response import (
    KV_CACHE_HIT_KEY,
    CompletionUsage,
    EngineOutput,
    FinishReason,
    KvCacheHit,
    PromptTokensDetails,
    TopLogprob,
)

T = TypeVar("T")

ENCODER = msgspec.msgpack.Encoder()


@functools.lru_cache(maxsize=256)
def _cached_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


@overload
def decoder(type_: type[T]) -> msgspec.msgpack.Decoder[T]: ...
@overload
def decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]: ...
def decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    """A shared msgpack decoder for ``type_`` (a struct, a union, ``list[...]``, ...)."""
    return _cached_decoder(type_)


__all__ = [
    "BYPASS_REMOTE_PREFILL_ANNOTATION",
    "ENCODER",
    "FAKE_BOOTSTRAP_HOST",
    "KV_CACHE_HIT_KEY",
    "REPLAY_END_SEQ",
    "RETRYABLE_CODES",
    "SGLANG_KV_METRICS_CLASS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "BootstrapInfo",
    "CompletionUsage",
    "Control",
    "ControlKind",
    "EmbeddingData",
    "EmbeddingInfo",
    "EmbeddingOutput",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "EngineOutput",
    "ErrorBody",
    "ErrorCode",
    "FinishReason",
    "Frame",
    "FrameKind",
    "GuidedDecodingOptions",
    "InstanceRecord",
    "KVEvent",
    "KVEventBatch",
    "KvCacheHit",
    "KvEventsMessage",
    "KvMetrics",
    "LoadMetrics",
    "ModelCard",
    "ModelType",
    "MultimodalData",
    "OutputOptions",
    "PreprocessedEmbeddingRequest",
    "PreprocessedRequest",
    "PromptTokensDetails",
    "RequestEnvelope",
    "RoutingHints",
    "RuntimeConfig",
    "SamplingOptions",
    "SglangKvMetrics",
    "StopConditions",
    "StorageMedium",
    "StreamFrame",
    "StreamHello",
    "TopLogprob",
    "WorkerType",
    "ZmqEndpoints",
    "decode_seq",
    "decoder",
    "encode_seq",
    "instance_id_from_key",
    "instance_key",
    "instances_prefix",
    "model_key",
    "models_prefix",
]
