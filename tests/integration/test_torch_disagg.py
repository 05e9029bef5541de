"""Disaggregation with the real KV cache: a prefill torch engine sends the prompt's K/V pages
over TCP, the decode torch engine writes them into its own pool and continues.

- the pages the decode engine holds after the transfer equal, byte for byte, the sender's
  pages for the prompt (the last page's slots past the prompt are zeros on the wire);
- prefill + decode produce the same greedy tokens as one aggregated engine, and the same
  seeded samples (draws depend on the seed and the token's position only);
- the first token's logprob travels with the KV;
- a prefill and a decode whose caches differ (float32 vs bfloat16) fail the request on both
  sides with a message naming both layouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.real_model import PROMPTS, chat_ids, model_dir

torch = pytest.importorskip("torch")

from shared.engine.pytorch.engine import TorchConfig, TorchEngine  # noqa: E402

TOKENS = 24


@pytest.fixture
async def engines() -> AsyncIterator[Any]:
    started: list[TorchEngine] = []

    async def make(mode: str = "null", **overrides: Any) -> TorchEngine:
        config: dict[str, Any] = {
            "model_path": str(model_dir()),
            "max_total_tokens": 8192,
            "disaggregation_mode": mode,
            "bootstrap_port": 0,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_timeout": 20.0,
        }
        config.update(overrides)
        engine = TorchEngine(TorchConfig(**config))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.shutdown()


async def collect(stream: AsyncIterator[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
    ids: list[int] = []
    meta: dict[str, Any] = {}
    lps: list[float] = []
    async for item in stream:
        ids.extend(item["output_ids"])
        meta = item["meta_info"]
        lps.extend(lp for lp, _, _ in meta.get("output_token_logprobs", ()))
    meta["logprobs"] = lps
    return ids, meta


async def disaggregated(
    prefill: TorchEngine, decode: TorchEngine, prompt: list[int], room: int, **params: Any
) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
    info = prefill.info
    leg: dict[str, Any] = {
        "input_ids": prompt,
        "bootstrap_host": info.bootstrap_host,
        "bootstrap_port": info.bootstrap_port,
        "bootstrap_room": room,
        "return_logprob": True,
    }
    (_, pmeta), (ids, dmeta) = await asyncio.gather(
        collect(
            prefill.async_generate(
                sampling_params={"max_new_tokens": 1, **params}, rid=f"p{room}", **leg
            )
        ),
        collect(
            decode.async_generate(
                sampling_params={"max_new_tokens": TOKENS, **params}, rid=f"d{room}", **leg
            )
        ),
    )
    return ids, dmeta, pmeta


async def test_decode_receives_the_prefill_pages_and_continues_exactly(engines: Any) -> None:
    agg = await engines()
    prefill = await engines("prefill")
    decode = await engines("decode")
    prompts = [chat_ids(p) for p in PROMPTS[:6]] + [chat_ids(PROMPTS[-1])]
    greedy = {"temperature": 0, "ignore_eos": True}
    sampled = {"temperature": 0.9, "top_p": 0.95, "sampling_seed": 1234, "ignore_eos": True}
    for params in (greedy, sampled):
        want = await asyncio.gather(
            *(
                collect(
                    agg.async_generate(
                        input_ids=p,
                        sampling_params={"max_new_tokens": TOKENS, **params},
                        rid=f"a{i}-{len(params)}",
                        return_logprob=True,
                    )
                )
                for i, p in enumerate(prompts)
            )
        )
        got = await asyncio.gather(
            *(
                disaggregated(prefill, decode, p, 1000 * len(params) + i, **params)
                for i, p in enumerate(prompts)
            )
        )
        for (ids, _), (dids, dmeta, _) in zip(want, got, strict=True):
            assert dids == ids
            assert dmeta["cached_tokens"] == 0 and dmeta["completion_tokens"] == TOKENS
        # The first token's logprob came with the KV: the same as the aggregated engine's.
        for (_, meta), (_, dmeta, _) in zip(want, got, strict=True):
            assert dmeta["logprobs"][0] == pytest.approx(meta["logprobs"][0], abs=1e-4)
    sender = prefill.bootstrap_server
    receiver = decode.kv_receiver
    assert sender is not None and receiver is not None
    assert sender.transfers_ok == receiver.transfers_ok == 2 * len(prompts)
    pages = sum(-(-len(p) // 16) for p in prompts)
    assert receiver.bytes_transferred == 2 * pages * prefill.runners[0].kv_nbytes(16)


async def test_received_pages_equal_the_senders(engines: Any) -> None:
    prefill = await engines("prefill")
    decode = await engines("decode")
    prompt = chat_ids(PROMPTS[-2])
    captured: dict[str, Any] = {}
    runner = decode.runners[0]
    original = runner.kv_import

    def keep(req: Any, sink: Any) -> None:
        original(req, sink)
        captured["pages"] = list(req.page_table)
        captured["wire"] = sink.data.clone()

    runner.kv_import = keep  # type: ignore[method-assign]
    sent: dict[str, Any] = {}
    sender_runner = prefill.runners[0]
    export = sender_runner.kv_export

    def remember(req: Any, num_tokens: int) -> Any:
        sent["pages"] = list(req.page_table)
        return export(req, num_tokens)

    sender_runner.kv_export = remember  # type: ignore[method-assign]
    ids, _, _ = await disaggregated(prefill, decode, prompt, 77, temperature=0, ignore_eos=True)
    assert len(ids) == TOKENS
    n = len(prompt)
    src = prefill.runners[0].cache.read(sent["pages"], n)  # type: ignore[attr-defined]
    dst = decode.runners[0].cache.read(captured["pages"], n)  # type: ignore[attr-defined]
    assert torch.equal(captured["wire"], src)  # the bytes on the wire are the sender's pages
    assert torch.equal(dst, src)  # ... and the receiver's pages now hold them
    # Page-aligned, the tail of the last page zeroed: no other request's KV leaves the engine.
    tail = src.reshape(src.shape[0], 2, -1, *src.shape[4:])[:, :, n:]
    assert tail.numel() and not tail.any()


async def test_a_layout_mismatch_fails_both_legs_clearly(engines: Any) -> None:
    prefill = await engines("prefill")
    decode = await engines("decode", dtype="bfloat16")
    ids, dmeta, pmeta = await disaggregated(prefill, decode, chat_ids(PROMPTS[0]), 5, temperature=0)
    assert ids == []
    for meta in (dmeta, pmeta):
        message = meta["finish_reason"]["message"]
        assert "KV layout mismatch" in message
        assert "float32" in message and "bfloat16" in message
    # Both engines keep serving.
    again = await collect(
        decode.async_generate(
            input_ids=[1, 2, 3],
            sampling_params={"max_new_tokens": 2, "ignore_eos": True},
            rid="local",
            bootstrap_host="2.2.2.2",
            bootstrap_port=1,
            bootstrap_room=0,
        )
    )
    assert len(again[0]) == 2
