"""Engine arguments: SGLang's own flags plus the mesh's engine flags, parsed once for both engines.

Why this module exists: a worker's command line is an SGLang command line (``--model-path``,
``--page-size``, ``--disaggregation-mode``, ...) so that one deployment file works for the
real engine and the simulated one. Where sglang is importable, SGLang's own parser reads it
(``ServerArgs.add_cli_args`` / ``ServerArgs.from_cli_args``): every one of its ~530 flags is
accepted exactly as ``sglang serve`` accepts it, and the worker gets the real ``ServerArgs``.
Where it is not (CPU machines, CI), a built-in parser accepts the subset the mesh needs with
the same flag names, ``dest`` names and defaults as SGLang 0.5.23 (read from the wheel's
``sglang/srt/arg_groups/fields/*.py``); anything else is a clear error pointing at
``pip install sglang``.

What we force, as the reference deployment does before ``ServerArgs.from_cli_args``:

- ``incremental_streaming_output=True``: each stream item carries only the new token ids,
  which is what ``shared.engine.mapping`` expects.
- ``skip_tokenizer_init=True`` for LLM workers: the processor tokenizes and detokenizes, so
  the engine never needs its own tokenizer (embedding workers keep it: they take text).
- ``disaggregation_bootstrap_port``: a free port is reserved unless the command line (or its
  ``--config`` file) names one, so several prefill workers can share a host.
- ``served_model_name``: a comma/whitespace-separated list; the first name is the model's
  name, the rest are aliases. SGLang only ever sees the first.

The mesh-level engine flags (``--engine``, ``--speedup-ratio``, ...) are ``shared.flags`` flags,
as the mesh's are: each has an ``SGLMESH_*`` environment twin (an empty value counts as unset)
and, where the reference has one, its variable as a fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from shared.engine.registry import (
    AUTO,
    EngineSelectionError,
    engine_kind,
    engine_names,
    package_installed,
)
from shared.flags import (
    FALSE_WORDS,
    TRUE_WORDS,
    Flag,
    OneLineParser,
    add_flags,
    flag_values,
    float_converter,
    int_converter,
    non_empty,
    without_flags,
)

__all__ = [
    "BUILTIN_SGLANG_FLAGS",
    "DEFAULT_BOOTSTRAP_PORT",
    "DEFAULT_KV_BYTES_PER_TOKEN",
    "DISAGGREGATION_MODES",
    "EngineArgs",
    "EngineSelectionError",
    "KvEventsEndpoints",
    "SglangFlag",
    "add_engine_args",
    "engine_flag_values",
    "human_readable_int",
    "kv_events_endpoints",
    "model_overrides",
    "parse_engine_args",
    "parse_kv_events_config",
    "split_served_model_name",
]

DISAGGREGATION_MODES = ("null", "prefill", "decode")
# 32 layers x 8 KV heads x 128 head dim x 2 (K and V) x 2 bytes (bf16): Llama-3-8B.
DEFAULT_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
DEFAULT_BOOTSTRAP_PORT = 8998


# --------------------------------------------------------------------------------------------
# Mesh-level engine flags (each with an environment twin)


def _parse_engine(text: str) -> str:
    value = text.strip().lower()
    choices = (*engine_names(), AUTO)
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
    return value


def _engine_help() -> str:
    kinds = "; ".join(f"{name}: {engine_kind(name).help}" for name in engine_names())
    return (
        f"which engine runs the model ({kinds}). auto (the default) takes the first of "
        f"{', '.join(engine_names())} that can run here: sglang with a GPU, torch when it is "
        "installed and the model has weights, else sim"
    )


_ENGINE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "engine",
        _parse_engine,
        AUTO,
        "{" + ",".join((*engine_names(), AUTO)) + "}",
        _engine_help(),
    ),
    Flag(
        "torch_threads",
        int_converter(0),
        0,
        "N",
        "torch engine: intra-op threads; 0 = every core this process may run on",
    ),
    Flag(
        "speedup_ratio",
        float_converter(0.0),
        1.0,
        "RATIO",
        "sim engine: divide every modelled delay by this; 0 = no delay at all",
    ),
    Flag(
        "kv_bytes_per_token",
        int_converter(1),
        DEFAULT_KV_BYTES_PER_TOKEN,
        "BYTES",
        "sim engine: KV bytes per token moved by a disaggregated transfer "
        "(default: Llama-3-8B in bf16, 32 layers x 8 KV heads x 128 x 2 x 2 bytes)",
    ),
    Flag(
        "sim_output_len_mean",
        int_converter(0),
        0,
        "TOKENS",
        "sim engine: mean output length before an early EOS; 0 = never stop early",
    ),
    Flag(
        "sim_timeslice_ms",
        float_converter(0.0),
        0.5,
        "MS",
        "sim engine: when steps are shorter than 1 ms (large --speedup-ratio), run steps back "
        "to back for up to this long before letting the streams run, so each takes several "
        "tokens at once; 0 = after every step, one token per stream item as the reference's "
        "mocker streams",
    ),
    Flag(
        "bootstrap_timeout",
        float_converter(0.0, strict=True),
        300.0,
        "SECONDS",
        "disaggregation: how long either side waits for its peer's KV transfer",
        ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",),
    ),
    Flag(
        "disagg_config",
        non_empty("a file path"),
        None,
        "FILE",
        "YAML file with one section of SGLang flags per role; needs --disagg-config-key",
        ("DYN_SGL_DISAGG_CONFIG",),
    ),
    Flag(
        "disagg_config_key",
        non_empty("a key"),
        None,
        "KEY",
        "section of --disagg-config to use (e.g. prefill or decode)",
        ("DYN_SGL_DISAGG_CONFIG_KEY",),
    ),
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add the mesh's engine flags, in an argument group "engine", to ``parser``.

    They default to ``None`` so the environment can be consulted for flags not given; read
    the final values with ``parse_engine_args`` (or ``engine_flag_values``).
    """
    group = parser.add_argument_group(
        "engine",
        "Engine selection and simulator settings. Precedence: flag > SGLMESH_* > "
        "reference env > default.",
    )
    add_flags(group, _ENGINE_FLAGS)


def engine_flag_values(
    ns: argparse.Namespace, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Final values of the flags ``add_engine_args`` added: the flag, else its environment
    variables in order (an empty value counts as unset), else the default. A bad environment
    value is a ``ValueError`` naming the flag and the variable."""
    return flag_values(_ENGINE_FLAGS, ns, env)


# --------------------------------------------------------------------------------------------
# The built-in subset of SGLang's flags


def human_readable_int(text: str) -> int:
    """An integer with an optional SI (``8k``, ``1.5M``) or IEC (``32Ki``) suffix, as
    SGLang 0.5.23 reads ``--context-length``, ``--max-total-tokens`` and
    ``--max-prefill-tokens``. Suffixes are case-sensitive; IEC ones take integers only."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)", value)
    if match:
        number, suffix = match.groups()
        iec = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
        if suffix in iec:
            if "." in number:
                raise argparse.ArgumentTypeError(
                    f"decimals are not allowed with IEC suffixes like {suffix!r}: {text!r}"
                )
            return int(number) * iec[suffix]
        si = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
        try:
            return int(Decimal(number) * si[suffix])
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            pass
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer value {text!r}: use a plain integer, an SI suffix (1k, 1M) "
            "or an IEC suffix (1Ki, 1Mi)"
        ) from None


@dataclass(frozen=True, slots=True)
class SglangFlag:
    """One SGLang flag the built-in parser accepts, as SGLang 0.5.23 declares it."""

    dest: str
    flags: tuple[str, ...]  # SGLang's own spellings, first = canonical
    kind: str  # "str" | "int" | "float" | "hint" (human_readable_int) | "bool" (store_true)
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    required: bool = False
    # Spellings SGLang accepts only through argparse's prefix matching (``--tp`` for
    # ``--tp-size``); the built-in parser turns prefix matching off, so it lists them.
    extra_aliases: tuple[str, ...] = ()


_DISAGG_TRANSFER_BACKENDS = ("mooncake", "nixl", "ascend", "fake", "mori", "mooncake_tcp")
_LOAD_FORMATS = (
    "auto", "pt", "safetensors", "instanttensor", "npcache", "dummy", "sharded_state",
    "presharded", "gguf", "expert_pack", "bitsandbytes", "mistral", "layered", "flash_rl",
    "remote", "remote_instance", "fastsafetensors", "private", "runai_streamer",
)  # fmt: skip
_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_KV_CACHE_DTYPES = (
    "auto", "fp8_e5m2", "fp8_e4m3", "mxfp8", "bf16", "bfloat16", "nvfp4", "fp4_mx_block16",
)  # fmt: skip

# Derived from sglang 0.5.23 (arg_groups/fields/*.py and ServerArgs.add_cli_args); the
# conformance test checks every row against the installed SGLang parser.
BUILTIN_SGLANG_FLAGS: tuple[SglangFlag, ...] = (
    # model and tokenizer
    SglangFlag(
        "model_path",
        ("--model-path", "--model"),
        "str",
        None,
        "The path of the model weights: a local folder or a Hugging Face repo ID.",
        required=True,
    ),
    SglangFlag("tokenizer_path", ("--tokenizer-path",), "str", None, "The tokenizer path."),
    SglangFlag(
        "tokenizer_mode",
        ("--tokenizer-mode",),
        "str",
        "auto",
        "Tokenizer mode.",
        choices=("auto", "slow"),
    ),
    SglangFlag("revision", ("--revision",), "str", None, "The model version to use."),
    SglangFlag(
        "trust_remote_code",
        ("--trust-remote-code",),
        "bool",
        False,
        "Allow custom models defined on the Hub in their own modeling files.",
    ),
    SglangFlag(
        "context_length",
        ("--context-length",),
        "hint",
        None,
        "The model's maximum context length (default: from the model's config.json).",
    ),
    SglangFlag(
        "is_embedding", ("--is-embedding",), "bool", False, "Use a CausalLM as an embedding model."
    ),
    SglangFlag(
        "json_model_override_args",
        ("--json-model-override-args",),
        "str",
        "{}",
        "A dictionary in JSON string format used to override default model configurations.",
    ),
    SglangFlag("dtype", ("--dtype",), "str", "auto", "Weights dtype.", choices=_DTYPES),
    SglangFlag(
        "kv_cache_dtype",
        ("--kv-cache-dtype",),
        "str",
        "auto",
        "KV cache dtype.",
        choices=_KV_CACHE_DTYPES,
    ),
    SglangFlag(
        "load_format",
        ("--load-format",),
        "str",
        "auto",
        "The format of the model weights.",
        choices=_LOAD_FORMATS,
    ),
    SglangFlag(
        "skip_tokenizer_init",
        ("--skip-tokenizer-init",),
        "bool",
        False,
        "Take token ids in and give token ids out; the engine loads no tokenizer.",
    ),
    SglangFlag(
        "served_model_name",
        ("--served-model-name",),
        "str",
        None,
        "The model name to serve (mesh: a comma-separated list, first = name, rest = aliases).",
    ),
    SglangFlag("chat_template", ("--chat-template",), "str", None, "The chat template."),
    # serving
    SglangFlag("host", ("--host",), "str", "127.0.0.1", "The host of the HTTP server."),
    SglangFlag("port", ("--port",), "int", 30000, "The port of the HTTP server."),
    SglangFlag(
        "stream_interval",
        ("--stream-interval",),
        "int",
        1,
        "Streaming interval in tokens.",
    ),
    SglangFlag(
        "incremental_streaming_output",
        ("--incremental-streaming-output",),
        "bool",
        False,
        "Output a sequence of disjoint segments (the mesh always turns it on).",
    ),
    # scheduling and memory
    SglangFlag(
        "mem_fraction_static",
        ("--mem-fraction-static",),
        "float",
        None,
        "Fraction of the memory used for static allocation (weights and KV cache pool).",
    ),
    SglangFlag(
        "max_running_requests",
        ("--max-running-requests",),
        "int",
        None,
        "The maximum number of running requests.",
    ),
    SglangFlag(
        "max_total_tokens",
        ("--max-total-tokens",),
        "hint",
        None,
        "The maximum number of tokens in the KV memory pool.",
    ),
    SglangFlag(
        "chunked_prefill_size",
        ("--chunked-prefill-size",),
        "int",
        None,
        "Tokens per chunk of a chunked prefill; -1 disables chunking.",
    ),
    SglangFlag(
        "max_prefill_tokens",
        ("--max-prefill-tokens",),
        "hint",
        16384,
        "The maximum number of tokens in a prefill batch.",
    ),
    SglangFlag("page_size", ("--page-size",), "int", None, "The number of tokens in a page."),
    SglangFlag(
        "disable_radix_cache",
        ("--disable-radix-cache",),
        "bool",
        False,
        "Disable RadixAttention prefix caching.",
    ),
    SglangFlag("random_seed", ("--random-seed",), "int", None, "The random seed."),
    SglangFlag(
        "enable_multimodal",
        ("--enable-multimodal",),
        "bool",
        None,
        "Enable the multimodal functionality for the served model (the mesh: its workers "
        "take images, as embeddings from an image encode worker).",
    ),
    # parallelism
    SglangFlag(
        "tp_size",
        ("--tp-size", "--tensor-parallel-size"),
        "int",
        1,
        "The tensor parallelism size.",
        extra_aliases=("--tp",),
    ),
    SglangFlag(
        "pp_size",
        ("--pp-size", "--pipeline-parallel-size"),
        "int",
        1,
        "The pipeline parallelism size.",
    ),
    SglangFlag(
        "dp_size",
        ("--dp-size", "--data-parallel-size"),
        "int",
        1,
        "The number of data-parallel replicas of the model.",
        extra_aliases=("--dp",),
    ),
    SglangFlag(
        "dist_init_addr",
        ("--dist-init-addr", "--nccl-init-addr"),
        "str",
        None,
        "The host:port for initializing the distributed backend.",
    ),
    SglangFlag("nnodes", ("--nnodes",), "int", 1, "The number of nodes."),
    SglangFlag("node_rank", ("--node-rank",), "int", 0, "The node rank."),
    # disaggregation
    SglangFlag(
        "disaggregation_mode",
        ("--disaggregation-mode",),
        "str",
        "null",
        'PD disaggregation role: "prefill", "decode", or "null" (not disaggregated).',
        choices=DISAGGREGATION_MODES,
    ),
    SglangFlag(
        "disaggregation_transfer_backend",
        ("--disaggregation-transfer-backend",),
        "str",
        "mooncake",
        "The backend for disaggregation transfer.",
        choices=_DISAGG_TRANSFER_BACKENDS,
    ),
    SglangFlag(
        "disaggregation_bootstrap_port",
        ("--disaggregation-bootstrap-port",),
        "int",
        DEFAULT_BOOTSTRAP_PORT,
        "Bootstrap server port on the prefill server (mesh: a free port unless given).",
    ),
    # observability
    SglangFlag("log_level", ("--log-level",), "str", "info", "The logging level."),
    SglangFlag(
        "enable_metrics", ("--enable-metrics",), "bool", False, "Enable Prometheus metrics."
    ),
    SglangFlag(
        "decode_log_interval",
        ("--decode-log-interval",),
        "int",
        40,
        "Log and metrics interval, in decode iterations.",
    ),
    SglangFlag(
        "kv_events_config",
        ("--kv-events-config",),
        "str",
        None,
        "KV event publishing config (JSON object).",
    ),
    # device
    SglangFlag("device", ("--device",), "str", None, "The device to use."),
    SglangFlag(
        "watchdog_timeout",
        ("--watchdog-timeout",),
        "float",
        300,
        "Watchdog timeout in seconds.",
    ),
    # configuration file (ServerArgs.add_cli_args registers it by hand)
    SglangFlag("config", ("--config",), "str", None, "Read CLI options from a YAML file."),
)

_KIND_TYPES: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "hint": human_readable_int,
}


def _add_builtin_sglang_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "SGLang (built-in subset)",
        "The SGLang flags the mesh needs, spelled as SGLang spells them. "
        "Install sglang for all of them.",
    )
    for spec in BUILTIN_SGLANG_FLAGS:
        names = [*spec.flags, *spec.extra_aliases]
        if spec.kind == "bool":
            group.add_argument(
                *names, dest=spec.dest, action="store_true", default=spec.default, help=spec.help
            )
            continue
        kwargs: dict[str, Any] = {
            "dest": spec.dest,
            "type": _KIND_TYPES[spec.kind],
            "default": spec.default,
            "help": spec.help,
        }
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
        if spec.required:
            kwargs["required"] = True
        group.add_argument(*names, **kwargs)


class _BuiltinParser(OneLineParser):
    """Rewords "unrecognized arguments" so the user learns why the flag is unknown."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = message.split(":", 1)[1].strip()
            message = (
                f"unknown engine flag(s): {flags}. sglang is not installed, so only the "
                "built-in subset of SGLang's flags is available (see --help); the full set "
                "needs `pip install sglang`"
            )
        super().error(message)


# --------------------------------------------------------------------------------------------
# Configuration files (--config and --disagg-config)


def _load_yaml(path: str, what: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{what} needs PyYAML: pip install pyyaml") from None
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ValueError(f"{what}: file {path!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{what}: {path!r} is not valid YAML: {exc}") from None


@contextlib.contextmanager
def _disagg_config_argv(rest: list[str], path: str | None, key: str | None) -> Iterator[list[str]]:
    """With ``--disagg-config FILE --disagg-config-key KEY``: write section KEY to a temp YAML
    and pass it as SGLang's ``--config`` (replacing any given one), as the reference does.
    The temp file lives only while the caller merges it."""
    if path is None and key is None:
        yield rest
        return
    if path is None or key is None:
        raise ValueError("--disagg-config and --disagg-config-key must be given together")
    data = _load_yaml(path, "--disagg-config")
    if not isinstance(data, dict):
        raise ValueError(f"--disagg-config: {path!r} must hold a mapping of sections")
    if key not in data:
        sections = ", ".join(map(str, data)) or "none"
        raise ValueError(
            f"--disagg-config-key {key!r} is not a section of {path!r} (sections: {sections})"
        )
    section = data[key]
    if not isinstance(section, dict):
        raise ValueError(
            f"--disagg-config: section {key!r} of {path!r} must be a mapping of SGLang flags"
        )
    import yaml  # _load_yaml succeeded, so PyYAML is there

    stripped = without_flags(rest, valued={"--config": None})
    fd, tmp = tempfile.mkstemp(prefix="sglmesh-disagg-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(section, fh)
        yield [*stripped, "--config", tmp]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _merge_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Built-in counterpart of SGLang's ``ConfigArgumentMerger``: the YAML's flags go first,
    so the command line overrides the file. ``key: true`` is a bare flag, ``false`` omits it,
    a list repeats the values after the flag."""
    positions = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not positions:
        return argv
    if len(positions) > 1:
        raise ValueError("--config: only one config file may be given")
    i = positions[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            raise ValueError("--config: no file given")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1 :]
    data = _load_yaml(path, "--config")
    if data is None:
        return rest
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping of flag names to values")
    store_true = {
        opt
        for action in parser._actions
        if isinstance(action, argparse._StoreTrueAction)
        for opt in action.option_strings
    }
    merged: list[str] = []
    for raw_key, value in data.items():
        flag = "--" + str(raw_key).replace("_", "-")
        if flag in store_true:
            if value is True or (isinstance(value, str) and value.lower() in TRUE_WORDS):
                merged.append(flag)
            elif not (value is False or value is None or str(value).lower() in FALSE_WORDS):
                raise ValueError(f"--config: {raw_key} must be true or false, got {value!r}")
        elif isinstance(value, list):
            merged += [flag, *map(str, value)]
        elif isinstance(value, dict):
            merged += [flag, json.dumps(value)]
        elif value is not None:
            merged += [flag, str(value)]
    return merged + rest


# --------------------------------------------------------------------------------------------
# KV events endpoints


@dataclass(frozen=True, slots=True)
class KvEventsEndpoints:
    """Where a publisher connects to one engine's KV events, one entry per DP rank."""

    endpoints: list[str]
    replay_endpoints: list[str]
    topic: str


def _offset_endpoint(endpoint: str, rank: int) -> str:
    # SGLang binds DP rank r at the base port + r (inproc: a "_dp{r}" suffix).
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://") and ":" in endpoint[len("tcp://") :]:
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    raise ValueError(f"cannot offset KV events endpoint {endpoint!r} by DP rank {rank}")


def _connect_address(endpoint: str) -> str:
    # A wildcard bind is reached on loopback by a publisher on the same host.
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:", "tcp://:::"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard) :]
    return endpoint


def kv_events_endpoints(kv_events_config: str | None, dp_size: int = 1) -> KvEventsEndpoints:
    """The ZMQ addresses to connect to for an engine started with ``--kv-events-config``.

    Empty when publishing is off (no config, or ``publisher`` is ``"null"``). SGLang binds
    one PUB socket per DP rank at the configured port plus the rank; the replay ROUTER
    socket likewise.
    """
    config = parse_kv_events_config(kv_events_config)
    if config is None or config.get("publisher", "null") == "null":
        return KvEventsEndpoints([], [], "")
    base = str(config.get("endpoint", "tcp://*:5557"))
    replay = config.get("replay_endpoint")
    ranks = range(max(1, dp_size))
    return KvEventsEndpoints(
        endpoints=[_connect_address(_offset_endpoint(base, r)) for r in ranks],
        replay_endpoints=[_connect_address(_offset_endpoint(str(replay), r)) for r in ranks]
        if replay
        else [],
        topic=str(config.get("topic", "")),
    )


_KV_PUBLISHERS = ("null", "zmq")


def parse_kv_events_config(text: str | None) -> dict[str, Any] | None:
    """``--kv-events-config`` as a dict; ``ValueError`` naming the flag when it is not a
    JSON object with a known publisher."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--kv-events-config must be a JSON object, got {text!r}")
    publisher = value.get("publisher", "null")
    if publisher not in _KV_PUBLISHERS:
        raise ValueError(
            f"--kv-events-config: publisher must be one of {', '.join(_KV_PUBLISHERS)}, "
            f"got {publisher!r}"
        )
    endpoint = value.get("endpoint", "tcp://*:5557")
    if not isinstance(endpoint, str) or not re.match(r"^(tcp|ipc|inproc)://.+", endpoint):
        raise ValueError(
            f"--kv-events-config: endpoint must be a ZMQ address such as tcp://*:5557, "
            f"got {endpoint!r}"
        )
    return value


# --------------------------------------------------------------------------------------------
# The parsed result


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """What the mesh needs from the engine command line, under SGLang's field names.

    ``server_args`` is the real ``sglang.srt.server_args.ServerArgs`` when sglang parsed the
    command line (what ``SglangEngine`` starts), else ``None``.
    """

    model_path: str
    served_model_name: list[str]
    tokenizer_path: str | None = None
    page_size: int | None = None
    context_length: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = None
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    disaggregation_transfer_backend: str = "mooncake"
    kv_events_config: str | None = None
    enable_metrics: bool = False
    skip_tokenizer_init: bool = False
    is_embedding: bool = False
    json_model_override_args: str = "{}"
    incremental_streaming_output: bool = True
    disable_radix_cache: bool = False
    # SGLang's --enable-multimodal (None: not given): the model takes images.
    enable_multimodal: bool | None = None
    random_seed: int | None = None
    trust_remote_code: bool = False
    mem_fraction_static: float | None = None
    dtype: str = "auto"
    decode_log_interval: int = 40
    log_level: str = "info"
    # mesh engine flags
    engine: str = "auto"
    torch_threads: int = 0
    speedup_ratio: float = 1.0
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    sim_output_len_mean: int = 0
    sim_timeslice_ms: float = 0.5
    bootstrap_timeout: float = 300.0
    disagg_config: str | None = None
    disagg_config_key: str | None = None
    server_args: Any | None = field(default=None, repr=False, compare=False)

    @property
    def model_name(self) -> str:
        """The name the model is served under (first of ``served_model_name``)."""
        return self.served_model_name[0]

    @property
    def model_aliases(self) -> list[str]:
        return self.served_model_name[1:]

    @property
    def kv_events(self) -> dict[str, Any] | None:
        return parse_kv_events_config(self.kv_events_config)

    @property
    def kv_events_enabled(self) -> bool:
        config = self.kv_events
        return config is not None and config.get("publisher", "null") != "null"

    def kv_events_endpoints(self) -> KvEventsEndpoints:
        return kv_events_endpoints(self.kv_events_config, self.dp_size)


_FIELD_NAMES = frozenset(EngineArgs.__dataclass_fields__)
_MESH_DESTS = frozenset(f.dest for f in _ENGINE_FLAGS)


def split_served_model_name(text: str | None, model_path: str) -> list[str]:
    """``"name, alias1 alias2"`` -> ``["name", "alias1", "alias2"]``; unset -> the model path."""
    names: list[str] = []
    for name in re.split(r"[\s,]+", text or ""):
        if name and name not in names:
            names.append(name)
    return names or [model_path]


def _free_port() -> int:
    # Reserve-and-release, as the reference does: a small race, but the engine binds it
    # moments later and the alternative (a fixed 8998) collides on every shared host.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def _flag_given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _check(values: Mapping[str, Any]) -> None:
    """Rules SGLang itself only checks at engine start (with a model at hand) or never;
    checked here so a bad command line fails at once, naming the flag."""

    def at_least(dest: str, minimum: int, *, optional: bool = True) -> None:
        value = values.get(dest)
        if value is None and optional:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")

    at_least("page_size", 1)
    at_least("context_length", 1)
    at_least("max_running_requests", 1)
    at_least("max_total_tokens", 1)
    at_least("max_prefill_tokens", 1, optional=False)
    at_least("tp_size", 1, optional=False)
    at_least("dp_size", 1, optional=False)
    at_least("pp_size", 1, optional=False)
    at_least("nnodes", 1, optional=False)
    at_least("node_rank", 0, optional=False)
    at_least("decode_log_interval", 1, optional=False)
    if values["node_rank"] >= values["nnodes"]:
        raise ValueError(f"--node-rank {values['node_rank']} must be < --nnodes {values['nnodes']}")
    chunk = values.get("chunked_prefill_size")
    if chunk is not None and (chunk == 0 or chunk < -1):
        raise ValueError(f"--chunked-prefill-size must be -1 (no chunking) or >= 1, got {chunk}")
    mode = values.get("disaggregation_mode")
    if mode not in DISAGGREGATION_MODES:
        raise ValueError(
            f"--disaggregation-mode must be one of {', '.join(DISAGGREGATION_MODES)}, got {mode!r}"
        )
    port = values.get("disaggregation_bootstrap_port")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--disaggregation-bootstrap-port must be 1-65535, got {port!r}")
    fraction = values.get("mem_fraction_static")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {fraction}")
    if not values.get("model_path"):
        raise ValueError("--model-path must not be empty")
    parse_kv_events_config(values.get("kv_events_config"))
    model_overrides(values.get("json_model_override_args"))


def model_overrides(text: str | None) -> dict[str, Any]:
    """``--json-model-override-args`` as a dict; ValueError naming the flag if it is not a
    JSON object."""
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--json-model-override-args is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--json-model-override-args must be a JSON object, got {type(value).__name__}"
        )
    return value


def _sglang_parser_class() -> Any | None:
    """``ServerArgs`` when sglang's argument module imports, else ``None``. Only that module
    is tried: it is the one the parser needs, and anything broken elsewhere in sglang must
    not stop a CPU worker from starting with the built-in parser."""
    if not package_installed("sglang"):
        return None
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception:  # any import failure: use the built-in parser
        return None
    return ServerArgs


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


def parse_engine_args(
    argv: Sequence[str],
    *,
    prog: str,
    env: Mapping[str, str] | None = None,
    embedding: bool = False,
    default_model: Callable[[], str] | None = None,
    use_sglang: bool | None = None,
) -> EngineArgs:
    """Parse the engine part of a worker's command line (the mesh flags already removed).

    ``embedding=True`` makes this an embedding worker (``is_embedding`` forced on, the
    tokenizer kept), as the reference's ``--embedding-worker`` does. ``default_model`` is
    called for a model path when the command line names none (``None``: ``--model-path`` is
    required, as in SGLang). ``use_sglang`` forces the parser choice (``None``: SGLang's when
    importable). Errors exit with status 2 and a message naming the flag; ``--help`` prints
    both the engine flags and the SGLang flags.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    argv = list(argv)
    server_args_cls = _sglang_parser_class() if use_sglang in (None, True) else None
    if use_sglang and server_args_cls is None:
        raise EngineSelectionError("sglang.srt.server_args cannot be imported")

    # Our flags first, from their own parser, so SGLang's parser sees only its own flags.
    mesh_parser = OneLineParser(prog=prog, allow_abbrev=False, add_help=False)
    add_engine_args(mesh_parser)
    engine_parser: argparse.ArgumentParser
    if server_args_cls is not None:
        engine_parser = OneLineParser(prog=prog, allow_abbrev=True, add_help=False)
        server_args_cls.add_cli_args(engine_parser)
    else:
        engine_parser = _BuiltinParser(prog=prog, allow_abbrev=False, add_help=False)
        _add_builtin_sglang_args(engine_parser)

    if "-h" in argv or "--help" in argv:
        help_parser = OneLineParser(
            prog=prog,
            allow_abbrev=False,
            parents=[mesh_parser, engine_parser],
            conflict_handler="resolve",
            description="Engine flags: the mesh's own, then SGLang's."
            + ("" if server_args_cls else " sglang is not installed: built-in subset shown."),
        )
        help_parser.parse_args(["--help"])  # exits 0

    ns, rest = mesh_parser.parse_known_args(argv)
    try:
        mesh_values = engine_flag_values(ns, environ)
    except ValueError as exc:
        _fail(mesh_parser, str(exc))

    try:
        with _disagg_config_argv(
            rest, mesh_values["disagg_config"], mesh_values["disagg_config_key"]
        ) as rest_with_config:
            if server_args_cls is not None:
                merged = _sglang_merge_config(engine_parser, rest_with_config)
            else:
                merged = _merge_config_file(engine_parser, rest_with_config)
    except ValueError as exc:
        _fail(engine_parser, str(exc))

    if default_model is not None and not (
        _flag_given(merged, "--model-path") or _flag_given(merged, "--model")
    ):
        try:
            merged = ["--model-path", default_model(), *merged]
        except Exception as exc:  # reported as a usage error
            _fail(engine_parser, f"no --model-path given and the default model failed: {exc}")

    engine_ns = engine_parser.parse_args(merged)
    # The namespace's own dict: what is forced below is what ServerArgs.from_cli_args reads.
    values = vars(engine_ns)

    # What the reference forces before building ServerArgs.
    names = split_served_model_name(values.get("served_model_name"), values["model_path"])
    if values.get("served_model_name") is not None:
        values["served_model_name"] = names[0]
    values["incremental_streaming_output"] = True
    if embedding:
        values["is_embedding"] = True
    if not values.get("is_embedding"):
        values["skip_tokenizer_init"] = True
    if not _flag_given(merged, "--disaggregation-bootstrap-port"):
        values["disaggregation_bootstrap_port"] = _free_port()

    try:
        _check(values)
    except ValueError as exc:
        _fail(engine_parser, str(exc))

    server_args: Any | None = None
    if server_args_cls is not None:
        if "_radix_eviction_policy_explicitly_set" in _record_field_names(server_args_cls):
            values["_radix_eviction_policy_explicitly_set"] = _flag_given(
                merged, "--radix-eviction-policy"
            )
        try:
            server_args = server_args_cls.from_cli_args(engine_ns)
        except (TypeError, ValueError) as exc:
            _fail(engine_parser, f"invalid SGLang arguments: {exc}")
        values = {name: getattr(server_args, name, values.get(name)) for name in values}

    ours = {k: v for k, v in values.items() if k in _FIELD_NAMES and k not in _MESH_DESTS}
    ours["served_model_name"] = names
    return EngineArgs(**ours, **mesh_values, server_args=server_args)


def _record_field_names(cls: Any) -> set[str]:
    try:
        import msgspec

        return {f.name for f in msgspec.structs.fields(cls)}
    except (TypeError, ImportError):
        import dataclasses

        if dataclasses.is_dataclass(cls):
            return {f.name for f in dataclasses.fields(cls)}
        return set()


def _sglang_merge_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """SGLang's own ``--config`` merge (``ConfigArgumentMerger``), as ``sglang serve`` does."""
    if "--config" not in argv:
        return argv
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    merged: list[str] = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    return merged
