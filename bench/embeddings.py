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

Side by side: the machine is shared (other people's tests and benchmarks run on it, and what
they run drifts by the minute), so the bare library stays loaded in its child and is measured
at its best batch size right before and right after every mesh cell (and its single-sentence
latency around the concurrency-1 cell); each cell's ratio uses the mean of its own two. Per
cell the CPU each mesh process spent per sentence is reported too (processor, worker).

Goals (issue 13): at concurrency 64 the mesh reaches >= 0.8x the bare library's best
throughput, and the p50 latency at concurrency 1 (one sentence per request) is within 5 ms of
a bare single-sentence ``encode()``.

    python bench/embeddings.py [--duration 10] [--warmup 2] [--repeat 2] [--concurrency 1,16,64]
                               [--sentences 1,32] [--baseline-seconds 4] [--output PATH]

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
    group_cpu_seconds,
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


def _baseline_child(model: str, corpus_path: str) -> None:
    """The child: loads the model once, then answers commands (JSON lines on stdin)."""
    import torch
    from sentence_transformers import SentenceTransformer

    with open(corpus_path) as f:
        sentences: list[str] = json.load(f)
    st = SentenceTransformer(model, device="cpu", local_files_only=True)
    st.encode(sentences[:256], batch_size=64)  # warm-up
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    offset = 0
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "throughput":
            batch, seconds = command["batch"], command["seconds"]
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                chunk = [sentences[(offset + i) % len(sentences)] for i in range(batch * 2)]
                offset += len(chunk)
                st.encode(chunk, batch_size=batch)
                done += len(chunk)
            result: dict[str, Any] = {"value": done / (time.perf_counter() - started)}
        else:
            latencies = []
            for _ in range(command["count"]):
                t = time.perf_counter()
                st.encode(sentences[offset % len(sentences)])
                offset += 1
                latencies.append(time.perf_counter() - t)
            result = {"value": statistics.median(latencies) * 1000}
        print(json.dumps(result), flush=True)


class Baseline:
    """sentence-transformers' ``encode()`` in a process of its own, measured on demand."""

    def __init__(self, model: Path, sentences: list[str], tmp: Path) -> None:
        path = tmp / "corpus.json"
        path.write_text(json.dumps(sentences))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--baseline-child", str(model), str(path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # The worker's own OpenMP setting (services/encode/torch_engine.py): the same torch,
            # run the same way, so the comparison is of the serving paths, not of spin-waiting.
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
        )  # fmt: skip
        self.threads = int(self._read()["threads"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline process exited ({self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def _ask(self, **command: Any) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["value"])

    def throughput(self, batch: int, seconds: float) -> float:
        """Sentences/s of ``encode(batch_size=batch)`` over ``seconds``."""
        return self._ask(op="throughput", batch=batch, seconds=seconds)

    def single_ms(self, count: int = 100) -> float:
        """p50 of ``count`` single-sentence ``encode()`` calls, in ms."""
        return self._ask(op="latency", count=count)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    """A closed loop of ``users``; the window opens once every user has had an answer and
    ``warmup`` has passed (steady state, however slow a request is), and counts the requests
    that end inside it."""
    clients = [await Client.open(port) for _ in range(users)]
    latencies: list[float] = []
    done_sentences = 0
    sent_total = 0
    errors = 0
    answered: set[int] = set()
    everyone = asyncio.Event()
    window: list[float] = []  # [start, end] once open
    began = time.monotonic()

    async def user(k: int) -> None:
        nonlocal done_sentences, errors, sent_total
        client, i = clients[k], k * 997
        while not window or time.monotonic() < window[1]:
            t0 = time.monotonic()
            batch = [sentences[(i + j) % len(sentences)] for j in range(per_request)]
            i += per_request
            body = json.dumps({"model": EMBEDDING_MODEL_NAME, "input": batch,
                               "encoding_format": "base64"}).encode()  # fmt: skip
            status, _ = await client.post(port, body)
            t1 = time.monotonic()
            sent_total += per_request
            if status != 200:
                errors += 1
            elif window and window[0] <= t1 <= window[1]:
                latencies.append(t1 - t0)
                done_sentences += per_request
            answered.add(k)
            if len(answered) == users:
                everyone.set()

    tasks = [asyncio.create_task(user(k)) for k in range(users)]
    await everyone.wait()
    await asyncio.sleep(max(0.0, began + warmup - time.monotonic()))
    busy = machine_busy_seconds()
    window.extend([time.monotonic(), time.monotonic() + duration])
    await asyncio.sleep(duration)
    busy = machine_busy_seconds() - busy
    await asyncio.gather(*tasks)
    for c in clients:
        c.close()
    lat = sorted(latencies)
    return {
        "concurrency": users,
        "sentences_per_request": per_request,
        "requests": len(lat),
        "errors": errors,
        "sentences_per_s": done_sentences / duration,
        "sentences_total": sent_total,
        "latency_ms_p50": statistics.median(lat) * 1000 if lat else None,
        "latency_ms_p99": lat[int(0.99 * (len(lat) - 1))] * 1000 if lat else None,
        "machine_busy_cores": busy / duration,
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


async def bench(opts: argparse.Namespace) -> dict[str, Any]:
    model = prepare_embedding_model()
    sentences = corpus(4096)
    cells = []
    with tempfile.TemporaryDirectory(prefix="sglmesh-embbench-") as tmp_dir:
        tmp = Path(tmp_dir)
        baseline = Baseline(model, sentences, tmp)
        try:
            sweep = {b: baseline.throughput(b, opts.baseline_seconds) for b in BATCH_SIZES}
            best = max(sweep, key=lambda b: sweep[b])
            print(f"bare sentence-transformers ({baseline.threads} threads): "
                  + ", ".join(f"batch {b} {r:.0f}/s" for b, r in sweep.items())
                  + f"; best batch {best}", flush=True)  # fmt: skip
            procs, port, nats, etcd = await start_mesh(tmp, model)
            try:
                await run_cell(port, sentences, 4, 8, 0.0, 2.0)  # warm both processes
                for per_request in opts.sentences:
                    for users in opts.concurrency:
                        runs = []
                        for _ in range(opts.repeat):
                            runs.append(
                                await side_by_side(
                                    opts, baseline, best, port, sentences, users,
                                    per_request, procs,
                                )
                            )  # fmt: skip
                            print(_row(runs[-1]), flush=True)
                        cells.append(_median_run(runs))
            finally:
                stop(procs)
                nats.stop()
                etcd.stop()
        finally:
            baseline.close()
    c64 = {c["sentences_per_request"]: c for c in cells if c["concurrency"] == 64}
    c1 = next((c for c in cells if c["concurrency"] == 1 and c["sentences_per_request"] == 1), None)
    goals = {
        "c64_throughput_vs_bare": {str(s): c["vs_bare"] for s, c in sorted(c64.items())},
        "c64_goal": 0.8,
        "c1_p50_minus_bare_single_ms": None if c1 is None else c1["p50_minus_bare_single_ms"],
        "c1_goal_ms": 5.0,
    }
    return {
        "benchmark": "embeddings",
        "model": EMBEDDING_MODEL_NAME,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "git": git_state(),
        "options": {k: v for k, v in vars(opts).items() if k != "output"},
        "bare_sweep_sentences_per_s": {str(b): r for b, r in sweep.items()},
        "bare_best_batch": best,
        "bare_threads": baseline.threads,
        "cells": cells,
        "goals": goals,
    }


async def side_by_side(
    opts: argparse.Namespace,
    baseline: Baseline,
    best: int,
    port: int,
    sentences: list[str],
    users: int,
    per_request: int,
    procs: list[Proc],
) -> dict[str, Any]:
    """One mesh cell between two measurements of the bare library (the machine is shared:
    what others run drifts, so each cell is compared with the baseline of its own minutes)."""
    bare_before = baseline.throughput(best, opts.baseline_seconds)
    cpu = group_cpu_seconds()
    cell = await run_cell(port, sentences, users, per_request, opts.warmup, opts.duration)
    used = group_cpu_seconds()
    bare_after = baseline.throughput(best, opts.baseline_seconds)
    bare = (bare_before + bare_after) / 2
    cell["bare_sentences_per_s"] = [bare_before, bare_after]
    cell["vs_bare"] = cell["sentences_per_s"] / bare if bare else None
    # CPU per sentence of each mesh process over the whole cell (warm-up included).
    total = max(cell["sentences_total"], 1)
    cell["cpu_ms_per_sentence"] = {
        p.name: (used.get(p.pid, 0.0) - cpu.get(p.pid, 0.0)) * 1000 / total for p in procs
    }
    if per_request == 1 and users == 1:
        cell.update(await single_latency(baseline, port, sentences, opts.latency_rounds))
    return cell


async def single_latency(
    baseline: Baseline, port: int, sentences: list[str], rounds: int, per_round: int = 40
) -> dict[str, Any]:
    """One sentence at a time, the bare ``encode()`` and the mesh taking turns in short rounds
    (so both see the same background load); the p50 of all of each."""
    client = await Client.open(port)
    mesh: list[float] = []
    bare: list[float] = []
    try:
        for r in range(rounds):
            bare.append(baseline.single_ms(per_round))
            for i in range(per_round):
                body = json.dumps(
                    {
                        "model": EMBEDDING_MODEL_NAME,
                        "encoding_format": "base64",
                        "input": sentences[(r * per_round + i) % len(sentences)],
                    }
                )
                started = time.perf_counter()
                status, _ = await client.post(port, body.encode())
                assert status == 200, status
                mesh.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    mesh_p50, bare_p50 = statistics.median(mesh), statistics.median(bare)
    return {
        "single_mesh_ms_p50": mesh_p50,
        "single_bare_ms_p50": bare_p50,
        "p50_minus_bare_single_ms": mesh_p50 - bare_p50,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ratio, carrying every run's figures (and the median of the
    one-sentence latency gaps, where measured)."""
    ordered = sorted(runs, key=lambda r: r["vs_bare"] or 0.0)
    cell = dict(ordered[(len(ordered) - 1) // 2])
    gaps = [r["p50_minus_bare_single_ms"] for r in runs if "p50_minus_bare_single_ms" in r]
    if gaps:
        cell["p50_minus_bare_single_ms"] = statistics.median(gaps)
    cell["runs"] = runs
    return cell


def _row(c: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in c["cpu_ms_per_sentence"].items())
    text = (
        f"  c={c['concurrency']:<3} x{c['sentences_per_request']:<3} mesh "
        f"{c['sentences_per_s']:6.0f}/s  bare {sum(c['bare_sentences_per_s']) / 2:5.0f}/s "
        f"= {c['vs_bare']:.2f}x  p50 {c['latency_ms_p50']:.1f} ms  p99 "
        f"{c['latency_ms_p99']:.1f} ms  CPU ms/sentence: {cpu}"
    )
    if "single_mesh_ms_p50" in c:
        text += (f"\n  one sentence at a time, taking turns: mesh p50 "
                 f"{c['single_mesh_ms_p50']:.2f} ms, bare encode() p50 "
                 f"{c['single_bare_ms_p50']:.2f} ms")  # fmt: skip
    return text


def print_summary(result: dict[str, Any]) -> None:
    print(f"\nbare sentence-transformers: best batch {result['bare_best_batch']} "
          f"({result['bare_threads']} torch threads); each cell against the bare library "
          "measured just before and after it (median of the repeats)")  # fmt: skip
    print(f"{'users':>5} {'per req':>7} {'mesh /s':>8} {'bare /s':>8} {'ratio':>6} "
          f"{'p50 ms':>8} {'p99 ms':>9} {'busy cores':>10}")  # fmt: skip
    for c in result["cells"]:
        print(f"{c['concurrency']:>5} {c['sentences_per_request']:>7} "
              f"{c['sentences_per_s']:>8.0f} {sum(c['bare_sentences_per_s']) / 2:>8.0f} "
              f"{c['vs_bare']:>6.2f} {c['latency_ms_p50']:>8.1f} {c['latency_ms_p99']:>9.1f} "
              f"{c['machine_busy_cores']:>10.2f}")  # fmt: skip
    goals = result["goals"]
    for per, ratio in goals["c64_throughput_vs_bare"].items():
        verdict = "met" if ratio >= goals["c64_goal"] else "MISSED"
        print(f"goal c=64 x{per}: {ratio:.2f}x bare (>= {goals['c64_goal']}x): {verdict}")
    gap = goals["c1_p50_minus_bare_single_ms"]
    if gap is not None:
        verdict = "met" if gap <= goals["c1_goal_ms"] else "MISSED"
        print(f"goal c=1 one-sentence p50, mesh - bare encode(): {gap:+.2f} ms "
              f"(<= {goals['c1_goal_ms']} ms): {verdict}")  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--baseline-child"]:
        _baseline_child(args[1], args[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--baseline-seconds", type=float, default=4.0,
                        help="seconds per measurement of the bare library")  # fmt: skip
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="measure every cell this often; the median ratio counts",
    )
    parser.add_argument("--latency-rounds", type=int, default=10,
                        help="turns of 40 single-sentence requests, bare vs mesh")  # fmt: skip
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
