"""Fixtures that run REAL nats-server and etcd processes on 127.0.0.1 (neither is ever mocked).

Why real servers: reconnects, lease expiry and lost registrations are exactly what the mesh
must survive, and a fake would only test our assumptions about them. The process handling
lives in `shared.infra`; this file only maps it onto pytest scopes.

- `nats_server`, `etcd_server`: shared by the whole session; do not stop or kill them.
- `own_nats`, `own_etcd`: private to one test, free to kill/restart (chaos tests).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# As the torch engine sets it for its workers (shared/engine/pytorch/engine.py), before any
# test module loads torch: the engines tests run in-process share two cores with the servers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from shared.infra import EtcdServer, InfraError, NatsServer

_Server = TypeVar("_Server", NatsServer, EtcdServer)

# Every temporary file of the session -- pytest's own, the tests', and every child process's
# (TMPDIR is inherited) -- goes into one private directory, removed when the session ends:
# nothing is left in the system's temp directory. Leftovers other than pytest's directory are
# reported as a failure, except the private socket directories of engines a test killed with
# SIGKILL (a killed process cannot clean up), torch's compile cache (kept on purpose) and
# onnxruntime's ``.ses`` (its native library writes it when imported; no setting stops it).
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="sglmesh-tests-"))
os.environ["TMPDIR"] = str(_SESSION_TMP)
tempfile.tempdir = None  # recomputed from TMPDIR on next use
# A run that stops before its session starts (a bad command-line argument) never reaches
# pytest_sessionfinish; the directory goes at exit then.
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = sorted(
        p.name
        for p in _SESSION_TMP.iterdir()
        if not p.name.startswith(("pytest-of-", "sglmesh-sim-", "sglmesh-torch-", "torchinductor_"))
        # onnxruntime's native telemetry library writes this 51-byte session file on import.
        and p.name != ".ses"
    )
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
    if leftovers and exitstatus == 0:
        print(f"\ntests left files in the temp directory: {', '.join(leftovers)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _serve(make: Callable[[], _Server]) -> Iterator[_Server]:
    try:
        server = make().__enter__()
    except InfraError as exc:
        # A missing binary is a broken setup, not an optional feature: fail, never skip, and
        # report one clear line rather than a chained traceback.
        raise pytest.fail.Exception(
            f"cannot run real infrastructure: {exc}", pytrace=False
        ) from None
    try:
        yield server
    finally:
        server.stop()


def _nats(root: Path) -> NatsServer:
    return NatsServer(data_dir=root / "nats")


def _etcd(root: Path) -> EtcdServer:
    return EtcdServer(data_dir=root / "etcd-data")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    yield from _serve(lambda: _nats(tmp_path_factory.mktemp("infra")))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    yield from _serve(lambda: _etcd(tmp_path_factory.mktemp("infra")))


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    yield from _serve(lambda: _nats(tmp_path))


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    yield from _serve(lambda: _etcd(tmp_path))
