"""A worker's command line: which role it plays, and its mesh, worker and engine flags.

``sglmesh worker [SGLang flags] [mesh flags]`` picks the role from the flags as SGLang and the
reference do: no ``--disaggregation-mode`` (or ``null``, ``agg``, ``pd``) is an aggregated
worker, ``decode`` a disaggregated decode worker, ``prefill`` a prefill worker. The encoder
roles (``--embedding-worker``; ``--multimodal-encode-worker``, or the reference's
``--enable-multimodal --disaggregation-mode encode``) belong to the encode service;
``--embedding-worker`` (the reference's flag) also sets SGLang's ``--is-embedding``. Parsing
goes mesh flags first, then worker flags, then the engine's (SGLang's own parser when sglang
is importable), each taking only its own flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from shared.config import EndpointId, MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.engine.args import (
    EngineArgs,
    EngineSelectionError,
    parse_engine_args,
)
from shared.engine.registry import resolve
from shared.flags import (
    TRUE_WORDS,
    Flag,
    FlagError,
    OneLineParser,
    add_flags,
    flag_values,
    float_converter,
    without_flags,
)
from shared.parser_names import (
    REASONING_PARSER_NAMES,
    TOOL_CALL_PARSER_NAMES,
    reasoning_parser_name,
    tool_call_parser_name,
)

AGGREGATED = "aggregated"
DECODE = "decode"
PREFILL = "prefill"
ENCODE = "encode"

# The reference accepts these for an aggregated worker; SGLang itself knows only "null".
_AGGREGATED_MODES = {"null", "agg", "pd"}
EMBEDDING_WORKER_FLAG = "--embedding-worker"
_MULTIMODAL_ENCODE_FLAG = "--multimodal-encode-worker"
_ENCODER_FLAGS = (EMBEDDING_WORKER_FLAG, _MULTIMODAL_ENCODE_FLAG)


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
    dyn_tool_call_parser: str | None = None
    dyn_reasoning_parser: str | None = None


def _endpoint_types(text: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = set(types) - {"chat", "completions"}
    if unknown:
        raise ValueError(f"unknown {sorted(unknown)}; use chat, completions")
    return types


def _template_file(text: str) -> str:
    path = os.path.expandvars(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    return path


def _truthy(text: str) -> bool:
    # Anything but a "true" spelling turns health checks off, as the reference reads it.
    return text.strip().lower() in TRUE_WORDS


_DEFAULTS = WorkerFlags()
_WORKER_FLAGS: tuple[Flag, ...] = (
    Flag(
        "canary_wait_time",
        float_converter(0.0, strict=True),
        _DEFAULTS.canary_wait_time,
        "SECONDS",
        "seconds an endpoint must be idle before a health canary is sent",
        ("DYN_CANARY_WAIT_TIME",),
    ),
    Flag(
        "health_check_timeout",
        float_converter(0.0, strict=True),
        _DEFAULTS.health_check_timeout,
        "SECONDS",
        "seconds a health canary may take before the worker counts as unhealthy",
        ("DYN_HEALTH_CHECK_REQUEST_TIMEOUT",),
    ),
    Flag(
        "endpoint_types",
        _endpoint_types,
        _DEFAULTS.endpoint_types,
        "TYPES",
        "APIs the model is served on: chat, completions (comma-separated)",
        ("DYN_ENDPOINT_TYPES",),
    ),
    Flag(
        "custom_jinja_template",
        _template_file,
        _DEFAULTS.custom_jinja_template,
        "FILE",
        "a chat template file that overrides the model's own",
        ("DYN_CUSTOM_JINJA_TEMPLATE",),
    ),
    Flag(
        "dyn_tool_call_parser",
        tool_call_parser_name,
        _DEFAULTS.dyn_tool_call_parser,
        "NAME",
        "the format the model writes tool calls in, so the processor serves `tools`: "
        + ", ".join(TOOL_CALL_PARSER_NAMES),
        ("DYN_TOOL_CALL_PARSER",),
    ),
    Flag(
        "dyn_reasoning_parser",
        reasoning_parser_name,
        _DEFAULTS.dyn_reasoning_parser,
        "NAME",
        "the model's thinking tags, split into `reasoning_content`: "
        + ", ".join(REASONING_PARSER_NAMES),
        ("DYN_REASONING_PARSER",),
    ),
    Flag(
        "health_check",
        _truthy,
        _DEFAULTS.health_check,
        None,
        "send health canaries on idle endpoints",
        ("DYN_HEALTH_CHECK_ENABLED",),
    ),
)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    add_flags(parser.add_argument_group("worker"), _WORKER_FLAGS)


def _worker_flags(
    ns: argparse.Namespace, env: Mapping[str, str], parser: argparse.ArgumentParser
) -> WorkerFlags:
    try:
        return WorkerFlags(**flag_values(_WORKER_FLAGS, ns, env))
    except FlagError as exc:
        parser.error(str(exc))


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    mesh: MeshConfig
    worker: WorkerFlags
    engine: EngineArgs
    endpoint: EndpointId
    # An image encode worker (``--multimodal-encode-worker``), not a text-embedding one.
    vision: bool = False


_COMPONENTS = {PREFILL: "prefill", ENCODE: "encode"}


def default_endpoint(mesh: MeshConfig, role: str) -> EndpointId:
    component = _COMPONENTS.get(role, "backend")
    return mesh.endpoint or EndpointId(mesh.namespace, component, "generate")


def is_multimodal_encode(argv: Sequence[str]) -> bool:
    """``--multimodal-encode-worker``, or the reference's ``--enable-multimodal
    --disaggregation-mode encode``: an image encode worker (the encode service)."""
    if any(a.split("=", 1)[0] == _MULTIMODAL_ENCODE_FLAG for a in argv):
        return True
    return _flag_value(argv, "--disaggregation-mode") == ENCODE


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
    vision_model: Callable[[], str] | None = None,
) -> WorkerConfig:
    """Parse a whole worker command line; exits 2 with one clear line on bad input.

    ``role`` pins the role (``python -m services.prefill``); otherwise the flags choose it.
    ``vision_model`` gives an image encode worker's default model path and name (the encode
    service knows its encoder; without it image encode flags are refused).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog=prog, allow_abbrev=False, add_help=False)
    add_mesh_args(parser)
    add_worker_args(parser)
    if "-h" in args or "--help" in args:
        helper = OneLineParser(
            prog=prog,
            parents=[parser],
            allow_abbrev=False,
            description="An LLM worker. The role follows --disaggregation-mode "
            "(null|agg|pd: aggregated, prefill, decode); --enable-multimodal makes it take "
            "images. --embedding-worker runs a text-embedding worker and "
            "--multimodal-encode-worker (or --enable-multimodal --disaggregation-mode encode) "
            "an image encode worker: the encode service (sglmesh encode --help). "
            "Mesh and worker flags:",
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
    if chosen == ENCODE and role != ENCODE:
        _die(prog, "encoder flags run the encode service: use sglmesh encode (or sglmesh worker)")
    chosen = role or chosen
    vision = chosen == ENCODE and is_multimodal_encode(args)
    if chosen == ENCODE:
        args = (
            without_flags(
                args,
                bare=(_MULTIMODAL_ENCODE_FLAG, EMBEDDING_WORKER_FLAG, "--enable-multimodal"),
                valued={"--disaggregation-mode": ENCODE},
            )
            if vision
            # --embedding-worker is a mesh flag SGLang's parser lacks.
            else without_flags(args, bare=(EMBEDDING_WORKER_FLAG,))
        )
    if role == PREFILL and _flag_value(args, "--disaggregation-mode") is None:
        args = [*args, "--disaggregation-mode", "prefill"]
    ns, rest = parser.parse_known_args(args)
    mesh = mesh_config_from_namespace(ns, environ, parser=parser)
    worker = _worker_flags(ns, environ, parser)

    if vision and vision_model is None:
        _die(prog, "image encode workers run the encode service: use sglmesh worker or encode")

    def default_model() -> str:
        if vision and vision_model is not None:
            return vision_model()
        if chosen == ENCODE:
            from shared.embedding_model import prepare_embedding_model

            return str(prepare_embedding_model())
        from shared.model import default_model_path

        return str(default_model_path())

    try:
        engine = parse_engine_args(
            normalize_mode(rest),
            prog=prog,
            env=environ,
            embedding=chosen == ENCODE and not vision,
            default_model=default_model,
            use_sglang=use_sglang,
        )
    except EngineSelectionError as exc:
        _die(prog, str(exc))
    # An image encode worker's engine and model come from the image encoders' registry
    # (the encode service checks them); the LLM engines' is for everything else.
    if not vision:
        try:
            kind, _reason = resolve(engine, environ)
        except EngineSelectionError as exc:
            _die(prog, str(exc))
        # SGLang also takes hub ids ("org/name"); the CPU engines and a local path must exist.
        local = not kind.hub_ids or engine.model_path.startswith(("/", ".", "~"))
        if local and not os.path.exists(os.path.expanduser(engine.model_path)):
            _die(prog, f"--model-path: {engine.model_path!r} does not exist")
    return WorkerConfig(
        role=chosen,
        mesh=mesh,
        worker=worker,
        engine=engine,
        endpoint=default_endpoint(mesh, chosen),
        vision=vision,
    )
