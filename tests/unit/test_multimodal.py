"""Images below the HTTP layer: wire tensors, placeholder tokens, the simulated engine's prefix
cache and KV events with images, the torch engine's refusal, the request mapping, the
processor's image checks and fitting, and the role flags of an image encode worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from proto.multimodal import MultimodalItem, Tensor
from proto.openai import ChatCompletionRequest, RequestError
from proto.request import PreprocessedRequest
from services.encode.args import parse_encode_args
from services.encode.vision import VISION_MODEL_NAME, default_vision_model
from services.processor.images import (
    ImageFetcher,
    ImageLimits,
    ImagePart,
    _data_url,
    decode_image,
    fit_image,
    image_parts,
)
from shared.engine.args import EngineSelectionError, parse_engine_args
from shared.engine.mapping import to_generate_kwargs
from shared.engine.registry import engine_kind
from shared.engine.sim.engine import SimEngine
from shared.multimodal import (
    MM_PAD_SHIFT,
    from_array,
    image_hash,
    placeholder_ids,
    to_array,
)
from shared.worker.args import is_multimodal_encode
from tests.images import data_url, encode, scene
from tests.unit.test_sim_engine import config, generate, model_dir  # noqa: F401  (fixture)

H1, H2 = image_hash(b"one"), image_hash(b"two")


def test_tensor_round_trip_and_size_check() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = from_array(a, "float16")
    assert t.shape == [3, 4] and t.dtype == "float16" and len(t.data) == 24
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=Tensor)
    assert np.array_equal(to_array(back), a)
    with pytest.raises(msgspec.ValidationError, match="needs 48 bytes"):
        msgspec.msgpack.decode(msgspec.msgpack.encode([[3, 4], "float32", b"\0" * 12]), type=Tensor)


def test_placeholders_derive_from_the_hash() -> None:
    a = placeholder_ids(H1, 257)
    assert a == placeholder_ids(H1, 257) and a != placeholder_ids(H2, 257)
    assert all(MM_PAD_SHIFT <= t < 2**32 for t in a)
    assert len(set(a)) == 4 and a[:4] == a[4:8]  # four sentinels, cycling


def _image_request(ids: list[int], hashes: list[str], rows: int) -> dict[str, Any]:
    return {
        "input_ids": ids,
        "image_data": [
            {"format": "precomputed_embedding", "feature": np.zeros((rows, 8), np.float32)}
        ],
        "mm_hashes": hashes,
    }


async def test_sim_engine_caches_the_same_image_and_misses_another(
    model_dir: Path,  # noqa: F811
) -> None:
    engine = SimEngine(config(model_dir, page_size=16))
    await engine.start()
    try:
        text = list(range(3, 19))  # one page of text, then a 64-token image, then text

        def prompt(h: str) -> list[int]:
            return [*text, *placeholder_ids(h, 64), 4, 5, 6]

        _, meta, _ = await generate(engine, rid="a", **_image_request(prompt(H1), [H1], 64))
        assert meta["prompt_tokens"] == 16 + 64 + 3 and meta["cached_tokens"] == 0
        _, meta, _ = await generate(engine, rid="b", **_image_request(prompt(H1), [H1], 64))
        assert meta["cached_tokens"] == 80  # the text page and the image's four pages
        _, meta, _ = await generate(engine, rid="c", **_image_request(prompt(H2), [H2], 64))
        assert meta["cached_tokens"] == 16  # only the text before the image

        bad = [
            (_image_request(prompt(H1), [H1], 63), "64 image positions"),
            (_image_request(prompt(H1), [H2], 64), "do not match mm_hashes"),
            ({**_image_request(prompt(H1), [H1], 64), "mm_hashes": ["zz"]}, "not a hex hash"),
            ({"input_ids": prompt(H1)}, "carries no image_data"),
        ]
        for i, (kw, words) in enumerate(bad):
            _, meta, _ = await generate(engine, rid=f"bad{i}", **kw)
            assert meta["finish_reason"]["type"] == "abort", kw
            assert words in meta["finish_reason"]["message"], meta
    finally:
        await engine.shutdown()


def test_torch_engine_refuses_images() -> None:
    args = parse_engine_args(
        ["--model-path", "/tmp", "--engine", "torch", "--enable-multimodal"], prog="w", env={}
    )
    with pytest.raises(EngineSelectionError, match="text-only"):
        engine_kind("torch").build(args)
    from shared.engine.cpu.engine import CpuEngine
    from shared.engine.pytorch.engine import TorchEngine

    assert TorchEngine.accepts_images is False and CpuEngine.accepts_images is False


def test_mapping_passes_images_as_one_precomputed_embedding_item() -> None:
    emb = [from_array(np.full((5, 4), i, np.float32), "float16") for i in (1, 2)]
    ids = [7, *placeholder_ids(H1, 5), 8, *placeholder_ids(H2, 5)]
    items = [
        MultimodalItem(hash=H1, offset=1, length=5, embedding=emb[0]),
        MultimodalItem(hash=H2, offset=7, length=5, embedding=emb[1]),
    ]
    req = PreprocessedRequest(token_ids=ids, mm_items=items)
    kw = to_generate_kwargs(req, rid="r", disaggregation_mode="null", dp_rank=None)
    (item,) = kw["image_data"]
    assert item["format"] == "precomputed_embedding"
    assert item["feature"].shape == (10, 4) and item["feature"].dtype == np.float32
    assert item["feature"][:5].max() == 1 and item["feature"][5:].min() == 2
    assert kw["mm_hashes"] == [H1, H2]
    assert "image_data" not in to_generate_kwargs(
        PreprocessedRequest(token_ids=[1]), rid="r", disaggregation_mode="null", dp_rank=None
    )


def test_sglang_adapter_gives_sglang_the_models_image_token() -> None:
    from shared.engine.sglang_engine import restore_image_tokens

    ids = [7, *placeholder_ids(H1, 3), 8]
    assert restore_image_tokens(ids, 151655) == [7, 151655, 151655, 151655, 8]


def _part(url: str) -> ImagePart:
    return ImagePart("messages[0].content[1]", url)


def test_data_urls() -> None:
    png = encode(scene(1))
    assert _data_url(_part(data_url(png)), ImageLimits()) == png
    for url, words in [
        ("data:image/png;base64,@@@@", "corrupt"),
        ("data:image/png,abc", "must be base64"),
        ("data:text/plain;base64,aGVsbG8=", "text/plain"),
        ("data:image/png;base64", "needs a ','"),
    ]:
        with pytest.raises(RequestError, match=words) as err:
            _data_url(_part(url), ImageLimits())
        assert err.value.param == "messages[0].content[1]"
    with pytest.raises(RequestError, match="larger than 100 bytes"):
        _data_url(_part(data_url(png)), ImageLimits(max_bytes=100))


def test_decode_and_fit() -> None:
    wide = encode(scene(2, (448, 224)), "WEBP", lossless=True)
    pixels = fit_image(decode_image(wide, 10**6), 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert pixels[:56].max() == 0 and pixels[-56:].max() == 0  # padded top and bottom
    assert pixels[56:168].mean() > 50
    with pytest.raises(ValueError, match="more than 1000 pixels"):
        decode_image(wide, 1000)
    with pytest.raises(ValueError, match="corrupt"):
        decode_image(encode(scene(3), "JPEG")[:500], 10**6)
    with pytest.raises(ValueError, match="not a PNG"):
        decode_image(encode(scene(3), "GIF"), 10**6)


async def test_link_local_and_metadata_hosts_are_refused_before_connecting() -> None:
    fetcher = ImageFetcher(ImageLimits(fetch_timeout=2))
    try:
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/x.png",
            "http://metadata.google.internal/x",
            "http://[::ffff:169.254.169.254]/x",
        ]:
            with pytest.raises(RequestError, match="link-local or metadata"):
                await fetcher.fetch(_part(url))
    finally:
        await fetcher.close()


def test_image_parts_in_order() -> None:
    req = msgspec.json.decode(
        b'{"model": "m", "messages": [{"role": "user", "content": ['
        b'{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "x"},'
        b'{"type": "image_url", "image_url": {"url": "data:b", "detail": "low"}}]},'
        b'{"role": "user", "content": "plain"}]}',
        type=ChatCompletionRequest,
    )
    parts = image_parts(req)
    assert [(p.where, p.url) for p in parts] == [
        ("messages[0].content[0]", "data:a"),
        ("messages[0].content[2]", "data:b"),
    ]
    assert req.messages[0].text("<img>") == "<img>\nx\n<img>"
    with pytest.raises(RequestError, match="'image_url'"):
        req.messages[0].text()


def test_image_encode_worker_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_multimodal_encode(["--multimodal-encode-worker"])
    assert is_multimodal_encode(["--enable-multimodal", "--disaggregation-mode", "encode"])
    assert not is_multimodal_encode(["--embedding-worker"])
    for argv in (
        ["--multimodal-encode-worker"],
        ["--enable-multimodal", "--disaggregation-mode", "encode"],
        ["--enable-multimodal", "--disaggregation-mode=encode"],
    ):
        cfg = parse_encode_args(argv, env={}, use_sglang=False)
        assert cfg.worker.vision and cfg.engine == "onnxruntime"
        assert cfg.worker.engine.model_name == VISION_MODEL_NAME
        assert cfg.worker.engine.model_path == str(default_vision_model())
        assert cfg.worker.endpoint.component == "encode"
    # A model named on the command line is served under its path (SGLang's default), not
    # under the default ViT's name.
    onnx = str(default_vision_model())
    cfg = parse_encode_args(["--multimodal-encode-worker", "--model-path", onnx], env={},
                            use_sglang=False)  # fmt: skip
    assert cfg.worker.engine.model_name == onnx and cfg.engine == "onnxruntime"


def test_embedding_cache_is_bounded_and_least_recently_used_first_out() -> None:
    from services.processor.images import _Cache

    def tensor(n: int) -> Tensor:
        return from_array(np.zeros((n, 4), np.float32), "float16")  # 8 bytes a row

    cache = _Cache(capacity=100)
    cache.put("a", tensor(5))  # 40 bytes
    cache.put("b", tensor(5))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", tensor(5))  # 120 bytes > 100: b, the least recent, goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.size == 80
    cache.put("huge", tensor(20))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.size == 80


def test_mapping_refuses_forged_image_items() -> None:
    from shared.runtime.errors import InvalidRequestError

    ids = [7, *placeholder_ids(H1, 5), 8]
    five = from_array(np.zeros((5, 4), np.float32), "float16")
    cases = [
        [MultimodalItem(hash=H1, offset=5, length=5, embedding=five)],  # past the prompt
        [MultimodalItem(hash=H1, offset=1, length=4, embedding=five)],  # rows != positions
        [
            MultimodalItem(hash=H1, offset=1, length=5, embedding=five),
            MultimodalItem(
                hash=H2, offset=0, length=1, embedding=from_array(np.zeros((1, 3), np.float32))
            ),
        ],  # two widths
    ]
    for items in cases:
        req = PreprocessedRequest(token_ids=ids, mm_items=items)
        with pytest.raises(InvalidRequestError):
            to_generate_kwargs(req, rid="r", disaggregation_mode="null", dp_rank=None)
