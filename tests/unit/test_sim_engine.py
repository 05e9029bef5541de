"""``SimEngine`` end to end on one event loop: the Engine protocol, request validation, DP
routing, disaggregated prefill/decode over the real bootstrap transfer, KV events and load
metrics on real ZMQ sockets, and the vocabulary read from a tiny tokenizer.json."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from proto.kv_events import BlockStored, KVEventBatch
from proto.metrics import SglangKvMetrics
from proto.request import FAKE_BOOTSTRAP_HOST
from shared.engine.cpu.kv_events import KvEventSubscriber
from shared.engine.cpu.scheduler import SENDING
from shared.engine.protocol import Engine
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.engine.sim.tokens import TokenGenerator, Vocabulary, prompt_hash

WORDS = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away", "in", "sun"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    vocab: dict[str, int] = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab["\u0120" + w] = len(vocab)
    for junk in ["\u0120", "a", "\u0120x", "\u01201st", ".", "ing", "\u0120Hello"]:
        vocab[junk] = len(vocab)
    vocab["<|eot_id|>"] = len(vocab)
    tokenizer = {
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [
            {"id": 0, "content": "<s>", "special": True},
            {"id": 1, "content": "</s>", "special": True},
            {"id": vocab["<|eot_id|>"], "content": "<|eot_id|>", "special": True},
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "eos_token_id": 1,
                "bos_token_id": 0,
                "max_position_embeddings": 2048,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [1, vocab["<|eot_id|>"]]})
    )
    return tmp_path


def free_port_pair() -> int:
    """A port p with p and p + 1 free right now (a DP-2 publisher binds both)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def config(model_dir: Path | None = None, **kw: Any) -> SimConfig:
    base: dict[str, Any] = {
        "model_path": str(model_dir) if model_dir else "",
        "speedup_ratio": 0.0,
        "random_seed": 0,
        "max_total_tokens": 16384,
        "bootstrap_port": 0,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_timeout": 5.0,
    }
    base.update(kw)
    return SimConfig(**base)


async def generate(engine: SimEngine, **kw: Any) -> tuple[list[int], dict[str, Any], int]:
    kw.setdefault("sampling_params", {"max_new_tokens": 8})
    ids: list[int] = []
    meta: dict[str, Any] = {}
    n = 0
    async for item in engine.async_generate(**kw):
        ids.extend(item["output_ids"])
        meta = item["meta_info"]
        n += 1
    return ids, meta, n


def test_vocabulary_from_tokenizer_json(model_dir: Path) -> None:
    vocab = Vocabulary.from_model_dir(model_dir)
    data = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    words = {data["\u0120" + w] for w in WORDS} | {data["\u0120Hello"]}
    assert set(vocab.ordinary) == words  # word starts with 2+ ASCII letters only
    assert vocab.eos_token_ids == (1, data["<|eot_id|>"])
    assert vocab.bos_token_id == 0


def test_vocabulary_fallback(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    vocab = Vocabulary.from_model_dir(tmp_path)
    assert vocab.eos_token_ids == (7,)
    assert vocab.ordinary[0] == 1000 and vocab.ordinary[-1] == 30999
    assert Vocabulary.from_model_dir(tmp_path / "missing").eos_token_ids == (2,)


def test_token_generator_is_pure() -> None:
    vocab = Vocabulary.fallback()
    a = TokenGenerator(vocab, seed=5, prompt_digest=prompt_hash([1, 2, 3]))
    b = TokenGenerator(vocab, seed=5, prompt_digest=prompt_hash([1, 2, 3]))
    c = TokenGenerator(vocab, seed=5, prompt_digest=prompt_hash([1, 2, 4]))
    seq_a = [a.token(i) for i in range(50)]
    assert seq_a == [b.token(i) for i in reversed(range(50))][::-1]  # random access
    assert seq_a != [c.token(i) for i in range(50)]
    assert len(set(seq_a)) > 40


async def test_engine_protocol_and_info(model_dir: Path) -> None:
    engine = SimEngine(config(model_dir, page_size=None, dp_size=2, max_total_tokens=1000))
    check: Engine = engine  # type-checks the protocol
    await check.start()
    info = engine.info
    assert info.engine == "sim" and info.page_size == 16
    assert info.max_total_tokens == 992  # whole pages
    assert info.context_length == 2048 and info.dp_size == 2
    assert info.served_model_name == str(model_dir)
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    with pytest.raises(NotImplementedError, match="encode"):
        await engine.async_encode(prompt="hi")
    await engine.shutdown()


async def test_stream_and_non_stream(model_dir: Path) -> None:
    engine = SimEngine(config(model_dir))
    await engine.start()
    vocab = Vocabulary.from_model_dir(model_dir)
    ids, meta, n = await generate(
        engine,
        input_ids=list(range(3, 40)),
        rid="s",
        sampling_params={"max_new_tokens": 6, "temperature": 0.7},
    )
    assert n == 6 and len(ids) == 6 and set(ids) <= set(vocab.ordinary)
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == 37 and meta["completion_tokens"] == 6
    ids2, meta2, n2 = await generate(
        engine,
        input_ids=list(range(3, 40)),
        rid="ns",
        stream=False,
        sampling_params={"max_new_tokens": 6},
        return_logprob=True,
        top_logprobs_num=2,
    )
    assert n2 == 1 and ids2 == ids  # engine random_seed: same tokens
    assert len(meta2["output_token_logprobs"]) == 6 and len(meta2["output_top_logprobs"]) == 6
    # SGLang's default max_new_tokens is 128; None means "to the context length".
    ids3, _, _ = await generate(engine, input_ids=[5] * 10, rid="d", sampling_params={})
    assert len(ids3) == 128
    ids4, meta4, _ = await generate(
        engine, input_ids=[5] * 2000, rid="n", sampling_params={"max_new_tokens": None}
    )
    assert len(ids4) == 48 and meta4["finish_reason"]["type"] == "length"
    await engine.shutdown()


async def test_fast_steps_share_a_timeslice(model_dir: Path) -> None:
    """Steps of microseconds (a speedup in the thousands) run on without handing the loop
    back until a timeslice is used up: a stream takes the tokens of several steps in one item,
    the same tokens; the loop still runs every timeslice. A timeslice of 0 yields per step."""
    kw: dict[str, Any] = {
        "input_ids": [3, 4, 5],
        "sampling_params": {"max_new_tokens": 48, "ignore_eos": True},
    }
    results: dict[float, tuple[list[int], int]] = {}
    for timeslice in (0.0, 30.0):
        engine = SimEngine(config(model_dir, speedup_ratio=1e9, timeslice_s=timeslice))
        await engine.start()
        try:
            ids, meta, n = await generate(engine, rid=f"r{timeslice}", **kw)
        finally:
            await engine.shutdown()
        assert meta["finish_reason"] == {"type": "length", "length": 48}
        results[timeslice] = (ids, n)
    assert results[0.0][0] == results[30.0][0] and len(results[0.0][0]) == 48
    assert results[0.0][1] == 48  # one item per step
    assert results[30.0][1] <= 2  # the first step yields (fresh runner), the rest run on

    # The default timeslice keeps the loop turning during a long run of quick steps.
    engine = SimEngine(config(model_dir, speedup_ratio=1e9))
    await engine.start()
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        long_kw = {**kw, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
        ids, _, n = await generate(engine, rid="long", **long_kw)
    finally:
        done = True
        await task
        await engine.shutdown()
    assert len(ids) == 1500 and n < 1500
    assert ticks >= 3


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_ids": []}, "non-empty"),
        ({"input_ids": [1, -2]}, "token ids"),
        ({"input_ids": [1] * 2048}, "context length"),
        ({"input_ids": [1] * 2000, "sampling_params": {"max_new_tokens": 100}}, "context length"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}}, "min"),
        ({"input_ids": [1], "sampling_params": {"n": 2}}, "n=2"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"stop_token_ids": ["x"]}}, "stop_token_ids"),
        ({"input_ids": [1], "data_parallel_rank": 5}, "data_parallel_rank"),
    ],
)
async def test_invalid_requests_end_with_400(
    model_dir: Path, kwargs: dict[str, Any], needle: str
) -> None:
    engine = SimEngine(config(model_dir))
    await engine.start()
    ids, meta, n = await generate(engine, rid="bad", **kwargs)
    assert n == 1 and ids == []
    reason = meta["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert needle in reason["message"]
    await engine.shutdown()


async def test_seed_rules(model_dir: Path) -> None:
    unseeded = SimEngine(config(model_dir, random_seed=None))
    await unseeded.start()
    p = list(range(10, 60))

    async def run(params: dict[str, Any], rid: str) -> list[int]:
        return (await generate(unseeded, input_ids=p, rid=rid, sampling_params=params))[0]

    greedy = [await run({"max_new_tokens": 12, "temperature": 0}, f"g{i}") for i in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [await run({"max_new_tokens": 12, "sampling_seed": 3}, f"s{i}") for i in range(2)]
    assert seeded[0] == seeded[1]
    sampled = [await run({"max_new_tokens": 12}, f"r{i}") for i in range(2)]
    assert sampled[0] != sampled[1]  # temperature 1, no seed anywhere: fresh randomness
    await unseeded.shutdown()


async def test_dp_routing(model_dir: Path) -> None:
    engine = SimEngine(config(model_dir, dp_size=3))
    await engine.start()
    p = list(range(100, 180))
    ref, _, _ = await generate(engine, input_ids=p, rid="a", data_parallel_rank=0)
    await generate(engine, input_ids=p, rid="b", data_parallel_rank=2)
    await generate(engine, input_ids=list(range(300, 380)), rid="c", bootstrap_room=7)
    assert [s.stats.finished for s in engine.schedulers] == [1, 1, 1]  # 7 % 3 == 1
    # The least-loaded rank takes requests without a rank or room; outputs do not depend on it.
    blocker = asyncio.ensure_future(
        generate(
            engine,
            input_ids=[9] * 20,
            rid="long",
            data_parallel_rank=0,
            sampling_params={"max_new_tokens": 1000, "ignore_eos": True},
        )
    )
    await asyncio.sleep(0)
    assert engine.num_active_requests() == 1
    got, _, _ = await generate(engine, input_ids=p, rid="d")
    assert got == ref
    assert engine.schedulers[0].stats.finished == 1
    engine.abort_request("long")
    _, meta, _ = await blocker
    assert meta["finish_reason"]["type"] == "abort"
    assert engine.num_active_requests() == 0
    await engine.shutdown()


async def test_closing_the_stream_aborts(model_dir: Path) -> None:
    engine = SimEngine(config(model_dir))
    await engine.start()
    stream = engine.async_generate(
        input_ids=[4] * 30,
        sampling_params={"max_new_tokens": 1000, "ignore_eos": True},
        rid="x",
    )
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.num_active_requests() == 0
    await engine.shutdown()


async def test_control_methods(model_dir: Path) -> None:
    engine = SimEngine(config(model_dir))
    await engine.start()
    await generate(engine, input_ids=list(range(64)), rid="a")
    assert engine.schedulers[0].cache.cached_pages > 0
    await engine.pause_generation()
    task = asyncio.ensure_future(generate(engine, input_ids=list(range(64)), rid="b"))
    await asyncio.sleep(0.01)
    assert not task.done()
    assert not await engine.flush_cache()  # a request is in flight
    await engine.continue_generation()
    await task
    assert await engine.flush_cache()
    assert engine.schedulers[0].cache.cached_pages == 0
    await engine.release_memory_occupation()
    _, meta, _ = await generate(engine, input_ids=[1, 2, 3], rid="c")
    assert meta["finish_reason"]["type"] == "abort"
    await engine.resume_memory_occupation()
    ids, _, _ = await generate(engine, input_ids=[1, 2, 3], rid="d")
    assert len(ids) == 8
    await engine.start_profile()
    assert engine.profiling
    await engine.stop_profile()
    await engine.shutdown()


async def test_disaggregated_matches_aggregated(model_dir: Path) -> None:
    common: dict[str, Any] = {"kv_bytes_per_token": 64}
    agg = SimEngine(config(model_dir, **common))
    prefill = SimEngine(config(model_dir, disaggregation_mode="prefill", **common))
    decode = SimEngine(config(model_dir, disaggregation_mode="decode", dp_size=2, **common))
    for engine in (agg, prefill, decode):
        await engine.start()
    assert prefill.info.bootstrap_host == "127.0.0.1"
    port = prefill.info.bootstrap_port
    assert port is not None and port > 0

    p = list(range(20, 120))
    params = {"max_new_tokens": 10, "sampling_seed": 11}
    ref, ref_meta, _ = await generate(agg, input_ids=p, rid="agg", sampling_params=params)

    boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 12345}
    pre = asyncio.ensure_future(
        generate(
            prefill,
            input_ids=p,
            rid="pre",
            sampling_params={**params, "max_new_tokens": 1},
            **boot,
        )
    )
    dec_ids, dec_meta, _ = await generate(
        decode, input_ids=p, rid="dec", sampling_params=params, **boot
    )
    pre_ids, pre_meta, pre_items = await pre
    assert pre_ids == ref[:1] and pre_items == 1
    assert pre_meta["finish_reason"] == {"type": "length", "length": 1}
    assert dec_ids == ref
    assert dec_meta["finish_reason"] == ref_meta["finish_reason"]
    assert dec_meta["cached_tokens"] == 0
    assert decode.schedulers[12345 % 2].stats.finished == 1
    # The prefill's prompt pages stay cached there (only whole pages: 100 // 16).
    assert prefill.schedulers[0].cache.cached_pages == 6

    # Fake bootstrap host: no transfer on either side, same tokens.
    fake = {"bootstrap_host": FAKE_BOOTSTRAP_HOST, "bootstrap_port": 1, "bootstrap_room": 1}
    ids, _, _ = await generate(decode, input_ids=p, rid="fd", sampling_params=params, **fake)
    assert ids == ref
    ids, meta, _ = await generate(prefill, input_ids=p, rid="fp", sampling_params=params, **fake)
    assert ids == ref[:1] and meta["finish_reason"] == {"type": "length", "length": 1}
    for engine in (agg, prefill, decode):
        await engine.shutdown()


async def test_decode_errors(model_dir: Path) -> None:
    decode = SimEngine(
        config(model_dir, disaggregation_mode="decode", kv_bytes_per_token=8, bootstrap_timeout=0.3)
    )
    prefill = SimEngine(
        config(
            model_dir, disaggregation_mode="prefill", kv_bytes_per_token=8, bootstrap_timeout=0.3
        )
    )
    await decode.start()
    await prefill.start()
    _, meta, _ = await generate(decode, input_ids=[1, 2, 3], rid="nob")
    assert (
        meta["finish_reason"]["type"] == "abort" and "bootstrap" in meta["finish_reason"]["message"]
    )
    # A prefill that never comes: the bootstrap timeout ends the decode leg.
    port = prefill.info.bootstrap_port
    assert port is not None
    _, meta, _ = await generate(
        decode,
        input_ids=[1, 2, 3],
        rid="late",
        bootstrap_host="127.0.0.1",
        bootstrap_port=port,
        bootstrap_room=99,
    )
    assert meta["finish_reason"]["type"] == "abort"
    assert "KV transfer failed" in meta["finish_reason"]["message"]
    # A prefill whose decode never comes can be aborted while it waits to send.
    task = asyncio.ensure_future(
        generate(
            prefill,
            input_ids=list(range(50)),
            rid="orphan",
            bootstrap_host="127.0.0.1",
            bootstrap_port=port,
            bootstrap_room=5,
        )
    )
    for _ in range(50):
        await asyncio.sleep(0.001)
        if prefill.schedulers[0].requests.get("orphan") is not None and (
            prefill.schedulers[0].requests["orphan"].state == SENDING
        ):
            break
    prefill.abort_request("orphan")
    _, meta, _ = await task
    assert meta["finish_reason"]["type"] == "abort"
    assert prefill.schedulers[0].cache.pool.request_pages == 0
    await decode.shutdown()
    await prefill.shutdown()


async def test_kv_events_and_metrics_on_zmq(model_dir: Path, tmp_path: Path) -> None:
    metrics_path = f"ipc://{tmp_path}/metrics.ipc"
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(metrics_path)
    base = free_port_pair()
    events_cfg = json.dumps(
        {"publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{base}", "bind": True, "topic": "kv"}
    )
    engine = SimEngine(
        config(model_dir, kv_events_config=events_cfg, metrics_endpoint=metrics_path, dp_size=2)
    )
    await engine.start()
    endpoints = engine.info.kv_events_endpoints
    # One publisher per DP rank, at the rank-offset port (SGLang's offset_endpoint_port).
    assert endpoints == [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"]
    assert engine.info.kv_events_topic == "kv" and engine.info.metrics_endpoint == metrics_path
    sub = KvEventSubscriber(endpoints[1], topic="kv", start_seq=None)
    sub.connect()
    await asyncio.sleep(0.2)  # PUB/SUB join
    await generate(engine, input_ids=list(range(40)), rid="e", data_parallel_rank=1)
    _seq, batch = await asyncio.wait_for(sub.__anext__(), 5)
    assert isinstance(batch, KVEventBatch) and batch.attn_dp_rank == 1
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    assert stored and stored[0].token_ids == list(range(32)) and stored[0].block_size == 16
    raw = await asyncio.wait_for(pull.recv(), 5)
    report = msgspec.msgpack.decode(raw, type=SglangKvMetrics)
    assert report.kv_total_blocks == engine.max_total_tokens
    await sub.close()
    await engine.shutdown()
    pull.close(linger=0)
    ctx.term()
