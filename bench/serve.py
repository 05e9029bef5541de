"""End-to-end serving benchmark: the OpenAI processor in front of simulated workers.

Starts a real mesh on free loopback ports in a temporary directory -- nats-server and etcd
(``shared.infra``), W aggregated workers (``python -m sglmesh worker --engine sim``) and the
processor (``python -m sglmesh processor``), each as its own process, exactly as a user would
start them -- and drives it with ``bench/loadgen.py``: a closed loop of C users, each on its
own keep-alive HTTP/1.1 connection, sending ``POST /v1/chat/completions`` with
``stream: true``, ``max_tokens`` 64, ``ignore_eos`` and a ~128-token templated prompt.

Every cell of the matrix W x C (default {1, 4} x {1, 16, 64}) runs for a warm-up, then a
measured window; requests that finish inside the window count. Per cell: requests/s, output
tokens/s, TTFT and ITL p50/p99 (definitions in ``bench/loadgen.py``), and the CPU each party
spent per request during the window (``/proc/<pid>/stat`` utime + stime of each process group;
the load generator from ``os.times()``): processor (also per output token), workers, NATS,
etcd, load generator -- so the reader sees where the machine's cores go.

The prompt: the default SmolLM2 chat template (its system prompt) around a user message
``Request NNNNNNNN. <filler words>``; the filler is calibrated against the processor's own
``usage.prompt_tokens`` to hit ``--prompt-tokens`` (128) +- 4, and every request's count is
reported. The counter differs per request, so requests share only the first ~30 tokens
(template, system prompt, "Request 0000"): one 16-token page may be a prefix-cache hit, the
other ~112 tokens are always prefilled.

The speedup (``--speedup``, default 1000) divides the simulated engine's cost model
(``shared/engine/sim/cost.py``: ~5 ms per decode step, ~7 ms to prefill 128 tokens, at 1x):
at 1000x a 64-token request costs the simulated GPU ~0.33 ms, far below what the Python
stack spends on it, so the engine is not the bottleneck.

Also measured: each mesh's idle CPU (``--idle`` seconds with no load), the machine's busy
cores (``/proc/stat``) and what other processes used meanwhile ("other": this benchmark shares
the machine), and the share of the window the processor's threads spent runnable but waiting
for a CPU (``/proc/<pid>/task/*/schedstat``). CPU times come in 10 ms ticks: a window holds
hundreds of requests, so per-request figures are good to a few percent.

The reference numbers (NVIDIA Dynamo 1.6.1: Rust HTTP frontend + its mocker, tiny model, same
load shape, on this kind of 2-core machine) are printed beside ours and saved in the JSON.
``--profile DIR`` records the processor with py-spy (raw collapsed stacks) during every
measured window and prints the top functions by self and total time; py-spy briefly stops
the process for every sample, so do not quote a profiled run's numbers.

    python bench/serve.py [--quick] [--workers 1,4] [--concurrency 1,16,64]
                          [--duration 15] [--warmup 2] [--speedup 1000] [--max-tokens 64]
                          [--repeat 2] [--idle 3] [--profile DIR] [--output PATH]

    # the processor's hot spots at 1 worker, 16 users:
    python bench/serve.py --workers 1 --concurrency 16 --profile /tmp/prof --output /tmp/p.json

Prints one table per run and writes ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.loadgen import (  # noqa: E402
    Connection,
    LoadResult,
    build_request,
    counter_message,
    run_users,
)
from shared.infra import EtcdServer, NatsServer, free_port  # noqa: E402
from shared.model import prepare_default_model  # noqa: E402

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# NVIDIA Dynamo 1.6.1 (Rust HTTP frontend + mocker, tiny model, same load shape), 2-core box.
REFERENCE: dict[str, Any] = {
    "system": "NVIDIA Dynamo 1.6.1: Rust HTTP frontend + mocker engine, tiny model",
    "machine": "2-core machine of the same kind",
    "load": "chat, stream, max_tokens 64, ~128-token prompt",
    "requests_per_s": {"1": 80, "16": 250, "64": 170},
    "frontend_cpu_ms_per_request": [2.0, 5.0],
    "frontend_cpu_us_per_output_token": [35, 80],
}

FILLER = (
    "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree "
    "and people walk along the long road to the city where they work every day of the week"
)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_LIVE: list[Proc] = []  # everything started and not yet stopped, for cleanup on any exit


def spawn(name: str, argv: list[str], log: Path) -> Proc:
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C does not reach it, kill reaps all
        )
    proc = Proc(name, popen, log)
    _LIVE.append(proc)
    return proc


def stop(procs: Sequence[Proc], timeout: float = 5.0) -> None:
    for proc in procs:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait()
        with contextlib.suppress(ProcessLookupError):  # stray children of the group
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in _LIVE:
            _LIVE.remove(proc)


def group_cpu_seconds() -> dict[int, float]:
    """utime + stime (seconds) of every live process, summed per process group."""
    totals: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        # after the comm: state(3) ppid(4) pgrp(5) ... utime(14) stime(15), 1-based in man 5 proc
        pgrp = int(fields[2])
        totals[pgrp] = totals.get(pgrp, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return totals


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idle and iowait, since boot."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def runqueue_wait_seconds(pids: Sequence[int]) -> float:
    """Seconds the threads of ``pids`` spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with open(f"{task.path}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])
    return total / 1e9


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def git_state() -> dict[str, Any]:
    """The commit measured, and the code files that differed from it (a dirty tree)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.rstrip("\n")

    changed = [
        line[3:]
        for line in git(
            "status", "--porcelain", "--", "services", "shared", "proto", "sglmesh"
        ).splitlines()
    ]
    return {"commit": git("rev-parse", "HEAD"), "changed_code_files": changed}


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- the mesh --------------------------------------------------------------------------------


@dataclass
class Mesh:
    namespace: str
    processor: Proc
    workers: list[Proc]
    http_port: int
    worker_ports: list[int]
    model: str = ""

    @property
    def procs(self) -> list[Proc]:
        return [self.processor, *self.workers]


def start_mesh(
    namespace: str,
    n_workers: int,
    nats: NatsServer,
    etcd: EtcdServer,
    model_path: Path,
    speedup: float,
    tmp: Path,
) -> Mesh:
    python = [sys.executable, "-m", "sglmesh"]
    mesh_flags = [
        "--namespace", namespace,
        "--nats-url", nats.url,
        "--etcd-endpoints", etcd.endpoint,
        "--log-format", "text",
        "--log-level", "warning",
        "--graceful-shutdown-grace-period", "0",
    ]  # fmt: skip
    workers, ports = [], []
    for i in range(n_workers):
        port = free_port()
        ports.append(port)
        argv = [
            *python, "worker", "--engine", "sim",
            "--model-path", str(model_path),
            "--speedup-ratio", str(speedup),
            "--system-host", HOST, "--system-port", str(port),
            *mesh_flags,
        ]  # fmt: skip
        workers.append(spawn(f"worker-{i}", argv, tmp / f"{namespace}-worker-{i}.log"))
    http_port = free_port()
    argv = [
        *python, "processor", *mesh_flags,
        "--http-host", HOST, "--http-port", str(http_port),
    ]  # fmt: skip
    processor = spawn("processor", argv, tmp / f"{namespace}-processor.log")
    return Mesh(namespace, processor, workers, http_port, ports)


async def wait_http(
    http: aiohttp.ClientSession, url: str, proc: Proc, timeout: float = 60.0
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(url) as resp:
                if resp.status == 200:
                    return await resp.json(content_type=None)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not ready at {url}:\n{proc.tail()}")
        await asyncio.sleep(0.2)


async def routed_instances(http: aiohttp.ClientSession, port: int) -> set[str]:
    async with http.get(f"http://{HOST}:{port}/metrics") as resp:
        text = await resp.text()
    return set(re.findall(r'routing_decisions_total\{[^}]*instance="([^"]+)"', text))


async def ready_mesh(mesh: Mesh) -> None:
    """Every worker healthy, the processor serving the model, and every worker routed to."""
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(
            *(
                wait_http(http, f"http://{HOST}:{port}/health", w)
                for w, port in zip(mesh.workers, mesh.worker_ports, strict=True)
            )
        )
        base = f"http://{HOST}:{mesh.http_port}"
        await wait_http(http, f"{base}/health", mesh.processor)
        models = await wait_http(http, f"{base}/v1/models", mesh.processor)
        mesh.model = models["data"][0]["id"]
        make = build_request(HOST, mesh.http_port, mesh.model, counter_message("hello"), 4)
        conns = [await Connection.open(HOST, mesh.http_port) for _ in mesh.workers]
        try:
            deadline = time.monotonic() + 30
            n = 0
            while len(await routed_instances(http, mesh.http_port)) < len(mesh.workers):
                if time.monotonic() > deadline:
                    raise TimeoutError("the processor did not route to every worker in 30 s")
                await asyncio.gather(*(c.request(make(n := n + 1)) for c in conns))
                await asyncio.sleep(0.1)
        finally:
            for c in conns:
                c.close()


async def calibrate_prompt(mesh: Mesh, target: int, max_tokens: int) -> tuple[str, int]:
    """A counter-prefixed user message whose templated prompt is ``target`` +- 4 tokens, by
    the processor's own count (``usage.prompt_tokens``)."""
    filler = FILLER.split()
    words = target - 30
    conn = await Connection.open(HOST, mesh.http_port)
    try:
        for _ in range(8):
            text = " ".join(filler[i % len(filler)] for i in range(words))
            message = counter_message(text)
            make = build_request(HOST, mesh.http_port, mesh.model, message, 1)
            result = await conn.request(make(12345678))
            if result.error is not None:
                raise RuntimeError(f"calibration request failed: {result.error}")
            got = result.prompt_tokens
            if abs(got - target) <= 4:
                return message, got
            words = max(1, words + target - got)
    finally:
        conn.close()
    raise RuntimeError(f"could not calibrate a {target}-token prompt (last: {got})")


# -- statistics ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class CpuWindow:
    groups: dict[str, list[int]]  # party -> process-group ids
    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        totals = group_cpu_seconds()
        out = {party: sum(totals.get(g, 0.0) for g in gids) for party, gids in self.groups.items()}
        out["loadgen"] = self_cpu_seconds()
        out["machine"] = machine_busy_seconds()
        out["processor_runqueue_wait"] = runqueue_wait_seconds(self.groups["processor"])
        out["workers_runqueue_wait"] = runqueue_wait_seconds(self.groups["workers"])
        return out

    def mark(self, edge: str) -> None:
        (self.start if edge == "start" else self.end).update(self.sample())

    def seconds(self) -> dict[str, float]:
        out = {party: self.end[party] - self.start[party] for party in self.start}
        ours = sum(out[p] for p in ("processor", "workers", "nats", "etcd", "loadgen"))
        out["others"] = max(0.0, out["machine"] - ours)  # other users of this machine
        return out


def summarize(
    load: LoadResult, cpu: dict[str, float], workers: int, concurrency: int
) -> dict[str, Any]:
    window = load.window_end - load.window_start
    ok = [r for r in load.results if r.error is None]
    errors = [r for r in load.results if r.error is not None]
    n = len(ok)
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [(r.events[0] - r.sent) * 1e3 for r in ok]
    itl = [
        (r.events[-1] - r.events[0]) / (r.completion_tokens - 1) * 1e3
        for r in ok
        if r.completion_tokens > 1
    ]
    gaps: list[float] = []
    norm_gaps: list[float] = []
    for r in ok:
        per_event = r.completion_tokens / len(r.events)
        ev = r.events
        for a, b in itertools.pairwise(ev):
            gaps.append((b - a) * 1e3)
            norm_gaps.append((b - a) * 1e3 / per_event)
    latency = [(r.done - r.sent) * 1e3 for r in ok]
    prompt = [r.prompt_tokens for r in ok]

    def per_request_ms(party: str) -> float | None:
        return round(cpu[party] / n * 1e3, 3) if n else None

    cell: dict[str, Any] = {
        "workers": workers,
        "concurrency": concurrency,
        "window_s": round(window, 3),
        "requests": n,
        "errors": len(errors),
        "error_samples": sorted({e.error or "" for e in errors})[:3],
        "requests_per_s": round(n / window, 2),
        "output_tokens_per_s": round(tokens / window, 1),
        "output_tokens_per_request": round(tokens / n, 2) if n else None,
        "prompt_tokens_mean": round(statistics.fmean(prompt), 1) if prompt else None,
        "prompt_tokens_min_max": [min(prompt), max(prompt)] if prompt else None,
        "ttft_ms_p50": round(pct(ttft, 0.5), 3),
        "ttft_ms_p99": round(pct(ttft, 0.99), 3),
        "itl_ms_p50": round(pct(itl, 0.5), 4),
        "itl_ms_p99": round(pct(itl, 0.99), 4),
        "event_gap_ms_p50": round(pct(gaps, 0.5), 4),
        "event_gap_ms_p99": round(pct(gaps, 0.99), 4),
        "event_gap_per_token_ms_p50": round(pct(norm_gaps, 0.5), 4),
        "event_gap_per_token_ms_p99": round(pct(norm_gaps, 0.99), 4),
        "token_events_per_request": round(statistics.fmean(len(r.events) for r in ok), 2)
        if ok
        else None,
        "request_latency_ms_p50": round(pct(latency, 0.5), 3),
        "request_latency_ms_p99": round(pct(latency, 0.99), 3),
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_cores_busy": {k: round(v / window, 3) for k, v in cpu.items()},
        "processor_cpu_ms_per_request": per_request_ms("processor"),
        "processor_cpu_us_per_output_token": round(cpu["processor"] / tokens * 1e6, 2)
        if tokens
        else None,
        "workers_cpu_ms_per_request": per_request_ms("workers"),
        "nats_cpu_ms_per_request": per_request_ms("nats"),
        "etcd_cpu_ms_per_request": per_request_ms("etcd"),
        "loadgen_cpu_ms_per_request": per_request_ms("loadgen"),
        "connect_errors": load.connect_errors,
    }
    return cell


# -- profiling -------------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by self and total samples from py-spy's raw (collapsed) output.

    Only the event-loop thread counts: the processor's other threads (an idle executor, a
    C library's thread) sleep in calls py-spy does not always recognise as idle."""
    self_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    samples = other_threads = 0
    frame_re = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        if "Runner.run (" not in stack:
            other_threads += count
            continue
        samples += count
        frames = stack.split(";")
        seen: set[str] = set()
        for i, frame in enumerate(frames):
            m = frame_re.match(frame)
            func, path = (m.group(1), m.group(2)) if m else (frame, "?")
            key = f"{func} ({_short(path)})"
            if key not in seen:
                seen.add(key)
                total_fn[key] += count
            if i == len(frames) - 1:
                self_fn[key] += count
                lineno = m.group(3) if m else None
                self_line[f"{func} ({_short(path)}:{lineno})"] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        ranked = [(k, v) for k, v in counter.most_common() if k.split(" (")[0] not in _ENTRY]
        return [
            {"function": k, "samples": v, "percent": round(100 * v / samples, 1)}
            for k, v in ranked[:top]
        ]

    return {
        "samples": samples,
        "samples_other_threads": other_threads,
        "top_self": rows(self_fn),
        "top_total": rows(total_fn),
        "top_self_lines": rows(self_line),
    }


# The process's entry chain, in every stack: left out of the rankings.
_ENTRY = {
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "main",
    "run_service",
    "run",
    "Runner.run",
}


def _short(path: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        i = path.find(marker)
        if i >= 0:
            return path[i + len(marker) :] if marker != "/lib/python3" else "stdlib" + path[i:]
    return path


def print_profile(title: str, prof: dict[str, Any]) -> None:
    print(
        f"\npy-spy, processor, {title}: {prof['samples']} event-loop samples (idle excluded; "
        f"{prof['samples_other_threads']} in other threads left out)"
    )
    for key, label in (("top_self", "self"), ("top_total", "total")):
        print(f"  top by {label}:")
        for row in prof[key]:
            print(f"    {row['percent']:5.1f}%  {row['function']}")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Options:
    workers: list[int]
    concurrency: list[int]
    duration: float
    warmup: float
    speedup: float
    max_tokens: int
    prompt_tokens: int
    repeat: int
    idle: float
    profile: Path | None
    profile_rate: int


def cpu_window(mesh: Mesh, nats: NatsServer, etcd: EtcdServer) -> CpuWindow:
    assert nats.pid is not None and etcd.pid is not None
    return CpuWindow(
        {
            "processor": [mesh.processor.pid],
            "workers": [w.pid for w in mesh.workers],
            "nats": [nats.pid],
            "etcd": [etcd.pid],
        }
    )


async def idle_cores(mesh: Mesh, nats: NatsServer, etcd: EtcdServer, seconds: float) -> Any:
    """CPU cores each party uses with no load at all (heartbeats, leases, metrics loops)."""
    cpu = cpu_window(mesh, nats, etcd)
    cpu.mark("start")
    await asyncio.sleep(seconds)
    cpu.mark("end")
    return {k: round(v / seconds, 4) for k, v in cpu.seconds().items()}


async def run_cell(
    mesh: Mesh,
    nats: NatsServer,
    etcd: EtcdServer,
    message: str,
    concurrency: int,
    opts: Options,
    profile_name: str | None,
) -> dict[str, Any]:
    cpu = cpu_window(mesh, nats, etcd)
    spy: subprocess.Popen[bytes] | None = None
    raw: Path | None = None

    def on_window(edge: str) -> None:
        nonlocal spy, raw
        cpu.mark(edge)
        if edge == "start" and opts.profile is not None and profile_name is not None:
            raw = opts.profile / f"{profile_name}.txt"
            argv = [
                _py_spy(), "record", "--pid", str(mesh.processor.pid),
                "--duration", str(max(1, int(opts.duration))),
                "--rate", str(opts.profile_rate),
                "--format", "raw", "--output", str(raw),
            ]  # fmt: skip
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    make = build_request(HOST, mesh.http_port, mesh.model, message, opts.max_tokens)
    load = await run_users(
        HOST, mesh.http_port, make, concurrency, opts.warmup, opts.duration, on_window
    )
    cell = summarize(load, cpu.seconds(), len(mesh.workers), concurrency)
    if spy is not None and raw is not None:
        await asyncio.to_thread(spy.wait, 30)
        if await asyncio.to_thread(raw.exists):
            cell["profile"] = summarize_profile(raw)
            cell["profile"]["raw"] = str(raw)
    return cell


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


async def run_matrix(opts: Options, model_path: Path, tmp: Path) -> list[dict[str, Any]]:
    nats = NatsServer(data_dir=tmp / "nats", log_file=tmp / "nats.log")
    etcd = EtcdServer(data_dir=tmp / "etcd", log_file=tmp / "etcd.log")
    nats.start()
    etcd.start()
    runs: list[dict[str, Any]] = []
    try:
        await nats.wait_ready()
        await etcd.wait_ready()
        for run in range(opts.repeat):
            record: dict[str, Any] = {
                "run": run + 1,
                "loadavg_before": loadavg(),
                "started": _now(),
                "meshes": [],
                "cells": [],
            }
            runs.append(record)
            for n_workers in opts.workers:
                namespace = f"bench-r{run + 1}-w{n_workers}"
                mesh = start_mesh(namespace, n_workers, nats, etcd, model_path, opts.speedup, tmp)
                try:
                    await ready_mesh(mesh)
                    message, prompt_tokens = await calibrate_prompt(
                        mesh, opts.prompt_tokens, opts.max_tokens
                    )
                    idle = await idle_cores(mesh, nats, etcd, opts.idle)
                    record["meshes"].append(
                        {
                            "workers": n_workers,
                            "namespace": namespace,
                            "model": mesh.model,
                            "prompt_tokens_calibrated": prompt_tokens,
                            "idle_seconds": opts.idle,
                            "idle_cores": idle,
                        }
                    )
                    print(
                        f"{n_workers} worker(s): prompt {prompt_tokens} tokens; idle cores: "
                        f"processor {idle['processor']:.3f}, workers {idle['workers']:.3f}, "
                        f"nats {idle['nats']:.3f}, etcd {idle['etcd']:.3f}, "
                        f"other {idle['others']:.2f}",
                        flush=True,
                    )
                    for conc in opts.concurrency:
                        name = f"run{run + 1}-w{n_workers}-c{conc}"
                        cell = await run_cell(mesh, nats, etcd, message, conc, opts, name)
                        cell["loadavg"] = loadavg()
                        record["cells"].append(cell)
                        print(_row(cell), flush=True)
                        if "profile" in cell:
                            print_profile(name, cell["profile"])
                        for proc in mesh.procs:
                            if proc.popen.poll() is not None:
                                raise RuntimeError(
                                    f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}"
                                )
                finally:
                    stop(mesh.procs)
            record["loadavg_after"] = loadavg()
    finally:
        nats.stop()
        etcd.stop()
    return runs


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


HEADER = (
    f"{'W':>2} {'C':>3} {'req/s':>6} {'tok/s':>6} {'TTFT ms':>6} {'p99':>6} {'ITL ms':>6} "
    f"{'p99':>6} | {'processor':>9} {'us/tok':>6} {'cores':>5} {'rq-wait':>7} | "
    f"{'workers':>7} {'nats':>5} {'loadgen':>7} | {'busy':>4} {'other':>5} | {'err':>3} | "
    f"{'ref req/s':>9}"
)
LEGEND = (
    "processor, workers, nats, loadgen: CPU ms per request; us/tok: processor CPU us per output "
    "token;\ncores: processor CPU cores; rq-wait: share of the window the processor waited for "
    "a CPU;\nbusy: machine cores busy; other: cores used by processes outside this benchmark"
)


def _row(c: dict[str, Any]) -> str:
    ref = REFERENCE["requests_per_s"].get(str(c["concurrency"]), "")
    cores = c["cpu_cores_busy"]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"{c['workers']:>2} {c['concurrency']:>3} {c['requests_per_s']:>6.1f} "
        f"{c['output_tokens_per_s']:>6.0f} {c['ttft_ms_p50']:>7.2f} {c['ttft_ms_p99']:>6.1f} "
        f"{c['itl_ms_p50']:>6.3f} {c['itl_ms_p99']:>6.3f} | "
        f"{f(c['processor_cpu_ms_per_request'], '>9.2f')} "
        f"{f(c['processor_cpu_us_per_output_token'], '>6.0f')} "
        f"{cores['processor']:>5.2f} {cores['processor_runqueue_wait'] * 100:>6.0f}% | "
        f"{f(c['workers_cpu_ms_per_request'], '>7.2f')} "
        f"{f(c['nats_cpu_ms_per_request'], '>5.2f')} "
        f"{f(c['loadgen_cpu_ms_per_request'], '>7.2f')} | "
        f"{cores['machine']:>4.2f} {cores['others']:>5.2f} | {c['errors']:>3} | {ref!s:>9}"
    )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path, bool]:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add = parser.add_argument
    add("--workers", type=_int_list, default=[1, 4], help="worker counts, e.g. 1,4")
    add("--concurrency", type=_int_list, default=[1, 16, 64], help="users, e.g. 1,16,64")
    add("--duration", type=float, default=15.0, help="measured seconds per cell")
    add("--warmup", type=float, default=2.0, help="warm-up seconds per cell")
    add("--speedup", type=float, default=1000.0, help="sim engine --speedup-ratio")
    add("--max-tokens", type=int, default=64, help="output tokens per request")
    add("--prompt-tokens", type=int, default=128, help="templated prompt length to aim for")
    add("--repeat", type=int, default=1, help="run the whole matrix this many times")
    add("--idle", type=float, default=3.0, help="seconds to measure the idle mesh's CPU")
    add("--profile", type=Path, default=None, help="py-spy the processor; raw stacks here")
    add("--profile-rate", type=int, default=200, help="py-spy samples per second")
    add("--quick", action="store_true", help="smoke run: 1 worker, c 1 and 16, 3 s windows")
    add(
        "--output",
        type=Path,
        default=ROOT / "bench" / "results" / "serve.json",
        help="where to write the JSON results",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.concurrency, args.duration, args.warmup = [1], [1, 16], 3.0, 1.0
        args.idle = 1.0
    opts = Options(
        workers=args.workers,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        speedup=args.speedup,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        repeat=args.repeat,
        idle=args.idle,
        profile=args.profile,
        profile_rate=args.profile_rate,
    )
    return opts, args.output, args.quick


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[None]:
    """Stop every child on any exit: normal, exception, Ctrl-C or SIGTERM."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        stop(list(_LIVE))
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    opts, output, quick = parse_args(argv)
    if opts.profile is not None:
        opts.profile.mkdir(parents=True, exist_ok=True)
        _py_spy()
    model_path = prepare_default_model()
    info = machine_info()
    code = git_state()
    print(
        f"serve benchmark: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"speedup {opts.speedup:g}, max_tokens {opts.max_tokens}, "
        f"{opts.warmup:g} s warm-up + {opts.duration:g} s per cell, loadavg {loadavg()}"
    )
    print(
        "reference (Dynamo 1.6.1 Rust frontend + mocker): "
        f"{REFERENCE['requests_per_s']} req/s at concurrency, frontend "
        f"{REFERENCE['frontend_cpu_ms_per_request']} ms CPU/request, "
        f"{REFERENCE['frontend_cpu_us_per_output_token']} us/output token"
    )
    print(LEGEND)
    print(HEADER, flush=True)
    import uvloop

    with cleanup_on_exit(), tempfile.TemporaryDirectory(prefix="sglmesh-serve-") as tmp:
        try:
            runs = uvloop.run(run_matrix(opts, model_path, Path(tmp)))
        except KeyboardInterrupt:
            print("interrupted; stopped every process started", file=sys.stderr)
            return 130
    for run in runs:
        print(
            f"run {run['run']}: loadavg before {run['loadavg_before']}, "
            f"after {run['loadavg_after']}"
        )
    payload = {
        "benchmark": "serve",
        "when": _now(),
        "quick": quick,
        "machine": info,
        "code": code,
        "config": {
            "workers": opts.workers,
            "concurrency": opts.concurrency,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "speedup_ratio": opts.speedup,
            "max_tokens": opts.max_tokens,
            "prompt_tokens_target": opts.prompt_tokens,
            "model": str(model_path),
            "endpoint": "POST /v1/chat/completions, stream, ignore_eos, include_usage",
            "prompt": "chat template (system prompt) + 'Request NNNNNNNN. <filler>'; the "
            "counter differs per request, so only the system-prompt prefix is shared",
            "router_mode": "round-robin (processor default)",
            "loadgen": "closed loop, one keep-alive HTTP/1.1 connection per user, "
            "asyncio.Protocol on uvloop, in the benchmark process",
            "itl_definition": "(last token event - first token event) / (completion_tokens - 1)"
            " per request; p50/p99 across requests",
            "ttft_definition": "request written -> first HTTP chunk carrying a delta",
            "cpu": "utime+stime from /proc/<pid>/stat summed over each process group, "
            "during the measured window, divided by requests finished in it",
            "cpu_keys": "cpu_seconds/cpu_cores_busy: processor, workers, nats, etcd, loadgen "
            "(this process); machine = all busy cores (/proc/stat); others = machine minus "
            "ours; *_runqueue_wait = seconds runnable but waiting for a CPU (schedstat)",
        },
        "reference": REFERENCE,
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
