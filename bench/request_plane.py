"""Request-plane benchmark: streamed-chunk throughput and request round trip.

Starts its own nats-server and etcd on free loopback ports, a worker *process* serving a
streaming endpoint, and measures from this process at 1 and 64 concurrent streams:

- throughput: small chunks per second through the mesh, end to end;
- round trip: one request, one chunk back, p50/p99;

each beside the same handler called directly in-process (the baseline), with ratios and the
latency the mesh adds per hop; and beside a bare NATS request/reply to the same worker process
(the floor any NATS request plane pays), to show what the runtime itself adds.
Prints a table and writes ``bench/results/request_plane.json``.

    python bench/request_plane.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import MeshConfig  # noqa: E402
from shared.infra import EtcdServer, NatsServer  # noqa: E402
from shared.runtime import Context, DistributedRuntime  # noqa: E402

CHUNK = {"token_ids": [42], "index": 0}  # about the size of one decode step's output


async def handler(request: dict[str, int], ctx: Context | None) -> AsyncIterator[Any]:
    for _ in range(request["n"]):
        yield CHUNK


def worker_main(args: argparse.Namespace) -> None:
    import uvloop

    async def run() -> None:
        config = MeshConfig(
            namespace=args.namespace, nats_url=args.nats, etcd_endpoints=[args.etcd]
        )
        rt = DistributedRuntime(config)
        await rt.start()
        await rt.endpoint("bench", "generate").serve(handler)

        async def echo(msg: Any) -> None:  # the bare-NATS baseline: one reply per request
            await rt.nats.publish(msg.reply, msg.data)

        await rt.nats.subscribe("bench.raw", cb=echo)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await rt.shutdown(grace=0)

    uvloop.run(run())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def throughput(
    call: Callable[[int], Awaitable[int]], concurrency: int, chunks_per_stream: int
) -> float:
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(call(chunks_per_stream) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    assert all(c == chunks_per_stream for c in counts), counts
    return sum(counts) / elapsed


async def round_trips(
    call: Callable[[int], Awaitable[int]], concurrency: int, per_worker: int
) -> list[float]:
    samples: list[float] = []

    async def loop() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            await call(1)
            samples.append(time.perf_counter() - t0)

    for _ in range(20):  # warm up
        await call(1)
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return samples


async def bench(quick: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sglmesh-bench-"))
    nats = NatsServer(data_dir=tmp / "nats", log_file=tmp / "nats.log")
    etcd = EtcdServer(data_dir=tmp / "etcd", log_file=tmp / "etcd.log")
    nats.start()
    etcd.start()
    await nats.wait_ready()
    await etcd.wait_ready()
    namespace = "bench"
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
        [sys.executable, __file__, "--worker", "--nats", nats.url, "--etcd", etcd.endpoint,
         "--namespace", namespace],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("READY")
        config = MeshConfig(namespace=namespace, nats_url=nats.url, etcd_endpoints=[etcd.endpoint])
        rt = DistributedRuntime(config)
        await rt.start()
        client = await rt.client("bench", "generate")
        await client.wait_for_instances(1, timeout=10)

        async def via_mesh(n: int) -> int:
            count = 0
            async for _ in await client.generate({"n": n}):
                count += 1
            return count

        raw_inbox = rt.nats.new_inbox()
        raw_waiters: dict[str, asyncio.Future[None]] = {}

        async def on_raw(msg: Any) -> None:
            waiter = raw_waiters.pop(msg.subject, None)
            if waiter is not None:
                waiter.set_result(None)

        await rt.nats.subscribe(f"{raw_inbox}.*", cb=on_raw)
        raw_ids = iter(range(10**9))

        async def bare_nats(n: int) -> int:
            reply = f"{raw_inbox}.{next(raw_ids)}"
            waiter = raw_waiters[reply] = asyncio.get_running_loop().create_future()
            await rt.nats.publish("bench.raw", b"x", reply=reply)
            await waiter
            return 1

        async def direct(n: int) -> int:
            count = 0
            async for _ in handler({"n": n}, None):
                count += 1
            return count

        scale = 0.2 if quick else 1.0
        results: dict[str, Any] = {}
        for conc, per_stream in ((1, 100_000), (64, 2_000)):
            per_stream = int(per_stream * scale)
            await via_mesh(1000)
            mesh_tp = await throughput(via_mesh, conc, per_stream)
            direct_tp = await throughput(direct, conc, per_stream)
            n_req = int((2000 if conc == 1 else 100) * scale)
            mesh_rt = await round_trips(via_mesh, conc, n_req)
            direct_rt = await round_trips(direct, conc, n_req)
            nats_rt = await round_trips(bare_nats, conc, n_req)
            results[f"c{conc}"] = {
                "concurrency": conc,
                "chunks_per_stream": per_stream,
                "mesh_chunks_per_s": round(mesh_tp),
                "direct_chunks_per_s": round(direct_tp),
                "throughput_ratio_mesh_over_direct": round(mesh_tp / direct_tp, 4),
                "requests": len(mesh_rt),
                "mesh_rtt_p50_ms": round(pct(mesh_rt, 0.5) * 1e3, 4),
                "mesh_rtt_p99_ms": round(pct(mesh_rt, 0.99) * 1e3, 4),
                "mesh_rtt_mean_ms": round(statistics.fmean(mesh_rt) * 1e3, 4),
                "direct_rtt_p50_ms": round(pct(direct_rt, 0.5) * 1e3, 4),
                "direct_rtt_p99_ms": round(pct(direct_rt, 0.99) * 1e3, 4),
                "bare_nats_rtt_p50_ms": round(pct(nats_rt, 0.5) * 1e3, 4),
                "bare_nats_rtt_p99_ms": round(pct(nats_rt, 0.99) * 1e3, 4),
                "runtime_over_bare_nats_p50_ms": round(
                    (pct(mesh_rt, 0.5) - pct(nats_rt, 0.5)) * 1e3, 4
                ),
                "added_p50_ms_per_hop": round((pct(mesh_rt, 0.5) - pct(direct_rt, 0.5)) * 1e3, 4),
            }
        await rt.shutdown(grace=0)
        return results
    finally:
        if worker.stdin is not None:
            worker.stdin.close()
        try:
            worker.wait(5)
        except subprocess.TimeoutExpired:
            worker.kill()
        nats.stop()
        etcd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "request_plane.json"),
        help="where to write the JSON results",
    )  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    import uvloop

    results = uvloop.run(bench(args.quick))
    header = (
        f"{'conc':>4} {'mesh chunks/s':>14} {'direct chunks/s':>16} {'ratio':>7} "
        f"{'mesh p50 ms':>11} {'mesh p99 ms':>11} {'direct p50 ms':>13} {'added p50 ms':>12} "
        f"{'NATS p50 ms':>11} {'over NATS ms':>12}"
    )
    print(header)
    for r in results.values():
        print(
            f"{r['concurrency']:>4} {r['mesh_chunks_per_s']:>14,} {r['direct_chunks_per_s']:>16,} "
            f"{r['throughput_ratio_mesh_over_direct']:>7.4f} {r['mesh_rtt_p50_ms']:>11.3f} "
            f"{r['mesh_rtt_p99_ms']:>11.3f} {r['direct_rtt_p50_ms']:>13.4f} "
            f"{r['added_p50_ms_per_hop']:>12.3f} {r['bare_nats_rtt_p50_ms']:>11.3f} "
            f"{r['runtime_over_bare_nats_p50_ms']:>12.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "request_plane",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick,
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
