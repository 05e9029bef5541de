"""``sglmesh run`` / ``sglmesh stop`` exactly as a user runs them: real subprocesses, real NATS
and etcd, a real chat completion over HTTP.

Every test has its own run dir and its own free ports (NATS, etcd, HTTP, system ports), so it
never meets a developer's mesh on 4222/2379/8000 nor another test's.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.infra import LOOPBACK, free_port, port_in_use

ROOT = Path(__file__).resolve().parents[2]

# Straight to loopback: a developer's http_proxy must not see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _hermetic_env(**extra: str) -> dict[str, str]:
    # A developer's SGLMESH_*/DYN_* settings would change what `run` starts; the model cache
    # location is the one that must survive (CI points it at a prepared copy).
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SGLMESH_", "DYN_")) or key == "SGLMESH_MODEL_CACHE"
    }
    env.update(extra)
    return env


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


@dataclass
class Dev:
    run_dir: Path
    nats_port: int
    etcd_port: int
    etcd_peer_port: int
    http_port: int
    args: list[str]

    def cli(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sglmesh", *argv],
            cwd=ROOT,
            env=env or _hermetic_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(
        self, mode: str, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("run", mode, *self.args, *extra, env=env)

    def stop(self) -> subprocess.CompletedProcess[str]:
        return self.cli("stop", "--run-dir", str(self.run_dir))

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.run_dir / "mesh.json").read_text())
        return state

    def pid_files(self) -> list[str]:
        return sorted(p.name for p in self.run_dir.glob("*.pid"))


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    nats_port, etcd_port, peer_port, http_port = _distinct_free_ports(4)
    run_dir = tmp_path / "run"
    args = [
        "--nats-port", str(nats_port),
        "--etcd-port", str(etcd_port),
        "--etcd-peer-port", str(peer_port),
        "--http-port", str(http_port),
        "--system-port-base", "0",
        "--run-dir", str(run_dir),
        "--timeout", "120",
    ]  # fmt: skip
    yield Dev(run_dir, nats_port, etcd_port, peer_port, http_port, args)
    # Whatever a test did, nothing it started may outlive it.
    subprocess.run(
        [sys.executable, "-m", "sglmesh", "stop", "--run-dir", str(run_dir), "--timeout", "5"],
        cwd=ROOT,
        env=_hermetic_env(),
        capture_output=True,
        timeout=60,
    )


def _post_json(url: str, body: dict[str, Any], timeout: float = 30) -> bytes:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _OPENER.open(request, timeout=timeout) as response:
        assert response.status == 200
        data: bytes = response.read()
    return data


def _curl_line(stdout: str) -> tuple[str, dict[str, Any]]:
    """The URL and JSON body of the curl line `run` printed (so the hint itself is tested)."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith("curl "))
    words = shlex.split(line)
    url = next(w for w in words if w.startswith("http://"))
    body: dict[str, Any] = json.loads(words[words.index("-d") + 1])
    return url, body


@pytest.mark.parametrize("mode", ["disagg", "agg"])
def test_run_serves_chat_then_stop_leaves_nothing(dev: Dev, mode: str) -> None:
    started = dev.run(mode)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "nats-server started" in started.stdout
    assert "etcd started" in started.stdout

    state = dev.state()
    assert state["mode"] == mode
    assert state["infra_started"] == ["nats", "etcd"]
    names = [p["name"] for p in state["processes"]]
    assert names == (
        ["processor", "publisher", "prefill", "decode", "encoder"] if mode == "disagg" else
        ["processor", "publisher", "worker-1", "worker-2", "encoder"]
    )  # fmt: skip
    pids = [p["pid"] for p in state["processes"]]
    pids += [int((dev.run_dir / f"{key}.pid").read_text()) for key in ("nats", "etcd")]
    assert not any(_gone(pid) for pid in pids)
    assert dev.pid_files() == sorted(f"{name}.pid" for name in [*names, "nats", "etcd"])

    # Each worker's system server answers on the port the run chose and printed.
    for proc in [p for p in state["processes"] if p.get("system_port")]:
        port = proc["system_port"]
        assert f"http://127.0.0.1:{port}" in started.stdout
        try:
            with _OPENER.open(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                assert response.status == 200
        except urllib.error.HTTPError as exc:  # say why, with the worker's log
            log = (dev.run_dir / f"{proc['name']}.log").read_text(errors="replace")
            pytest.fail(f"{proc['name']} /health {exc.code}: {exc.read()!r}\n{log[-4000:]}")

    # The printed curl line, sent as printed: a streamed chat completion with text in it.
    url, body = _curl_line(started.stdout)
    assert url == f"http://127.0.0.1:{dev.http_port}/v1/chat/completions"
    body["max_tokens"] = 16
    events = _post_json(url, body).decode().split("\n\n")
    chunks = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip(), events
    assert "data: [DONE]" in events
    # The default engine is the real model: greedy SmolLM2 knows the capital of France.
    assert "(torch engine)" in started.stdout
    answer = json.loads(
        _post_json(
            url,
            {
                "model": body["model"],
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 16,
            },
        )
    )
    assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."

    # Supervised: the processor killed with SIGKILL comes back by itself, and says so.
    supervisor = next(p["pid"] for p in state["processes"] if p["name"] == "processor")
    child = int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0])
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            if _post_json(url, {**body, "stream": False, "max_tokens": 2}):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, (dev.run_dir / "processor.log").read_text()[-3000:]
        time.sleep(0.2)
    assert "was killed by SIGKILL" in (dev.run_dir / "processor.log").read_text()
    # Credentials on every plane: anonymous NATS is refused.
    with socket.create_connection(("127.0.0.1", dev.nats_port), timeout=5) as sock:
        info = sock.recv(4096)
    assert b'"auth_required":true' in info, info

    # Embeddings beside chat: the printed embeddings line, sent as printed.
    line = next(x for x in started.stdout.splitlines() if "/v1/embeddings" in x)
    words = shlex.split(line.strip())
    embed_url = next(w for w in words if w.startswith("http://"))
    answer = json.loads(_post_json(embed_url, json.loads(words[words.index("-d") + 1])))
    assert [len(d["embedding"]) for d in answer["data"]] == [384, 384]

    # A second run while this one is up refuses, starts nothing, and says what to do.
    again = dev.run("agg")
    assert again.returncode == 1
    assert "sglmesh stop" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert [p["pid"] for p in dev.state()["processes"]] == pids[: len(names)]

    stopped = dev.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name in [*names, "nats-server", "etcd"]:
        assert f"{name} stopped" in stopped.stdout
    assert [pid for pid in pids if not _gone(pid)] == []
    assert dev.pid_files() == []
    assert not (dev.run_dir / "mesh.json").exists()
    assert not port_in_use(dev.http_port)
    assert not port_in_use(dev.nats_port)

    # The logs stay for reading after the stop.
    assert (dev.run_dir / "processor.log").stat().st_size > 0


def test_run_multimodal_serves_the_printed_image_line(dev: Dev) -> None:
    started = dev.run("agg", "--multimodal")
    assert started.returncode == 0, started.stdout + started.stderr
    names = [p["name"] for p in dev.state()["processes"]]
    assert names == ["processor", "publisher", "worker-1", "worker-2", "encoder", "vision"]
    assert "(sim engine)" in started.stdout  # the default model is text-only
    line = next(x for x in started.stdout.splitlines() if '"image_url"' in x)
    words = shlex.split(line.strip())
    url = next(w for w in words if w.startswith("http://"))
    answer = json.loads(_post_json(url, json.loads(words[words.index("-d") + 1])))
    assert answer["usage"]["prompt_tokens"] > 257, answer  # the image's tokens are counted
    assert answer["choices"][0]["message"]["content"]
    assert dev.stop().returncode == 0
    assert dev.pid_files() == []


def test_run_multimodal_refuses_the_torch_engine(dev: Dev) -> None:
    refused = dev.run("agg", "--multimodal", "--engine", "torch")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "text-only" in refused.stderr and not (dev.run_dir / "mesh.json").exists()


def test_stop_when_nothing_runs(dev: Dev) -> None:
    result = dev.stop()
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stdout
    assert result.stderr == ""


def test_taken_http_port_is_refused_before_anything_starts(dev: Dev) -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, dev.http_port))
        holder.listen()
        result = dev.run("disagg")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--http-port" in lines[0] and str(dev.http_port) in lines[0]
    assert "already in use" in lines[0]
    assert dev.pid_files() == []
    assert not port_in_use(dev.nats_port)
    assert not port_in_use(dev.etcd_port)


def test_a_process_dying_at_start_is_reported_and_everything_is_stopped(dev: Dev) -> None:
    # A crashed earlier run: its state is stale and must not block this one.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dev.run_dir.mkdir()
    stale = {"name": "processor", "argv": ["python", "-m", "sglmesh"], "pid": dead.pid}
    (dev.run_dir / "processor.pid").write_text(f"{dead.pid}\n")
    (dev.run_dir / "mesh.json").write_text(
        json.dumps(
            {
                "mode": "disagg",
                "namespace": "sglmesh",
                "http_port": dev.http_port,
                "nats_port": dev.nats_port,
                "etcd_port": dev.etcd_port,
                "etcd_peer_port": dev.etcd_peer_port,
                "processes": [stale],
            }
        )
    )
    # Inherited by every child (not read by `run` itself): each exits at once with a usage error.
    result = dev.run("agg", env=_hermetic_env(SGLMESH_LEASE_TTL="0"))
    assert result.returncode == 1
    assert "exited with code 2" in result.stderr
    assert "SGLMESH_LEASE_TTL" in result.stderr  # the tail of the dead process's log
    assert "etcd stopped" in result.stderr and "nats-server stopped" in result.stderr
    assert dev.pid_files() == []
    assert not (dev.run_dir / "mesh.json").exists()
    assert not port_in_use(dev.nats_port)
    assert not port_in_use(dev.etcd_port)
