"""The torch engine against transformers itself: the same weights, greedy, token for token.

The reference is transformers' own ``LlamaForCausalLM.generate(do_sample=False)`` with its own
KV cache (never our pages), fp32, over the 20 chat prompts of ``tests/real_model.py``, 64
tokens each, never stopping at eos. Our engine must produce the same ids:

- one request alone; all 20 at once (mixed lengths in one batch); with chunked prefill far
  smaller than the prompts; with a KV pool so small that it evicts and retracts; and a second
  time through a warm prefix cache (``cached_tokens`` > 0, same tokens).

Where a sequence diverges, the test passes only if transformers' own top two logits at that
step are within 1e-4 of each other (a true tie in fp32, where summation order decides), and it
counts such ties; the rest of that sequence is not compared. Logprobs of the greedy tokens
must match transformers' within 1e-3.

bfloat16 (``--dtype bfloat16``) is held to its own tolerance: against transformers' generate in
bfloat16, a divergence must be a tie within 4 bfloat16 ulps of the top logit (its 8-bit
mantissa makes logits ~20 apart by steps of 0.125).

The model is loaded once per process and shared by the engines of every mode.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.real_model import PROMPTS, chat_ids, model_dir

torch = pytest.importorskip("torch")

from shared.engine.pytorch.engine import TorchConfig, TorchEngine  # noqa: E402

# 20 x 64 tokens per mode on two cores that the rest of the suite shares.
pytestmark = pytest.mark.timeout(600)

TOKENS = 64
TIE = 1e-4


@dataclass
class Reference:
    ids: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each step
    logprobs: list[float]  # of the chosen token at each step
    tie: list[float]  # a gap this small (or smaller) at a step is a tie


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [chat_ids(p) for p in PROMPTS]


def transformers_greedy(prompts: list[list[int]], dtype: Any) -> list[Reference]:
    """transformers' greedy generate, batched with left padding, its scores kept."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir()), dtype=dtype, local_files_only=True
    )
    model.eval()
    pad = 0
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
    refs = []
    scores = torch.stack(out.scores, dim=1).float()  # [prompts, steps, vocab]
    for row in range(len(prompts)):
        generated = out.sequences[row, longest:].tolist()
        top2 = torch.topk(scores[row], 2, dim=-1).values
        lps = torch.log_softmax(scores[row], dim=-1)
        if dtype == torch.bfloat16:
            # 4 bf16 ulps of the top logit: 2^(exponent - 7) each.
            ulps = torch.exp2(torch.floor(torch.log2(top2[:, 0].abs())) - 7)
            tie = (4 * ulps).tolist()
        else:
            tie = [TIE] * len(generated)
        refs.append(
            Reference(
                ids=generated,
                gaps=(top2[:, 0] - top2[:, 1]).tolist(),
                logprobs=[float(lps[k, t]) for k, t in enumerate(generated)],
                tie=tie,
            )
        )
    del model
    return refs


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]]) -> list[Reference]:
    return transformers_greedy(prompts, torch.float32)


def compare(outputs: list[list[int]], refs: list[Reference]) -> int:
    """Assert every output equals its reference up to a true tie; the number of ties met."""
    ties = 0
    for i, (ours, ref) in enumerate(zip(outputs, refs, strict=True)):
        assert len(ours) == TOKENS, (i, len(ours))
        for k, (a, b) in enumerate(zip(ours, ref.ids, strict=True)):
            if a != b:
                assert ref.gaps[k] <= ref.tie[k], (
                    f"prompt {i} diverges at token {k} ({a} vs transformers' {b}) although "
                    f"transformers' top two logits differ by {ref.gaps[k]:.2e} "
                    f"(a tie is <= {ref.tie[k]:.2e})"
                )
                ties += 1
                break
    return ties


@pytest.fixture
async def engine_factory() -> AsyncIterator[Any]:
    engines: list[TorchEngine] = []

    async def make(**overrides: Any) -> TorchEngine:
        config: dict[str, Any] = {
            "model_path": str(model_dir()),
            "max_total_tokens": 32768,
            "random_seed": 0,
        }
        config.update(overrides)
        engine = TorchEngine(TorchConfig(**config))
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


async def generate(
    engine: TorchEngine, prompt: list[int], rid: str, *, logprobs: bool = False
) -> tuple[list[int], dict[str, Any]]:
    ids: list[int] = []
    lps: list[float] = []
    meta: dict[str, Any] = {}
    async for item in engine.async_generate(
        input_ids=prompt,
        sampling_params={"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
        rid=rid,
        return_logprob=logprobs,
    ):
        ids.extend(item["output_ids"])
        meta = item["meta_info"]
        lps.extend(lp for lp, _, _ in meta.get("output_token_logprobs", ()))
    meta["logprobs"] = lps
    return ids, meta


async def run_all(
    engine: TorchEngine, prompts: list[list[int]], tag: str, **kw: Any
) -> list[tuple[list[int], dict[str, Any]]]:
    return await asyncio.gather(
        *(generate(engine, p, f"{tag}-{i}", **kw) for i, p in enumerate(prompts))
    )


async def test_one_request_alone(
    engine_factory: Any, prompts: list[list[int]], reference: list[Reference]
) -> None:
    engine = await engine_factory()
    outputs = [(await generate(engine, p, f"alone-{i}"))[0] for i, p in enumerate(prompts)]
    print(f"\nalone: {compare(outputs, reference)} tie(s)")


async def test_all_at_once_and_logprobs(
    engine_factory: Any, prompts: list[list[int]], reference: list[Reference]
) -> None:
    engine = await engine_factory()
    results = await run_all(engine, prompts, "batch", logprobs=True)
    print(f"\nbatched: {compare([ids for ids, _ in results], reference)} tie(s)")
    worst = 0.0
    for (ids, meta), ref in zip(results, reference, strict=True):
        for k, (ours, theirs) in enumerate(zip(meta["logprobs"], ref.logprobs, strict=True)):
            if ids[k] != ref.ids[k]:
                break  # after a tie the sequences are different texts
            worst = max(worst, abs(ours - theirs))
    assert worst < 1e-3, worst
    assert engine.schedulers[0].stats.max_running == len(prompts)


async def test_chunked_prefill(
    engine_factory: Any, prompts: list[list[int]], reference: list[Reference]
) -> None:
    engine = await engine_factory(chunked_prefill_size=24)
    assert max(len(p) for p in prompts) > 5 * 24
    results = await run_all(engine, prompts, "chunked")
    print(f"\nchunked: {compare([ids for ids, _ in results], reference)} tie(s)")
    stats = engine.schedulers[0].stats
    assert stats.prefill_steps > sum(math.ceil(len(p) / 24) for p in prompts[-2:])


async def test_small_pool_evicts_and_retracts(
    engine_factory: Any, prompts: list[list[int]], reference: list[Reference]
) -> None:
    longest = max(len(p) for p in prompts) + TOKENS
    engine = await engine_factory(max_total_tokens=2 * longest + 64, page_size=16)
    results = await run_all(engine, prompts, "small")
    print(f"\nsmall pool: {compare([ids for ids, _ in results], reference)} tie(s)")
    scheduler = engine.schedulers[0]
    assert scheduler.stats.retractions > 0
    # Finished requests' prefixes filled the pool and were evicted for later ones.
    assert scheduler.cache.cached_pages <= scheduler.cache.total_pages
    assert scheduler.stats.finished == len(prompts) + 1  # and the engine's warm-up request
    pool = scheduler.cache.pool
    assert pool.request_pages == 0 and scheduler.cache.protected_pages == 0


async def test_warm_prefix_cache(
    engine_factory: Any, prompts: list[list[int]], reference: list[Reference]
) -> None:
    engine = await engine_factory()
    await run_all(engine, prompts, "cold")
    results = await run_all(engine, prompts, "warm")
    print(f"\nwarm cache: {compare([ids for ids, _ in results], reference)} tie(s)")
    for prompt, (_, meta) in zip(prompts, results, strict=True):
        # Every whole page but the last token's is a hit.
        assert meta["cached_tokens"] == (len(prompt) - 1) // 16 * 16 > 0, meta


async def test_bfloat16_at_its_own_tolerance(engine_factory: Any, prompts: list[list[int]]) -> None:
    refs = transformers_greedy(prompts, torch.bfloat16)
    engine = await engine_factory(dtype="bfloat16")
    results = await run_all(engine, prompts, "bf16")
    ties = compare([ids for ids, _ in results], refs)
    print(f"\nbfloat16 vs transformers in bfloat16: {ties} tie(s) within 4 ulps")
