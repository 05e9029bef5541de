"""KV router decision latency: one ``KvRouter.select`` over 16 workers x 100k indexed blocks.

The router runs on the processor's event loop, once per request (and per prefill leg), so a
decision must stay well under a millisecond however much the engines cache. Measured here,
pinned to ONE core:

- the index: 16 simulated engines (``shared/engine/sim/radix.py``, SGLang's radix cache and
  exact KV events), 16 tokens per block, each filled to 100k cached blocks with chat sessions
  of 2k-16k tokens that start with one of 32 shared system prompts (512-2048 tokens); every
  session is cached on its "home" worker and 30% also on a second one, as migrations and
  load balancing leave them. Every event batch goes through ``KvIndex.apply_message`` as the
  processor will apply it; the build rate, index size and RSS growth (sessions included) are
  reported;
- load: 24 requests in flight per worker (``KvRouter.begin``) and one engine load report each,
  so every cost term is live;
- requests of 2k, 4k, 8k and 16k tokens: 60% continue a cached session (deep match on one or
  two workers, the system prompt on all), 30% start a new session on a known system prompt
  (shallow match everywhere), 10% are cold. Timed per call with ``perf_counter_ns``:
  ``select`` with the prompt's block hashes precomputed (the decision), ``select`` from token
  ids (hashing included: the processor's real call), hashing alone, and ``find_matches``
  alone. Each measurement gets its own fresh requests: a repeated lookup would find the
  index's entries in the CPU cache, and a cold walk (a few hundred ns per block on a slow
  core, mostly memory latency, against about 100 ns warm) is what a new prompt pays.

Each size runs ``--rounds`` (3) rounds of fresh requests; the round with the median p99 is
reported, with the worst round's p99 beside it: the machine is shared, and one preempted
round should not stand for the code.

Goal: decision p99 < 1 ms, judged both with the prompt's hashes precomputed and with hashing
included (the processor's real call; ``select`` hashes lazily, only as far as some worker
still matches). The garbage collector stays on, as in the processor. Also reported: how long
purging a 100k-block worker blocks the loop (``remove_worker``).

    python bench/router_decision.py [--quick] [--workers 16] [--blocks 100000]
                                    [--requests 1000] [--rounds 3] [--output PATH]

Prints a table and writes ``bench/results/router_decision.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from array import array
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto.metrics import KvEventsMessage, LoadMetrics  # noqa: E402
from shared.engine.cpu.radix import RadixCache  # noqa: E402
from shared.router import (  # noqa: E402
    KvRouter,
    KvRouterConfig,
    RouteDecision,
    WorkerCandidate,
    block_hashes,
)

GOAL_P99_MS = 1.0
BLOCK = 16
SIZES = (2048, 4096, 8192, 16384)
NEW_TURN = 256
VOCAB = 150_000


def pin_one_core() -> int | None:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_tokens(rng: random.Random, n: int) -> array[int]:
    words = array("I")
    words.frombytes(rng.randbytes(4 * n))
    return array("I", (w % VOCAB for w in words))


class Workload:
    """Shared system prompts and chat sessions, generated on demand and kept for requests."""

    def __init__(self, rng: random.Random, *, min_len: int, max_len: int) -> None:
        self.rng = rng
        self.min_len = min_len
        self.max_len = max_len
        self.systems = [random_tokens(rng, rng.randrange(512, 2049)) for _ in range(32)]
        self.sessions: list[array[int]] = []

    def new_session(self) -> array[int]:
        system = self.rng.choice(self.systems)
        length = self.rng.randrange(self.min_len, self.max_len + 1)
        session = system + random_tokens(self.rng, max(length - len(system), BLOCK))
        self.sessions.append(session)
        return session

    def request(self, size: int) -> tuple[str, list[int]]:
        rng = self.rng
        kind = rng.random()
        if kind < 0.6:
            session = rng.choice(self.sessions)
            prefix = session[: size - NEW_TURN]
            tokens = prefix + random_tokens(rng, size - len(prefix))
            return "continue", tokens.tolist()
        if kind < 0.9:
            system = rng.choice(self.systems)
            return "new-session", (system + random_tokens(rng, size - len(system))).tolist()
        return "cold", random_tokens(rng, size).tolist()


def build(
    router: KvRouter, workers: int, blocks: int, workload: Workload
) -> tuple[dict[str, Any], list[int]]:
    """Fill one radix cache per worker to ``blocks`` pages, relaying every event batch."""
    caches = [RadixCache(BLOCK, blocks + workload.max_len // BLOCK + 1) for _ in range(workers)]
    seqs = [0] * workers
    index = router.index
    rng = workload.rng
    apply_s = 0.0
    events = 0
    rss0 = rss_bytes()
    full: set[int] = set()
    home = 0
    while len(full) < workers:
        session = workload.new_session()
        targets = {home % workers}
        if rng.random() < 0.3:
            targets.add(rng.randrange(workers))
        home += 1
        for w in targets - full:
            cache = caches[w]
            cache.insert(session)
            batch = cache.take_events()
            message = KvEventsMessage(worker_id=w + 1, dp_rank=0, seq=seqs[w], ts=0.0, events=batch)
            seqs[w] += 1
            events += len(batch)
            start = time.perf_counter()
            index.apply_message(message)
            apply_s += time.perf_counter() - start
            if cache.cached_pages >= blocks:
                full.add(w)
    per_worker = [index.num_blocks((w + 1, 0)) for w in range(workers)]
    for w, cache in enumerate(caches):
        assert per_worker[w] == cache.cached_pages, "index and engine cache disagree"
    del caches
    gc.collect()
    stored = index.stats.stored_blocks
    return {
        "workers": workers,
        "block_size": BLOCK,
        "blocks_per_worker_min": min(per_worker),
        "blocks_per_worker_max": max(per_worker),
        "indexed_blocks": sum(per_worker),
        "distinct_hashes": index.num_hashes(),
        "sessions": len(workload.sessions),
        "events": events,
        "apply_seconds": round(apply_s, 2),
        "apply_blocks_per_s": round(stored / apply_s),
        "rss_delta_mb_with_sessions": round((rss_bytes() - rss0) / 2**20),
    }, per_worker


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 4)

    return {
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] / 1e6, 4),
        "mean_ms": round(statistics.fmean(ordered) / 1e6, 4),
    }


def measure(
    router: KvRouter,
    candidates: list[WorkerCandidate],
    workload: Workload,
    size: int,
    count: int,
    overlap_seen: dict[str, list[int]],
) -> dict[str, list[int]]:
    """One round: each measurement on its own fresh requests (a second lookup of the same
    prompt would find the index's entries in the CPU cache and flatter the numbers)."""
    sets = [
        [(kind, tokens, block_hashes(tokens, BLOCK)) for kind, tokens in batch]
        for batch in ([workload.request(size) for _ in range(count)] for _ in range(4))
    ]
    for _, tokens, _hashes in sets[0][:20]:  # warm up the code paths
        router.select(candidates, tokens, block_size=BLOCK)
    now = time.perf_counter_ns
    find = router.index.find_matches
    decide: list[int] = []
    for kind, _tokens, hashes in sets[0]:
        t0 = now()
        decision = router.select(candidates, hashes=hashes, prompt_tokens=size, block_size=BLOCK)
        decide.append(now() - t0)
        overlap_seen.setdefault(kind, []).append(decision.overlap_blocks)
    with_hash: list[int] = []
    for _, tokens, _hashes in sets[1]:
        t0 = now()
        router.select(candidates, tokens, block_size=BLOCK)
        with_hash.append(now() - t0)
    hash_only: list[int] = []
    for _, tokens, _hashes in sets[2]:
        t0 = now()
        block_hashes(tokens, BLOCK)
        hash_only.append(now() - t0)
    match_only: list[int] = []
    for _, _tokens, hashes in sets[3]:
        t0 = now()
        find(hashes)
        match_only.append(now() - t0)
    return {
        "select_hashes_precomputed": decide,
        "select_with_hashing": with_hash,
        "hashing_only": hash_only,
        "find_matches_only": match_only,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 workers x 10k blocks")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=100_000, help="cached blocks per worker")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per prompt size and measurement"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per size (the median round is reported)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--output", default=str(ROOT / "bench" / "results" / "router_decision.json")
    )
    args = parser.parse_args()
    if args.quick:
        args.workers, args.blocks, args.requests, args.rounds = 4, 10_000, 200, 1
    cpu = pin_one_core()
    load_before = os.getloadavg()
    rng = random.Random(args.seed)
    workload = Workload(rng, min_len=SIZES[0], max_len=SIZES[-1])
    router = KvRouter(KvRouterConfig(), busy_threshold=0.95, rng=random.Random(args.seed))

    start = time.perf_counter()
    index_info, _ = build(router, args.workers, args.blocks, workload)
    index_info["build_seconds"] = round(time.perf_counter() - start, 1)

    candidates = [
        WorkerCandidate(w + 1, total_kv_blocks=args.blocks + 10_000) for w in range(args.workers)
    ]
    for w in range(args.workers):
        for _ in range(24):
            router.begin(RouteDecision(w + 1, 0, 0), rng.randrange(256, 4096), BLOCK)
        router.update_load(
            LoadMetrics(
                worker_id=w + 1,
                kv_used_blocks=rng.randrange(2_000, 8_000),
                kv_total_blocks=args.blocks + 10_000,
                num_running=24,
                ts=0.0,
            )
        )

    results: dict[str, Any] = {}
    overlap_seen: dict[str, list[int]] = {}
    for size in SIZES:
        rounds = [
            measure(router, candidates, workload, size, args.requests, overlap_seen)
            for _ in range(args.rounds)
        ]
        entry: dict[str, Any] = {
            "prompt_tokens": size,
            "prompt_blocks": size // BLOCK,
            "requests_per_measurement_and_round": args.requests,
        }
        for name in rounds[0]:
            per_round = [percentiles(r[name]) for r in rounds]
            # The round with the median p99 stands for the size; the worst is kept beside it.
            per_round.sort(key=lambda p: p["p99_ms"])
            entry[name] = {
                **per_round[len(per_round) // 2],
                "worst_round_p99_ms": per_round[-1]["p99_ms"],
            }
        results[str(size)] = entry

    victim = args.workers
    t0 = time.perf_counter_ns()
    router.remove_worker(victim)
    purge_ms = (time.perf_counter_ns() - t0) / 1e6

    worst_p99 = max(r["select_hashes_precomputed"]["p99_ms"] for r in results.values())
    worst_p99_hashing = max(r["select_with_hashing"]["p99_ms"] for r in results.values())
    overlap_summary = {
        kind: {
            "requests": len(v),
            "mean_overlap_blocks_of_chosen": round(statistics.fmean(v), 1),
        }
        for kind, v in sorted(overlap_seen.items())
    }

    print(
        f"KV router decision, one core (cpu {cpu}), Python {platform.python_version()}: "
        f"{index_info['workers']} workers x {index_info['blocks_per_worker_min']:,}+ blocks "
        f"({index_info['indexed_blocks']:,} indexed, {index_info['distinct_hashes']:,} distinct),"
        f" built in {index_info['build_seconds']} s "
        f"(apply {index_info['apply_blocks_per_s']:,} blocks/s)"
    )
    header = (
        "tokens",
        "select p50",
        "select p99",
        "+hash p50",
        "+hash p99",
        "hash p99",
        "match p99",
    )
    print("  " + "  ".join(f"{h:>10}" for h in header))
    for label, r in results.items():
        row = (
            label,
            r["select_hashes_precomputed"]["p50_ms"],
            r["select_hashes_precomputed"]["p99_ms"],
            r["select_with_hashing"]["p50_ms"],
            r["select_with_hashing"]["p99_ms"],
            r["hashing_only"]["p99_ms"],
            r["find_matches_only"]["p99_ms"],
        )
        print("  " + "  ".join(f"{v:>10}" for v in row))
    print(
        f"  (ms; goal: p99 < {GOAL_P99_MS} ms -- hashes precomputed: "
        f"{'met' if worst_p99 < GOAL_P99_MS else 'MISSED'}, with hashing: "
        f"{'met' if worst_p99_hashing < GOAL_P99_MS else 'MISSED'})"
    )
    for kind, o in overlap_summary.items():
        print(
            f"  {kind:<12} mean overlap of the chosen worker: {o['mean_overlap_blocks_of_chosen']}"
        )
    print(f"  remove_worker with {args.blocks:,} blocks: {purge_ms:.1f} ms")

    payload = {
        "benchmark": "router_decision",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "pinned_cpu": cpu,
            "python": platform.python_version(),
            # Other processes share this machine: its load average around the run.
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "quick": args.quick,
        "goal": {"select_p99_ms": GOAL_P99_MS},
        "index": index_info,
        "load": {"in_flight_per_worker": 24, "busy_threshold": 0.95},
        "results": results,
        "chosen_overlap": overlap_summary,
        "remove_worker_ms": round(purge_ms, 1),
        "worst_p99_ms": {
            "select_hashes_precomputed": worst_p99,
            "select_with_hashing": worst_p99_hashing,
        },
        # The goal is set on the decision; hashing a 16k prompt alone stays under it, so the
        # processor's real call (hashing included) is judged against it too.
        "met": {
            "select_hashes_precomputed": worst_p99 < GOAL_P99_MS,
            "select_with_hashing": worst_p99_hashing < GOAL_P99_MS,
        },
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
