"""The worker's cost per token without the network: engine, handler, framing, each measured.

Why: in the side-by-side run (``bench/reference.sh``) the worker's CPU per request is set by
what it pays per engine step and per token, and a profile of the whole mesh on two cores
blames whatever line a process was preempted on. Here one process runs, alone, what a worker
runs for a request: the simulated engine (speedup 10000, timeslice 0: a token per stream item,
as the reference's mocker streams), ``DecodeHandler`` with its ``OutputMapper``, and the
endpoint's framing (a chunk, a ``Frame``, a ``StreamFrame``), for batches of 1, 2 and 14
running requests (what the mesh mostly runs at c=64 with a new connection per request, where
the processor hands requests over one at a time and each finishes in about a millisecond, and
with keep-alive).

Three layers, each a superset of the previous one:

- ``engine``: ``async for`` over ``SimEngine.async_generate``;
- ``handler``: ``DecodeHandler.generate`` (``OutputMapper``, ``EngineOutput``);
- ``framed``: plus the msgpack encoding the endpoint does per chunk.

Prints CPU microseconds per step and per token, and writes ``bench/results/worker_path.json``.

    python bench/worker_path.py [--rounds N] [--batch 1 --batch 2 --batch 14]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto.plane import Frame, FrameKind, StreamFrame  # noqa: E402
from proto.request import PreprocessedRequest  # noqa: E402
from services.decode.handler import DecodeHandler  # noqa: E402
from shared.engine.sim.engine import SimConfig, SimEngine  # noqa: E402
from shared.runtime.endpoint import Context  # noqa: E402

MODEL = ROOT.parent / "shared" / "anchor" / "tiny-model"
PROMPT_TOKENS = 120
OUTPUT_TOKENS = 64
LAYERS = ("engine", "handler", "framed")


def _prompt(i: int) -> list[int]:
    return [(i * 7919 + k * 104729) % 30000 + 10 for k in range(PROMPT_TOKENS)]


def _request(i: int) -> PreprocessedRequest:
    return msgspec.convert(
        {
            "token_ids": _prompt(i),
            "stop_conditions": {
                "max_tokens": OUTPUT_TOKENS,
                "min_tokens": OUTPUT_TOKENS,
                "ignore_eos": True,
            },
            "sampling_options": {},
        },
        PreprocessedRequest,
    )


class _Layers:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.handler = DecodeHandler(engine, disaggregation_mode="null")
        self.encoder = msgspec.msgpack.Encoder()
        self.sink = bytearray()

    async def engine_only(self, i: int) -> int:
        n = 0
        async for _ in self.engine.async_generate(
            input_ids=_prompt(i),
            sampling_params={"max_new_tokens": OUTPUT_TOKENS, "ignore_eos": True},
            rid=f"e{i}",
        ):
            n += 1
        return n

    async def handler_only(self, i: int) -> int:
        n = 0
        async for _ in self.handler.generate(_request(i), Context(f"h{i}", 1)):
            n += 1
        return n

    async def framed(self, i: int) -> int:
        encode = self.encoder.encode
        seq = 0
        async for chunk in self.handler.generate(_request(i), Context(f"f{i}", 1)):
            frame = Frame(seq=seq, kind=FrameKind.DATA, chunks=[msgspec.Raw(encode(chunk))])
            self.sink += encode(StreamFrame("s", frame))
            seq += 1
        self.sink.clear()
        return seq


async def _measure(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    engine = SimEngine(
        SimConfig(
            model_path=str(MODEL) if MODEL.is_dir() else "",
            speedup_ratio=10000,
            timeslice_s=0.0,
            max_total_tokens=400_000,
        )
    )
    await engine.start()
    try:
        layers = _Layers(engine)
        runs: dict[str, Callable[[int], Awaitable[int]]] = {
            "engine": layers.engine_only,
            "handler": layers.handler_only,
            "framed": layers.framed,
        }
        results: dict[str, dict[str, float]] = {}
        offset = 0
        for name in LAYERS:
            run = runs[name]
            await asyncio.gather(*(run(offset + i) for i in range(batch)))  # warm
            offset += batch
            steps0 = engine.schedulers[0].stats.steps
            cpu0 = time.process_time()
            for _ in range(rounds):
                await asyncio.gather(*(run(offset + i) for i in range(batch)))
                offset += batch
            cpu = time.process_time() - cpu0
            steps = engine.schedulers[0].stats.steps - steps0
            tokens = batch * rounds * OUTPUT_TOKENS
            results[name] = {
                "cpu_us_per_step": cpu / steps * 1e6,
                "cpu_us_per_token": cpu / tokens * 1e6,
                "cpu_ms_per_request": cpu / (batch * rounds) * 1e3,
                "steps": steps,
            }
        return results
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=600, help="rounds of BATCH requests")
    parser.add_argument(
        "--batch", type=int, action="append", help="running requests (default: 1, 2 and 14)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "worker_path.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    batches = args.batch or [1, 2, 14]
    import uvloop

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "output_tokens": OUTPUT_TOKENS,
        "prompt_tokens": PROMPT_TOKENS,
        "rounds": args.rounds,
        "batches": {},
    }
    print(f"{'batch':>5} {'layer':>8} {'us/step':>8} {'us/token':>9} {'ms/request':>11}")
    for batch in batches:
        result = uvloop.run(_measure(batch, args.rounds))
        report["batches"][str(batch)] = result
        for name in LAYERS:
            r = result[name]
            print(
                f"{batch:>5} {name:>8} {r['cpu_us_per_step']:>8.1f} "
                f"{r['cpu_us_per_token']:>9.2f} {r['cpu_ms_per_request']:>11.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
