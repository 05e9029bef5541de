"""Chat templating, tokenization and request mapping (services/processor/preprocess.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, processors

from proto.discovery import ModelCard
from proto.openai import ChatCompletionRequest, CompletionRequest, RequestError, decode_request
from services.processor.preprocess import ModelPreprocessor, PreprocessorLoadError
from shared.model import default_cache_dir, make_test_tokenizer

CHAT = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello world"}]
CHATML = (
    "<|im_start|>system\nbe nice<|im_end|>\n"
    "<|im_start|>user\nhello world<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pre(tok_dir: Path) -> ModelPreprocessor:
    return ModelPreprocessor.from_card(
        ModelCard(name="test-model", model_path=str(tok_dir), eos_token_ids=[2], mdc_sum="abc")
    )


def chat_req(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "test-model", "messages": CHAT, **fields}
    return decode_request(json.dumps(body).encode(), ChatCompletionRequest)


def completion_req(**fields: Any) -> CompletionRequest:
    body = {"model": "test-model", "prompt": "hello world", **fields}
    return decode_request(json.dumps(body).encode(), CompletionRequest)


def test_renders_chatml(pre: ModelPreprocessor) -> None:
    assert pre.has_chat_template
    assert pre.render_chat(decode_chat_messages()) == CHATML
    assert pre.render_chat(CHAT, add_generation_prompt=False) == CHATML.rsplit("<|im_start|>", 1)[0]
    assert pre.bos_token == "<|im_start|>"
    assert pre.eos_token == "<|im_end|>"
    assert pre.context_length == 2048


def decode_chat_messages() -> list[Any]:
    return chat_req().messages


def test_custom_template_file_overrides(tok_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom.jinja"
    custom.write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    card = ModelCard(name="m", model_path=str(tok_dir), custom_template_path=str(custom))
    pre = ModelPreprocessor.from_card(card)
    assert pre.render_chat(CHAT) == "[system] be nice\n[user] hello world\n[assistant]"
    # Explicit template text beats the card's file.
    pre = ModelPreprocessor.from_card(card, custom_template="{{ messages|length }}")
    assert pre.render_chat(CHAT) == "2"


def test_template_sources(tok_dir: Path, tmp_path: Path) -> None:
    # chat_template.jinja beside the tokenizer beats tokenizer_config.json.
    own = tmp_path / "own"
    make_test_tokenizer(own)
    (own / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    pre = ModelPreprocessor.from_card(ModelCard(name="m", model_path=str(own)))
    assert pre.render_chat(CHAT) == "jinja:be nice"
    # A list of named templates: "default" is used.
    named = tmp_path / "named"
    make_test_tokenizer(named)
    cfg = json.loads((named / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default:{{ bos_token }}"},
    ]
    (named / "tokenizer_config.json").write_text(json.dumps(cfg))
    pre = ModelPreprocessor.from_card(ModelCard(name="m", tokenizer_path=str(named)))
    assert pre.render_chat(CHAT) == "default:<|im_start|>"
    # No template at all: chat is refused, completions still work.
    cfg.pop("chat_template")
    (named / "tokenizer_config.json").write_text(json.dumps(cfg))
    pre = ModelPreprocessor.from_card(ModelCard(name="m", tokenizer_path=str(named)))
    assert not pre.has_chat_template
    with pytest.raises(RequestError, match="no chat template"):
        pre.preprocess_chat(chat_req())
    assert pre.preprocess_completion(completion_req())[0].token_ids


def test_load_errors(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(PreprocessorLoadError, match=r"tokenizer\.json"):
        ModelPreprocessor.from_card(ModelCard(name="m", model_path=str(tmp_path)))
    with pytest.raises(PreprocessorLoadError, match="does not compile"):
        ModelPreprocessor.from_card(
            ModelCard(name="m", model_path=str(tok_dir)), custom_template="{% for %}"
        )


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
        "{% set x = messages.append(1) %}",
        "{{ messages.clear() }}",
    ],
)
def test_sandbox_blocks_escapes(tok_dir: Path, template: str) -> None:
    pre = ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(tok_dir)), custom_template=template
    )
    with pytest.raises(RequestError) as info:
        pre.render_chat(CHAT)
    assert info.value.status == 400
    assert "pwned" not in info.value.message


def test_raise_exception_and_tojson(tok_dir: Path) -> None:
    pre = ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(tok_dir)),
        custom_template=(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first!') }}{% endif %}"
            "{{ messages|tojson }}"
        ),
    )
    with pytest.raises(RequestError, match="user first!"):
        pre.render_chat(CHAT)
    out = pre.render_chat([{"role": "user", "content": "<é>"}])
    assert json.loads(out) == [{"role": "user", "content": "<é>"}]


def test_preprocess_chat_fields(pre: ModelPreprocessor) -> None:
    req = chat_req(
        max_completion_tokens=20,
        max_tokens=5,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        seed=42,
        n=2,
        stop=["world", "end"],
        stop_token_ids=[2],
        min_tokens=3,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=4,
    )
    out = pre.preprocess_chat(req)
    assert out.model == "test-model"
    assert out.token_ids == pre.encode(CHATML, add_special_tokens=False)
    assert out.token_ids[0] == 1  # <|im_start|>, once
    sc = out.stop_conditions
    assert (sc.max_tokens, sc.stop, sc.stop_token_ids) == (20, ["world", "end"], [2])
    assert (sc.min_tokens, sc.ignore_eos) == (3, True)
    so = out.sampling_options
    assert (so.temperature, so.top_p, so.top_k, so.min_p) == (0.7, 0.9, -1, 0.1)
    assert (so.presence_penalty, so.frequency_penalty, so.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (so.seed, so.n) == (42, 2)
    assert out.output_options.logprobs == 4
    assert out.eos_token_ids == [2]
    assert out.mdc_sum == "abc"


def test_preprocess_chat_defaults(pre: ModelPreprocessor) -> None:
    out = pre.preprocess_chat(chat_req())
    assert out.stop_conditions.max_tokens == 2048 - len(out.token_ids)
    assert out.stop_conditions.stop is None
    assert out.sampling_options.temperature is None
    assert out.output_options.logprobs is None
    assert pre.preprocess_chat(chat_req(logprobs=True)).output_options.logprobs == 0


def test_preprocess_completion(pre: ModelPreprocessor) -> None:
    [out] = pre.preprocess_completion(completion_req(max_tokens=8, logprobs=2, stop="x"))
    assert out.token_ids == pre.tokenizer.encode("hello world").ids
    assert out.stop_conditions.max_tokens == 8
    assert out.stop_conditions.stop == ["x"]
    assert out.output_options.logprobs == 2
    assert out.eos_token_ids == [2]

    outs = pre.preprocess_completion(completion_req(prompt=["hello", "world"]))
    assert [o.token_ids for o in outs] == [pre.encode("hello"), pre.encode("world")]
    [out] = pre.preprocess_completion(completion_req(prompt=[5, 6, 7]))
    assert out.token_ids == [5, 6, 7]
    outs = pre.preprocess_completion(completion_req(prompt=[[5], [6, 7]]))
    assert [o.token_ids for o in outs] == [[5], [6, 7]]


def test_tokenized_apart_the_requests_are_the_same(pre: ModelPreprocessor) -> None:
    """What the processor does for a small request (the prompt rendered on the loop, the
    tokenizer on a thread, the request built from its ids) gives what one call gives."""
    for req in (chat_req(), chat_req(logprobs=True, top_logprobs=2, stop=["x"])):
        ids = pre.encode(pre.chat_prompt(req), add_special_tokens=False)
        assert pre.chat_request(req, ids) == pre.preprocess_chat(req)
    creq = completion_req(prompt=["hello", "world"], max_tokens=4)
    texts = pre.completion_texts(creq)
    assert texts == ["hello", "world"]
    encoded = pre.encode_all(texts)
    assert pre.preprocess_completion(creq, encoded) == pre.preprocess_completion(creq)
    ids = completion_req(prompt=[5, 6])
    assert pre.completion_texts(ids) == []
    assert pre.preprocess_completion(ids, []) == pre.preprocess_completion(ids)
    with pytest.raises(RequestError, match="empty"):
        pre.chat_request(chat_req(), [])
    with pytest.raises(RequestError, match="empty"):
        pre.preprocess_completion(completion_req(prompt=["a", ""]), pre.encode_all(["a"]))


def test_completion_token_ids_validated(pre: ModelPreprocessor) -> None:
    with pytest.raises(RequestError, match="vocabulary") as info:
        pre.preprocess_completion(completion_req(prompt=[5, pre.vocab_size]))
    assert info.value.param == "prompt"
    with pytest.raises(RequestError) as info:
        pre.preprocess_completion(completion_req(prompt=[[5], [10**6]]))
    assert info.value.param == "prompt[1]"
    with pytest.raises(RequestError) as info:
        pre.preprocess_chat(chat_req(stop_token_ids=[10**6]))
    assert info.value.param == "stop_token_ids"


def test_empty_prompt(pre: ModelPreprocessor) -> None:
    prompts: list[Any] = ["", [[]], ["a", ""]]
    for prompt in prompts:
        with pytest.raises(RequestError, match="empty") as info:
            pre.preprocess_completion(completion_req(prompt=prompt))
        assert info.value.status == 400
    empty = ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(pre.card.model_path)), custom_template=""
    )
    with pytest.raises(RequestError, match="empty"):
        empty.preprocess_chat(chat_req())


def test_context_length_overflow(tok_dir: Path) -> None:
    pre = ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(tok_dir), context_length=30)
    )
    prompt_len = len(pre.preprocess_chat(chat_req()).token_ids)
    with pytest.raises(RequestError) as info:
        pre.preprocess_chat(chat_req(max_tokens=30))
    msg = info.value.message
    assert info.value.status == 400
    assert "maximum context length is 30 tokens" in msg
    assert f"you requested {prompt_len + 30} tokens" in msg
    assert f"({prompt_len} in the prompt, 30 for the completion)" in msg
    # Exactly filling the context is fine.
    out = pre.preprocess_chat(chat_req(max_tokens=30 - prompt_len))
    assert out.stop_conditions.max_tokens == 30 - prompt_len
    # A prompt that fills the context leaves no room even without max_tokens.
    with pytest.raises(RequestError) as info:
        pre.preprocess_completion(completion_req(prompt=list(range(5, 35))))
    assert "30" in info.value.message
    assert info.value.param == "prompt"


def test_context_length_from_card_beats_tokenizer_config(tok_dir: Path) -> None:
    pre = ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(tok_dir), context_length=100)
    )
    assert pre.context_length == 100
    # eos from generation_config.json when the card has none.
    assert ModelPreprocessor.from_card(
        ModelCard(name="m", model_path=str(tok_dir))
    ).eos_token_ids == [2]


def test_bos_not_doubled(tmp_path: Path) -> None:
    directory = make_test_tokenizer(tmp_path / "bos")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    tok.save(str(directory / "tokenizer.json"))
    pre = ModelPreprocessor.from_card(ModelCard(name="m", model_path=str(directory)))
    assert pre.encode("hello")[0] == 1
    assert pre.encode("<|im_start|> hello") == pre.encode("hello")
    assert pre.encode("hello", add_special_tokens=False)[0] != 1
    # Chat: the template writes BOS itself; the tokenizer adds none.
    out = pre.preprocess_chat(chat_req())
    assert out.token_ids[:2] != [1, 1]


_REAL_MODEL = default_cache_dir() / "smollm2-135m-instruct"


@pytest.mark.skipif(
    not (_REAL_MODEL / "tokenizer.json").is_file(), reason="default model not prepared"
)
def test_real_model_template() -> None:
    pre = ModelPreprocessor.from_card(ModelCard(name="smol", model_path=str(_REAL_MODEL)))
    text = pre.render_chat([{"role": "user", "content": "Hello"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    out = pre.preprocess_chat(chat_req())
    assert out.token_ids[0] == pre.tokenizer.token_to_id("<|im_start|>")
    assert out.eos_token_ids
    assert pre.context_length == 8192
