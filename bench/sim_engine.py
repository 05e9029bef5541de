"""Simulated-engine benchmark: how fast the scheduler runs, and what its bookkeeping costs.

The simulated engine stands in for GPUs in CI and load tests, so it must never be the
bottleneck: at ``speedup_ratio=0`` (no simulated delays) one core should push far more tokens
than the mesh above it can carry. Measured here, pinned to ONE core:

- throughput: 512 requests (prompt 128 tokens, 256 output tokens, ``ignore_eos``) through one
  ``SimEngine`` with ``max_running_requests=256``, KV events published on a real ZMQ PUB socket
  and load metrics on a real PUSH socket, every stream consumed by its own ``async for`` as a
  worker would: scheduler steps/s and output tokens/s (goal >= 50,000 tokens/s);
- memory: the bookkeeping held for 1M cached KV tokens (1024 requests of 992 + 33 tokens
  whose prompt and output pages stay in the radix cache), by ``tracemalloc`` and by RSS delta
  (goal < 200 MB).

Prints a table and writes ``bench/results/sim_engine.json``.

    python bench/sim_engine.py [--quick] [--loop uvloop|asyncio] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.engine.sim.engine import SimConfig, SimEngine  # noqa: E402

GOAL_TOKENS_PER_S = 50_000
GOAL_MEMORY_MB = 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def consume(engine: SimEngine, rid: str, prompt: list[int], max_new: int) -> int:
    n = 0
    async for item in engine.async_generate(
        input_ids=prompt,
        sampling_params={"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0},
        rid=rid,
    ):
        n += len(item["output_ids"])
    return n


def prompts(count: int, length: int) -> list[list[int]]:
    # Distinct first pages, so no prefix is shared (the throughput case is not a cache test).
    return [[1000 + (i * 7919 + j * 104729) % 30000 for j in range(length)] for i in range(count)]


async def throughput(requests: int, prompt_len: int, max_new: int, tmp: str) -> dict[str, Any]:
    config = SimConfig(
        speedup_ratio=0.0,
        max_running_requests=256,
        max_total_tokens=400_000,
        kv_events_config=json.dumps(
            {"publisher": "zmq", "endpoint": f"ipc://{tmp}/kv-events", "bind": True}
        ),
        metrics_endpoint=f"ipc://{tmp}/metrics",
        random_seed=0,
    )
    engine = SimEngine(config)
    await engine.start()
    work = prompts(requests, prompt_len)
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(consume(engine, f"r{i}", p, max_new) for i, p in enumerate(work))
    )
    elapsed = time.perf_counter() - t0
    stats = engine.schedulers[0].stats
    published = engine.publishers[0].published
    await engine.shutdown()
    total = sum(counts)
    assert total == requests * max_new, total
    return {
        "requests": requests,
        "prompt_tokens": prompt_len,
        "max_new_tokens": max_new,
        "max_running_requests": 256,
        "seconds": round(elapsed, 4),
        "steps": stats.steps,
        "steps_per_s": round(stats.steps / elapsed, 1),
        "output_tokens": total,
        "output_tokens_per_s": round(total / elapsed),
        "peak_running": stats.max_running,
        "kv_event_batches": published,
        "simulated_gpu_seconds": round(stats.forward_seconds, 3),
    }


async def memory(target_tokens: int) -> dict[str, Any]:
    page = 16
    per_request = 1024  # cached tokens per request: 992 prompt + 32 output (the last has no KV)
    count = target_tokens // per_request
    config = SimConfig(
        speedup_ratio=0.0,
        page_size=page,
        max_running_requests=256,
        max_total_tokens=target_tokens + 256 * 2048,
        context_length=4096,
        random_seed=0,
    )
    engine = SimEngine(config)
    await engine.start()
    work = prompts(count, per_request - 32)
    gc.collect()
    tracemalloc.start()
    rss0 = rss_bytes()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, count, 256):
        await asyncio.gather(
            *(consume(engine, f"m{i}", work[i], 33) for i in range(start, min(count, start + 256)))
        )
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    held = current - base
    rss = rss_bytes() - rss0
    tracemalloc.stop()
    cache = engine.schedulers[0].cache
    cached = cache.cached_tokens
    await engine.shutdown()
    assert cached >= target_tokens * 0.99, cached
    return {
        "cached_kv_tokens": cached,
        "cached_pages": cached // page,
        "page_size": page,
        "tracemalloc_mb": round(held / 2**20, 1),
        # Includes 256 requests in flight and their streams, not just the cache.
        "tracemalloc_peak_mb": round((peak - base) / 2**20, 1),
        "rss_delta_mb": round(rss / 2**20, 1),
        "bytes_per_cached_token": round(held / cached, 1),
    }


def pin_one_core() -> int | None:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def run(main: Callable[[], Awaitable[Any]], loop_name: str) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--profile", action="store_true", help="cProfile the throughput run")
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results" / "sim_engine.json"),
        help="where to write the JSON results",
    )
    args = parser.parse_args()
    cpu = pin_one_core()
    requests, max_new, mem_tokens = (128, 64, 1 << 17) if args.quick else (512, 256, 1 << 20)

    with tempfile.TemporaryDirectory(prefix="sglmesh-bench-") as tmp:

        async def tp() -> dict[str, Any]:
            return await throughput(requests, 128, max_new, tmp)

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            tput = run(tp, args.loop)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        else:
            tput = run(tp, args.loop)

    async def mem() -> dict[str, Any]:
        return await memory(mem_tokens)

    mem_result = run(mem, args.loop)

    rows = [
        ("requests x (prompt + output)", f"{requests} x (128 + {max_new})"),
        ("scheduler steps/s", f"{tput['steps_per_s']:,.0f}"),
        (
            "output tokens/s",
            f"{tput['output_tokens_per_s']:,} (goal >= {GOAL_TOKENS_PER_S:,})",
        ),
        ("wall seconds", f"{tput['seconds']:.2f} ({tput['simulated_gpu_seconds']:.1f} s on GPU)"),
        ("cached KV tokens", f"{mem_result['cached_kv_tokens']:,}"),
        (
            "bookkeeping (tracemalloc)",
            f"{mem_result['tracemalloc_mb']} MB (goal < {GOAL_MEMORY_MB} MB)",
        ),
        ("bookkeeping (RSS delta)", f"{mem_result['rss_delta_mb']} MB"),
        ("peak while serving (tracemalloc)", f"{mem_result['tracemalloc_peak_mb']} MB"),
        ("bytes per cached token", f"{mem_result['bytes_per_cached_token']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(
        f"simulated engine, one core (cpu {cpu}), {args.loop}, Python {platform.python_version()}"
    )
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")

    payload = {
        "benchmark": "sim_engine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "pinned_cpu": cpu,
            "python": platform.python_version(),
            "loop": args.loop,
        },
        "quick": args.quick,
        "goals": {"output_tokens_per_s": GOAL_TOKENS_PER_S, "memory_mb": GOAL_MEMORY_MB},
        "throughput": tput,
        "memory": mem_result,
        "met": {
            "throughput": tput["output_tokens_per_s"] >= GOAL_TOKENS_PER_S,
            "memory": mem_result["tracemalloc_mb"] < GOAL_MEMORY_MB
            and mem_result["rss_delta_mb"] < GOAL_MEMORY_MB,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
