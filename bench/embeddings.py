"""Embeddings benchmark: ``POST /v1/embeddings`` through the mesh against sentence-transformers'
own ``encode()``, side by side in one run on this machine.

The mesh: nats-server and etcd (``shared.infra``), one embedding worker (``python -m sglmesh
worker --embedding-worker``, all-MiniLM-L6-v2 on the CPU engine) and the processor, each its
own process, on free loopback ports in a temporary directory. The load: a closed loop of C
users, each on its own keep-alive HTTP/1.1 connection (a minimal client here, so the load
generator costs little CPU), each request carrying S sentences (1 or 32), for C in 1, 16, 64.

The bare library: ``SentenceTransformer(...).encode()`` in one process of its own (a child of
this script, so it never shares an interpreter with the load generator), over the same
sentences: throughput at batch sizes 16 to 256 (the best one is the baseline), and the latency
of one single-sentence ``encode()`` call.

Side by side: the machine is shared (other people's tests and benchmarks run on it), so the
baseline is measured before and after the mesh cells, and every ratio uses the mean of the
two; the CPU the rest of the machine used during each window is reported beside it.

Goals (issue 13): at concurrency 64 the mesh reaches >= 0.8x the bare library's best
throughput, and the p50 latency at concurrency 1 (one sentence per request) is within 5 ms of
a bare single-sentence ``encode()``.

    python bench/embeddings.py [--duration 10] [--warmup 2] [--concurrency 1,16,64]
                               [--sentences 1,32] [--output PATH]

Prints a table and writes ``bench/results/embeddings.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.serve import (  # noqa: E402
    HOST,
    Proc,
    cleanup_on_exit,
    git_state,
    machine_busy_seconds,
    machine_info,
    spawn,
    stop,
    wait_http,
)
from shared.embedding_model import EMBEDDING_MODEL_NAME, prepare_embedding_model  # noqa: E402
from shared.infra import EtcdServer, NatsServer, free_port  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "embeddings.json"
BATCH_SIZES = (16, 32, 64, 128, 256)
_WORD_TEXT = (
    "the a man woman child dog cat city river mountain music song book film story team game "
    "market price company market school teacher student doctor patient garden kitchen window "
    "train station airport flight morning evening winter summer quickly slowly happily reads "
    "writes plays builds finds opens closes carries watches visits loves hates needs old new "
    "small large bright dark quiet loud early late near far under over beside"
)
WORDS = tuple(_WORD_TEXT.split(" "))


def corpus(count: int, seed: int = 13) -> list[str]:
    """Sentences of 6 to 30 words (10 to 40 tokens): short search queries to long captions."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
        out.append(" ".join(words).capitalize() + ".")
    return out


# -- the bare library, in a child process ------------------------------------------------------


def _baseline_child(model: str, sentences: list[str], seconds: float) -> dict[str, Any]:
    """Runs in the child: best-batch throughput and single-sentence latency of encode()."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu", local_files_only=True)
    st.encode(sentences[:256], batch_size=64)  # warm-up
    throughput: dict[str, float] = {}
    for batch in BATCH_SIZES:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            chunk = sentences[done % len(sentences) :][: batch * 4] or sentences[: batch * 4]
            st.encode(chunk, batch_size=batch)
            done += len(chunk)
        throughput[str(batch)] = done / (time.perf_counter() - started)
    latencies = []
    for i in range(200):
        t = time.perf_counter()
        st.encode(sentences[i])
        latencies.append(time.perf_counter() - t)
    return {
        "threads": torch.get_num_threads(),
        "sentences_per_s_by_batch": throughput,
        "single_ms_p50": statistics.median(latencies) * 1000,
        "single_ms_p99": sorted(latencies)[int(0.99 * len(latencies))] * 1000,
    }


def run_baseline(model: Path, sentences: list[str], seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sentences, f)
        path = f.name
    try:
        busy = machine_busy_seconds()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, __file__, "--baseline-child", str(model), path, str(seconds)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"the baseline failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["machine_busy_cores"] = (machine_busy_seconds() - busy) / wall
        rates = result["sentences_per_s_by_batch"]
        best = max(rates, key=lambda k: rates[k])
        result["best_batch"] = int(best)
        result["best_sentences_per_s"] = rates[best]
        return result
    finally:
        os.unlink(path)


# -- the load generator ----------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection posting JSON and reading Content-Length answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def post(self, port: int, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def run_cell(
    port: int, sentences: list[str], users: int, per_request: int, warmup: float, duration: float
) -> dict[str, Any]:
    clients = [await Client.open(port) for _ in range(users)]
    latencies: list[float] = []
    done_sentences = 0
    errors = 0
    start = time.monotonic() + warmup
    end = start + duration

    async def user(k: int) -> None:
        nonlocal done_sentences, errors
        client, i = clients[k], k * 997
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            batch = [sentences[(i + j) % len(sentences)] for j in range(per_request)]
            i += per_request
            body = json.dumps({"model": EMBEDDING_MODEL_NAME, "input": batch,
                               "encoding_format": "base64"}).encode()  # fmt: skip
            status, _ = await client.post(port, body)
            t1 = time.monotonic()
            if status != 200:
                errors += 1
            elif t0 >= start and t1 <= end:
                latencies.append(t1 - t0)
                done_sentences += per_request

    busy = machine_busy_seconds()
    await asyncio.gather(*(user(k) for k in range(users)))
    wall = time.monotonic() - start + warmup
    for c in clients:
        c.close()
    lat = sorted(latencies)
    return {
        "concurrency": users,
        "sentences_per_request": per_request,
        "requests": len(lat),
        "errors": errors,
        "sentences_per_s": done_sentences / duration,
        "latency_ms_p50": statistics.median(lat) * 1000 if lat else None,
        "latency_ms_p99": lat[int(0.99 * (len(lat) - 1))] * 1000 if lat else None,
        "machine_busy_cores": (machine_busy_seconds() - busy) / wall,
    }


# -- the mesh --------------------------------------------------------------------------------


async def start_mesh(tmp: Path, model: Path) -> tuple[list[Proc], int, NatsServer, EtcdServer]:
    nats = NatsServer(data_dir=tmp / "nats")
    etcd = EtcdServer(data_dir=tmp / "etcd")
    nats.__enter__()
    etcd.__enter__()
    python = [sys.executable, "-m", "sglmesh"]
    mesh = ["--namespace", "embbench", "--nats-url", nats.url, "--etcd-endpoints", etcd.endpoint,
            "--log-format", "text", "--log-level", "warning"]  # fmt: skip
    worker_port, http_port = free_port(), free_port()
    worker = spawn("encoder", [*python, "worker", "--embedding-worker", *mesh,
                               "--model-path", str(model),
                               "--served-model-name", EMBEDDING_MODEL_NAME,
                               "--system-host", HOST, "--system-port", str(worker_port)],
                   tmp / "encoder.log")  # fmt: skip
    processor = spawn(
        "processor",
        [*python, "processor", *mesh, "--http-host", HOST, "--http-port", str(http_port)],
        tmp / "processor.log",
    )
    async with aiohttp.ClientSession() as http:
        await wait_http(http, f"http://{HOST}:{worker_port}/health", worker, timeout=180)
        await wait_http(http, f"http://{HOST}:{http_port}/health", processor, timeout=60)
    return [processor, worker], http_port, nats, etcd


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None or not b else a / b


async def bench(opts: argparse.Namespace) -> dict[str, Any]:
    model = prepare_embedding_model()
    sentences = corpus(4096)
    print(f"baseline: sentence-transformers encode(), batch sizes {BATCH_SIZES} ...", flush=True)
    before = run_baseline(model, sentences, opts.baseline_seconds)
    print(f"  best {before['best_sentences_per_s']:.0f} sentences/s (batch {before['best_batch']}),"
          f" single encode() p50 {before['single_ms_p50']:.2f} ms", flush=True)  # fmt: skip
    cells = []
    with tempfile.TemporaryDirectory(prefix="sglmesh-embbench-") as tmp:
        procs, port, nats, etcd = await start_mesh(Path(tmp), model)
        try:
            # Warm both processes (tokenizer, torch) before measuring.
            await run_cell(port, sentences, 4, 8, 0.0, 2.0)
            for per_request in opts.sentences:
                for users in opts.concurrency:
                    cell = await run_cell(
                        port, sentences, users, per_request, opts.warmup, opts.duration
                    )
                    cells.append(cell)
                    print(f"  mesh c={users:<3} x{per_request:<3} "
                          f"{cell['sentences_per_s']:8.0f} sentences/s  p50 "
                          f"{cell['latency_ms_p50']:.2f} ms  p99 {cell['latency_ms_p99']:.2f} ms"
                          f"  errors {cell['errors']}", flush=True)  # fmt: skip
        finally:
            stop(procs)
            nats.stop()
            etcd.stop()
    after = run_baseline(model, sentences, opts.baseline_seconds)
    print(f"baseline again: best {after['best_sentences_per_s']:.0f} sentences/s, single p50 "
          f"{after['single_ms_p50']:.2f} ms", flush=True)  # fmt: skip
    bare = (before["best_sentences_per_s"] + after["best_sentences_per_s"]) / 2
    single = (before["single_ms_p50"] + after["single_ms_p50"]) / 2
    for cell in cells:
        cell["vs_bare_throughput"] = _ratio(cell["sentences_per_s"], bare)
    c64 = {c["sentences_per_request"]: c for c in cells if c["concurrency"] == 64}
    c1 = next((c for c in cells if c["concurrency"] == 1 and c["sentences_per_request"] == 1), None)
    goals = {
        "c64_throughput_vs_bare": {str(s): c["vs_bare_throughput"] for s, c in sorted(c64.items())},
        "c64_goal": 0.8,
        "c1_p50_minus_bare_single_ms": (None if c1 is None else c1["latency_ms_p50"] - single),
        "c1_goal_ms": 5.0,
    }
    return {
        "benchmark": "embeddings",
        "model": EMBEDDING_MODEL_NAME,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "git": git_state(),
        "options": {k: v for k, v in vars(opts).items() if k != "output"},
        "baseline_before": before,
        "baseline_after": after,
        "bare_best_sentences_per_s": bare,
        "bare_single_ms_p50": single,
        "mesh": cells,
        "goals": goals,
    }


def print_summary(result: dict[str, Any]) -> None:
    bare, single = result["bare_best_sentences_per_s"], result["bare_single_ms_p50"]
    print(f"\nbare sentence-transformers: {bare:.0f} sentences/s at its best batch size, "
          f"single encode() p50 {single:.2f} ms (mean of before and after)")  # fmt: skip
    print(f"{'concurrency':>11} {'per req':>7} {'sentences/s':>11} {'vs bare':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'busy cores':>10}")  # fmt: skip
    for c in result["mesh"]:
        print(f"{c['concurrency']:>11} {c['sentences_per_request']:>7} "
              f"{c['sentences_per_s']:>11.0f} {c['vs_bare_throughput']:>7.2f} "
              f"{c['latency_ms_p50']:>8.2f} {c['latency_ms_p99']:>8.2f} "
              f"{c['machine_busy_cores']:>10.2f}")  # fmt: skip
    goals = result["goals"]
    for per, ratio in goals["c64_throughput_vs_bare"].items():
        verdict = "met" if ratio >= goals["c64_goal"] else "MISSED"
        print(f"goal c=64 x{per}: {ratio:.2f}x bare (>= {goals['c64_goal']}x): {verdict}")
    gap = goals["c1_p50_minus_bare_single_ms"]
    if gap is not None:
        verdict = "met" if gap <= goals["c1_goal_ms"] else "MISSED"
        print(f"goal c=1 p50 - bare single encode(): {gap:+.2f} ms (<= {goals['c1_goal_ms']} "
              f"ms): {verdict}")  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--baseline-child"]:
        model, path, seconds = args[1], args[2], float(args[3])
        with open(path) as f:
            sentences = json.load(f)
        print(json.dumps(_baseline_child(model, sentences, seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--baseline-seconds", type=float, default=4.0,
                        help="seconds per batch size for the bare library")  # fmt: skip
    parser.add_argument("--concurrency", type=_ints, default=[1, 16, 64])
    parser.add_argument("--sentences", type=_ints, default=[1, 32],
                        help="sentences per request")  # fmt: skip
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    opts = parser.parse_args(args)
    with cleanup_on_exit():
        result = asyncio.run(bench(opts))
    print_summary(result)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {opts.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
