"""Health canaries: a tiny real request a worker sends itself when it has been idle.

Why a self-addressed request and not an in-process engine ping: a canary that goes out over
NATS, through the endpoint's own handler and the engine, and back, proves everything a router
depends on (the subscription, the handler, the engine's scheduler) in one go. It only runs
after an idle spell with no request in flight, so real traffic is never delayed by it; real
traffic is evidence enough while it flows.

A failed canary takes the instance out of discovery (routers stop picking it) and marks the
endpoint unregistered, which turns ``/health`` to 503. The instance's direct NATS subject stays
subscribed, so the canary keeps probing it; the first passing canary puts it back. Something
else may take the instance out on purpose (a paused engine, memory released): the canary is
then :meth:`Canary.suspend`-ed so it cannot undo that by re-registering.

The payload per role follows the reference: one token, one output token, greedy; the
disaggregated roles carry fake-transfer bootstrap info, so a prefill runs without a decode
peer and a decode runs without a prefill peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from proto.request import (
    FAKE_BOOTSTRAP_HOST,
    BootstrapInfo,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from proto.response import EngineOutput, FinishReason
from shared.runtime.client import Client
from shared.runtime.errors import MeshError

if TYPE_CHECKING:
    from shared.runtime.endpoint import ServedEndpoint
    from shared.runtime.runtime import DistributedRuntime

__all__ = [
    "PAYLOAD_ENV_VARS",
    "Canary",
    "CanaryProbe",
    "CanaryResult",
    "canary_payload",
    "generate_probe",
    "payload_override",
]

log = logging.getLogger(__name__)

# Checked in this order; the second is the reference's name, honoured so its deployments work.
PAYLOAD_ENV_VARS = ("SGLMESH_HEALTH_CHECK_PAYLOAD", "DYN_HEALTH_CHECK_PAYLOAD")

_AGGREGATED = "aggregated"
_DISAGGREGATED = ("decode", "prefill")
_FAILED_FINISHES = (FinishReason.ERROR, FinishReason.CANCELLED)


def payload_override(env: Mapping[str, str] | None = None) -> dict[str, object] | None:
    """The operator's canary payload from the environment (JSON, or ``@path`` to a JSON file).

    Raises ValueError naming the variable when it is set but unusable: a canary that can
    never pass would silently take every worker out of service, so fail at start-up instead.
    """
    env = os.environ if env is None else env
    for name in PAYLOAD_ENV_VARS:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        source = name
        if raw.startswith("@"):
            path = os.path.expanduser(raw[1:])
            source = f"{name} (file {path})"
            try:
                with open(path, encoding="utf-8") as f:
                    raw = f.read()
            except OSError as exc:
                raise ValueError(f"{source}: cannot read: {exc}") from exc
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"{source}: must be a JSON object, got {type(value).__name__}")
        return value
    return None


def canary_payload(
    worker_type: str,
    *,
    bos_token_id: int | None,
    bootstrap_port: int | None,
    env: Mapping[str, str] | None = None,
) -> PreprocessedRequest:
    """The canary request for a worker role: ``aggregated``, ``decode`` or ``prefill``.

    An override from :data:`PAYLOAD_ENV_VARS` replaces the default; for the disaggregated
    roles the fake-transfer bootstrap info is put back on top of it, because without it a
    decode worker rejects the request and a prefill worker would wait for a decode peer.
    """
    if worker_type != _AGGREGATED and worker_type not in _DISAGGREGATED:
        raise ValueError(
            f"no canary for worker type {worker_type!r}; "
            f"expected {_AGGREGATED}, {', '.join(_DISAGGREGATED)}"
        )
    override = payload_override(env)
    if override is None:
        request = PreprocessedRequest(
            token_ids=[1 if bos_token_id is None else bos_token_id],
            stop_conditions=StopConditions(max_tokens=1, ignore_eos=False),
            sampling_options=SamplingOptions(temperature=0.0, top_p=1.0, top_k=-1),
        )
    else:
        try:
            request = msgspec.convert(override, PreprocessedRequest)
        except (msgspec.ValidationError, ValueError) as exc:
            names = " / ".join(PAYLOAD_ENV_VARS)
            raise ValueError(f"{names}: not a valid generate request: {exc}") from exc
    if worker_type in _DISAGGREGATED:
        # Room 0 always lands on DP rank 0; the port is informational with the fake host.
        request.bootstrap_info = BootstrapInfo(
            bootstrap_host=FAKE_BOOTSTRAP_HOST,
            bootstrap_port=bootstrap_port or 0,
            bootstrap_room=0,
        )
    return request


@dataclass(frozen=True, slots=True)
class CanaryProbe:
    """What a canary sends and how it reads the answer: the request, the chunk type, and
    ``failure(chunk)``, which says why a chunk shows the worker unhealthy (None: it does not).
    Each worker service brings its own (an LLM role: :func:`generate_probe`)."""

    payload: Any
    response_type: Any
    failure: Callable[[Any], str | None]


def _generate_failure(chunk: EngineOutput) -> str | None:
    if chunk.finish_reason in _FAILED_FINISHES:
        return f"finished with {chunk.finish_reason.value}"
    return None


def generate_probe(payload: PreprocessedRequest) -> CanaryProbe:
    """The probe of an LLM worker's ``generate``: a failed or cancelled finish is unhealthy."""
    return CanaryProbe(payload, EngineOutput, _generate_failure)


@dataclass(frozen=True, slots=True)
class CanaryResult:
    ok: bool
    at: float  # wall-clock time the canary finished
    latency: float  # seconds from sending to the end of the stream (or the failure)
    chunks: int
    error: str | None = None


class Canary:
    """Probes one served endpoint whenever it has been idle for ``wait_time`` seconds.

    While unhealthy it probes every ``wait_time`` seconds regardless of activity, so a worker
    that recovers comes back. ``on_change(healthy)`` runs after each transition, once the
    discovery change is done. Start it after the endpoint is registered: it only ever puts
    back an instance it took out itself.
    """

    def __init__(
        self,
        runtime: DistributedRuntime,
        served: ServedEndpoint,
        payload: PreprocessedRequest | CanaryProbe,
        *,
        wait_time: float = 10.0,
        timeout: float = 3.0,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        if wait_time <= 0 or timeout <= 0:
            raise ValueError("wait_time and timeout must be > 0")
        self.runtime = runtime
        self.served = served
        self.probe = payload if isinstance(payload, CanaryProbe) else generate_probe(payload)
        self.wait_time = wait_time
        self.timeout = timeout
        self.on_change = on_change
        self.healthy = True
        self.last_result: CanaryResult | None = None
        self.sent = 0
        self.passed = 0
        self.failed = 0
        # Results that arrived while suspended or shutting down and were ignored.
        self.discarded = 0
        self._suspended = False
        # When probing may start again after a resume (monotonic); the engine needs a moment.
        self._not_before = 0.0
        self._last_probe = 0.0
        self._took_out = False
        self._closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._shutdown_watch: asyncio.Task[None] | None = None
        # Not started: it routes by instance id, so it needs no discovery watch.
        self._client = Client(runtime, served.eid)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            return
        self._closed = False
        self._task = asyncio.create_task(self._run(), name=f"canary:{self.served.name}")
        self._shutdown_watch = asyncio.create_task(
            self._watch_shutdown(), name=f"canary-shutdown:{self.served.name}"
        )

    async def close(self) -> None:
        """Stop probing; a canary in flight is cancelled. Discovery is left as it is."""
        self._closed = True
        self._wake.set()
        for task in (self._task, self._shutdown_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._shutdown_watch = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def suspended(self) -> bool:
        return self._suspended

    def suspend(self) -> None:
        """Stop probing (and ignore a result in flight) until :meth:`resume`.

        For when something else took the instance out of discovery on purpose: the canary
        must neither put it back nor report the expected failures of a paused engine.
        """
        self._suspended = True
        self._wake.set()

    def resume(self) -> None:
        """Probe again, after a fresh idle spell."""
        if not self._suspended:
            return
        self._suspended = False
        self._not_before = time.monotonic() + self.wait_time
        self._wake.set()

    # -- probing -----------------------------------------------------------------------------
    def _stopping(self) -> bool:
        rt = self.runtime
        return self._closed or rt.shutting_down or rt.shutdown_event.is_set()

    async def _watch_shutdown(self) -> None:
        await self.runtime.shutdown_event.wait()
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(seconds, 0.0))

    def _due_in(self, now: float) -> float:
        """Seconds until the next canary may go out (<= 0: now)."""
        if self.healthy:
            since = max(self.served.last_activity, self._not_before)
        else:
            # The canary's own request counts as activity; unhealthy probes are paced by
            # the last probe instead, and go out even if stray traffic keeps arriving.
            since = max(self._last_probe, self._not_before)
        return since + self.wait_time - now

    async def _run(self) -> None:
        # Polling while busy: in-flight streams end without telling anyone.
        busy_poll = min(self.wait_time, 1.0)
        while not self._stopping():
            if self._suspended or not self.served.serving:
                await self._sleep(busy_poll if not self._suspended else self.wait_time)
                continue
            if self.served.streams:
                await self._sleep(busy_poll)
                continue
            due = self._due_in(time.monotonic())
            if due > 0:
                await self._sleep(due)
                continue
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not end health checking for good.
                log.exception("health canary failed unexpectedly", extra=self._log_extra())
                await self._sleep(self.wait_time)

    async def _probe(self) -> CanaryResult:
        started = time.monotonic()
        chunks = 0
        error: str | None = None
        stream = None
        try:
            async with asyncio.timeout(self.timeout):
                stream = await self._client.generate(
                    self.probe.payload,
                    instance_id=self.runtime.instance_id,
                    response_type=self.probe.response_type,
                )
                async for chunk in stream:
                    chunks += 1
                    error = self.probe.failure(chunk) or error
        except TimeoutError:
            error = f"no complete answer within {self.timeout:g} s"
        except MeshError as exc:
            error = f"{exc.code.value}: {exc.message}"
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        if error is None and chunks == 0:
            error = "the stream ended without a chunk"
        return CanaryResult(
            ok=error is None,
            at=time.time(),
            latency=time.monotonic() - started,
            chunks=chunks,
            error=error,
        )

    async def check(self) -> bool:
        """Send one canary now and act on its result; returns whether it passed.

        A result that arrives while suspended or shutting down is recorded in ``discarded``
        only: it says nothing about the worker's health.
        """
        self._last_probe = time.monotonic()
        self.sent += 1
        result = await self._probe()
        self._last_probe = time.monotonic()
        if self._suspended or self._stopping():
            self.discarded += 1
            return result.ok
        self.last_result = result
        if result.ok:
            self.passed += 1
            if not self.healthy:
                await self._recover(result)
        else:
            self.failed += 1
            if self.healthy or self.served.registered:
                # Also when still failing but something (a rejoin) put the instance back.
                await self._fail(result)
            else:
                log.debug("health canary still failing", extra=self._log_extra(result))
        return result.ok

    async def _fail(self, result: CanaryResult) -> None:
        was_healthy = self.healthy
        self.healthy = False
        self._took_out = self._took_out or self.served.registered
        log.warning("health canary failed: leaving discovery", extra=self._log_extra(result))
        await self.served.unregister()
        if was_healthy:
            await self._notify(False)

    async def _recover(self, result: CanaryResult) -> None:
        if self._took_out:
            try:
                await self.served.register()
            except Exception as exc:
                # etcd unreachable: stay out and try again with the next canary.
                log.warning(
                    "health canary passed but re-registering failed",
                    extra={**self._log_extra(result), "register_error": repr(exc)},
                )
                return
        self.healthy = True
        self._took_out = False
        log.info("health canary passed: back in discovery", extra=self._log_extra(result))
        await self._notify(True)

    async def _notify(self, healthy: bool) -> None:
        if self.on_change is None:
            return
        try:
            await self.on_change(healthy)
        except Exception:
            log.exception("health change callback failed", extra=self._log_extra())

    def _log_extra(self, result: CanaryResult | None = None) -> dict[str, object]:
        extra: dict[str, object] = {"endpoint": self.served.name}
        if result is not None:
            extra.update(latency=round(result.latency, 4), error=result.error)
        return extra
