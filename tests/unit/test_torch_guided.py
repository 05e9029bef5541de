"""Guided decoding on the real model (SmolLM2): the grammar decides, the model fills it in.

- 20 sampled requests with a JSON schema (nested objects, arrays, enums, required fields) all
  parse and validate, and the same requests without the schema mostly do not;
- a regex and a GBNF grammar are followed; bad specs end with a 400 and the engine serves on;
- constrained rows leave the unconstrained rows of the same batch exactly as they were;
- retraction (a pool too small for the batch) and chunked prefill keep every output valid;
- prefill -> decode disaggregation: the decode engine's matcher picks up from the token the
  prefill engine sampled.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.real_model import chat_ids, model_dir, tokenizer

torch = pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from shared.engine.pytorch.engine import TorchConfig, TorchEngine  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 12},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "role", "address", "skills"],
    "additionalProperties": False,
}
SPEC = json.dumps(SCHEMA)
PROMPTS = [
    f"Give me a JSON profile of {who}."
    for who in (
        "a librarian",
        "a pilot",
        "a chef in Paris",
        "a software developer",
        "a nurse",
        "a gardener",
        "a student",
        "a painter",
        "a baker",
        "a teacher in Rome",
    )
]
MAX_TOKENS = 80


def prompt(i: int) -> list[int]:
    return chat_ids([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])


def text(ids: list[int]) -> str:
    return str(tokenizer().decode(ids, skip_special_tokens=True))


def valid(output: str) -> bool:
    try:
        jsonschema.validate(json.loads(output), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def generate(
    engine: TorchEngine, ids: list[int], rid: str, leg: dict[str, Any] | None = None, **params: Any
) -> tuple[list[int], dict[str, Any]]:
    out: list[int] = []
    meta: dict[str, Any] = {}
    async for item in engine.async_generate(
        input_ids=ids,
        sampling_params={"max_new_tokens": MAX_TOKENS, **params},
        rid=rid,
        **(leg or {}),
    ):
        out.extend(item["output_ids"])
        meta = item["meta_info"]
    return out, meta


@pytest.fixture
async def engines() -> AsyncIterator[Any]:
    started: list[TorchEngine] = []

    async def make(**overrides: Any) -> TorchEngine:
        config: dict[str, Any] = {"model_path": str(model_dir()), "max_total_tokens": 8192}
        config.update(overrides)
        engine = TorchEngine(TorchConfig(**config))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.shutdown()


async def test_json_schema_holds_for_sampled_outputs_and_is_what_makes_them_valid(
    engines: Any,
) -> None:
    engine = await engines()
    params = {"temperature": 0.8, "sampling_seed": 7}
    guided, free = await asyncio.gather(
        asyncio.gather(
            *(generate(engine, prompt(i), f"g{i}", json_schema=SPEC, **params) for i in range(20))
        ),
        asyncio.gather(*(generate(engine, prompt(i), f"f{i}", **params) for i in range(20))),
    )
    for ids, meta in guided:
        assert valid(text(ids)), text(ids)
        assert meta["finish_reason"] == {"type": "stop", "matched": 2}, meta
    assert sum(valid(text(ids)) for ids, _ in free) <= 5
    backend = engine.grammar_backend
    assert backend is not None and backend.cache_info() == (1, 19)  # compiled once


async def test_regex_ebnf_and_bad_specs(engines: Any) -> None:
    engine = await engines()
    ids, meta = await generate(
        engine, prompt(0), "re", temperature=0.8, regex=r"(yes|no), [0-9]{3}-[A-Z]{2}"
    )
    assert re.fullmatch(r"(yes|no), [0-9]{3}-[A-Z]{2}", text(ids)), text(ids)
    assert meta["finish_reason"]["type"] == "stop"
    # Logprobs come from the masked distribution: finite for every chosen token, and the
    # allowed alternatives share all the mass (the first token: "yes", "no" or a prefix).
    async for item in engine.async_generate(
        input_ids=prompt(0),
        sampling_params={"max_new_tokens": 8, "temperature": 0, "regex": "(yes|no)!"},
        rid="lp",
        stream=False,
        return_logprob=True,
        top_logprobs_num=5,
    ):
        chosen = [lp for lp, _, _ in item["meta_info"]["output_token_logprobs"]]
        assert all(-30.0 < lp <= 0.0 for lp in chosen), chosen
        first = [lp for lp, _, _ in item["meta_info"]["output_top_logprobs"][0] if lp > -1e30]
        assert abs(sum(math.exp(lp) for lp in first) - 1.0) < 1e-3, first
    grammar = 'root ::= animal " x" count\nanimal ::= "cat" | "dog"\ncount ::= [1-9] [0-9]?'
    ids, _ = await generate(engine, prompt(1), "ebnf", temperature=0.8, ebnf=grammar)
    assert re.fullmatch(r"(cat|dog) x[1-9][0-9]?", text(ids)), text(ids)
    bad = {
        "json_schema": ('{"type": "objec"}', "invalid json_schema"),
        "regex": ("[a-z", "invalid regex"),
        "ebnf": ('root ::= "a" missing', "invalid ebnf"),
        "structural_tag": ('{"structures": 3}', "structural_tag must be"),
    }
    for key, (spec, message) in bad.items():
        out, meta = await generate(engine, prompt(2), f"bad-{key}", **{key: spec})
        assert out == [] and meta["finish_reason"]["status_code"] == 400, meta
        assert message in meta["finish_reason"]["message"]
        assert "\n" not in meta["finish_reason"]["message"]
    ids, meta = await generate(engine, prompt(3), "after", temperature=0, max_new_tokens=4)
    assert len(ids) == 4 and meta["finish_reason"]["type"] == "length"


async def test_a_stuck_grammar_ends_the_request_with_an_error(engines: Any) -> None:
    # "yes" completes the grammar, which then allows only eos; min_new_tokens forbids eos,
    # so no token fits: the request must end with an error naming guided decoding, not
    # sample past the mask to its limit. A guided row beside it and the engine go on.
    engine = await engines()
    (stuck, meta), (ok, ok_meta) = await asyncio.gather(
        generate(engine, prompt(0), "stuck", temperature=0, regex="yes", min_new_tokens=8),
        generate(engine, prompt(1), "ok", temperature=0, regex="(yes|no)!"),
    )
    reason = meta["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 500, meta
    assert reason["message"].startswith("guided decoding could not continue"), reason
    assert len(stuck) < 8 and text(stuck).startswith("yes"), text(stuck)
    assert re.fullmatch(r"(yes|no)!", text(ok)) and ok_meta["finish_reason"]["type"] == "stop"
    ids, meta = await generate(engine, prompt(3), "after", temperature=0, max_new_tokens=4)
    assert len(ids) == 4 and meta["finish_reason"]["type"] == "length"


async def test_constrained_rows_leave_the_others_alone(engines: Any) -> None:
    engine = await engines()
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    alone = await asyncio.gather(*(generate(engine, prompt(i), f"a{i}", **greedy) for i in (0, 1)))
    mixed = await asyncio.gather(
        *(generate(engine, prompt(i), f"m{i}", **greedy) for i in (0, 1)),
        *(generate(engine, prompt(i), f"j{i}", json_schema=SPEC, temperature=0) for i in (2, 3)),
    )
    assert [ids for ids, _ in mixed[:2]] == [ids for ids, _ in alone]
    assert all(valid(text(ids)) for ids, _ in mixed[2:])


async def test_retraction_and_chunked_prefill_keep_outputs_valid(engines: Any) -> None:
    # Room for one request's whole sequence and little more: as the admission reserve decays,
    # a second request gets in and one of the two is retracted while decoding.
    longest = max(len(prompt(i)) for i in range(6)) + MAX_TOKENS
    engine = await engines(max_total_tokens=longest + 32, page_size=16, chunked_prefill_size=16)
    params = {"temperature": 0.8, "sampling_seed": 3, "json_schema": SPEC}
    results = await asyncio.gather(
        *(generate(engine, prompt(i), f"r{i}", **params) for i in range(6))
    )
    for ids, _ in results:
        assert valid(text(ids)), text(ids)
    assert engine.schedulers[0].stats.retractions > 0


async def test_disaggregated_prefill_and_decode_follow_one_schema(engines: Any) -> None:
    prefill = await engines(
        disaggregation_mode="prefill", bootstrap_port=0, bootstrap_host="127.0.0.1"
    )
    decode = await engines(disaggregation_mode="decode", bootstrap_timeout=20.0)
    info = prefill.info
    params = {"temperature": 0.8, "sampling_seed": 11, "json_schema": SPEC}

    async def one(i: int) -> str:
        leg: dict[str, Any] = {
            "bootstrap_host": info.bootstrap_host,
            "bootstrap_port": info.bootstrap_port,
            "bootstrap_room": 500 + i,
        }
        (first, _), (ids, _) = await asyncio.gather(
            generate(prefill, prompt(i), f"p{i}", leg, **{**params, "max_new_tokens": 1}),
            generate(decode, prompt(i), f"d{i}", leg, **params),
        )
        assert ids[:1] == first
        return text(ids)

    outputs = await asyncio.gather(*(one(i) for i in range(4)))
    for output in outputs:
        assert valid(output), output


def test_structural_tag_constrains_the_tagged_json_only() -> None:
    from shared.engine.pytorch.grammar import make_backend

    backend = make_backend("llguidance", str(model_dir()), 49152, [2])
    spec = json.dumps(
        {
            "type": "structural_tag",
            "structures": [
                {
                    "begin": "<function=get_weather>",
                    "schema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "end": "</function>",
                }
            ],
            "triggers": ["<function="],
        }
    )

    def follows(output: str) -> bool:
        matcher = backend.matcher("structural_tag", spec)
        ids = tokenizer().encode(output, add_special_tokens=False)
        return all(matcher.consume(t) for t in ids)

    assert follows('Checking. <function=get_weather>{"city": "Paris"}</function> Done.')
    assert not follows('Checking. <function=get_weather>{"town": 3}')
    assert backend.cache_info() == (1, 1)
