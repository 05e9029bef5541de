"""What an embedding worker tells discovery, and how its health canary checks it.

The model card says ``model_type: ["embedding"]`` and ``worker_type: embedding`` (the
processor serves it on ``/v1/embeddings`` only) and carries the model's
:class:`~proto.discovery.EmbeddingInfo` -- dimensions, input limit, pooling, normalisation,
Matryoshka sizes, vocabulary -- so the processor checks and truncates requests without asking
the worker. ``model_input`` is ``tokens``: the processor tokenizes, as it does for chat.

The canary is a real embedding request, as the reference's: the text ``"Test"`` (the worker's
engine tokenizes it), and it passes only when one vector of the model's size comes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proto.discovery import EmbeddingInfo, ModelCard, ModelType, RuntimeConfig, WorkerType
from proto.embedding import EmbeddingOutput, PreprocessedEmbeddingRequest
from services.encode.batcher import BatchLimits
from shared.engine.protocol import EngineInfo
from shared.worker.args import WorkerConfig
from shared.worker.health import CanaryProbe

__all__ = ["embedding_card", "embedding_instance_fields", "embedding_probe"]

CANARY_TEXT = "Test"


def _runtime_config(
    info: EngineInfo, embedding: EmbeddingInfo, limits: BatchLimits
) -> RuntimeConfig:
    return RuntimeConfig(
        max_num_seqs=limits.max_batch_size,
        max_num_batched_tokens=limits.max_batch_tokens,
        context_length=embedding.max_input_tokens,
        worker_type=WorkerType.EMBEDDING,
        engine_specific={"engine": info.engine},
    )


def embedding_instance_fields(
    info: EngineInfo, embedding: EmbeddingInfo, config: WorkerConfig, limits: BatchLimits
) -> dict[str, Any]:
    """Keyword arguments for ``Endpoint.serve`` that go into the instance record."""
    return {
        "model": config.engine.model_name,
        "worker_type": WorkerType.EMBEDDING,
        "runtime_config": _runtime_config(info, embedding, limits),
        "metadata": {"engine": info.engine, "role": config.role},
    }


def embedding_card(
    info: EngineInfo,
    embedding: EmbeddingInfo,
    config: WorkerConfig,
    limits: BatchLimits,
    instance_id: int,
) -> ModelCard:
    args = config.engine
    model_dir = Path(args.model_path).expanduser()
    tokenizer_dir = Path(args.tokenizer_path).expanduser() if args.tokenizer_path else model_dir
    return ModelCard(
        name=args.model_name,
        aliases=args.model_aliases,
        model_path=str(model_dir),
        tokenizer_path=str(tokenizer_dir),
        context_length=embedding.max_input_tokens,
        model_type=[ModelType.EMBEDDING],
        model_input="tokens",
        worker_type=WorkerType.EMBEDDING,
        runtime_config=_runtime_config(info, embedding, limits),
        instance_id=instance_id,
        endpoint=str(config.endpoint),
        embedding=embedding,
    )


def embedding_probe(embedding: EmbeddingInfo, model: str) -> CanaryProbe:
    """One text in, one vector of the model's size out, or the worker is unhealthy."""
    size = embedding.dimensions * 4

    def failure(chunk: EmbeddingOutput) -> str | None:
        if len(chunk.embeddings) != 1:
            return f"answered {len(chunk.embeddings)} vectors for one input"
        if len(chunk.embeddings[0]) != size:
            return f"answered a vector of {len(chunk.embeddings[0]) // 4} dimensions"
        return None

    payload = PreprocessedEmbeddingRequest(texts=[CANARY_TEXT], model=model)
    return CanaryProbe(payload, EmbeddingOutput, failure)
