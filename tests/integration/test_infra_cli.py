"""`sglmesh infra up|down|status`, run in-process against real servers on free ports.

Why in-process: the `sglmesh` dispatcher is separate; `shared.infra.main` is the contract.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.infra import LOOPBACK, free_port, main, probe_etcd, probe_nats


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture
def cli_args(tmp_path: Path) -> Iterator[list[str]]:
    nats_port, etcd_port, peer_port = _distinct_free_ports(3)
    args = [
        "--nats-port", str(nats_port),
        "--etcd-port", str(etcd_port),
        "--etcd-peer-port", str(peer_port),
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    yield args
    # Whatever a test did, no server may outlive it.
    main(["down", *args])


def _port(args: list[str], flag: str) -> int:
    return int(args[args.index(flag) + 1])


def _run_dir(args: list[str]) -> Path:
    return Path(args[args.index("--run-dir") + 1])


def _spawned_pid() -> int:
    """The pid of a process that has exited: what a stale pid file points at."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_up_is_idempotent_then_status_and_down(
    cli_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    nats_port, etcd_port = _port(cli_args, "--nats-port"), _port(cli_args, "--etcd-port")
    run_dir = _run_dir(cli_args)
    run_dir.mkdir(parents=True)
    (run_dir / "nats.pid").write_text(f"{_spawned_pid()}\n")

    assert main(["up", *cli_args]) == 0
    out = capsys.readouterr().out
    assert "removed stale" in out
    assert f"SGLMESH_NATS_URL=nats://127.0.0.1:{nats_port}" in out
    assert f"SGLMESH_ETCD_ENDPOINTS=http://127.0.0.1:{etcd_port}" in out
    assert probe_nats(LOOPBACK, nats_port)
    assert probe_etcd(LOOPBACK, etcd_port)
    pids = [int((run_dir / f"{name}.pid").read_text()) for name in ("nats", "etcd")]
    assert (run_dir / "etcd-data").is_dir()

    assert main(["up", *cli_args]) == 0
    out = capsys.readouterr().out
    assert out.count("already running") == 2
    assert [int((run_dir / f"{name}.pid").read_text()) for name in ("nats", "etcd")] == pids

    assert main(["status", *cli_args]) == 0
    assert capsys.readouterr().out.count(": running") == 2

    assert main(["down", *cli_args]) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (run_dir / "nats.pid").exists()
    assert not (run_dir / "etcd.pid").exists()
    assert not probe_nats(LOOPBACK, nats_port, 0.5)

    capsys.readouterr()
    assert main(["status", *cli_args]) == 3
    assert capsys.readouterr().out.count(": stopped") == 2
    assert main(["down", *cli_args]) == 0


def test_taken_port_fails_naming_the_flag(
    cli_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    nats_port = _port(cli_args, "--nats-port")
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, nats_port))
        squatter.listen()
        assert main(["up", *cli_args]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert f"port {nats_port}" in captured.err
    assert "--nats-port" in captured.err
    assert "Traceback" not in captured.err
    assert not (_run_dir(cli_args) / "nats.pid").exists()


def test_env_vars_are_the_flags_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nats_port, etcd_port = _distinct_free_ports(2)
    monkeypatch.setenv("SGLMESH_NATS_PORT", str(nats_port))
    monkeypatch.setenv("SGLMESH_ETCD_PORT", str(etcd_port))
    monkeypatch.setenv("SGLMESH_RUN_DIR", str(tmp_path))
    assert main(["status"]) == 3
    out = capsys.readouterr().out
    assert f"url=nats://127.0.0.1:{nats_port}\n" in out
    assert f"url=http://127.0.0.1:{etcd_port}\n" in out

    monkeypatch.setenv("SGLMESH_NATS_PORT", "not-a-port")
    assert main(["status"]) == 1
    assert "SGLMESH_NATS_PORT" in capsys.readouterr().err


def test_help_mentions_every_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for var in ("SGLMESH_NATS_PORT", "SGLMESH_ETCD_PORT", "SGLMESH_RUN_DIR"):
        assert var in out
