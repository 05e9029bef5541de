"""One etcd client and one lease per process, kept alive, with re-registration after loss.

Everything a process registers (instance records, model cards) is attached to its lease, so a
crashed process disappears from discovery when the lease expires. The session remembers what
it registered: if etcd forgets the lease (restarted without its data, or the keep-alive could
not reach it for longer than the TTL) the session grants a new lease and writes every key again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aetcd

from shared.runtime import metrics
from shared.runtime.etcd_client import EtcdAuth, EtcdClient, auth_enabled

log = logging.getLogger(__name__)

_RETRY_INTERVAL = 0.25

# gRPC's default reconnect backoff grows to 120 s; after an etcd restart the process must be
# back within a lease TTL. etcd is cluster-internal, so an HTTP proxy from the environment is
# never the way to it.
_GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.enable_http_proxy": 0,
    "grpc.use_local_subchannel_pool": 1,
}


class EtcdSession:
    def __init__(
        self,
        hostports: list[tuple[str, int]],
        lease_ttl: int,
        *,
        request_timeout: float = 5.0,
        auth: EtcdAuth | None = None,
    ) -> None:
        if not hostports:
            raise ValueError("at least one etcd endpoint is required")
        self._hostports = hostports
        self._auth = auth or EtcdAuth()
        self._warned = False
        self._endpoint_index = 0
        self._ttl = lease_ttl
        self._timeout = request_timeout
        self._client: aetcd.Client | None = None
        self._lease_id = 0
        self._registered: dict[bytes, bytes] = {}
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._lease_listeners: list[Callable[[int], None]] = []
        self.healthy = False

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            raise RuntimeError("etcd session is not started")
        return self._client

    @property
    def lease_id(self) -> int:
        return self._lease_id

    def on_lease_change(self, listener: Callable[[int], None]) -> None:
        """Called with the new lease id after a re-grant, before keys are written again.

        A listener may call :meth:`remember` to change what gets written.
        """
        self._lease_listeners.append(listener)

    async def start(self, *, connect_timeout: float = 10.0) -> None:
        deadline = time.monotonic() + connect_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                await self._connect()
                await self._grant()
                break
            except Exception as exc:  # every endpoint gets tried before giving up
                last_error = exc
                self._rotate_endpoint()
                await asyncio.sleep(_RETRY_INTERVAL)
        else:
            targets = ", ".join(f"{h}:{p}" for h, p in self._hostports)
            raise ConnectionError(f"cannot reach etcd at {targets}: {last_error}") from last_error
        self.healthy = True
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")

    async def _connect(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        host, port = self._hostports[self._endpoint_index]
        client = EtcdClient(
            host, port, auth=self._auth, timeout=self._timeout, options=_GRPC_OPTIONS
        )
        await client.connect()
        await client.status()  # connect() is lazy; this proves the server answers
        self._client = client
        if self._auth.user is None:
            if await auth_enabled(client):
                raise PermissionError(
                    "etcd requires authentication: give --etcd-user and --etcd-password "
                    "(or --credentials FILE)"
                )
            if not self._warned:
                self._warned = True
                log.warning(
                    "etcd accepts anonymous clients: anyone who reaches it can read and "
                    "change discovery",
                    extra={"etcd": f"{host}:{port}"},
                )

    def _rotate_endpoint(self) -> None:
        self._endpoint_index = (self._endpoint_index + 1) % len(self._hostports)

    async def _grant(self) -> None:
        lease = await self.client.lease(self._ttl)
        self._lease_id = lease.id

    async def put(self, key: str, value: bytes) -> None:
        """Write ``key`` under the lease and remember it for re-registration."""
        k = key.encode()
        async with self._lock:
            self._registered[k] = value
            await self.client.put(k, value, lease=self._lease_id)

    async def delete(self, key: str) -> None:
        k = key.encode()
        async with self._lock:
            self._registered.pop(k, None)
            await self.client.delete(k)

    async def _keepalive(self) -> None:
        interval = max(self._ttl / 3.0, 0.1)
        failing_since: float | None = None
        while not self._closed:
            try:
                reply = await asyncio.wait_for(
                    self.client.refresh_lease(self._lease_id), timeout=interval
                )
                if reply is None or reply.TTL <= 0:
                    await self._regrant()
                else:
                    await self._restore_missing()
                if failing_since is not None:
                    log.info("etcd reachable again", extra={"lease_id": self._lease_id})
                failing_since = None
                self.healthy = True
                await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("etcd keep-alive failed", extra={"error": repr(exc)})
                if now - failing_since > self._ttl:
                    self.healthy = False
                if len(self._hostports) > 1:
                    self._rotate_endpoint()
                    with contextlib.suppress(Exception):
                        await self._connect()
                await asyncio.sleep(_RETRY_INTERVAL)

    async def _regrant(self) -> None:
        async with self._lock:
            old = self._lease_id
            await self._grant()
            metrics.lease_regrants_total.inc()
            log.warning(
                "etcd lease lost; re-registering",
                extra={"old_lease": old, "lease_id": self._lease_id, "keys": len(self._registered)},
            )
            for listener in self._lease_listeners:
                listener(self._lease_id)
            for k, v in self._registered.items():
                await self.client.put(k, v, lease=self._lease_id)

    async def _restore_missing(self) -> None:
        """Write again any registered key that vanished while the lease lives (someone
        deleted it): a live process must not drop out of discovery for good."""
        async with self._lock:
            for k, v in list(self._registered.items()):
                current = await self.client.get(k)
                if current is None or current.value != v or current.lease != self._lease_id:
                    log.warning(
                        "registration missing or changed in etcd; writing it again",
                        extra={"key": k.decode(errors="replace")},
                    )
                    metrics.reregistrations_total.inc()
                    await self.client.put(k, v, lease=self._lease_id)

    def remember(self, key: str, value: bytes) -> None:
        """Change the value a registered key gets on the next re-registration."""
        k = key.encode()
        if k in self._registered:
            self._registered[k] = value

    async def close(self, *, revoke: bool = True) -> None:
        self._closed = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keepalive_task
        if self._client is None:
            return
        if revoke and self._lease_id:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease_id), 2.0)
        with contextlib.suppress(Exception):
            await self._client.close()
        self._client = None
