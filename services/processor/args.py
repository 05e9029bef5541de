"""The processor's command line: mesh flags plus HTTP, routing, admission and migration flags.

Names follow the reference frontend's where it has one (``--router-mode``,
``--migration-limit``, ``--active-decode-blocks-threshold``), and its ``DYN_*`` variables are
accepted as second twins.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.processor.images import IMAGE_FLAGS, ImageLimits, image_limits
from shared.config import MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.flags import (
    Flag,
    FlagError,
    OneLineParser,
    add_flags,
    flag_values,
    float_converter,
    int_converter,
    parse_bool,
)
from shared.router import KV_ROUTER_FLAGS, KvRouterConfig, RouterMode, kv_router_config
from shared.router.mode import PROCESSOR_MODES

__all__ = ["ProcessorConfig", "is_loopback", "parse_processor_args"]


@dataclass(frozen=True)
class ProcessorFlags:
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    api_key: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    router_mode: RouterMode = RouterMode.KV
    max_inflight: int = 1024
    active_decode_blocks_threshold: float | None = None
    migration_limit: int = 3
    migration_budget: float = 10.0
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    preprocess_threads: int = 2
    preprocess_queue: int = 64
    model_root: tuple[str, ...] = ()
    model_cache_dir: str | None = None
    custom_jinja_template: str | None = None
    retry_after: int = 1


@dataclass(frozen=True)
class ProcessorConfig:
    mesh: MeshConfig
    flags: ProcessorFlags
    kv_router: KvRouterConfig
    images: ImageLimits = field(default_factory=ImageLimits)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (a loopback address or ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _port(text: str) -> int:
    value = int_converter(0)(text)
    if value > 65535:
        raise ValueError(f"must be a TCP port (0-65535), got {value}")
    return value


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a host name or address, got an empty string")
    return text.strip()


def _router_mode(text: str) -> RouterMode:
    value = text.strip().lower().replace("_", "-")
    try:
        mode = RouterMode(value)
        if mode not in PROCESSOR_MODES:
            raise ValueError(value)
        return mode
    except ValueError:
        choices = ", ".join(m.value for m in PROCESSOR_MODES)
        raise ValueError(f"choose one of {choices}, got {text!r}") from None


def _fraction(text: str) -> float:
    value = float_converter(0.0)(text)
    if value > 1.0:
        raise ValueError(f"must be a fraction between 0 and 1, got {value:g}")
    return value


def _api_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise ValueError("expected one or more API keys, comma-separated")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ValueError("an API key must have at least 16 characters")
    return keys


def _readable_file(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


def _directories(text: str) -> tuple[str, ...]:
    dirs = tuple(
        os.path.realpath(os.path.expanduser(d.strip())) for d in text.split(",") if d.strip()
    )
    if not dirs:
        raise ValueError("expected one or more directories, comma-separated")
    return dirs


def _cache_dir(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a directory, got an empty string")
    path = os.path.realpath(os.path.expanduser(text.strip()))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} exists and is not a directory")
    return path


def _template_file(text: str) -> str:
    path = os.path.expandvars(os.path.expanduser(text.strip()))
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


_D = ProcessorFlags()
_FLAGS: tuple[Flag, ...] = (
    Flag("http_host", _host, _D.http_host, "HOST", "address the HTTP server listens on",
         ("DYN_HTTP_HOST",)),
    Flag("http_port", _port, _D.http_port, "PORT", "HTTP port (0 picks a free one)",
         ("DYN_HTTP_PORT",)),
    Flag("api_key", _api_keys, (), "KEY[,KEY...]",
         "API keys clients must send as 'Authorization: Bearer KEY' on /v1/* (several "
         "allowed, comma-separated; /health, /live, /metrics and /openapi.json stay open); "
         "required unless --http-host is a loopback address or --allow-unauthenticated",
         default_text="none"),
    Flag("allow_unauthenticated", parse_bool, False, None,
         "serve /v1/* without API keys on a non-loopback --http-host"),
    Flag("tls_cert", _readable_file, None, "FILE",
         "PEM certificate (chain) for HTTPS; needs --tls-key"),
    Flag("tls_key", _readable_file, None, "FILE", "PEM private key of --tls-cert"),
    Flag("router_mode", _router_mode, _D.router_mode, "MODE",
         "how workers are chosen: kv (prefix cache and load), round-robin, random or "
         "least-loaded", ("DYN_ROUTER_MODE",)),
    Flag("max_inflight", int_converter(0), _D.max_inflight, "N",
         "requests in flight before new ones get 503 with Retry-After (0: no limit)"),
    Flag("active_decode_blocks_threshold", _fraction, None, "FRACTION",
         "a worker whose active KV blocks exceed this fraction of its pool is busy; when "
         "every worker is busy, requests get 503 (unset: never busy)",
         ("DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD",)),
    Flag("migration_limit", int_converter(0), _D.migration_limit, "N",
         "times a failed worker stream is resent to another worker (0: never)",
         ("DYN_MIGRATION_LIMIT",)),
    Flag("migration_budget", float_converter(0.0), _D.migration_budget, "SECONDS",
         "how long a request may wait, in all, for a worker or the transport to come back "
         "(NATS restarting, no live worker) before it fails"),
    Flag("max_body_bytes", int_converter(1), _D.max_body_bytes, "BYTES",
         "largest request body accepted; larger ones get 413"),
    Flag("header_timeout", float_converter(0.0, strict=True), _D.header_timeout, "SECONDS",
         "a connection must send a request's headers within this time, or it is closed"),
    Flag("body_timeout", float_converter(0.0, strict=True), _D.body_timeout, "SECONDS",
         "a request's body must arrive within this time, or it gets 408"),
    Flag("idle_timeout", float_converter(0.0, strict=True), _D.idle_timeout, "SECONDS",
         "a keep-alive connection idle this long is closed"),
    Flag("preprocess_threads", int_converter(1), _D.preprocess_threads, "N",
         "threads that decode, template and tokenize large requests, and tokenize every "
         "other one, off the event loop"),
    Flag("preprocess_queue", int_converter(1), _D.preprocess_queue, "N",
         "large requests waiting for a preprocessing thread before new ones get 503"),
    Flag("model_root", _directories, (), "DIR[,DIR...]",
         "directories the processor may read model files (tokenizer, chat template) from; "
         "a model card pointing elsewhere is refused",
         default_text="the default model cache"),
    Flag("model_cache_dir", _cache_dir, None, "DIR",
         "where model files fetched through the mesh (tokenizer, config, chat template, "
         "checked by hash) are cached; created if missing",
         default_text="the default model cache"),
    Flag("custom_jinja_template", _template_file, None, "FILE",
         "a chat template file used for every model instead of the model's own",
         ("DYN_CUSTOM_JINJA_TEMPLATE",)),
    Flag("retry_after", int_converter(1), _D.retry_after, "SECONDS",
         "the Retry-After header of a 503 for a busy mesh"),
)  # fmt: skip


def parse_processor_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "sglmesh processor",
    env: Mapping[str, str] | None = None,
) -> ProcessorConfig:
    """Parse the whole command line; bad input exits 2 with one line naming the flag."""
    environ: Mapping[str, str] = os.environ if env is None else env
    parser = OneLineParser(
        prog=prog,
        allow_abbrev=False,
        description="The OpenAI-compatible HTTP ingress: templates and tokenizes requests, "
        "routes them to workers (aggregated, or prefill + decode), streams the answers.",
    )
    add_mesh_args(parser)
    add_flags(parser.add_argument_group("processor"), _FLAGS)
    add_flags(parser.add_argument_group("KV router (--router-mode kv)"), KV_ROUTER_FLAGS)
    add_flags(parser.add_argument_group("images (image_url parts in chat)"), IMAGE_FLAGS)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    mesh = mesh_config_from_namespace(ns, environ, parser=parser)
    try:
        flags = ProcessorFlags(**flag_values(_FLAGS, ns, environ))
        kv = kv_router_config(flag_values(KV_ROUTER_FLAGS, ns, environ))
        images = image_limits(flag_values(IMAGE_FLAGS, ns, environ))
    except (FlagError, ValueError) as exc:
        parser.error(str(exc))
    if (flags.tls_cert is None) != (flags.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both or neither")
    if not flags.api_key and not flags.allow_unauthenticated and not is_loopback(flags.http_host):
        parser.error(
            f"--http-host {flags.http_host} listens beyond this machine: give --api-key "
            "(or SGLMESH_API_KEY), or say --allow-unauthenticated"
        )
    return ProcessorConfig(mesh=mesh, flags=flags, kv_router=kv, images=images)
