"""The torch engine against transformers on the same CPU, side by side in one run.

Same weights (the prepared SmolLM2-135M-Instruct), greedy, ``ignore_eos`` (every request
generates its full length), every measurement in a fresh subprocess (its own memory and
threads; the systems never run at the same time), systems alternating, ``--repeats`` times;
the figures are medians and the ratios are ours over transformers'.

- **uniform**: prompts of 128 tokens, 64 output tokens, at concurrency 1, 8 and 32. Ours:
  that many requests in flight (closed loop) through one engine. transformers: static
  ``generate`` in batches of that size (its best case: no padding), and its own continuous
  batching, ``generate_batch``, at 8 and 32. Output tokens/s.
- **server**: Poisson arrivals (``--rate`` per second), prompts 32-512 tokens, outputs 16-256
  tokens. Ours: each request submitted when it arrives. transformers: static ``generate`` over
  the same requests in arrival order, in batches of 8 (a batch starts when its last request
  has arrived and the previous batch is done; left padding; it runs to its longest output).
  Total time from the first arrival to the last token.
- **ttft**: a 1,024-token prompt, cold, then another with the same 1,024-token prefix (served
  from the prefix cache); time to the first token of each.
- **memory**: a worker's peak RSS (VmHWM) with a 100k-token KV pool, idle and after requests
  that fill 32k tokens of it (the pool is allocated lazily: it costs RAM only as it fills).
- **profile**: where one decode step's time goes, at batch 1 and 32 (torch profiler, top ops).

Prints a table and writes ``bench/results/torch_engine.json``.

    python bench/torch_engine.py [--quick] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "torch_engine.json"
PROMPT, OUTPUT = 128, 64
GOALS = {
    "uniform_generate_1": 2.0,
    "uniform_generate_8": 1.0,
    "uniform_generate_32": 1.0,
    "uniform_generate_batch_8": 2.0,
    "uniform_generate_batch_32": 2.0,
    "server_generate": 1.5,
    "ttft_cached_speedup": 5.0,
}


def model_path() -> str:
    from shared.model import prepare_default_model

    return str(prepare_default_model())


def threads() -> int:
    return len(os.sched_getaffinity(0))


def uniform_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(PROMPT)] for _ in range(count)]


def server_load(count: int, rate: float, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(
            {
                "at": t,
                "prompt": [rng.randrange(1000, 40000) for _ in range(rng.randint(32, 512))],
                "output": rng.randint(16, 256),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# What runs in a subprocess


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _ours(task: dict[str, Any]) -> dict[str, Any]:
    from shared.engine.pytorch.engine import TorchConfig, TorchEngine

    engine = TorchEngine(
        TorchConfig(
            model_path=task["model"],
            max_total_tokens=task.get("pool", 65536),
            max_running_requests=task.get("max_running", 64),
            dtype=task["dtype"],
        )
    )
    await engine.start()
    ttfts: dict[str, float] = {}

    async def one(rid: str, prompt: list[int], output: int) -> int:
        started = time.perf_counter()
        n = 0
        async for item in engine.async_generate(
            input_ids=prompt,
            sampling_params={"max_new_tokens": output, "temperature": 0, "ignore_eos": True},
            rid=rid,
        ):
            if n == 0 and item["output_ids"]:
                ttfts[rid] = time.perf_counter() - started
            n += len(item["output_ids"])
        return n

    try:
        # Warm-up: the first forward of each shape pays one-time costs.
        await one("warmup", uniform_prompts(1, 99)[0], 4)
        kind = task["kind"]
        if kind == "uniform":
            prompts = uniform_prompts(task["requests"], task["seed"])
            limit = asyncio.Semaphore(task["concurrency"])

            async def bounded(i: int, p: list[int]) -> int:
                async with limit:
                    return await one(f"u{i}", p, OUTPUT)

            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts))))
            elapsed = time.perf_counter() - started
            return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
        if kind == "server":
            load = server_load(task["requests"], task["rate"], task["seed"])
            started = time.perf_counter()

            async def arrive(i: int, req: dict[str, Any]) -> int:
                await asyncio.sleep(max(0.0, started + req["at"] - time.perf_counter()))
                return await one(f"s{i}", req["prompt"], req["output"])

            tokens = sum(await asyncio.gather(*(arrive(i, r) for i, r in enumerate(load))))
            elapsed = time.perf_counter() - started - load[0]["at"]
            return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
        if kind == "ttft":
            rng = random.Random(task["seed"])
            prefix = [rng.randrange(1000, 40000) for _ in range(1024)]
            await one("cold", [*prefix, *(rng.randrange(1000, 40000) for _ in range(16))], 1)
            await one("warm", [*prefix, *(rng.randrange(1000, 40000) for _ in range(16))], 1)
            return {"cold_s": ttfts["cold"], "cached_s": ttfts["warm"]}
        if kind == "memory":
            idle = _rss_now()
            rng = random.Random(task["seed"])
            prompts = [[rng.randrange(1000, 40000) for _ in range(500)] for _ in range(64)]
            await asyncio.gather(*(one(f"m{i}", p, 12) for i, p in enumerate(prompts)))
            cached = engine.schedulers[0].cache.cached_tokens
            return {"idle_rss": idle, "peak_rss": _rss_peak(), "cached_tokens": cached}
        if kind == "profile":
            return await _profile(engine, one)
        raise ValueError(kind)
    finally:
        await engine.shutdown()


async def _profile(engine: Any, one: Any) -> dict[str, Any]:
    """Capture one decode step's plan at batch 1 and 32, then time and profile it alone."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runners[0]
    plans: dict[int, Any] = {}
    run = runner._run

    def capture(plan: Any) -> Any:
        if not plan.step.chunks and len(plan.rows) in (1, 32):
            plans.setdefault(len(plan.rows), plan)
        return run(plan)

    runner._run = capture
    for batch in (1, 32):
        prompts = uniform_prompts(batch, batch)
        # Long enough that all of them run decode-only steps once every prompt is prefilled.
        await asyncio.gather(*(one(f"p{batch}-{i}", p, 40) for i, p in enumerate(prompts)))
    runner._run = run
    out: dict[str, Any] = {}
    torch.set_num_threads(engine.threads)
    for batch, plan in sorted(plans.items()):
        for _ in range(3):
            run(plan)
        started = time.perf_counter()
        for _ in range(10):
            run(plan)
        step = (time.perf_counter() - started) / 10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                run(plan)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[str(batch)] = {
            "step_ms": step * 1e3,
            "ops": [
                {
                    "op": e.key,
                    "share": e.self_cpu_time_total / total,
                    "calls_per_step": e.count / 5,
                }
                for e in top[:8]
            ],
        }
    return out


def _transformers(task: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(threads())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[task["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(task["model"], dtype=dtype, local_files_only=True)
    model.eval()
    pad = 0

    def static(batch: list[list[int]], output: int) -> int:
        longest = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=output,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
            )
        return int(out.shape[1] - longest) * len(batch)

    static([uniform_prompts(1, 99)[0]], 4)  # warm-up
    kind = task["kind"]
    if kind == "uniform":
        prompts = uniform_prompts(task["requests"], task["seed"])
        c = task["concurrency"]
        started = time.perf_counter()
        if task["mode"] == "generate":
            tokens = sum(static(prompts[i : i + c], OUTPUT) for i in range(0, len(prompts), c))
        else:
            config = GenerationConfig(
                max_new_tokens=OUTPUT, do_sample=False, eos_token_id=None, pad_token_id=pad
            )
            with torch.inference_mode():
                outputs = model.generate_batch(
                    inputs=prompts, generation_config=config, progress_bar=False
                )
            tokens = sum(len(o.generated_tokens) for o in outputs.values())
        elapsed = time.perf_counter() - started
        return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
    if kind == "server":
        load = server_load(task["requests"], task["rate"], task["seed"])
        started = time.perf_counter()
        useful = 0
        for i in range(0, len(load), 8):
            batch = load[i : i + 8]
            time.sleep(max(0.0, started + batch[-1]["at"] - time.perf_counter()))
            static([r["prompt"] for r in batch], max(r["output"] for r in batch))
            useful += sum(r["output"] for r in batch)
        elapsed = time.perf_counter() - started - load[0]["at"]
        return {"tokens": useful, "seconds": elapsed, "tokens_per_s": useful / elapsed}
    raise ValueError(kind)


def _child(task: dict[str, Any]) -> dict[str, Any]:
    if task["system"] == "ours":
        return asyncio.run(_ours(task))
    return _transformers(task)


# ---------------------------------------------------------------------------------------------
# The orchestration


def run_task(task: dict[str, Any], wait_policy: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The same OpenMP behaviour for both systems (the torch engine defaults to PASSIVE).
        "OMP_WAIT_POLICY": wait_policy,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{task['system']} {task['kind']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rate", type=float, default=2.0, help="server load: arrivals per s")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY for both systems (the torch engine's default is PASSIVE)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    repeats = 1 if args.quick else args.repeats
    common = {"model": model_path(), "dtype": args.dtype}
    uniform_requests = {1: 2 if args.quick else 4, 8: 16, 32: 32}
    server_requests = 12 if args.quick else 32
    results: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, task: dict[str, Any]) -> None:
        print(f"  {name} ...", end="", flush=True)
        result = run_task({**common, **task}, args.omp_wait_policy)
        results.setdefault(name, []).append(result)
        shown = result.get("tokens_per_s") or result.get("cached_s") or result.get("peak_rss")
        print(f" {shown:.4g}" if isinstance(shown, float) else f" {shown}")

    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}")
        for c, n in uniform_requests.items():
            task = {"kind": "uniform", "concurrency": c, "requests": n, "seed": r}
            record(f"ours_uniform_{c}", {**task, "system": "ours"})
            record(f"generate_uniform_{c}", {**task, "system": "hf", "mode": "generate"})
            if c > 1:
                record(
                    f"generate_batch_uniform_{c}",
                    {**task, "system": "hf", "mode": "generate_batch"},
                )
        server = {"kind": "server", "requests": server_requests, "rate": args.rate, "seed": r}
        record("ours_server", {**server, "system": "ours"})
        record("generate_server", {**server, "system": "hf"})
        record("ours_ttft", {"kind": "ttft", "seed": r, "system": "ours"})
    record("ours_memory", {"kind": "memory", "seed": 0, "system": "ours", "pool": 100_000})
    record("ours_profile", {"kind": "profile", "system": "ours"})

    def med(name: str, key: str) -> float:
        return median([x[key] for x in results[name]])

    rows: list[tuple[str, float, float, float, float]] = []
    summary: dict[str, Any] = {}
    for c in uniform_requests:
        ours = med(f"ours_uniform_{c}", "tokens_per_s")
        gen = med(f"generate_uniform_{c}", "tokens_per_s")
        rows.append(
            (f"uniform c={c} vs generate", ours, gen, ours / gen, GOALS[f"uniform_generate_{c}"])
        )
        summary[f"uniform_generate_{c}"] = ours / gen
        if c > 1:
            batch = med(f"generate_batch_uniform_{c}", "tokens_per_s")
            rows.append(
                (f"uniform c={c} vs generate_batch", ours, batch, ours / batch,
                 GOALS[f"uniform_generate_batch_{c}"])
            )  # fmt: skip
            summary[f"uniform_generate_batch_{c}"] = ours / batch
    ours_s = med("ours_server", "seconds")
    gen_s = med("generate_server", "seconds")
    rows.append(("server load, total s (lower wins)", ours_s, gen_s, gen_s / ours_s, 1.5))
    summary["server_generate"] = gen_s / ours_s
    cold = med("ours_ttft", "cold_s")
    cached = med("ours_ttft", "cached_s")
    summary["ttft_cached_speedup"] = cold / cached

    print(
        f"\ntorch engine vs transformers ({args.dtype}, {threads()} threads, medians of {repeats})"
    )
    print(f"{'scenario':<38} {'ours':>10} {'theirs':>10} {'ratio':>7} {'goal':>6}")
    for name, ours_v, theirs_v, ratio, goal in rows:
        mark = "ok" if ratio >= goal else "MISS"
        print(f"{name:<38} {ours_v:>10.1f} {theirs_v:>10.1f} {ratio:>6.2f}x {goal:>5.1f}x {mark}")
    print(
        f"TTFT of a 1,024-token prompt: cold {cold * 1e3:.0f} ms, prefix cached "
        f"{cached * 1e3:.0f} ms ({cold / cached:.1f}x, goal >= 5x)"
    )
    memory = results["ours_memory"][0]
    print(
        f"worker RSS with a 100k-token pool: idle {memory['idle_rss'] / 2**20:.0f} MiB, peak "
        f"{memory['peak_rss'] / 2**20:.0f} MiB with {memory['cached_tokens']} tokens cached"
    )
    profile = results["ours_profile"][0]
    for batch, info in profile.items():
        ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in info["ops"][:5])
        print(f"one decode step at batch {batch}: {info['step_ms']:.1f} ms ({ops})")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "threads": threads(),
                },
                "dtype": args.dtype,
                "repeats": repeats,
                "ratios": summary,
                "goals": GOALS,
                "ttft": {"cold_s": cold, "cached_s": cached},
                "memory": memory,
                "profile": profile,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
