"""``sglmesh status`` against a live mesh (real etcd, NATS, worker processes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from tests.integration.mesh import ROOT, mesh_flags
from tests.integration.processor_mesh import hermetic_env, mesh


def _status(flags: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sglmesh", "status", *flags, *extra],
        cwd=ROOT, env=hermetic_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_status_lists_instances_and_models(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    model = make_test_tokenizer(tmp_path / "tiny")
    async with mesh(nats_server, etcd_server, tmp_path / "logs") as m:
        flags = mesh_flags(m.cfg)
        empty = await asyncio.to_thread(_status, flags, "--json")
        assert empty.returncode == 0, empty.stderr
        assert json.loads(empty.stdout)["instances"] == []

        await m.add_workers(
            model, ("--disaggregation-mode", "prefill"), ("--disaggregation-mode", "decode"),
            served="tiny",
        )  # fmt: skip
        done = await asyncio.to_thread(_status, flags, "--json")
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        roles = sorted(i["role"] for i in snap["instances"])
        assert roles == ["decode", "prefill"]
        (tiny,) = snap["models"]
        assert tiny["name"] == "tiny" and tiny["servable"]
        assert tiny["workers"] == {"decode": 1, "prefill": 1}
        for inst in snap["instances"]:
            assert inst["model"] == "tiny" and inst["total_kv_blocks"] > 0

        table = await asyncio.to_thread(_status, flags)
        assert table.returncode == 0, table.stderr
        assert "model tiny: 1 decode, 1 prefill (servable)" in table.stdout
        assert "INSTANCE" in table.stdout and "prefill" in table.stdout

        # The decode worker leaves: the model is no longer servable.
        m.workers[1].stop()
        await asyncio.sleep(m.cfg.lease_ttl + 1)
        gone = json.loads((await asyncio.to_thread(_status, flags, "--json")).stdout)
        assert [i["role"] for i in gone["instances"]] == ["prefill"]
        assert not gone["models"][0]["servable"]


def test_status_reports_an_unreachable_mesh() -> None:
    result = _status(["--nats-url", "nats://127.0.0.1:1", "--timeout", "0.5"])
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr and "Traceback" not in result.stderr


async def test_status_shows_load_and_cache_from_the_publisher(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    from tests.integration.mesh import make_config, runtime
    from tests.integration.test_publisher import Publisher, Worker, generate

    model = make_test_tokenizer(tmp_path / "tiny")
    cfg = make_config(nats_server, etcd_server)
    flags = mesh_flags(cfg)
    worker, publisher = Worker(cfg, model), Publisher(cfg)
    try:
        await asyncio.gather(worker.wait_ready(), publisher.wait_ready())
        async with runtime(cfg) as rt:
            client = await rt.client("backend", "generate")
            await client.wait_for_instances(1)
            deadline = asyncio.get_running_loop().time() + 20
            i = 0
            while True:
                # Engines drop load reports until the publisher has bound their metrics
                # socket: keep one busy until a report is in.
                await generate(client, worker, [5 + i % 7] * 40, 8)
                i += 1
                out = await asyncio.to_thread(_status, flags, "--json")
                snap = json.loads(out.stdout)
                wid = f"{worker.instance_id:x}"
                (inst,) = [x for x in snap["instances"] if x["instance_id"] == wid]
                engines = inst["engines"]
                if engines and engines[0]["cached_blocks"] and engines[0]["kv_total_blocks"]:
                    break
                assert asyncio.get_running_loop().time() < deadline, json.dumps(engines)
        (engine,) = engines
        assert engine["events_relayed"] > 0 and engine["last_event_age_s"] is not None
        assert engine["kv_total_blocks"] > 0 and engine["running"] is not None
        table = (await asyncio.to_thread(_status, flags)).stdout
        assert "ago" in table and "%" in table
    finally:
        worker.close()
        publisher.close()
