"""Where a model's tokenizer/config/template files should travel: etcd or NATS JetStream.

A processor fetches these files (SmolLM2-135M-Instruct's: a 3.4 MB tokenizer.json and a few
small JSON files) once per model and per change, so what matters is a cold publish and a cold
fetch of the whole set, and what the store keeps afterwards. Measured on loopback, real
servers (``shared.infra``), each round with fresh keys/objects and a fresh client:

- etcd: ``shared/model_files.py`` itself (zlib, 1 MiB chunks, marker key), publish and fetch
  into a cache directory, plus the growth of etcd's database file;
- JetStream object store (nats-py, nats-server ``--jetstream``): one bucket, ``put`` and
  ``get`` of each raw file (the object store chunks at 128 KiB itself).

    python bench/model_files.py [--rounds 10] [--model DIR] [--output PATH]

Prints a table and writes ``bench/results/model_files.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from shared.infra import EtcdServer, NatsServer  # noqa: E402
from shared.model import default_model_path  # noqa: E402
from shared.model_files import (  # noqa: E402
    PUBLISHED_FILES,
    fetch_model_files,
    publish_model_files,
)
from shared.runtime.etcd_client import EtcdAuth, EtcdClient  # noqa: E402


def _sources(model: Path) -> list[tuple[str, Path]]:
    return [(n, model / n) for n in PUBLISHED_FILES if (model / n).is_file()]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


async def _bench_etcd(etcd: EtcdServer, model: Path, rounds: int, tmp: Path) -> dict[str, Any]:
    publish, fetch = [], []

    def db_size() -> int:
        return sum(p.stat().st_size for p in etcd.data_dir.rglob("db"))

    db_before = db_size()
    for r in range(rounds):
        namespace = f"bench{r}"  # fresh keys every round: nothing is already published
        client = EtcdClient("127.0.0.1", etcd.port, auth=EtcdAuth())
        await client.connect()
        t0 = time.perf_counter()
        files = await publish_model_files(client, namespace, _sources(model))
        publish.append(time.perf_counter() - t0)
        await client.close()
        client = EtcdClient("127.0.0.1", etcd.port, auth=EtcdAuth())
        await client.connect()
        cache = tmp / f"cache{r}"
        t0 = time.perf_counter()
        _, fetched = await fetch_model_files(client, namespace, files, cache)
        fetch.append(time.perf_counter() - t0)
        assert fetched == len(files)
        await client.close()
        shutil.rmtree(cache)
    return {
        "publish": _ms(publish),
        "fetch_cold": _ms(fetch),
        "db_growth_bytes_per_publish": (db_size() - db_before) // rounds,
    }


async def _bench_jetstream(nats_url: str, model: Path, rounds: int) -> dict[str, Any]:

    publish, fetch = [], []
    sources = _sources(model)
    for r in range(rounds):
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        t0 = time.perf_counter()
        store = await js.create_object_store(f"bench{r}")
        for name, path in sources:
            await store.put(name, path.read_bytes())
        publish.append(time.perf_counter() - t0)
        await nc.close()
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        t0 = time.perf_counter()
        store = await js.object_store(f"bench{r}")
        for name, _ in sources:
            got = await store.get(name)
            assert got.data is not None
            hashlib.sha256(got.data).hexdigest()  # the same check the etcd path does
        fetch.append(time.perf_counter() - t0)
        await nc.close()
    return {"publish": _ms(publish), "fetch_cold": _ms(fetch)}


async def bench(model: Path, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sglmesh-bench-files-"))
    nats_server = NatsServer(data_dir=tmp / "nats", jetstream=True)
    etcd = EtcdServer(data_dir=tmp / "etcd", log_file=tmp / "etcd.log")
    try:
        for server in (nats_server, etcd):
            server.start()
            server.wait_ready_sync(30.0)
        sizes = {n: p.stat().st_size for n, p in _sources(model)}
        return {
            "model": model.name,
            "files": sizes,
            "total_bytes": sum(sizes.values()),
            "rounds": rounds,
            "etcd": await _bench_etcd(etcd, model, rounds, tmp),
            "jetstream_object_store": await _bench_jetstream(nats_server.url, model, rounds),
            "machine": platform.platform(),
        }
    finally:
        nats_server.stop()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="publish+fetch rounds per store")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: "
                        "SmolLM2-135M-Instruct, prepared on first use)")  # fmt: skip
    parser.add_argument(
        "--output", default=str(ROOT / "bench" / "results" / "model_files.json"),
        help="where to write the JSON results",
    )  # fmt: skip
    args = parser.parse_args()
    model = args.model or default_model_path()
    results = asyncio.run(bench(model, args.rounds))
    print(f"{results['model']}: {len(results['files'])} files, {results['total_bytes']} bytes")
    print(f"{'store':<24}{'publish median/max ms':>24}{'cold fetch median/max ms':>28}")
    for store in ("etcd", "jetstream_object_store"):
        r = results[store]
        pub, fet = r["publish"], r["fetch_cold"]
        print(
            f"{store:<24}{pub['median_ms']:>15.1f} / {pub['max_ms']:<7.1f}"
            f"{fet['median_ms']:>19.1f} / {fet['max_ms']:<7.1f}"
        )
    print(f"etcd db growth per publish: {results['etcd']['db_growth_bytes_per_publish']} bytes")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
