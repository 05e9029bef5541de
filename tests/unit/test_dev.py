"""``sglmesh run`` / ``sglmesh stop`` in-process: input errors, the state file, and how
``stop`` treats pids (ours, dead, reused by another program, deaf to SIGTERM).

Nothing here starts NATS, etcd or a mesh (tests/integration/test_dev_run.py does); the
processes signalled are real ones started by the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sglmesh.cli import main as cli
from shared.infra import LOOPBACK, free_port

_ENV_PREFIXES = ("SGLMESH_", "DYN_")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(_ENV_PREFIXES) and key != "SGLMESH_MODEL_CACHE":
            monkeypatch.delenv(key)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    # Whatever a failed test left running (a mesh a refusal test did not expect) is stopped.
    if (path / "mesh.json").exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli(["stop", "--run-dir", str(path), "--timeout", "5"])


def _ports_args(run_dir: Path) -> list[str]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    nats, etcd, http = sorted(ports)
    return [
        "--nats-port", str(nats),
        "--etcd-port", str(etcd),
        "--etcd-peer-port", str(free_port()),
        "--http-port", str(http),
        "--system-port-base", "0",
        "--run-dir", str(run_dir),
    ]  # fmt: skip


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the flag


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["run"], "mode"),
        (["run", "both"], "invalid choice"),
        (["run", "agg", "--http-port", "http"], "--http-port"),
        (["run", "agg", "--http-port", "70000"], "--http-port"),
        (["run", "agg", "--speedup-ratio", "-1"], "--speedup-ratio"),
        (["run", "agg", "--timeout", "0"], "--timeout"),
        (["run", "agg", "--namespace", "a.b"], "--namespace"),
        (["run", "agg", "--system-port-base", "65535"], "--system-port-base"),
        (["run", "agg", "--http-port", "4222", "--nats-port", "4222"], "--http-port"),
        (["run", "agg", "--nats-port", "5000", "--etcd-port", "5000"], "--nats-port"),
        (["stop", "--timeout", "soon"], "--timeout"),
        (["stop", "--run-dir", ""], "--run-dir"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], names: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--run-dir" not in argv:
        argv = [*argv, "--run-dir", str(run_dir)]
    assert cli(argv) == 2
    assert names in _error_line(capsys)
    assert not run_dir.exists()  # nothing was started, not even the run dir


@pytest.mark.parametrize(
    ("command", "var", "value", "flag"),
    [
        ("run", "SGLMESH_HTTP_PORT", "eighty", "--http-port"),
        ("run", "SGLMESH_SYSTEM_PORT_BASE", "-1", "--system-port-base"),
        ("run", "DYN_NAMESPACE", "no spaces", "--namespace"),
        ("run", "SGLMESH_SPEEDUP_RATIO", "fast", "--speedup-ratio"),
        ("run", "SGLMESH_RUN_TIMEOUT", "-5", "--timeout"),
        ("run", "SGLMESH_NATS_PORT", "0", "--nats-port"),
        ("stop", "SGLMESH_STOP_TIMEOUT", "never", "--timeout"),
    ],
)
def test_bad_environment_exits_2_naming_flag_and_variable(
    command: str,
    var: str,
    value: str,
    flag: str,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(var, value)
    argv = [command, "agg"] if command == "run" else [command]
    assert cli([*argv, "--run-dir", str(run_dir)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"sglmesh {command}: error: ")
    assert flag in line and var in line


def test_help_documents_every_env_twin(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for var in (
        "SGLMESH_HTTP_PORT",
        "SGLMESH_SYSTEM_PORT_BASE",
        "SGLMESH_NAMESPACE",
        "SGLMESH_SPEEDUP_RATIO",
        "SGLMESH_NATS_PORT",
        "SGLMESH_ETCD_PORT",
        "SGLMESH_ETCD_PEER_PORT",
        "SGLMESH_RUN_DIR",
        "SGLMESH_RUN_TIMEOUT",
    ):
        assert var in text
    assert cli(["stop", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "SGLMESH_RUN_DIR" in text and "SGLMESH_STOP_TIMEOUT" in text


# --------------------------------------------------------------------------------------------
# The state file and stop


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


_SLEEPER = "import time; time.sleep(60)"
# Ignores SIGTERM, and says so once it does (so the test never signals it too early).
_DEAF = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], *, wait_ready: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        # Until the child has exec'd, its /proc cmdline is pytest's, and `run`/`stop` would
        # (rightly) take the pid for someone else's: wait for the exec.
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 10
        while cmdline.exists() and cmdline.read_bytes().split(b"\0")[1:-1] != [
            a.encode() for a in argv[1:]
        ]:
            assert time.monotonic() < deadline, f"{argv} did not start"
            time.sleep(0.01)
        if wait_ready:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _dead_pid() -> int:
    child = subprocess.Popen(_python("pass"))
    child.wait()
    return child.pid


def _write_state(run_dir: Path, processes: list[dict[str, Any]], **extra: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(2)]
    state = {
        "mode": "agg",
        "namespace": "sglmesh",
        "http_port": free_port(),
        "nats_port": ports[0],
        "etcd_port": ports[1],
        "etcd_peer_port": free_port(),
        "infra_started": [],
        "processes": processes,
        **extra,
    }
    (run_dir / "mesh.json").write_text(json.dumps(state))
    for proc in processes:
        (run_dir / f"{proc['name']}.pid").write_text(f"{proc['pid']}\n")


def _gone(proc: subprocess.Popen[str], timeout: float = 5.0) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_stop_with_no_state_is_a_no_op(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["stop", "--run-dir", str(run_dir)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert not run_dir.exists()


def test_stop_terminates_ours_and_spares_a_reused_pid(
    run_dir: Path, spawn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = spawn(_python(_SLEEPER))
    # A pid the state file names, now running a different program: it must survive.
    stranger = spawn(_python(_SLEEPER + "  # another program"))
    dead = _dead_pid()
    _write_state(
        run_dir,
        [
            {"name": "processor", "argv": ours.args, "pid": ours.pid},
            {"name": "worker-1", "argv": _python(_SLEEPER), "pid": stranger.pid},
            {"name": "worker-2", "argv": _python(_SLEEPER), "pid": dead},
        ],
    )
    assert cli(["stop", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"processor stopped (pid {ours.pid})" in out
    assert "worker-1 not running" in out and "worker-2 not running" in out
    assert _gone(ours)
    assert stranger.poll() is None
    assert sorted(p.name for p in run_dir.iterdir()) == []  # pid files and state removed

    # Idempotent.
    assert cli(["stop", "--run-dir", str(run_dir)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_stop_kills_a_process_that_ignores_sigterm(
    run_dir: Path, spawn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    deaf = spawn(_python(_DEAF), wait_ready=True)
    _write_state(run_dir, [{"name": "decode", "argv": deaf.args, "pid": deaf.pid}])
    started = time.monotonic()
    assert cli(["stop", "--run-dir", str(run_dir), "--timeout", "0.5"]) == 0
    assert time.monotonic() - started < 5
    assert f"decode killed (pid {deaf.pid}" in capsys.readouterr().out
    assert _gone(deaf)


def test_stop_reports_an_unreadable_state_file(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir.mkdir()
    (run_dir / "mesh.json").write_text("{not json")
    assert cli(["stop", "--run-dir", str(run_dir)]) == 1
    line = _error_line(capsys)
    assert "mesh.json" in line and "unreadable" in line


def test_run_refuses_while_an_earlier_run_is_up(
    run_dir: Path, spawn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = spawn(_python(_SLEEPER))
    _write_state(run_dir, [{"name": "processor", "argv": ours.args, "pid": ours.pid}])
    assert cli(["run", "disagg", *_ports_args(run_dir)]) == 1
    line = _error_line(capsys)
    assert "still up" in line and str(ours.pid) in line and "sglmesh stop" in line
    assert ours.poll() is None
    assert (run_dir / "mesh.json").exists()
    assert not (run_dir / "nats.pid").exists()


def test_run_refused_for_a_taken_http_port_keeps_a_stale_state(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_state(run_dir, [{"name": "processor", "argv": _python(_SLEEPER), "pid": _dead_pid()}])
    args = _ports_args(run_dir)
    http_port = int(args[args.index("--http-port") + 1])
    with socket.socket() as holder:
        holder.bind((LOOPBACK, http_port))
        holder.listen()
        assert cli(["run", "agg", *args]) == 1
    line = _error_line(capsys)
    assert line.startswith("sglmesh run: --http-port ")
    assert "already in use" in line and "SGLMESH_HTTP_PORT" in line
    # Nothing was touched: the stale run's files stay for `stop`, which clears them.
    assert sorted(p.name for p in run_dir.iterdir()) == ["mesh.json", "processor.pid"]
    assert cli(["stop", "--run-dir", str(run_dir)]) == 0
    assert "processor not running" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_run_refuses_a_taken_system_port(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _ports_args(run_dir)
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        base = holder.getsockname()[1]
        if base == 65535:
            pytest.skip("the kernel picked the last port")
        args[args.index("--system-port-base") + 1] = str(base)
        assert cli(["run", "agg", *args]) == 1
    line = _error_line(capsys)
    assert "--system-port-base" in line and str(base) in line
