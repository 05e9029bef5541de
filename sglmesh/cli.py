"""``sglmesh``: one console script, one subcommand per service.

Why a hand-rolled dispatcher instead of argparse sub-parsers: each subcommand owns its whole
command line (the worker's includes SGLang's own flags, which only SGLang's parser knows),
so everything after the subcommand name is handed over untouched. And each target module is
imported only when its command runs, so ``sglmesh infra status`` never pays for importing
an engine.

A target is ``main(argv: list[str]) -> int | None``; ``None`` means success. Commands whose
module has not been written yet are listed but answer "not available yet" (exit 2).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, TextIO

__all__ = ["COMMANDS", "Command", "main"]

PROG = "sglmesh"


class Command(NamedTuple):
    module: str
    function: str
    help: str


COMMANDS: dict[str, Command] = {
    "infra": Command("shared.infra", "main", "start, stop or inspect local NATS and etcd"),
    "worker": Command(
        "sglmesh.worker",
        "main",
        "run a worker; the role follows the SGLang flags (aggregated, prefill, decode, encode)",
    ),
    "processor": Command(
        "services.processor.main", "main", "run the OpenAI-compatible HTTP ingress"
    ),
    "prefill": Command("services.prefill.main", "main", "run a disaggregated prefill worker"),
    "decode": Command(
        "services.decode.main", "main", "run an aggregated or disaggregated decode worker"
    ),
    "encode": Command("services.encode.main", "main", "run a text-embedding or vision encoder"),
    "publisher": Command(
        "services.publisher.main",
        "main",
        "relay an engine's KV events and load metrics to NATS; export Prometheus metrics",
    ),
    "status": Command("sglmesh.status", "main", "show the instances and models registered"),
    "run": Command(
        "sglmesh.dev",
        "run_main",
        "start the whole mesh locally in the background (run agg|disagg); see 'sglmesh stop'",
    ),
    "stop": Command("sglmesh.dev", "stop_main", "stop what 'sglmesh run' started"),
    "model": Command(
        "shared.model", "main", "prepare the default model (SmolLM2-135M-Instruct), print its path"
    ),
}


class _Unavailable(Exception):
    pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:
        return "0.0.0"


def _help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} [-h] [--version] <command> [args ...]",
        "",
        "An asyncio service mesh that serves LLMs with SGLang.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "  --version   print the version and exit",
        "",
        f"Run '{PROG} <command> --help' for a command's own options.",
    ]
    return "\n".join(lines)


def _error(message: str, stream: TextIO | None = None) -> int:
    print(f"{PROG}: error: {message}", file=stream or sys.stderr)
    return 2


def _is_missing(exc: ModuleNotFoundError, module: str) -> bool:
    """True when ``module`` itself (or a package containing it) is what is missing.

    A ModuleNotFoundError for anything else -- a dependency the target imports -- is a real
    failure and must not be disguised as "not written yet".
    """
    if exc.name is None:
        return False
    return module == exc.name or module.startswith(exc.name + ".")


def _load(name: str, command: Command) -> Callable[[list[str]], int | None]:
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if _is_missing(exc, command.module):
            raise _Unavailable(f"{PROG} {name}: not available yet") from None
        raise
    target = getattr(module, command.function, None)
    if not callable(target):
        raise _Unavailable(
            f"{PROG} {name}: not available yet ({command.module} has no {command.function}())"
        )
    return target  # type: ignore[no-any-return]


def _exit_code(code: object) -> int:
    """Map a ``SystemExit`` code / return value the way the interpreter would."""
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message") prints the message, exits 1
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sglmesh <command> [args ...]``; return the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_help_text(), file=sys.stderr)
        return _error("no command given")
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        print(_help_text())
        return 0
    if first in ("-V", "--version"):
        print(f"{PROG} {_version()}")
        return 0
    if first == "help":
        if not rest:
            print(_help_text())
            return 0
        first, rest = rest[0], ["--help"]
    if first.startswith("-"):
        return _error(f"unknown option {first!r} before the command; see '{PROG} --help'")

    command = COMMANDS.get(first)
    if command is None:
        close = difflib.get_close_matches(first, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _error(f"unknown command {first!r}{hint}; choose from: {', '.join(COMMANDS)}")

    try:
        target = _load(first, command)
    except _Unavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return _exit_code(target(rest))
    except SystemExit as exc:  # argparse in the target: --help, usage errors
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        return 130  # the shell's convention for SIGINT, without a traceback
