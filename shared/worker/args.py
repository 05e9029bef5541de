"""A worker's command line: which role it plays, and its mesh, worker and engine flags.

``sglmesh worker [SGLang flags] [mesh flags]`` picks the role from the flags as SGLang and the
reference do: no ``--disaggregation-mode`` (or ``null``, ``agg``, ``pd``) is an aggregated
worker, ``decode`` a disaggregated decode worker, ``prefill`` a prefill worker. The encoder
roles (``--embedding-worker``, ``--multimodal-encode-worker``, ``--disaggregation-mode
encode``) belong to the encode service. Parsing goes mesh flags first, then worker flags, then
the engine's (SGLang's own parser when sglang is importable), each taking only its own flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from shared.config import EndpointId, MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.engine.args import (
    EngineArgs,
    EngineSelectionError,
    parse_engine_args,
    resolve_engine_kind,
)

AGGREGATED = "aggregated"
DECODE = "decode"
PREFILL = "prefill"
ENCODE = "encode"

# The reference accepts these for an aggregated worker; SGLang itself knows only "null".
_AGGREGATED_MODES = {"null", "agg", "pd"}
_ENCODER_FLAGS = ("--embedding-worker", "--multimodal-encode-worker")


class RoleError(ValueError):
    pass


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    value: str | None = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def select_role(argv: Sequence[str]) -> str:
    """The worker role these flags ask for; RoleError names the offending flag."""
    if any(a in _ENCODER_FLAGS or a.split("=", 1)[0] in _ENCODER_FLAGS for a in argv):
        return ENCODE
    mode = _flag_value(argv, "--disaggregation-mode")
    if mode is None or mode in _AGGREGATED_MODES:
        return AGGREGATED
    if mode in (DECODE, PREFILL):
        return mode
    if mode == ENCODE:
        return ENCODE
    raise RoleError(
        f"--disaggregation-mode {mode!r}: choose null (or agg, pd), prefill, decode or encode"
    )


def normalize_mode(argv: Sequence[str]) -> list[str]:
    """Rewrite the reference's aggregated aliases to SGLang's ``null`` for SGLang's parser."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--disaggregation-mode" and i + 1 < len(out) and out[i + 1] in {"agg", "pd"}:
            out[i + 1] = "null"
        elif arg in ("--disaggregation-mode=agg", "--disaggregation-mode=pd"):
            out[i] = "--disaggregation-mode=null"
    return out


@dataclass(frozen=True)
class WorkerFlags:
    canary_wait_time: float = 10.0
    health_check_timeout: float = 3.0
    health_check: bool = True
    endpoint_types: tuple[str, ...] = ("chat", "completions")
    custom_jinja_template: str | None = None


# flag, env names, default, type, help
_WORKER_FLAGS: list[tuple[str, tuple[str, ...], object, type, str]] = [
    (
        "--canary-wait-time",
        ("SGLMESH_CANARY_WAIT_TIME", "DYN_CANARY_WAIT_TIME"),
        10.0,
        float,
        "seconds an endpoint must be idle before a health canary is sent",
    ),
    (
        "--health-check-timeout",
        ("SGLMESH_HEALTH_CHECK_TIMEOUT", "DYN_HEALTH_CHECK_REQUEST_TIMEOUT"),
        3.0,
        float,
        "seconds a health canary may take before the worker counts as unhealthy",
    ),
    (
        "--endpoint-types",
        ("SGLMESH_ENDPOINT_TYPES", "DYN_ENDPOINT_TYPES"),
        "chat,completions",
        str,
        "APIs the model is served on: chat, completions (comma-separated)",
    ),
    (
        "--custom-jinja-template",
        ("SGLMESH_CUSTOM_JINJA_TEMPLATE", "DYN_CUSTOM_JINJA_TEMPLATE"),
        None,
        str,
        "a chat template file that overrides the model's own",
    ),
]


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("worker")
    for flag, envs, default, _type, text in _WORKER_FLAGS:
        group.add_argument(
            flag, default=None, help=f"{text} (env {', '.join(envs)}; default {default})"
        )
    group.add_argument(
        "--health-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send health canaries on idle endpoints "
        "(env SGLMESH_HEALTH_CHECK, DYN_HEALTH_CHECK_ENABLED; default on)",
    )


def _worker_flags(
    ns: argparse.Namespace, env: Mapping[str, str], parser: argparse.ArgumentParser
) -> WorkerFlags:
    values: dict[str, object] = {}
    for flag, envs, default, type_, _text in _WORKER_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        raw = getattr(ns, dest)
        source = flag
        if raw is None:
            for name in envs:
                if env.get(name):
                    raw, source = env[name], f"{flag} (from {name})"
                    break
        if raw is None:
            values[dest] = default
            continue
        try:
            values[dest] = type_(raw)
        except ValueError:
            parser.error(f"{source}: invalid value {raw!r}")
    if ns.health_check is None:
        raw = env.get("SGLMESH_HEALTH_CHECK") or env.get("DYN_HEALTH_CHECK_ENABLED")
        health = True if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")
    else:
        health = bool(ns.health_check)
    for dest in ("canary_wait_time", "health_check_timeout"):
        if float(values[dest]) <= 0:  # type: ignore[arg-type]
            parser.error(f"--{dest.replace('_', '-')} must be > 0")
    types = tuple(t.strip() for t in str(values["endpoint_types"]).split(",") if t.strip())
    unknown = set(types) - {"chat", "completions"}
    if unknown:
        parser.error(f"--endpoint-types: unknown {sorted(unknown)}; use chat, completions")
    template = values["custom_jinja_template"]
    if template is not None:
        template = os.path.expandvars(os.path.expanduser(str(template)))
        if not os.path.isfile(template):
            parser.error(f"--custom-jinja-template: no such file {template!r}")
    return WorkerFlags(
        canary_wait_time=float(values["canary_wait_time"]),  # type: ignore[arg-type]
        health_check_timeout=float(values["health_check_timeout"]),  # type: ignore[arg-type]
        health_check=health,
        endpoint_types=types,
        custom_jinja_template=template,
    )


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    mesh: MeshConfig
    worker: WorkerFlags
    engine: EngineArgs
    endpoint: EndpointId


def default_endpoint(mesh: MeshConfig, role: str) -> EndpointId:
    component = "prefill" if role == PREFILL else "backend"
    return mesh.endpoint or EndpointId(mesh.namespace, component, "generate")


def _die(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_worker_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "sglmesh worker",
    role: str | None = None,
    env: Mapping[str, str] | None = None,
    use_sglang: bool | None = None,
) -> WorkerConfig:
    """Parse a whole worker command line; exits 2 with one clear line on bad input.

    ``role`` pins the role (``python -m services.prefill``); otherwise the flags choose it.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, add_help=False)
    add_mesh_args(parser)
    add_worker_args(parser)
    if "-h" in args or "--help" in args:
        helper = argparse.ArgumentParser(
            prog=prog,
            parents=[parser],
            allow_abbrev=False,
            description="An LLM worker. The role follows --disaggregation-mode "
            "(null|agg|pd: aggregated, prefill, decode). Mesh and worker flags:",
        )
        helper.print_help()
        print("\nEngine flags (the mesh's, then SGLang's):\n")
        sys.stdout.flush()
        parse_engine_args(["--help"], prog=prog, env=environ, use_sglang=use_sglang)
        raise SystemExit(0)
    try:
        chosen = select_role(args)
    except RoleError as exc:
        _die(prog, str(exc))
    if role is not None and chosen not in (role, AGGREGATED):
        _die(prog, f"this entry point runs a {role} worker, but the flags ask for {chosen}")
    chosen = role or chosen
    if chosen == ENCODE:
        _die(
            prog,
            "encoder workers (--embedding-worker, --multimodal-encode-worker, "
            "--disaggregation-mode encode) come with the encode service: not available yet",
        )
    if role == PREFILL and _flag_value(args, "--disaggregation-mode") is None:
        args = [*args, "--disaggregation-mode", "prefill"]
    ns, rest = parser.parse_known_args(args)
    mesh = mesh_config_from_namespace(ns, environ, parser=parser)
    worker = _worker_flags(ns, environ, parser)

    def default_model() -> str:
        from shared.model import default_model_path

        return str(default_model_path())

    try:
        engine = parse_engine_args(
            normalize_mode(rest),
            prog=prog,
            env=environ,
            default_model=default_model,
            use_sglang=use_sglang,
        )
    except EngineSelectionError as exc:
        _die(prog, str(exc))
    try:
        kind, _reason = resolve_engine_kind(engine.engine, environ)
    except EngineSelectionError as exc:
        _die(prog, str(exc))
    # SGLang also takes hub ids ("org/name"); the simulator and any local path must exist.
    local = kind == "sim" or engine.model_path.startswith(("/", ".", "~"))
    if local and not os.path.exists(os.path.expanduser(engine.model_path)):
        _die(prog, f"--model-path: {engine.model_path!r} does not exist")
    return WorkerConfig(
        role=chosen,
        mesh=mesh,
        worker=worker,
        engine=engine,
        endpoint=default_endpoint(mesh, chosen),
    )
