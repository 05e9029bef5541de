"""``python -m services.encode`` / ``sglmesh encode``: an embedding or image encode worker.

Serves ``{ns}.encode.generate`` (``--endpoint`` changes it; the reference puts its embedding
worker on ``{ns}.backend.generate``): batches of token ids (or texts) in, vectors out, on the
CPU sentence-embedding engine or on SGLang (``--is-embedding``) with a GPU. It registers an
embedding model card, so the processor serves the model on ``/v1/embeddings``, and runs the
shared worker lifecycle (``shared.worker.runner``): leased discovery, ``/health`` with a real
embedding canary, ``/metrics``, graceful SIGTERM drain. With ``--multimodal-encode-worker``
it is an image encode worker instead: pixels in, vision embeddings out, for the processor to
hand to the LLM workers, from the ViT on onnxruntime (``services.encode.vision``) or SGLang's
encoder-only path on GPUs (``services.encode.sglang_vision``), as the image encoders'
registry (``services.encode.vision_engines``) chooses.
"""

from __future__ import annotations

import logging
from typing import Any

from proto.discovery import EmbeddingInfo
from proto.embedding import PreprocessedEmbeddingRequest
from proto.multimodal import ImageEncodeRequest
from services.encode.args import EncodeConfig, parse_encode_args
from services.encode.engines import create_embedding_engine, embedding_info
from services.encode.handler import EmbeddingHandler
from services.encode.metrics import EncodeMetrics
from services.encode.registration import (
    embedding_card,
    embedding_instance_fields,
    embedding_probe,
)
from services.encode.vision import (
    VisionHandler,
    vision_card,
    vision_instance_fields,
    vision_probe,
)
from services.encode.vision_engines import ImageEncoder, VisionSettings, vision_engine
from shared.engine.args import EngineArgs
from shared.worker.runner import WorkerRole, worker_main

__all__ = ["encode_role", "main"]

log = logging.getLogger(__name__)


def encode_role(config: EncodeConfig) -> WorkerRole[Any]:
    """The embedding worker's part of the shared worker lifecycle."""
    limits = config.limits
    model = config.worker.engine.model_name
    infos: dict[int, EmbeddingInfo] = {}

    def info(engine: Any) -> EmbeddingInfo:
        # Read once the engine runs (SGLang resolves its model config at start).
        found = infos.get(id(engine))
        if found is None:
            found = infos[id(engine)] = embedding_info(engine)
        return found

    def create(args: EngineArgs) -> Any:
        log.info("embedding engine selected", extra={"engine": config.engine,
                                                     "reason": config.engine_reason})  # fmt: skip
        stats = EncodeMetrics(None, model)
        return create_embedding_engine(args, limits, threads=args.torch_threads, stats=stats)

    return WorkerRole(
        create_engine=create,
        handler=lambda engine, cfg, metrics: EmbeddingHandler(
            engine, info(engine), model=model, metrics=EncodeMetrics(metrics, model)
        ),
        request_type=PreprocessedEmbeddingRequest,
        canary=lambda engine, cfg, card: embedding_probe(info(engine), model),
        card=lambda engine, cfg, iid: embedding_card(engine.info, info(engine), cfg, limits, iid),
        instance_fields=lambda engine, cfg: embedding_instance_fields(
            engine.info, info(engine), cfg, limits
        ),
        clear_kv_blocks=False,
        engine_routes=False,
    )


def vision_role(config: EncodeConfig) -> WorkerRole[ImageEncoder]:
    """The image encode worker's part of the shared worker lifecycle."""
    model = config.worker.engine.model_name
    kind = vision_engine(config.engine)

    def create(args: EngineArgs) -> ImageEncoder:
        log.info("image encoder selected", extra={"engine": kind.name,
                                                  "reason": config.engine_reason})  # fmt: skip
        settings = VisionSettings(
            served_model_name=model,
            limits=config.limits,
            image_size=config.image_size,
            threads=args.torch_threads,
            stats=EncodeMetrics(None, model),
        )
        return kind.build(args, settings)

    return WorkerRole(
        create_engine=create,
        handler=lambda engine, cfg, metrics: VisionHandler(
            engine, model=model, metrics=EncodeMetrics(metrics, model)
        ),
        request_type=ImageEncodeRequest,
        canary=lambda engine, cfg, card: vision_probe(model, engine.vision),
        card=vision_card,
        instance_fields=vision_instance_fields,
        clear_kv_blocks=False,
        engine_routes=False,
    )


def main(argv: list[str] | None = None, *, prog: str = "sglmesh encode") -> int:
    config = parse_encode_args(argv, prog=prog)
    if config.worker.vision:
        return worker_main(config.worker, vision_role(config))
    return worker_main(config.worker, encode_role(config))
