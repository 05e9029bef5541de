"""aetcd's client with TLS and self-renewing authentication.

Why wrap aetcd instead of switching clients: aetcd is the asyncio etcd v3 client the mesh has
been tested against (put/get/prefix/lease/expiry/watch/txn), and its only gaps are at the
channel: it always dials ``grpc.aio.insecure_channel``, and it authenticates once at connect
and sends that token forever, while etcd forgets simple tokens on restart (and after their
TTL of idleness). Both gaps close below its API: :class:`EtcdClient` overrides ``connect`` to
build the channel itself (TLS credentials when asked) and to put an :class:`_AuthInterceptor`
on it. The interceptors add the current token to every call; when etcd answers a unary
call with "invalid auth token" it authenticates again and retries that call once; a stream
(watch, keep-alive) opened with a stale token fails and is reopened by its owner, which
then gets the new token. aetcd never sees a token (its ``metadata`` stays ``None``).
The alternatives looked at: ``etcd3`` (synchronous, unmaintained since 2020), ``aioetcd3``
(unmaintained since 2020), ``etcd-client-py`` (a Rust binding with its own API: every caller
would change). ``connect`` mirrors aetcd 1.0's own; ``pyproject.toml`` pins aetcd below 1.1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

__all__ = ["EtcdAuth", "EtcdClient", "auth_enabled", "auth_is_disabled"]

log = logging.getLogger(__name__)

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
# "user name is empty": authentication was turned on after this process connected without
# it (Kubernetes' etcd-auth Job finishing after the pods start); log in now.
_TOKEN_ERRORS = ("invalid auth token", "auth token is expired", "user name is empty")


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """How to reach etcd: user and password (token auth), and TLS files (PEM paths)."""

    user: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as fh:
                return fh.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


async def auth_enabled(client: aetcd.Client) -> bool:
    """Whether the etcd behind ``client`` refuses anonymous reads (authentication is on)."""
    try:
        await rpc.KVStub(client.channel).Range(rpc.RangeRequest(key=b"\0", limit=1), timeout=5)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        return "user name is empty" in details or "permission denied" in details
    return False


def auth_is_disabled(exc: BaseException) -> bool:
    """Whether ``exc`` is etcd saying it runs without authentication."""
    return "authentication is not enabled" in str(exc)


def _is_token_error(exc: grpc.aio.AioRpcError) -> bool:
    details = (exc.details() or "").lower()
    return any(text in details for text in _TOKEN_ERRORS)


class _Auth:
    """The login state a channel's interceptors share: the current token, renewed on demand."""

    def __init__(self, user: str, password: str, timeout: float | None) -> None:
        self._user = user
        self._password = password
        self._timeout = timeout
        self.token: str | None = None
        self._stub: Any = None
        self._lock = asyncio.Lock()
        self.disabled = False

    def bind(self, channel: grpc.aio.Channel) -> None:
        self._stub = rpc.AuthStub(channel)

    async def authenticate(self, stale: str | None = None) -> None:
        async with self._lock:
            if self.token != stale:
                return  # another call renewed it meanwhile
            try:
                resp = await self._stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._user, password=self._password),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if auth_is_disabled(Exception(exc.details())):
                    self.disabled = True
                    log.warning(
                        "etcd runs without authentication: anyone who reaches it can read and "
                        "change discovery (the credentials given are not needed)"
                    )
                    return
                raise
            self.token = resp.token
            self.disabled = False

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self.token is None or details.method == _AUTHENTICATE:
            return details
        metadata = list(details.metadata or ())
        metadata.append(("token", self.token))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files an interceptor under the first kind it is an instance of, so each kind of
# call gets its own small class around the shared state.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: _Auth) -> None:
        self._auth = auth

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        auth = self._auth
        used = auth.token
        call = await continuation(auth.details(details), request)
        if details.method == _AUTHENTICATE:
            return call
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            if not _is_token_error(exc):
                raise
            await auth.authenticate(stale=used)
            return await continuation(auth.details(details), request)
        return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: _Auth) -> None:
        self._auth = auth

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._auth.details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: _Auth) -> None:
        self._auth = auth

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._auth.details(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: _Auth) -> None:
        self._auth = auth

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._auth.details(details), requests)


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """``aetcd.Client`` over a channel this class builds: TLS and renewing tokens."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        auth: EtcdAuth,
        timeout: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        # aetcd's own username/password handling stays off: the interceptor does it.
        super().__init__(host=host, port=port, timeout=timeout, options=options)
        self._auth = auth
        self._login: _Auth | None = None

    @property
    def auth_disabled(self) -> bool:
        """True when credentials were given but the server runs without authentication."""
        return self._login is not None and self._login.disabled

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            interceptors: Sequence[Any] = ()
            auth = self._auth
            if auth.user is not None and auth.password is not None:
                login = self._login = _Auth(auth.user, auth.password, self._timeout)
                interceptors = (
                    _UnaryUnary(login),
                    _UnaryStream(login),
                    _StreamUnary(login),
                    _StreamStream(login),
                )
            options = list(self._options.items())
            credentials = auth.channel_credentials()
            if credentials is None:
                self.channel = grpc.aio.insecure_channel(
                    target, options=options, interceptors=interceptors
                )
            else:
                self.channel = grpc.aio.secure_channel(
                    target, credentials, options=options, interceptors=interceptors
                )
            if self._login is not None:
                self._login.bind(self.channel)
                await self._login.authenticate()
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None
            )
            self._connected.set()
        except grpc.aio.AioRpcError as exc:
            if self.channel is not None:
                await self.channel.close()
            self._init_channel_attrs()
            raise aetcd.exceptions.ClientError(exc.details()) from exc
        finally:
            self._is_connecting = False
