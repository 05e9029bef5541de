"""``GET /engine/kv_cache``: the simulated engine lists its cache page by page (what the
publisher tests compare consumers against); engines that cannot answer 501."""

from __future__ import annotations

import json
from typing import Any, cast

from aiohttp.test_utils import make_mocked_request

from shared.engine.cpu.hashing import page_hash
from shared.engine.protocol import Engine
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.worker.engine_routes import _kv_cache_route


async def call(engine: object) -> tuple[int, Any]:
    handler = _kv_cache_route(cast(Engine, engine))
    resp = await handler(make_mocked_request("GET", "/engine/kv_cache"))
    assert resp.body is not None
    return resp.status, json.loads(cast(bytes, resp.body))


async def test_the_simulated_engine_lists_its_pages_parents_first() -> None:
    engine = SimEngine(SimConfig(page_size=4, speedup_ratio=0, dp_size=2))
    await engine.start()
    try:
        prompt = list(range(100, 110))  # two full pages, and a partial one never cached
        async for _ in engine.async_generate(
            input_ids=prompt, sampling_params={"max_new_tokens": 1}, rid="a", data_parallel_rank=1
        ):
            pass
        status, body = await call(engine)
    finally:
        await engine.shutdown()
    assert status == 200 and body["status"] == "ok" and body["page_size"] == 4
    rank0, rank1 = body["dp_ranks"]
    assert (rank0["dp_rank"], rank0["pages"]) == (0, [])
    first, second = rank1["pages"][:2]
    _, h1 = page_hash(None, prompt[:4])
    assert first == {"block_hash": h1, "parent_block_hash": None, "token_ids": prompt[:4]}
    assert second["parent_block_hash"] == h1 and second["token_ids"] == prompt[4:8]


async def test_other_engines_answer_501() -> None:
    status, body = await call(object())
    assert status == 501 and body["status"] == "error"
