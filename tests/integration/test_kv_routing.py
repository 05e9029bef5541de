"""KV-aware routing end to end: engines' KV events -> publisher -> NATS -> processor's router.

Four simulated workers, a publisher and a processor (default ``--router-mode kv``), real
processes throughout. Prompts are token ids (``/v1/completions``) so their blocks are exact.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp

from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from tests.integration.mesh import mesh_flags
from tests.integration.processor_mesh import Processor, _Process, mesh
from tests.integration.test_publisher import _consecutive_ports

PAGE = 16
PREFIX = 8 * PAGE  # each shared "system prompt" is 8 blocks
MODEL = "tiny"


def kv_flags() -> tuple[str, ...]:
    base = _consecutive_ports(1)
    events = {"publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{base}",
              "replay_endpoint": f"tcp://127.0.0.1:{base + 1}", "bind": True}  # fmt: skip
    return ("--kv-events-config", json.dumps(events), "--enable-metrics",
            "--decode-log-interval", "4")  # fmt: skip


async def complete(http: aiohttp.ClientSession, proc: Processor, prompt: list[int]) -> Any:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    async with http.post(f"{proc.v1}/completions", json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return data


def cached(answer: Any) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_repeats_of_a_prefix_go_to_the_worker_holding_it(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    rng = random.Random(7)
    vocab = 60  # the tiny tokenizer's ordinary words
    prefixes = [[rng.randrange(4, vocab) for _ in range(PREFIX)] for _ in range(8)]

    def prompt(i: int) -> list[int]:
        return prefixes[i] + [rng.randrange(4, vocab) for _ in range(20)]

    model = make_test_tokenizer(tmp_path / "tiny")
    async with mesh(nats_server, etcd_server, tmp_path / "logs", lease_ttl=3) as m:
        workers = await m.add_workers(model, *[kv_flags() for _ in range(4)], served=MODEL)
        publisher = _Process(
            "publisher",
            [sys.executable, "-m", "sglmesh", "publisher", *mesh_flags(m.cfg)],
            m.log_dir,
        )
        m.workers.append(publisher)  # type: ignore[arg-type]  # closed with the mesh
        first = m.add_processor()
        await first.wait_model(MODEL)
        async with aiohttp.ClientSession() as http:
            # Warm: each prefix once (the router spreads them by load), then let the events
            # reach the router.
            for i in range(8):
                await complete(http, first, prompt(i))
            await asyncio.sleep(1.5)
            misses = []
            # In a shuffled order, so no load-only rotation can line up with the warm-up's.
            order = [*range(8), *range(8)]
            rng.shuffle(order)
            for i in order:
                answer = await complete(http, first, prompt(i))
                if cached(answer) < PREFIX:
                    misses.append((i, cached(answer)))
            assert not misses, f"repeats that missed their prefix: {misses}\n{m.output()}"

            # A processor started after the workers learns the caches from the publisher.
            late = m.add_processor()
            await late.wait_model(MODEL)
            late_hits = [cached(await complete(http, late, prompt(i))) for i in order[:8]]
            assert all(c >= PREFIX for c in late_hits), late_hits

            # A worker that leaves is purged: its prefixes are served (and cached again) by
            # the others, and it gets no more requests.
            gone = workers[0]
            async with http.get(f"{gone.base}/health") as resp:
                gone_id = (await resp.json())["instance_id"]
            gone.stop()  # kill -9: only its lease expiry tells discovery
            await asyncio.sleep(m.cfg.lease_ttl + 1.5)
            before = by_instance(await first.metrics())
            answers = [await complete(http, first, prompt(i)) for i in range(8)]
            after = by_instance(await first.metrics())
            assert sum(after.values()) - sum(before.values()) == 8
            assert after.get(gone_id, 0.0) == before.get(gone_id, 0.0), (gone_id, before, after)
            assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)


_DECISION = re.compile(
    r'^sglmesh_processor_routing_decisions_total\{[^}]*instance="(\w+)"[^}]*\} (\S+)$', re.M
)


def by_instance(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for inst, value in _DECISION.findall(text):
        out[inst] = out.get(inst, 0.0) + float(value)
    return out
