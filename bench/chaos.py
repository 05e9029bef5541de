"""The chaos suite: faults injected into a real mesh under streaming load, every request
classified, one table.

A mesh as ``sglmesh run`` builds it -- nats-server and etcd with per-role users
(``shared/infra_auth.py``), the processor, a publisher and simulated workers, each its own
process with its role's credentials and the mesh's default timings -- on free loopback ports in
a temporary directory. ``--concurrency`` clients stream chat completions (``max_tokens``
tokens, ``ignore_eos``) in a closed loop while one fault is injected per scenario. Each request
is one of:

- **ok**: HTTP 200, ``[DONE]``, and exactly ``max_tokens`` completion tokens;
- **failed**: a clear error (an HTTP error status or an SSE error event, or the connection
  refused while the processor is down);
- **lost**: anything else (a stream cut without an error, a hang past ``--request-timeout``,
  the wrong token count).

**Recovery** is the time from the fault to the end of the first request that started after it
and succeeded. The harness restarts what a fault killed (as ``sglmesh run``'s supervisor,
compose and Kubernetes do), so each scenario starts from a whole mesh.

Bad input: each body is sent while ``/health`` is probed every 10 ms; the table gives its
status, the slowest probe and how much the processor's resident memory grew once the request
ended. Forged messages: what an attacker without credentials (or with a worker's) tries.

    python bench/chaos.py [--short] [--concurrency 8] [--max-tokens 48] [--output PATH]

``make chaos`` runs the full suite; ``make test`` runs ``--short`` through
``tests/integration/test_chaos.py``, which asserts 0 failed and 0 lost where the mesh promises
it. Prints the tables and writes ``bench/results/chaos.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.infra import EtcdServer, NatsServer, free_port  # noqa: E402
from shared.infra_auth import Credentials, enable_etcd_auth, ensure_credentials  # noqa: E402
from shared.model import make_test_tokenizer  # noqa: E402

MODEL = "tiny"
NAMESPACE = "chaos"


# --------------------------------------------------------------------------------------------
# Processes


class Service:
    def __init__(self, name: str, argv: list[str], log_dir: Path, port: int | None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLMESH_", "DYN_"))}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=log, env=env)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health"
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.name} not healthy:\n{tail}")
                await asyncio.sleep(0.1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


class Mesh:
    """NATS, etcd and the services of one topology, with per-role credentials."""

    def __init__(self, work: Path, topology: str, speedup: float) -> None:
        self.work = work
        self.topology = topology
        self.speedup = speedup
        self.creds: Credentials = ensure_credentials(work)
        self.nats = NatsServer(data_dir=work / "nats", config_file=self.creds.nats_config)
        self.etcd = EtcdServer(data_dir=work / "etcd-data")
        self.model = make_test_tokenizer(work / "model")
        self.services: dict[str, Service] = {}
        self._ports: set[int] = set()
        self.http_port = self.port()

    def port(self) -> int:
        """A free port not handed out before in this mesh (free_port alone can repeat one
        that nobody has bound yet)."""
        while True:
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _mesh(self, role: str) -> list[str]:
        return [
            "--namespace", NAMESPACE,
            "--nats-url", self.nats.url,
            "--etcd-endpoints", self.etcd.endpoint,
            "--credentials", str(self.creds.env_file(role)),
            "--log-format", "text",
        ]  # fmt: skip

    def _worker(self, name: str, *role: str) -> Service:
        port = self.port()
        argv = [
            sys.executable, "-m", "sglmesh", "worker", *self._mesh("worker"),
            "--engine", "sim", "--speedup-ratio", str(self.speedup),
            "--model-path", str(self.model), "--served-model-name", MODEL,
            "--page-size", "16", "--max-total-tokens", "65536",
            "--system-port", str(port), "--no-health-check",
            "--kv-events-config", json.dumps({
                "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.port()}",
                "replay_endpoint": f"tcp://127.0.0.1:{self.port()}", "bind": True}),
            *(["--disaggregation-bootstrap-port", str(self.port())] if "prefill" in role else []),
            *role,
        ]  # fmt: skip
        return Service(name, argv, self.work, port)

    async def start(self) -> None:
        self.nats.start()
        self.etcd.start()
        await self.nats.wait_ready()
        await self.etcd.wait_ready()
        await enable_etcd_auth("127.0.0.1", self.etcd.port, self.creds, NAMESPACE)
        python = [sys.executable, "-m", "sglmesh"]
        processor = Service(
            "processor",
            [*python, "processor", *self._mesh("processor"), "--http-port", str(self.http_port),
             "--model-root", str(self.work)],
            self.work,
            self.http_port,
        )  # fmt: skip
        publisher_port = self.port()
        publisher = Service(
            "publisher",
            [*python, "publisher", *self._mesh("publisher"), "--system-port",
             str(publisher_port)],
            self.work,
            publisher_port,
        )  # fmt: skip
        workers = (
            [self._worker("worker-1"), self._worker("worker-2")]
            if self.topology == "agg"
            else [
                self._worker("prefill-1", "--disaggregation-mode", "prefill"),
                self._worker("prefill-2", "--disaggregation-mode", "prefill"),
                self._worker("decode-1", "--disaggregation-mode", "decode"),
                self._worker("decode-2", "--disaggregation-mode", "decode"),
            ]
        )
        for svc in [processor, publisher, *workers]:
            self.services[svc.name] = svc
            svc.start()
        for svc in self.services.values():
            await svc.wait_healthy()
        await self.wait_serving()

    async def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.post(self.url, json=body) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError("the mesh does not serve")
                await asyncio.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/chat/completions"

    async def restart(self, name: str) -> None:
        svc = self.services[name]
        await svc.wait_exit()
        svc.start()
        await svc.wait_healthy()

    def close(self) -> None:
        for svc in self.services.values():
            svc.stop()
        self.nats.stop()
        self.etcd.stop()


# --------------------------------------------------------------------------------------------
# Load


@dataclass
class Outcome:
    started: float
    ended: float
    kind: str  # ok | failed | lost
    detail: str = ""


class Load:
    def __init__(self, url: str, concurrency: int, max_tokens: int, timeout: float) -> None:
        self.url = url
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._n = 0

    async def _one(self, http: aiohttp.ClientSession) -> Outcome:
        self._n += 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"request {self._n}: tell me a story"}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout), http.post(self.url, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.read()).decode(errors="replace")[:200]
                    return Outcome(started, time.monotonic(), "failed", f"{resp.status} {text}")
                tokens, done = None, False
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            detail = str(event["error"].get("message"))[:200]
                            return Outcome(started, time.monotonic(), "failed", detail)
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                ended = time.monotonic()
                if done and tokens == self.max_tokens:
                    return Outcome(started, ended, "ok")
                return Outcome(started, ended, "lost", f"done={done} tokens={tokens}")
        except aiohttp.ClientConnectorError as exc:
            return Outcome(started, time.monotonic(), "failed", f"connect: {exc}")
        except TimeoutError:
            return Outcome(started, time.monotonic(), "lost", "timeout")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Outcome(started, time.monotonic(), "lost", repr(exc)[:200])

    async def _user(self) -> None:
        async with aiohttp.ClientSession() as http:
            while not self._stop:
                outcome = await self._one(http)
                self.outcomes.append(outcome)
                if outcome.kind != "ok":
                    await asyncio.sleep(0.05)  # a client that got an error does not spin

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._user()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    lost: int = 0
    recovery_s: float | None = None
    # How long a failed request took to fail (the slowest): clear errors must also be fast.
    slowest_failure_s: float | None = None
    # Worker streams the processor resent elsewhere during the scenario, by reason: the
    # evidence that requests were caught mid-flight and rescued, not merely never hit.
    migrations: dict[str, int] = field(default_factory=dict)
    promise: str = "0 failed, 0 lost"
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        if self.promise == "0 failed, 0 lost":
            return self.failed == 0 and self.lost == 0
        if self.promise == "0 lost":
            return self.lost == 0
        return True


async def run_scenario(
    mesh: Mesh,
    name: str,
    fault: Callable[[], Awaitable[None]],
    args: argparse.Namespace,
    *,
    promise: str = "0 failed, 0 lost",
    heal: Callable[[], Awaitable[None]] | None = None,
) -> Row:
    before = await _migrations(mesh)
    load = Load(mesh.url, args.concurrency, args.max_tokens, args.request_timeout)
    load.start()
    await asyncio.sleep(args.before)
    fault_at = time.monotonic()
    await fault()
    await asyncio.sleep(args.after)
    await load.stop()
    if heal is not None:
        await heal()
    row = Row(name, promise=promise)
    after_counts = await _migrations(mesh)
    row.migrations = {
        k: int(v - before.get(k, 0)) for k, v in after_counts.items() if v > before.get(k, 0)
    }
    for o in load.outcomes:
        row.sent += 1
        setattr(row, o.kind, getattr(row, o.kind) + 1)
        if o.kind != "ok" and len(row.notes) < 3:
            row.notes.append(f"{o.kind}: {o.detail}")
    failures = [o.ended - o.started for o in load.outcomes if o.kind == "failed"]
    if failures:
        row.slowest_failure_s = round(max(failures), 2)
    after = [o for o in load.outcomes if o.started >= fault_at and o.kind == "ok"]
    if after:
        row.recovery_s = round(min(o.ended for o in after) - fault_at, 2)
    print(_format_row(row), flush=True)
    return row


# --------------------------------------------------------------------------------------------
# Scenarios


async def _migrations(mesh: Mesh) -> dict[str, float]:
    """The processor's ``sglmesh_processor_migrations_total`` by reason ({} if unreachable)."""
    out: dict[str, float] = {}
    url = f"http://127.0.0.1:{mesh.http_port}/metrics"
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError):
        return out
    for line in text.splitlines():
        if line.startswith("sglmesh_processor_migrations_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _kill(mesh: Mesh, name: str, sig: signal.Signals = signal.SIGKILL) -> Callable[[], Any]:
    async def fault() -> None:
        mesh.services[name].signal(sig)

    return fault


async def agg_scenarios(mesh: Mesh, args: argparse.Namespace) -> list[Row]:
    rows = []

    async def restart_nats() -> None:
        await asyncio.to_thread(mesh.nats.stop)
        await asyncio.sleep(args.nats_down)
        mesh.nats.start()
        await mesh.nats.wait_ready()

    async def restart_etcd() -> None:
        await asyncio.to_thread(mesh.etcd.restart)
        await mesh.etcd.wait_ready()

    rows.append(await run_scenario(mesh, "agg: kill -9 worker", _kill(mesh, "worker-1"), args,
                                   heal=lambda: mesh.restart("worker-1")))  # fmt: skip
    rows.append(await run_scenario(
        mesh, f"agg: NATS restart ({args.nats_down:g} s down)", restart_nats, args,
        heal=mesh.wait_serving))  # fmt: skip
    if args.short:
        return rows
    rows.append(await run_scenario(
        mesh, "agg: SIGTERM worker", _kill(mesh, "worker-2", signal.SIGTERM), args,
        heal=lambda: mesh.restart("worker-2")))  # fmt: skip
    rows.append(await run_scenario(mesh, "agg: kill -9 publisher", _kill(mesh, "publisher"), args,
                                   heal=lambda: mesh.restart("publisher")))  # fmt: skip
    rows.append(await run_scenario(mesh, "agg: etcd restart", restart_etcd, args))

    async def kill_processor() -> None:
        # As sglmesh run's supervisor (or compose, or Kubernetes) does: restart it at once.
        mesh.services["processor"].signal(signal.SIGKILL)
        await mesh.restart("processor")

    rows.append(await run_scenario(
        mesh, "agg: kill -9 processor (restarted)", kill_processor, args,
        promise="recovers (its in-flight requests are cut)"))  # fmt: skip
    return rows


async def disagg_scenarios(mesh: Mesh, args: argparse.Namespace) -> list[Row]:
    rows = [
        await run_scenario(
            mesh,
            "disagg: kill -9 prefill (spare up)",
            _kill(mesh, "prefill-1"),
            args,
            heal=lambda: mesh.restart("prefill-1"),
        )
    ]
    if args.short:
        return rows
    rows.append(await run_scenario(
        mesh, "disagg: kill -9 decode (spare up)", _kill(mesh, "decode-1"), args,
        heal=lambda: mesh.restart("decode-1")))  # fmt: skip
    rows.append(await run_scenario(
        mesh, "disagg: SIGTERM prefill", _kill(mesh, "prefill-2", signal.SIGTERM), args,
        heal=lambda: mesh.restart("prefill-2")))  # fmt: skip

    async def kill_both_prefills() -> None:
        mesh.services["prefill-1"].signal(signal.SIGKILL)
        mesh.services["prefill-2"].signal(signal.SIGKILL)

    async def heal_prefills() -> None:
        await mesh.restart("prefill-1")
        await mesh.restart("prefill-2")

    row = await run_scenario(mesh, "disagg: every prefill killed", kill_both_prefills, args,
                             promise="0 lost (clear 503s)", heal=heal_prefills)  # fmt: skip
    rows.append(row)
    return rows


# Bad input: (name, path, content type, body)
def bad_inputs(short: bool) -> list[tuple[str, str, str, bytes]]:
    def chat(**extra: Any) -> bytes:
        base = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        return json.dumps({**base, **extra}).encode()

    cases = [
        ("16 stop strings x 100,000 chars", "chat/completions", "application/json",
         chat(stop=["ab" * 50_000] * 16)),
        ("10 MB message", "chat/completions", "application/json",
         chat(messages=[{"role": "user", "content": "word " * 2 * 1024 * 1024}])),
    ]  # fmt: skip
    if short:
        return cases
    cases += [
        ("640 KB of stop strings", "chat/completions", "application/json",
         chat(stop=["x" * 40_000] * 16)),
        ("100,000 messages", "chat/completions", "application/json",
         chat(messages=[{"role": "user", "content": "hi"}] * 100_000)),
        ("1,000 prompts x n=8", "completions", "application/json",
         json.dumps({"model": MODEL, "prompt": ["hi"] * 1000, "n": 8, "max_tokens": 1}).encode()),
        ("20 MB body", "chat/completions", "application/json", b'{"x": "' + b"a" * 20_000_000
         + b'"}'),
        ("JSON as text/plain", "chat/completions", "text/plain", chat()),
    ]  # fmt: skip
    return cases


async def bad_input_rows(mesh: Mesh, short: bool) -> list[dict[str, Any]]:
    processor = mesh.services["processor"]
    base = f"http://127.0.0.1:{mesh.http_port}"
    rows = []
    async with aiohttp.ClientSession() as http:
        for name, path, ctype, body in bad_inputs(short):
            before = processor.rss_mb()

            async def send(path: str = path, ctype: str = ctype, body: bytes = body) -> int:
                async with http.post(
                    f"{base}/v1/{path}", data=body, headers={"Content-Type": ctype}
                ) as resp:
                    await resp.read()
                    return resp.status

            task = asyncio.ensure_future(send())
            slowest = 0.0
            while not task.done():
                t0 = time.perf_counter()
                async with http.get(f"{base}/health") as resp:
                    await resp.read()
                slowest = max(slowest, time.perf_counter() - t0)
                await asyncio.sleep(0.01)
            status = await task
            await asyncio.sleep(0.5)
            row = {
                "input": name,
                "status": status,
                "health_max_ms": round(slowest * 1000, 1),
                "rss_growth_mb": round(processor.rss_mb() - before, 1),
            }
            print(
                f"  {name:<34} {status:>4}  /health max {row['health_max_ms']:>7} ms"
                f"  RSS +{row['rss_growth_mb']} MB",
                flush=True,
            )
            rows.append(row)
        # Slowloris: 50 connections dribbling headers; the API must still answer.
        socks = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", mesh.http_port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nX-A: 1\r\n")
            socks.append((reader, writer))
        t0 = time.perf_counter()
        async with http.get(f"{base}/health") as resp:
            status = resp.status
        health_ms = round((time.perf_counter() - t0) * 1000, 1)
        closed = 0
        await asyncio.sleep(11)  # the default --header-timeout is 10 s
        for reader, writer in socks:
            with contextlib.suppress(Exception):
                if await asyncio.wait_for(reader.read(1), 1) == b"":
                    closed += 1
            writer.close()
        rows.append(
            {
                "input": "50 slowloris connections",
                "status": status,
                "health_max_ms": health_ms,
                "rss_growth_mb": None,
                "closed_by_server": closed,
            }
        )
        print(f"  50 slowloris connections: /health {status}, {closed}/50 closed", flush=True)
    return rows


async def forged_rows(mesh: Mesh) -> list[dict[str, Any]]:
    rows = []

    async def attempt(name: str, action: Callable[[], Awaitable[Any]]) -> None:
        try:
            await action()
            result = "ACCEPTED"
        except Exception as exc:
            result = f"refused ({type(exc).__name__}: {str(exc)[:60]})"
        rows.append({"attempt": name, "result": result})
        print(f"  {name:<46} {result}", flush=True)

    async def quiet(exc: Exception) -> None:
        del exc  # reported in the table instead

    async def anonymous_nats() -> None:
        nc = await nats.connect(
            mesh.nats.url, allow_reconnect=False, connect_timeout=2, error_cb=quiet
        )
        await nc.close()

    async def worker_forges_kv_event() -> None:
        env = dict(
            line.split("=", 1)
            for line in mesh.creds.env_file("worker").read_text().splitlines()
            if "=" in line
        )
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc = await nats.connect(
            mesh.nats.url,
            user=env["SGLMESH_NATS_USER"],
            password=env["SGLMESH_NATS_PASSWORD"],
            error_cb=on_error,
            allow_reconnect=False,
        )
        await nc.publish(f"{NAMESPACE}.events.kv.1", b"\x95\x01\x00\xcb" + b"\x00" * 8)
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.close()
        if errors:
            raise errors[0]

    async def anonymous_etcd_card() -> None:
        import aetcd

        async with aetcd.Client(host="127.0.0.1", port=mesh.etcd.port, timeout=3) as client:
            await client.put(f"/{NAMESPACE}/models/{MODEL}/1".encode(), b"forged")

    await attempt("anonymous NATS connection", anonymous_nats)
    await attempt("worker credential publishes a KV event", worker_forges_kv_event)
    await attempt("anonymous etcd writes a model card", anonymous_etcd_card)
    return rows


# --------------------------------------------------------------------------------------------


def _format_row(row: Row) -> str:
    rec = "-" if row.recovery_s is None else f"{row.recovery_s:.2f} s"
    slow = "-" if row.slowest_failure_s is None else f"{row.slowest_failure_s:.2f} s"
    mark = "" if row.kept else "   <-- promise broken"
    moved = ", ".join(f"{k} {v}" for k, v in sorted(row.migrations.items())) or "-"
    return (
        f"  {row.scenario:<40} {row.sent:>5} {row.ok:>5} {row.failed:>6} {row.lost:>5} "
        f"{rec:>9} {slow:>13}  {moved}{mark}"
    )


def _header() -> str:
    return (
        f"  {'scenario':<40} {'sent':>5} {'ok':>5} {'failed':>6} {'lost':>5} {'recovery':>9} "
        f"{'slowest error':>13}  migrations"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sglmesh-chaos-", dir=args.work_dir))
    result: dict[str, Any] = {"scenarios": [], "bad_input": [], "forged": []}
    try:
        print(f"faults under load ({args.concurrency} streaming clients):\n{_header()}", flush=True)
        for topology, scenarios in (("agg", agg_scenarios), ("disagg", disagg_scenarios)):
            mesh = Mesh(work / topology, topology, args.speedup)
            try:
                await mesh.start()
                rows = await scenarios(mesh, args)
                result["scenarios"] += [{**asdict(r), "kept": r.kept} for r in rows]
                if topology == "agg":
                    print("bad input (one request each, /health probed every 10 ms):")
                    result["bad_input"] = await bad_input_rows(mesh, args.short)
                    print("forged messages:")
                    result["forged"] = await forged_rows(mesh)
            finally:
                mesh.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the subset make test runs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--speedup", type=float, default=1.0, help="simulated engine speed")
    parser.add_argument("--before", type=float, default=1.5, help="load before the fault (s)")
    parser.add_argument("--after", type=float, default=6.0, help="load after the fault (s)")
    parser.add_argument("--nats-down", type=float, default=3.0, help="NATS restart gap (s)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--work-dir", default=None, help="parent of the temporary mesh dir")
    parser.add_argument("--output", default=None, help="JSON results (default: none)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    broken = [s["scenario"] for s in result["scenarios"] if not s["kept"]]
    broken += [f["attempt"] for f in result["forged"] if f["result"] == "ACCEPTED"]
    if broken:
        print(f"promises broken: {', '.join(broken)}")
        return 1
    print("every promise kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
