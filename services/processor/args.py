"""The processor's command line: mesh flags plus HTTP, routing, admission and migration flags.

Names follow the reference frontend's where it has one (``--router-mode``,
``--migration-limit``, ``--active-decode-blocks-threshold``), and its ``DYN_*`` variables are
accepted as second twins.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.config import MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.flags import Flag, FlagError, add_flags, flag_values, float_converter, int_converter
from shared.router import KV_ROUTER_FLAGS, KvRouterConfig, RouterMode, kv_router_config

__all__ = ["ProcessorConfig", "parse_processor_args"]


@dataclass(frozen=True)
class ProcessorFlags:
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    router_mode: RouterMode = RouterMode.KV
    max_inflight: int = 1024
    active_decode_blocks_threshold: float | None = None
    migration_limit: int = 3
    max_body_bytes: int = 16 * 1024 * 1024
    custom_jinja_template: str | None = None
    retry_after: int = 1


@dataclass(frozen=True)
class ProcessorConfig:
    mesh: MeshConfig
    flags: ProcessorFlags
    kv_router: KvRouterConfig


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
        return RouterMode(value)
    except ValueError:
        choices = ", ".join(m.value for m in RouterMode)
        raise ValueError(f"choose one of {choices}, got {text!r}") from None


def _fraction(text: str) -> float:
    value = float_converter(0.0)(text)
    if value > 1.0:
        raise ValueError(f"must be a fraction between 0 and 1, got {value:g}")
    return value


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
    Flag("max_body_bytes", int_converter(1), _D.max_body_bytes, "BYTES",
         "largest request body accepted; larger ones get 413"),
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
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="The OpenAI-compatible HTTP ingress: templates and tokenizes requests, "
        "routes them to workers (aggregated, or prefill + decode), streams the answers.",
    )
    add_mesh_args(parser)
    add_flags(parser.add_argument_group("processor"), _FLAGS)
    add_flags(parser.add_argument_group("KV router (--router-mode kv)"), KV_ROUTER_FLAGS)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    mesh = mesh_config_from_namespace(ns, environ, parser=parser)
    try:
        flags = ProcessorFlags(**flag_values(_FLAGS, ns, environ))
        kv = kv_router_config(flag_values(KV_ROUTER_FLAGS, ns, environ))
    except (FlagError, ValueError) as exc:
        parser.error(str(exc))
    return ProcessorConfig(mesh=mesh, flags=flags, kv_router=kv)
