"""Mesh-wide configuration: endpoint names, the settings every process shares, and their flags.

Why one module: every service (worker, processor, publisher, ...) needs the same handful of
settings to join the mesh -- where NATS and etcd are, which namespace, how long its lease
lives, how it shuts down. Declaring them once keeps the flag names, environment variables,
defaults and validation identical everywhere, so one deployment file works for every role.

Sources, highest precedence first:

1. the command-line flag (``--lease-ttl 5``);
2. its ``SGLMESH_<FIELD>`` environment variable (``SGLMESH_LEASE_TTL=5``);
3. the reference deployment's variable where one exists (``DYN_NAMESPACE``, ``NATS_SERVER``,
   ``ETCD_ENDPOINTS``, ``DYN_ENDPOINT``, ``DYN_SYSTEM_PORT``,
   ``DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS``, ``DYN_ENGINE_REQUEST_LIMIT``, ``DYN_LOG``), so
   manifests written for the reference keep working;
4. the default.

An environment variable set to the empty string counts as unset: compose files and Helm
charts routinely render ``FOO=`` for "not configured". The precedence is applied by
``shared.flags``, which the engine and worker flags use too.

Parsing uses ``parse_known_args`` and leaves every flag it does not know, in order and
untouched, for the engine's own parser (SGLang's ``ServerArgs``) to read later. Prefix
matching is off, otherwise ``--log`` or ``--end`` meant for another parser would be claimed
here.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from shared.flags import (
    Flag,
    FlagError,
    OneLineParser,
    add_flags,
    float_converter,
    int_converter,
    non_empty,
    parse_bool,
    resolve_flags,
)

__all__ = [
    "DEFAULT_ETCD_PORT",
    "EndpointId",
    "MeshConfig",
    "MeshConfigError",
    "add_mesh_args",
    "mesh_config_from_namespace",
    "parse_bool",
    "parse_endpoint",
    "parse_mesh_args",
]

DEFAULT_ETCD_PORT = 2379

# One NATS subject token / etcd key segment. Dots would split a name into extra subject
# tokens, and '*' / '>' are NATS wildcards, so both would silently change what is addressed.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_URI_PREFIX = "dyn://"
_ENDPOINT_FORM = "dyn://namespace.component.endpoint"

_LOG_LEVELS = {
    "trace": "debug",  # the reference's Rust filter syntax knows trace; Python's logging does not
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
}
_LOG_FORMATS = ("json", "text")
# How responders answer: "tcp" on a direct connection to the caller's response server,
# "nats" on the reply subject, "auto" tcp unless NATS is reached over TLS (the direct
# connection has no TLS of its own).
RESPONSE_PLANES = ("auto", "tcp", "nats")
# Frames wait at most this long for company (see shared/runtime/response_plane.py).
MAX_RESPONSE_FLUSH_INTERVAL = 0.05
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_ETCD_SCHEMES = ("http", "https")


class MeshConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and the env var."""


# --------------------------------------------------------------------------------------------
# Endpoint names


@dataclass(frozen=True, slots=True)
class EndpointId:
    """``namespace.component.endpoint``: what a worker serves and what a client addresses."""

    namespace: str
    component: str
    endpoint: str

    def __post_init__(self) -> None:
        for name in ("namespace", "component", "endpoint"):
            part = getattr(self, name)
            if not isinstance(part, str) or not _TOKEN_RE.fullmatch(part):
                raise ValueError(
                    f"invalid endpoint {name} {part!r}: each part must be non-empty and use "
                    f"only letters, digits, '_' or '-' (expected {_ENDPOINT_FORM})"
                )

    def __str__(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"

    @property
    def uri(self) -> str:
        return f"{_URI_PREFIX}{self}"

    @property
    def subject(self) -> str:
        """The NATS subject that any instance of the endpoint answers (via its queue group)."""
        return str(self)


def parse_endpoint(text: str) -> EndpointId:
    """Parse ``dyn://ns.comp.ep`` or ``ns.comp.ep``; anything else is a ``ValueError``."""
    if not isinstance(text, str):
        raise ValueError(f"invalid endpoint {text!r}: expected a string like {_ENDPOINT_FORM}")
    body = text[len(_URI_PREFIX) :] if text.startswith(_URI_PREFIX) else text
    parts = body.split(".")
    if len(parts) != 3 or not all(_TOKEN_RE.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid endpoint {text!r}: expected {_ENDPOINT_FORM} (or namespace.component."
            "endpoint) with exactly three non-empty parts of letters, digits, '_' or '-'"
        )
    return EndpointId(parts[0], parts[1], parts[2])


# --------------------------------------------------------------------------------------------
# Value checks shared by the dataclass (typed values) and the converters (text values)


def _check_token(what: str, value: object) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError(
            f"{what} must be one non-empty token of letters, digits, '_' or '-' "
            f"(it becomes part of NATS subjects and etcd keys), got {value!r}"
        )
    return value


def _check_port(value: int, what: str) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{what} port {value} is out of range (0-65535)")
    return value


def _split_nats_servers(url: str) -> list[str]:
    """Normalise a comma-separated server list; a bare ``host:port`` means ``nats://``."""
    servers: list[str] = []
    for raw in url.split(","):
        entry = raw.strip()
        if not entry:
            continue
        full = entry if "://" in entry else f"nats://{entry}"
        try:
            parts = urlsplit(full)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid NATS server {entry!r}: {exc}") from None
        if parts.scheme not in _NATS_SCHEMES:
            raise ValueError(
                f"invalid NATS server {entry!r}: scheme must be one of "
                f"{', '.join(s + '://' for s in _NATS_SCHEMES)}"
            )
        if not parts.hostname:
            raise ValueError(f"invalid NATS server {entry!r}: no host")
        if port is not None:
            _check_port(port, f"NATS server {entry!r}")
        servers.append(full)
    if not servers:
        raise ValueError(f"no NATS server in {url!r}; expected e.g. nats://127.0.0.1:4222")
    return servers


def _parse_etcd_endpoint(entry: str) -> tuple[str, int]:
    text = entry.strip()
    full = text if "://" in text else f"http://{text}"
    try:
        parts = urlsplit(full)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid etcd endpoint {entry!r}: {exc}") from None
    if parts.scheme not in _ETCD_SCHEMES:
        raise ValueError(
            f"invalid etcd endpoint {entry!r}: scheme must be http:// or https:// "
            "(or give host:port)"
        )
    if not parts.hostname:
        raise ValueError(f"invalid etcd endpoint {entry!r}: no host; expected http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"invalid etcd endpoint {entry!r}: expected http://host:port with no path or query"
        )
    if parts.username is not None:
        # Credentials in a URL end up in logs and `ps`; etcd auth is not configured this way.
        raise ValueError(f"invalid etcd endpoint {entry!r}: user info is not supported")
    return parts.hostname, _check_port(DEFAULT_ETCD_PORT if port is None else port, "etcd")


def _split_csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_log_level(value: object) -> str:
    level = _LOG_LEVELS.get(str(value).strip().lower()) if isinstance(value, str) else None
    if level is None:
        raise ValueError(
            f"unknown log level {value!r}; expected one of debug, info, warning, error, critical"
        )
    return level


def _check_log_format(value: object) -> str:
    fmt = value.strip().lower() if isinstance(value, str) else None
    if fmt not in _LOG_FORMATS:
        raise ValueError(f"unknown log format {value!r}; expected json or text")
    return fmt


def _check_response_plane(value: object) -> str:
    plane = value.strip().lower() if isinstance(value, str) else None
    if plane not in RESPONSE_PLANES:
        raise ValueError(f"unknown response plane {value!r}; expected auto, tcp or nats")
    return plane


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The configuration


def _default_etcd_endpoints() -> list[str]:
    return ["http://127.0.0.1:2379"]


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Settings every mesh process shares. Validated on construction; see the module doc.

    Normalisations applied on construction (so every consumer sees one spelling):
    ``log_level``/``log_format`` lower-cased (``warn`` -> ``warning``, ``trace`` -> ``debug``),
    a negative ``graceful_shutdown_grace_period`` becomes 0, and a negative ``system_port``
    becomes ``None`` (disabled), as the reference treats a negative ``DYN_SYSTEM_PORT``.
    ``system_port=0`` means "bind any free port".
    """

    namespace: str = "sglmesh"
    nats_url: str = "nats://127.0.0.1:4222"
    etcd_endpoints: list[str] = field(default_factory=_default_etcd_endpoints)
    endpoint: EndpointId | None = None
    lease_ttl: int = 10
    system_host: str = "127.0.0.1"
    system_port: int | None = None
    admin_token: str | None = field(default=None, repr=False)
    graceful_shutdown_grace_period: float = 5.0
    heartbeat_interval: float = 0.5
    stream_timeout: float = 5.0
    response_plane: str = "auto"
    response_host: str = ""
    response_port: int = 0
    response_flush_interval: float = 0.005
    engine_request_limit: int = 0
    log_level: str = "info"
    log_format: str = "json"
    # Credentials for the planes (see shared/planes_auth.py). Secrets never appear in repr().
    nats_user: str | None = None
    nats_password: str | None = field(default=None, repr=False)
    nats_token: str | None = field(default=None, repr=False)
    nats_nkey_seed: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_tls_ca: str | None = None
    etcd_tls_cert: str | None = None
    etcd_tls_key: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _check_token("namespace", self.namespace)
        if not isinstance(self.nats_url, str):
            raise ValueError(f"nats_url must be a string, got {self.nats_url!r}")
        _split_nats_servers(self.nats_url)

        endpoints: object = self.etcd_endpoints
        if isinstance(endpoints, str):
            endpoints = _split_csv(endpoints)
        if not isinstance(endpoints, list | tuple) or not all(
            isinstance(e, str) for e in endpoints
        ):
            raise ValueError(f"etcd_endpoints must be a list of strings, got {endpoints!r}")
        cleaned = [e.strip() for e in endpoints if e.strip()]
        if not cleaned:
            raise ValueError("etcd_endpoints must name at least one endpoint")
        for entry in cleaned:
            _parse_etcd_endpoint(entry)
        # A private copy: the caller's list must not be able to change a frozen config.
        put("etcd_endpoints", cleaned)

        if isinstance(self.endpoint, str):
            put("endpoint", parse_endpoint(self.endpoint))
        elif self.endpoint is not None and not isinstance(self.endpoint, EndpointId):
            raise ValueError(f"endpoint must be an EndpointId or None, got {self.endpoint!r}")

        if _integer(self.lease_ttl, "lease_ttl") < 1:
            raise ValueError(f"lease_ttl must be >= 1 second, got {self.lease_ttl}")
        if not isinstance(self.system_host, str) or not self.system_host.strip():
            raise ValueError(f"system_host must be a non-empty string, got {self.system_host!r}")
        if self.system_port is not None:
            port = _integer(self.system_port, "system_port")
            put("system_port", None if port < 0 else _check_port(port, "system"))

        grace = _finite(self.graceful_shutdown_grace_period, "graceful_shutdown_grace_period")
        put("graceful_shutdown_grace_period", max(0.0, grace))
        heartbeat = _finite(self.heartbeat_interval, "heartbeat_interval")
        if heartbeat <= 0:
            raise ValueError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        put("heartbeat_interval", heartbeat)
        timeout = _finite(self.stream_timeout, "stream_timeout")
        if timeout <= heartbeat:
            raise ValueError(
                f"stream_timeout ({timeout:g}) must be greater than heartbeat_interval "
                f"({heartbeat:g}), or a live responder would be declared dead between heartbeats"
            )
        put("stream_timeout", timeout)
        if _integer(self.engine_request_limit, "engine_request_limit") < 0:
            raise ValueError(
                f"engine_request_limit must be >= 0 (0 = unlimited), "
                f"got {self.engine_request_limit}"
            )
        put("response_plane", _check_response_plane(self.response_plane))
        if not isinstance(self.response_host, str):
            raise ValueError(f"response_host must be a string, got {self.response_host!r}")
        put("response_host", self.response_host.strip())
        _check_port(_integer(self.response_port, "response_port"), "response")
        interval = _finite(self.response_flush_interval, "response_flush_interval")
        put("response_flush_interval", _check_flush_interval(interval, "response_flush_interval "))
        if self.response_plane == "tcp" and self.nats_tls:
            raise ValueError(
                "response_plane tcp has no TLS while NATS is reached over TLS; use nats or auto"
            )
        put("log_level", _check_log_level(self.log_level))
        put("log_format", _check_log_format(self.log_format))
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("nats_user and nats_password go together")
        if (self.etcd_user is None) != (self.etcd_password is None):
            raise ValueError("etcd_user and etcd_password go together")
        for plane in ("nats", "etcd"):
            if (getattr(self, f"{plane}_tls_cert") is None) != (
                getattr(self, f"{plane}_tls_key") is None
            ):
                raise ValueError(f"{plane}_tls_cert and {plane}_tls_key go together")

    @property
    def nats_tls(self) -> bool:
        """Whether NATS is reached over TLS (a tls:// server, or a CA or certificate given)."""
        return (
            self.nats_tls_ca is not None
            or self.nats_tls_cert is not None
            or any(s.startswith("tls://") for s in self.nats_servers)
        )

    @property
    def direct_responses(self) -> bool:
        """Whether responses stream back on direct TCP connections (``response_plane``)."""
        return self.response_plane == "tcp" or (self.response_plane == "auto" and not self.nats_tls)

    @property
    def etcd_tls(self) -> bool:
        """Whether etcd is reached over TLS (an https:// endpoint or a CA given)."""
        return self.etcd_tls_ca is not None or any(
            e.strip().lower().startswith("https://") for e in self.etcd_endpoints
        )

    def endpoint_or(self, component: str, endpoint: str = "generate") -> EndpointId:
        """``endpoint`` if one was configured, else the role's default in this namespace."""
        return self.endpoint or EndpointId(self.namespace, component, endpoint)

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split into servers; a bare ``host:port`` gets ``nats://``."""
        return _split_nats_servers(self.nats_url)

    def etcd_hostports(self) -> list[tuple[str, int]]:
        """``etcd_endpoints`` as ``(host, port)``; the port defaults to 2379.

        IPv6 hosts come back without brackets (``"::1"``), as ``urllib`` spells a hostname.
        """
        return [_parse_etcd_endpoint(entry) for entry in self.etcd_endpoints]


# --------------------------------------------------------------------------------------------
# Flags and environment variables


def _conv_namespace(text: str) -> str:
    return _check_token("namespace", text)


def _conv_nats_url(text: str) -> str:
    _split_nats_servers(text)
    return text.strip()


def _conv_etcd_endpoints(text: str) -> list[str]:
    entries = _split_csv(text)
    if not entries:
        raise ValueError(f"no etcd endpoint in {text!r}; expected e.g. http://127.0.0.1:2379")
    for entry in entries:
        _parse_etcd_endpoint(entry)
    return entries


def _conv_grace(text: str) -> float:
    return max(0.0, float_converter()(text))


def _parse_port(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected a port number, got {text!r}") from None


def _conv_port(text: str) -> int:
    value = _parse_port(text)
    # Negative = disabled, as the reference reads DYN_SYSTEM_PORT. Kept negative here (the
    # config turns it into None) because None in the namespace means "flag not given".
    return value if value < 0 else _check_port(value, "system")


def _check_flush_interval(interval: float, prefix: str = "") -> float:
    if not 0.0 <= interval <= MAX_RESPONSE_FLUSH_INTERVAL:
        raise ValueError(
            f"{prefix}must be between 0 and {MAX_RESPONSE_FLUSH_INTERVAL:g} seconds, "
            f"got {interval:g}"
        )
    return interval


def _conv_flush_interval(text: str) -> float:
    return _check_flush_interval(float_converter()(text))


def _conv_response_port(text: str) -> int:
    return _check_port(_parse_port(text), "response")  # 0 (any free port) is in range


def _conv_dyn_log(text: str) -> str:
    # DYN_LOG is a Rust env-filter ("info,some_crate=debug"); the bare directive is the level.
    bare = [d.strip() for d in text.split(",") if d.strip() and "=" not in d]
    if len(bare) != 1:
        raise ValueError(f"expected a log level such as info or debug, got {text!r}")
    return _check_log_level(bare[0])


def _file(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


_DEFAULT = MeshConfig()

_OPTIONS: tuple[Flag, ...] = (
    Flag(
        "namespace",
        _conv_namespace,
        _DEFAULT.namespace,
        "NAME",
        "namespace that scopes every endpoint, etcd key and event subject",
        ("DYN_NAMESPACE",),
    ),
    Flag(
        "nats_url",
        _conv_nats_url,
        _DEFAULT.nats_url,
        "URL[,URL...]",
        "NATS server(s), comma-separated",
        ("NATS_SERVER",),
    ),
    Flag(
        "etcd_endpoints",
        _conv_etcd_endpoints,
        tuple(_DEFAULT.etcd_endpoints),
        "URL[,URL...]",
        "etcd endpoint(s), comma-separated: http://host:port, https://host:port or host:port",
        ("ETCD_ENDPOINTS",),
    ),
    Flag(
        "endpoint",
        parse_endpoint,
        _DEFAULT.endpoint,
        "dyn://NS.COMP.EP",
        "endpoint this process serves (dyn://namespace.component.endpoint or "
        "namespace.component.endpoint)",
        ("DYN_ENDPOINT",),
        default_text="the role's default",
    ),
    Flag(
        "lease_ttl",
        int_converter(1, " second"),
        _DEFAULT.lease_ttl,
        "SECONDS",
        "etcd lease TTL: a crashed process leaves discovery this long after it dies",
    ),
    Flag(
        "system_host",
        non_empty("a host name or address"),
        _DEFAULT.system_host,
        "HOST",
        "bind address of the system server (health, metrics)",
    ),
    Flag(
        "system_port",
        _conv_port,
        _DEFAULT.system_port,
        "PORT",
        "port of the system server (health, metrics); 0 = any free port, negative = off",
        ("DYN_SYSTEM_PORT",),
        default_text="off",
    ),
    Flag(
        "admin_token",
        non_empty("a token"),
        None,
        "TOKEN",
        "token the system server's /engine/* routes require ('Authorization: Bearer TOKEN'); "
        "unset: those routes are refused (pass it by environment, not on the command line)",
    ),
    Flag(
        "graceful_shutdown_grace_period",
        _conv_grace,
        _DEFAULT.graceful_shutdown_grace_period,
        "SECONDS",
        "after leaving discovery on SIGTERM, wait this long for in-flight requests; negative = 0",
        ("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",),
    ),
    Flag(
        "heartbeat_interval",
        float_converter(0.0, strict=True),
        _DEFAULT.heartbeat_interval,
        "SECONDS",
        "interval between keep-alive messages on an idle response stream",
    ),
    Flag(
        "stream_timeout",
        float_converter(0.0, strict=True),
        _DEFAULT.stream_timeout,
        "SECONDS",
        "silence after which a responder is considered dead; must exceed the heartbeat interval",
    ),
    Flag(
        "response_plane",
        _check_response_plane,
        _DEFAULT.response_plane,
        "{auto,tcp,nats}",
        "how responders stream answers back: tcp (a direct connection to this process's "
        "response server), nats (reply subjects), auto (tcp unless NATS uses TLS)",
    ),
    Flag(
        "response_host",
        non_empty("a host"),
        _DEFAULT.response_host,
        "HOST",
        "address this process's response server binds and advertises to responders",
        default_text="the local address that reaches NATS",
    ),
    Flag(
        "response_port",
        _conv_response_port,
        _DEFAULT.response_port,
        "PORT",
        "port of this process's response server; 0 = any free port",
    ),
    Flag(
        "response_flush_interval",
        _conv_flush_interval,
        _DEFAULT.response_flush_interval,
        "SECONDS",
        "least time between two writes of a responder's connection to one caller: frames "
        "that come sooner go together in the next write (the first after a quiet spell, and a "
        "stream's last, go at once); 0 = a write per event-loop turn; at most "
        f"{MAX_RESPONSE_FLUSH_INTERVAL:g}",
    ),
    Flag(
        "engine_request_limit",
        int_converter(0, " (0 = unlimited)"),
        _DEFAULT.engine_request_limit,
        "N",
        "maximum concurrent requests per endpoint; 0 = unlimited",
        ("DYN_ENGINE_REQUEST_LIMIT",),
    ),
    Flag(
        "log_level",
        _check_log_level,
        _DEFAULT.log_level,
        "LEVEL",
        "log level: debug, info, warning, error or critical",
        ("DYN_LOG",),
        {"DYN_LOG": _conv_dyn_log},
    ),
    Flag(
        "log_format",
        _check_log_format,
        _DEFAULT.log_format,
        "FORMAT",
        "log format: json (one object per line) or text",
    ),
    Flag("nats_user", non_empty("a user name"), None, "USER", "NATS user (with --nats-password)"),
    Flag(
        "nats_password",
        non_empty("a password"),
        None,
        "PASSWORD",
        "NATS password (pass it by environment or --credentials, not on the command line)",
    ),
    Flag("nats_token", non_empty("a token"), None, "TOKEN", "NATS token authentication"),
    Flag("nats_nkey_seed", _file, None, "FILE", "NATS nkey seed file (nkey authentication)"),
    Flag("nats_creds", _file, None, "FILE", "NATS credentials file (JWT + nkey seed)"),
    Flag("nats_tls_ca", _file, None, "FILE", "CA bundle that signs the NATS server's cert"),
    Flag("nats_tls_cert", _file, None, "FILE", "client certificate for NATS (mutual TLS)"),
    Flag("nats_tls_key", _file, None, "FILE", "private key of --nats-tls-cert"),
    Flag("etcd_user", non_empty("a user name"), None, "USER", "etcd user (with --etcd-password)"),
    Flag(
        "etcd_password",
        non_empty("a password"),
        None,
        "PASSWORD",
        "etcd password (pass it by environment or --credentials, not on the command line)",
    ),
    Flag("etcd_tls_ca", _file, None, "FILE", "CA bundle that signs etcd's cert (implies TLS)"),
    Flag("etcd_tls_cert", _file, None, "FILE", "client certificate for etcd (mutual TLS)"),
    Flag("etcd_tls_key", _file, None, "FILE", "private key of --etcd-tls-cert"),
)

# The table must cover the dataclass exactly; a new field without a flag is a bug.
if [o.dest for o in _OPTIONS] != [f.name for f in fields(MeshConfig)]:
    raise RuntimeError("shared.config: _OPTIONS is out of step with MeshConfig's fields")


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """Add the mesh flags, in an argument group "mesh", to ``parser``.

    Every flag defaults to ``None`` so ``mesh_config_from_namespace`` can tell "not given"
    from "given", and then consult the environment. The parser should be built with
    ``allow_abbrev=False`` if it passes unknown flags on to another parser.
    """
    group = parser.add_argument_group(
        "mesh", "How this process joins the mesh. Precedence: flag > SGLMESH_* > reference env."
    )
    add_flags(group, _OPTIONS)
    group.add_argument(
        "--credentials",
        dest="credentials",
        metavar="FILE",
        default=None,
        help="a file of SGLMESH_*=value lines (e.g. the role files `sglmesh infra up` writes "
        "under .run/credentials); its values count as environment variables, below the real "
        "ones (env: SGLMESH_CREDENTIALS; default: none)",
    )


def read_credentials_file(path: str) -> dict[str, str]:
    """``KEY=value`` lines (``export`` and quotes allowed, ``#`` comments); only SGLMESH_*
    keys, so a credentials file cannot reconfigure anything else."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise MeshConfigError(f"--credentials {path}: {exc.strerror or exc}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.startswith("SGLMESH_"):
            raise MeshConfigError(
                f"--credentials {path}, line {number}: expected SGLMESH_NAME=value"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _with_credentials(ns: argparse.Namespace, env: Mapping[str, str]) -> Mapping[str, str]:
    path = getattr(ns, "credentials", None) or env.get("SGLMESH_CREDENTIALS", "").strip()
    if not path:
        return env
    return {**read_credentials_file(path), **env}


def mesh_config_from_namespace(
    ns: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
) -> MeshConfig:
    """Build a ``MeshConfig`` from flags parsed by a parser that ran ``add_mesh_args``.

    ``env`` defaults to ``os.environ``. An invalid value (including one read from the
    environment) is reported through ``parser.error`` (exit status 2) when ``parser`` is
    given; otherwise it raises ``MeshConfigError`` naming the flag and the env var.
    """
    try:
        try:
            settings = resolve_flags(
                _OPTIONS, ns, _with_credentials(ns, os.environ if env is None else env)
            )
        except FlagError as exc:
            raise MeshConfigError(str(exc)) from None

        def describe(name: str) -> str:
            value, source = settings[name].value, settings[name].source
            origin = source if source in ("flag", "default") else f"from {source}"
            return f"--{name.replace('_', '-')} {value:g} ({origin})"

        # The one rule that spans two settings; checked here so the message names both sources.
        if settings["stream_timeout"].value <= settings["heartbeat_interval"].value:
            raise MeshConfigError(
                f"{describe('stream_timeout')} must be greater than "
                f"{describe('heartbeat_interval')}: a live responder would be declared dead "
                "between heartbeats"
            )
        try:
            return MeshConfig(**{name: s.value for name, s in settings.items()})
        except ValueError as exc:  # every field is pre-checked; this is a safety net
            raise MeshConfigError(f"invalid mesh configuration: {exc}") from None
    except MeshConfigError as exc:
        if parser is None:
            raise
        parser.error(str(exc))


def parse_mesh_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "sglmesh",
    env: Mapping[str, str] | None = None,
    add_help: bool = True,
) -> tuple[MeshConfig, list[str]]:
    """Parse the mesh flags out of ``argv``; return the config and every other argument.

    The other arguments come back in their original order and spelling (``--foo=bar``
    stays one item), ready for the engine's own parser. ``argv`` defaults to
    ``sys.argv[1:]``, ``env`` to ``os.environ``. Pass ``add_help=False`` when a later
    parser should see ``--help``. Invalid values exit with status 2 and a message naming
    the flag (and the env var the value came from).
    """
    parser = OneLineParser(prog=prog, allow_abbrev=False, add_help=add_help)
    add_mesh_args(parser)
    ns, rest = parser.parse_known_args(None if argv is None else list(argv))
    return mesh_config_from_namespace(ns, env, parser=parser), rest
