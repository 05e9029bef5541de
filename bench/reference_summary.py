"""Side-by-side table from the anchor driver's JSONL (``bench/reference.sh``).

Per cell (routing, workers, connection mode, concurrency) and system: medians over the
repeats of req/s and of CPU ms per request of every process of the stack (front, workers,
NATS, etcd, the publisher), then the ratios sglmesh / reference. A cell meets the goal when
req/s >= 1.0x and total CPU per request <= 1.0x. Also the SSE text events per request of each
system: the reference sends one per token; sglmesh sends the tokens a stream has ready when it
wakes in one event, so on a fast simulator it sends fewer (and less work per request).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

SYSTEMS = ("dynamo", "sglmesh")


def total_cpu(run: dict[str, Any]) -> float:
    return float(sum(run["server_cpu_ms_per_req"].values()))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int, str, int], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        key = (run["tag"].split("-")[0], run["n_workers"], run["conn"], run["concurrency"])
        cells[key][run["system"]].append(run)
    rows = []
    for (routing, workers, conn, c), by_system in sorted(cells.items()):
        row: dict[str, Any] = {"routing": routing, "workers": workers, "conn": conn, "c": c}
        for system in SYSTEMS:
            got = by_system.get(system, [])
            row[system] = {
                "runs": len(got),
                "req_per_s": statistics.median(r["req_per_s"] for r in got) if got else None,
                "cpu_ms_per_req": statistics.median(total_cpu(r) for r in got) if got else None,
                "cpu_by_process": {
                    name: round(
                        statistics.median(r["server_cpu_ms_per_req"].get(name, 0.0) for r in got), 3
                    )
                    for name in sorted({n for r in got for n in r["server_cpu_ms_per_req"]})
                },
                "errors": sum(r["errors"] for r in got),
                "events_per_req": (
                    statistics.median(r["text_events_per_request_mean"] for r in got)
                    if got
                    else None
                ),
            }
        ref, ours = row["dynamo"], row["sglmesh"]
        if ref["req_per_s"] and ours["req_per_s"]:
            row["req_per_s_ratio"] = round(ours["req_per_s"] / ref["req_per_s"], 3)
            row["cpu_ratio"] = round(ours["cpu_ms_per_req"] / ref["cpu_ms_per_req"], 3)
            row["goal_met"] = row["req_per_s_ratio"] >= 1.0 and row["cpu_ratio"] <= 1.0
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("jsonl")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--commit", default="")
    parser.add_argument(
        "--sim-timeslice-ms", type=float, default=None, help="sglmesh's simulator timeslice"
    )
    args = parser.parse_args()
    runs = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line]
    rows = summarise(runs)
    if args.sim_timeslice_ms is not None:
        print(f"sglmesh simulator timeslice: {args.sim_timeslice_ms:g} ms")
    print(
        "| routing | N | conn | c | req/s ref | req/s sglmesh | ratio | CPU ms/req ref | "
        "CPU ms/req sglmesh | ratio | events/req ref | events/req sglmesh |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref, ours = r["dynamo"], r["sglmesh"]
        print(
            f"| {r['routing']} | {r['workers']} | {r['conn']} | {r['c']} | "
            f"{ref['req_per_s'] or 0:.0f} | {ours['req_per_s'] or 0:.0f} | "
            f"{r.get('req_per_s_ratio', 0):.2f} | {ref['cpu_ms_per_req'] or 0:.2f} | "
            f"{ours['cpu_ms_per_req'] or 0:.2f} | {r.get('cpu_ratio', 0):.2f} | "
            f"{ref['events_per_req'] or 0:.1f} | {ours['events_per_req'] or 0:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "commit": args.commit,
                    "sim_timeslice_ms": args.sim_timeslice_ms,
                    "cells": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
