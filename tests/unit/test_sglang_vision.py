"""The image encode worker's SGLang engine and the image encoders' registry, against a fake of
SGLang's encoder runtime (no GPU here; ``tests/conformance/test_sglang_vision.py`` checks what
the fake assumes against SGLang's own source).

The fake behaves as SGLang 0.5.23's ``EncoderRuntime`` does for what the adapter touches:
``scheduler.submit(request)`` loads the image from its bytes, "encodes" it (rows and values
derived from the pixels, so a mix-up shows), stages an ``EmbeddingData``-like object with a
bf16 torch tensor in ``encoder.req_states[rid]`` and answers ``(nbytes, tokens, hidden,
error, code)``; ``encoder.release_request(rid)`` drops the staged state.
"""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from proto.multimodal import ImageEncodeOutput, ImageEncodeRequest
from services.encode.batcher import BatchLimits
from services.encode.sglang_vision import ANSWER_BUDGET, SglangVisionEngine
from services.encode.vision import VisionHandler, default_vision_model, vision_probe
from services.encode.vision_engines import (
    VisionSettings,
    choose_vision_engine,
    vision_engine,
)
from shared.engine.args import EngineArgs, EngineSelectionError
from shared.engine.registry import package_installed
from shared.multimodal import from_array, image_hash, to_array
from shared.runtime.errors import InvalidRequestError

PATCH = 28  # a Qwen2-VL-like tower: 14-pixel patches merged 2 x 2


class FakeEncoder:
    def __init__(self) -> None:
        self.req_states: dict[str, Any] = {}
        self.released: list[str] = []

    async def release_request(self, req_id: str) -> None:
        self.released.append(req_id)
        self.req_states.pop(req_id, None)


class FakeScheduler:
    def __init__(self, encoder: FakeEncoder, hidden: int) -> None:
        self.encoder = encoder
        self.hidden = hidden
        self.max_batch_size = 4
        self.requests: list[dict[str, Any]] = []
        self.images: list[np.ndarray[Any, Any]] = []
        self.error: tuple[str, int] | None = None
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    async def submit(self, request: dict[str, Any]) -> tuple[Any, ...]:
        self.requests.append(request)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            return (0, 0, 0, *self.error)
        (item,) = request["mm_items"]
        pixels = np.asarray(Image.open(io.BytesIO(item)).convert("RGB"))
        self.images.append(pixels)
        side = pixels.shape[0] // PATCH
        tokens = side * side
        # Row r: the mean of patch r's pixels, then a ramp: depends on the image and the row.
        patches = pixels[: side * PATCH, : side * PATCH].reshape(side, PATCH, side, PATCH, 3)
        means = patches.mean(axis=(1, 3, 4)).reshape(tokens, 1)
        values = means / 255.0 + np.arange(self.hidden)[None, :] / self.hidden
        embedding = torch.tensor(values, dtype=torch.bfloat16)
        data = SimpleNamespace(embedding=embedding, shape=list(embedding.shape))
        self.encoder.req_states[request["req_id"]] = SimpleNamespace(embedding_data=data)
        return (embedding.nbytes, tokens, self.hidden, None, None)


class FakeRuntime:
    def __init__(self, hidden: int = 32) -> None:
        self.encoder = FakeEncoder()
        self.scheduler = FakeScheduler(self.encoder, hidden)
        self.started = False
        self.stopped = False
        self.server_args: Any = None

    def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def _args(model: str = "Qwen/Qwen2.5-VL-3B-Instruct", **kw: Any) -> EngineArgs:
    kw.setdefault("server_args", SimpleNamespace(encoder_only=True))
    return EngineArgs(model_path=model, served_model_name=["qwen-vision"], **kw)


def _engine(runtime: FakeRuntime, image_size: int = 224) -> SglangVisionEngine:
    def factory(server_args: Any) -> FakeRuntime:
        runtime.server_args = server_args
        return runtime

    return SglangVisionEngine(
        _args(), served_model_name="qwen-vision", image_size=image_size, runtime_factory=factory
    )


def _pixels(seed: int, size: int = 224) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


async def test_start_measures_what_the_card_announces() -> None:
    runtime = FakeRuntime(hidden=48)
    engine = _engine(runtime)
    with pytest.raises(RuntimeError, match="not started"):
        _ = engine.vision
    await engine.start()
    assert runtime.started and runtime.server_args.encoder_only
    vision = engine.vision
    assert (vision.image_size, vision.tokens, vision.hidden_size) == (224, 64, 48)
    assert engine.limits.max_batch_size == 4 and engine.info.context_length == 64
    assert engine.info.engine == "sglang" and engine.answer_dtype == "float32"
    # The warm-up image was released like any other.
    assert runtime.encoder.released == [runtime.scheduler.requests[0]["req_id"]]
    await engine.shutdown()
    assert runtime.stopped


async def test_each_image_goes_to_sglang_as_one_request_and_comes_back_tokens_x_hidden() -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime)
    await engine.start()
    images = [_pixels(i) for i in range(3)]
    outs = await asyncio.gather(*(engine.encode(p) for p in images))
    decoded = runtime.scheduler.images[1:]
    for pixels, out in zip(images, outs, strict=True):
        # Lossless: SGLang sees our pixels (the requests may reach it in any order).
        assert sum(np.array_equal(d, pixels) for d in decoded) == 1
        assert out.shape == (64, 32) and out.dtype == np.float32
    assert not np.allclose(outs[0], outs[1])
    requests = runtime.scheduler.requests[1:]
    assert len({r["req_id"] for r in requests}) == 3
    for request in requests:
        assert request["modality"] == "image"
        assert (request["num_parts"], request["part_idx"]) == (0 + 1, 0)
        assert [type(item) for item in request["mm_items"]] == [bytes]
    # Nothing stays staged in SGLang's encoder.
    assert runtime.encoder.req_states == {}
    assert sorted(runtime.encoder.released) == sorted(
        r["req_id"] for r in runtime.scheduler.requests
    )


async def test_the_answer_is_bf16_widened_exactly() -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime)
    await engine.start()
    pixels = _pixels(7)
    out = await engine.encode(pixels)
    staged = runtime.scheduler
    # Recompute what the fake staged (bf16) and widen it: equal to the bit.
    side = 224 // PATCH
    patches = pixels.reshape(side, PATCH, side, PATCH, 3).mean(axis=(1, 3, 4)).reshape(-1, 1)
    expected = torch.tensor(
        patches / 255.0 + np.arange(staged.hidden)[None, :] / staged.hidden, dtype=torch.bfloat16
    ).float()
    assert np.array_equal(out, expected.numpy())


@pytest.mark.parametrize(("code", "error"), [(400, InvalidRequestError), (500, RuntimeError)])
async def test_sglang_errors_are_mapped_and_the_rid_released(
    code: int, error: type[Exception]
) -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime)
    await engine.start()
    runtime.scheduler.error = ("Failed to process mm items: bad", code)
    with pytest.raises(error, match="bad"):
        await engine.encode(_pixels(1))
    assert runtime.scheduler.requests[-1]["req_id"] in runtime.encoder.released


async def test_nothing_staged_is_an_error_not_a_silent_empty_answer() -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime)
    await engine.start()
    original = runtime.scheduler.submit

    async def lost(request: dict[str, Any]) -> tuple[Any, ...]:
        result = await original(request)
        runtime.encoder.req_states.clear()
        return result

    runtime.scheduler.submit = lost  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="staged no embedding"):
        await engine.encode(_pixels(2))


async def test_wrong_pixels_are_refused_before_sglang() -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime, image_size=448)
    await engine.start()
    sent = len(runtime.scheduler.requests)
    for bad in (_pixels(1, 224), _pixels(1, 448).astype(np.float32)):
        with pytest.raises(InvalidRequestError, match="448x448x3"):
            await engine.encode(bad)
    assert len(runtime.scheduler.requests) == sent
    assert engine.vision.tokens == (448 // PATCH) ** 2


async def test_a_caller_that_goes_away_still_releases_its_rid() -> None:
    runtime = FakeRuntime()
    engine = _engine(runtime)
    await engine.start()
    runtime.scheduler.gate = asyncio.Event()
    runtime.scheduler.arrived.clear()
    task = asyncio.ensure_future(engine.encode(_pixels(3)))
    await asyncio.wait_for(runtime.scheduler.arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rid = runtime.scheduler.requests[-1]["req_id"]
    assert rid not in runtime.encoder.released  # SGLang is still encoding it
    runtime.scheduler.gate.set()
    for _ in range(100):
        if rid in runtime.encoder.released:
            break
        await asyncio.sleep(0.01)
    assert rid in runtime.encoder.released and runtime.encoder.req_states == {}


async def test_answers_that_would_not_fit_a_message_shrink_or_fail() -> None:
    # 64 tokens: float32 fits up to ANSWER_BUDGET / 256 wide, float16 twice that.
    wide = ANSWER_BUDGET // (64 * 4) + 8
    runtime = FakeRuntime(hidden=wide)
    engine = _engine(runtime)
    await engine.start()
    assert engine.answer_dtype == "float16"
    assert (await engine.encode(_pixels(4))).dtype == np.float16
    too_wide = FakeRuntime(hidden=ANSWER_BUDGET // (64 * 2) + 8)
    with pytest.raises(ValueError, match="--vision-image-size 224"):
        await _engine(too_wide).start()
    assert too_wide.stopped


async def test_the_worker_handler_canary_and_card_work_unchanged_on_sglang() -> None:
    runtime = FakeRuntime(hidden=40)
    engine = _engine(runtime)
    await engine.start()
    handler = VisionHandler(engine, model="qwen-vision")
    pixels = _pixels(5)
    request = ImageEncodeRequest(hash=image_hash(pixels.tobytes()), pixels=from_array(pixels))
    ctx = SimpleNamespace(is_stopped=lambda: False)
    (out,) = [chunk async for chunk in handler.generate(request, ctx)]  # type: ignore[arg-type]
    assert isinstance(out, ImageEncodeOutput) and out.hash == request.hash
    assert out.embedding.shape == [64, 40] and out.embedding.dtype == "float32"
    assert np.array_equal(to_array(out.embedding), await engine.encode(pixels))
    probe = vision_probe("qwen-vision", engine.vision)
    assert to_array(probe.payload.pixels).shape == (224, 224, 3)
    assert probe.failure(out) is None
    wrong = ImageEncodeOutput(hash=out.hash, embedding=from_array(np.zeros((257, 40), np.float32)))
    assert probe.failure(wrong) is not None


# -- the registry ---------------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """What the registry may find: sglang installed, a GPU visible (both off by default)."""
    state = {"sglang": False, "gpu": False}
    monkeypatch.setattr(
        "services.encode.vision_engines.package_installed",
        lambda name: state["sglang"] if name == "sglang" else package_installed(name),
    )
    monkeypatch.setattr(
        "shared.engine.registry.gpu_visible",
        lambda env=None: (state["gpu"], "GPU found" if state["gpu"] else "no GPU device node"),
    )
    return state


ONNX = str(default_vision_model())


def test_auto_takes_sglang_for_a_vlm_on_a_gpu(machine: dict[str, bool]) -> None:
    machine.update(sglang=True, gpu=True)
    kind, why = choose_vision_engine(_args(), {})
    assert kind.name == "sglang" and "GPU" in why
    # The .onnx model is the CPU encoder's, GPU or not.
    kind, _ = choose_vision_engine(_args(ONNX), {})
    assert kind.name == "onnxruntime"


def test_auto_without_a_gpu_takes_the_onnx_vit_or_says_why_not(machine: dict[str, bool]) -> None:
    machine.update(sglang=True)
    assert choose_vision_engine(_args(ONNX), {})[0].name == "onnxruntime"
    with pytest.raises(EngineSelectionError, match="not sglang: needs a GPU"):
        choose_vision_engine(_args(), {})


@pytest.mark.parametrize(
    ("installed", "gpu", "kw", "needle"),
    [
        (False, True, {}, "--engine sglang needs the sglang package"),
        (True, False, {}, "--engine sglang needs a GPU"),
        (True, True, {"model": ONNX}, "--model-path"),
        (True, True, {"dp_size": 2}, "--dp-size 2"),
        (True, True, {"server_args": None}, "ServerArgs"),
        (True, True, {"engine": "torch"}, "--engine torch: an image encode worker runs sglang"),
        (True, True, {"engine": "sim"}, "--engine sim"),
    ],
)
def test_bad_engine_choices_name_the_flag(
    machine: dict[str, bool], installed: bool, gpu: bool, kw: dict[str, Any], needle: str
) -> None:
    machine.update(sglang=installed, gpu=gpu)
    kw.setdefault("engine", "sglang")
    with pytest.raises(EngineSelectionError) as exc:
        choose_vision_engine(_args(**kw), {})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_engine_sglang_on_a_gpu_builds_the_sglang_encoder(machine: dict[str, bool]) -> None:
    machine.update(sglang=True, gpu=True)
    kind, why = choose_vision_engine(_args(engine="sglang"), {})
    assert (kind.name, why) == ("sglang", "--engine sglang")
    built = kind.build(_args(), VisionSettings("qwen-vision", BatchLimits(), image_size=448))
    assert isinstance(built, SglangVisionEngine) and built.image_size == 448
    assert vision_engine("onnxruntime").fixed_image_size == 224
    with pytest.raises(ValueError, match="encoder_only"):
        SglangVisionEngine(
            _args(server_args=SimpleNamespace(encoder_only=False)),
            served_model_name="m",
            image_size=224,
        )
