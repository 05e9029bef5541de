"""The chaos suite's short version (``bench/chaos.py --short``), as ``make test`` runs it: a
worker killed with SIGKILL, a 3 s NATS restart and a prefill killed mid-flight under streaming
load must fail and lose nothing; bad input must not stall ``/health``; forged messages must be
refused. ``make chaos`` runs every scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.mesh import ROOT

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(600)
def test_short_chaos_suite_keeps_every_promise(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "bench/chaos.py", "--short", "--work-dir", str(tmp_path),
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    result = json.loads(out.read_text())
    names = {row["scenario"] for row in result["scenarios"]}
    assert {"agg: kill -9 worker", "disagg: kill -9 prefill (spare up)"} <= names
    for row in result["scenarios"]:
        assert row["failed"] == 0 and row["lost"] == 0 and row["ok"] > 0, row
    for row in result["bad_input"]:
        assert row["status"] in (200, 400, 413, 415), row
        assert row["health_max_ms"] < 500, row  # the goal is 100 ms on a quiet machine
    assert all(f["result"].startswith("refused") for f in result["forged"]), result["forged"]
