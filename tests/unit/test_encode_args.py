"""The encode service's command line, and the processor's embedding preprocessing with the real
all-MiniLM-L6-v2 tokenizer (limits, truncation as sentence-transformers truncates, token-id
checks, how batches are cut into parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.discovery import EmbeddingInfo, ModelCard, WorkerType
from proto.embedding import EmbeddingRequest
from proto.openai import RequestError
from services.encode.args import parse_encode_args
from services.processor import embeddings
from services.processor.embeddings import _parts, embedding_response, tokenize_inputs
from services.processor.preprocess import ModelPreprocessor
from sglmesh.worker import main as worker_main
from shared.embedding_model import prepare_embedding_model
from shared.worker.args import parse_worker_args


@pytest.fixture(scope="module")
def minilm() -> Path:
    return prepare_embedding_model()


def test_encode_flags_env_twins_and_role(minilm: Path) -> None:
    config = parse_encode_args(
        ["--model-path", str(minilm), "--embedding-max-batch-size", "8"],
        env={"SGLMESH_EMBEDDING_BATCH_WAIT_MS": "2.5", "SGLMESH_NAMESPACE": "ns"},
        use_sglang=False,
    )
    assert config.limits.max_batch_size == 8
    assert config.limits.max_wait == pytest.approx(0.0025)
    assert config.limits.max_batch_tokens == 16384
    worker = config.worker
    assert worker.role == "encode" and worker.engine.is_embedding
    assert str(worker.endpoint) == "ns.encode.generate"
    assert config.engine == "torch"


def test_embedding_worker_flag_is_taken_off_before_sglangs_parser(minilm: Path) -> None:
    config = parse_worker_args(
        ["--embedding-worker", "--model-path", str(minilm)], role="encode", env={},
        use_sglang=False,
    )  # fmt: skip
    assert config.engine.is_embedding and config.role == "encode"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--engine", "sim"], "--engine sim generates tokens only"),
        (["--embedding-max-batch-tokens", "0"], "--embedding-max-batch-tokens"),
        (["--json-model-override-args", "[1]"], "--json-model-override-args"),
        (["--json-model-override-args", "{bad"], "--json-model-override-args"),
        (["--multimodal-encode-worker"], "takes the vision encoder's .onnx file"),
        (["--multimodal-encode-worker", "--engine", "sim"], "an image encode worker runs sglang"),
        (["--multimodal-encode-worker", "--engine", "sglang"], "--engine sglang needs"),
    ],
)
def test_bad_command_lines_are_one_clear_line(
    minilm: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_encode_args(["--model-path", str(minilm), *argv], env={}, use_sglang=False)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in last


def test_llm_entry_points_send_encoder_flags_to_the_encode_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_worker_args(["--embedding-worker"], env={}, use_sglang=False)
    assert "sglmesh encode" in capsys.readouterr().err
    # `sglmesh worker --embedding-worker --help` shows the encode service's own help.
    with pytest.raises(SystemExit) as exc:
        worker_main(["--embedding-worker", "--help"])
    assert exc.value.code == 0
    assert "--embedding-max-batch-size" in capsys.readouterr().out


# -- the processor's side ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pre(minilm: Path) -> ModelPreprocessor:
    card = ModelCard(name="m", model_path=str(minilm), worker_type=WorkerType.EMBEDDING)
    return ModelPreprocessor.from_card(card)


INFO = EmbeddingInfo(dimensions=384, max_input_tokens=256, vocab_size=30522)


def _req(**body: object) -> EmbeddingRequest:
    return EmbeddingRequest(model="m", **body)  # type: ignore[arg-type]


async def test_text_is_tokenized_exactly_and_truncated_keeping_special_tokens(
    pre: ModelPreprocessor,
) -> None:
    # The tokenizer.json pads to 128; the processor turns that off.
    (ids,) = await tokenize_inputs(pre, INFO, _req(input="Hello world"))
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == 4  # [CLS] hello world [SEP]
    long = "word " * 600
    with pytest.raises(RequestError, match="602 tokens, over model 'm''s limit of 256"):
        await tokenize_inputs(pre, INFO, _req(input=long))
    (cut,) = await tokenize_inputs(pre, INFO, _req(input=long, truncate_prompt_tokens=-1))
    assert len(cut) == 256 and cut[0] == 101 and cut[-1] == 102
    (short,) = await tokenize_inputs(pre, INFO, _req(input=long, truncate_prompt_tokens=5))
    assert short == [101, *[2773] * 3, 102]
    with pytest.raises(RequestError, match="truncate_prompt_tokens 300"):
        await tokenize_inputs(pre, INFO, _req(input="hi", truncate_prompt_tokens=300))


async def test_token_inputs_are_checked_and_truncated(pre: ModelPreprocessor) -> None:
    assert await tokenize_inputs(pre, INFO, _req(input=[101, 7592, 102])) == [[101, 7592, 102]]
    with pytest.raises(RequestError, match="30522") as exc:
        await tokenize_inputs(pre, INFO, _req(input=[[101], [101, 30522]]))
    assert exc.value.param == "input[1]"
    cut = await tokenize_inputs(pre, INFO, _req(input=[[1] * 300], truncate_prompt_tokens=7))
    assert cut == [[1] * 7]


async def test_counts_empty_strings_and_dimensions(pre: ModelPreprocessor) -> None:
    with pytest.raises(RequestError, match="at most 2048"):
        await tokenize_inputs(pre, INFO, _req(input=["a"] * 2049))
    with pytest.raises(RequestError, match="empty string") as exc:
        await tokenize_inputs(pre, INFO, _req(input=["a", ""]))
    assert exc.value.param == "input[1]"
    with pytest.raises(RequestError, match="not a Matryoshka") as exc:
        await tokenize_inputs(pre, INFO, _req(input="a", dimensions=8))
    assert exc.value.param == "dimensions"


def test_large_batches_are_cut_into_bounded_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embeddings, "PART_INPUTS", 3)
    monkeypatch.setattr(embeddings, "PART_TOKENS", 10)
    batches = [[1] * n for n in (2, 2, 2, 2, 9, 1, 1)]
    parts = _parts(batches)
    assert [start for start, _ in parts] == [0, 3, 4, 6]
    assert [len(p) for _, p in parts] == [3, 1, 2, 1]
    assert [ids for _, p in parts for ids in p] == batches


def test_response_encodings() -> None:
    vector = bytes.fromhex("0000803f000000c0")  # 1.0, -2.0 as little-endian float32
    floats = embedding_response(_req(input="a"), "m", [vector], 3)
    assert floats.data[0].embedding == [1.0, -2.0]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 3
    b64 = embedding_response(_req(input="a", encoding_format="base64"), "m", [vector], 3)
    assert b64.data[0].embedding == "AACAPwAAAMA="
