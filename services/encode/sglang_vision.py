"""The image encode worker on GPUs: SGLang's encoder-only path, behind the mesh's image protocol.

What the reference does: its SGLang encode worker (``--enable-multimodal --disaggregation-mode
encode``) sets ``ServerArgs.encoder_only`` and builds SGLang's ``MMEncoder`` in-process -- no
``sgl.Engine`` -- to turn images into the vision tower's embeddings. We drive the same encoder
the way SGLang's own encoder server does (``sglang/srt/disaggregation/encoder/http_server.py``),
minus its HTTP (the reference's own call, ``MMEncoder._encode``, is private and gone from
SGLang 0.5.23, where the encoder lives in ``disaggregation/encoder/``): publish the
``ServerArgs`` for the ``encoder`` role, ``launch_local_runtime``
(the rank-0 ``MMEncoder`` in this process, tensor-parallel followers as child processes, an
``EncoderScheduler`` that batches concurrent requests), then ``scheduler.submit`` one request
per image. SGLang stages the result for a later transfer in ``encoder.req_states[rid]``: an
``EmbeddingData`` whose ``embedding`` is tokens x hidden (on the CPU, unless the mooncake
backend keeps it on the GPU). We read it and ``release_request`` it at once, so nothing stays
staged; a caller that goes away lets the encode finish and still releases it.

In: the processor's fitted pixels, handed to SGLang as PNG bytes (its ``load_image`` takes
bytes, and bytes pickle to tensor-parallel followers). Out: the same wire answer as the CPU
encoder (``ImageEncodeOutput``, tokens x hidden): float32 (the model's bf16 widened, exact), or
float16 -- what the processor keeps anyway -- when float32 would not fit one NATS message.
The card's ``VisionInfo`` is measured, not guessed: at start a grey image of
``--vision-image-size`` pixels is encoded and its rows and width are the tokens and hidden
size the processor plans prompts with.

Start-up blocks the event loop while SGLang loads the model, as the SGLang LLM adapter does;
the vision tower's forward runs on the event loop inside SGLang's scheduler, as in SGLang's
own server. sglang is imported only in the default runtime factory; tests pass a stand-in.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import numpy as np

from proto.multimodal import VisionInfo
from services.encode.batcher import BatchLimits
from shared.engine.args import EngineArgs
from shared.engine.protocol import EngineInfo
from shared.runtime.errors import InvalidRequestError

__all__ = ["ANSWER_BUDGET", "ENGINE_NAME", "SglangVisionEngine", "encode_request"]

log = logging.getLogger(__name__)

ENGINE_NAME = "sglang"
# One answer must fit a NATS message (1 MiB by default) with room for the envelope.
ANSWER_BUDGET = 768 * 1024
_MODALITY = "image"  # SGLang's Modality.from_str("image") is Modality.IMAGE


def _launch_runtime(server_args: Any) -> Any:
    """SGLang's own encoder bring-up (``launch_server`` without uvicorn)."""
    from sglang.srt.disaggregation.encoder.runtime import launch_local_runtime
    from sglang.srt.runtime_context import publish

    publish(server_args, role="encoder")
    return launch_local_runtime(server_args)


def _png(pixels: np.ndarray[Any, Any]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def encode_request(rid: str, image: bytes) -> dict[str, Any]:
    """One image as SGLang's encoder scheduler takes a request (``validate_encode_request``)."""
    return {
        "req_id": rid,
        "modality": _MODALITY,
        "num_parts": 1,
        "part_idx": 0,
        "mm_items": [image],
    }


def _to_numpy(embedding: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    if hasattr(embedding, "detach"):  # a torch tensor (bf16 on the GPU or the CPU)
        embedding = embedding.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(embedding, dtype=np.float32)


class SglangVisionEngine:
    """An image encoder over SGLang's ``MMEncoder`` (see the module docstring).

    ``runtime_factory`` builds SGLang's encoder runtime from the ``ServerArgs`` (default:
    publish + ``launch_local_runtime``); tests pass a stand-in."""

    def __init__(
        self,
        args: EngineArgs,
        *,
        served_model_name: str,
        image_size: int,
        runtime_factory: Callable[[Any], Any] | None = None,
    ) -> None:
        if args.server_args is None:
            raise ValueError("SglangVisionEngine needs SGLang's ServerArgs (sglang installed)")
        if not getattr(args.server_args, "encoder_only", False):
            raise ValueError("SglangVisionEngine needs ServerArgs with encoder_only set")
        self.args = args
        self.model_path = args.model_path
        self.image_size = image_size
        self.limits = BatchLimits(max_batch_size=1, max_batch_tokens=1)
        self._factory = runtime_factory or _launch_runtime
        self._runtime: Any = None
        self._vision: VisionInfo | None = None
        self._dtype = "float32"
        self._ids = itertools.count()
        self._prefix = f"sglmesh-image-{os.getpid()}-{id(self):x}"
        self._background: set[asyncio.Task[Any]] = set()
        self.info = EngineInfo(
            engine=ENGINE_NAME,
            model_path=args.model_path,
            served_model_name=served_model_name,
            page_size=1,
            max_total_tokens=0,
            max_running_requests=0,
            max_prefill_tokens=0,
            context_length=0,
            dp_size=1,
        )

    @property
    def vision(self) -> VisionInfo:
        if self._vision is None:
            raise RuntimeError("the SGLang image encoder is not started")
        return self._vision

    @property
    def answer_dtype(self) -> str:
        return self._dtype

    async def start(self) -> None:
        if self._runtime is not None:
            return
        self._runtime = self._factory(self.args.server_args)
        self._runtime.start()  # SGLang's batching task, on this loop
        size = int(getattr(self._runtime.scheduler, "max_batch_size", 1) or 1)
        grey = np.full((self.image_size, self.image_size, 3), 128, dtype=np.uint8)
        try:
            tokens, hidden = (await self.encode(grey)).shape
            self._dtype = _answer_dtype(tokens, hidden, self.image_size)
        except BaseException:
            await self.shutdown()
            raise
        self._vision = VisionInfo(image_size=self.image_size, tokens=tokens, hidden_size=hidden)
        self.limits = BatchLimits(max_batch_size=size, max_batch_tokens=size * tokens)
        self.info.max_running_requests = size
        self.info.max_total_tokens = self.info.max_prefill_tokens = size * tokens
        self.info.context_length = tokens
        log.info(
            "sglang image encoder ready: model=%s image=%dx%d tokens=%d hidden=%d answer=%s",
            self.model_path, self.image_size, self.image_size, tokens, hidden, self._dtype,
        )  # fmt: skip

    async def shutdown(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.stop()

    async def encode(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """One image (``image_size`` x ``image_size`` x 3 uint8) -> tokens x hidden."""
        size = self.image_size
        if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
            raise InvalidRequestError(
                f"image pixels must be uint8 {size}x{size}x3, got "
                f"{pixels.dtype} {'x'.join(map(str, pixels.shape))}"
            )
        if self._runtime is None:
            raise RuntimeError("the SGLang image encoder is not started")
        image = await asyncio.to_thread(_png, np.ascontiguousarray(pixels))
        rid = f"{self._prefix}-{next(self._ids)}"
        task = asyncio.ensure_future(self._encode(self._runtime, rid, image))
        try:
            embedding = await asyncio.shield(task)
        except asyncio.CancelledError:
            # SGLang's scheduler runs what it dequeued; let it finish and release the rid.
            self._background.add(task)
            task.add_done_callback(self._forget)
            raise
        return embedding.astype(self._dtype, copy=False)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller is gone

    async def _encode(
        self, runtime: Any, rid: str, image: bytes
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        encoder = runtime.encoder
        try:
            _nbytes, tokens, hidden, error, code = await runtime.scheduler.submit(
                encode_request(rid, image)
            )
            if error is not None:
                if code is not None and int(code) == HTTPStatus.BAD_REQUEST:
                    raise InvalidRequestError(f"SGLang's encoder refused the image: {error}")
                raise RuntimeError(f"SGLang's encoder failed ({code}): {error}")
            state = encoder.req_states.get(rid)
            staged = getattr(getattr(state, "embedding_data", None), "embedding", None)
            if staged is None:
                raise RuntimeError(f"SGLang's encoder staged no embedding for {rid}")
            array = _to_numpy(staged)
            if array.shape != (tokens, hidden):
                raise RuntimeError(
                    f"SGLang's encoder staged embeddings of shape {array.shape}, "
                    f"announced {tokens} x {hidden}"
                )
            return array
        finally:
            await encoder.release_request(rid)


def _answer_dtype(tokens: int, hidden: int, image_size: int) -> str:
    """float32 when one image's answer fits a NATS message, else float16; neither: an error
    naming the flag that sets the image's size."""
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        if tokens * hidden * itemsize <= ANSWER_BUDGET:
            return dtype
    raise ValueError(
        f"--vision-image-size {image_size}: one image is {tokens} x {hidden} embeddings, "
        f"{tokens * hidden * 2} bytes even as float16, more than one NATS message "
        f"({ANSWER_BUDGET} bytes); use a smaller image size"
    )
