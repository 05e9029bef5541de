"""Command-line flags with environment-variable twins, declared once and read one way.

A ``Flag("lease_ttl", ...)`` is the option ``--lease-ttl`` and the variables
``SGLMESH_LEASE_TTL`` then its ``fallback_envs`` (the reference deployment's names, such as
``DYN_NAMESPACE``). Its value comes from, highest precedence first:

1. the flag on the command line;
2. the first of its environment variables that is set (an empty or blank value counts as
   unset: compose files and Helm charts render ``FOO=`` for "not configured");
3. its default.

``add_flags`` puts flags into an argparse group with ``default=None`` (so "not given" can be
told from "given") and a help line naming the variables and the default; ``resolve_flags``
then applies the precedence. A bad value on the command line is an argparse error (exit
status 2, "argument --flag: ..."); a bad value from the environment is a ``FlagError`` naming
the flag and the variable.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

__all__ = [
    "FALSE_WORDS",
    "TRUE_WORDS",
    "Converter",
    "Flag",
    "FlagError",
    "OneLineParser",
    "Setting",
    "add_flags",
    "flag_values",
    "float_converter",
    "int_converter",
    "non_empty",
    "parse_bool",
    "resolve_flags",
    "without_flags",
]

Converter = Callable[[str], Any]

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class FlagError(ValueError):
    """A value read from the environment is invalid; the message names the flag and variable."""


@dataclass(frozen=True, slots=True)
class Flag:
    """One option: ``--<dest with dashes>``, read from ``SGLMESH_<DEST>`` and ``fallback_envs``.

    ``convert`` turns text (from the command line or the environment) into the value, raising
    ``ValueError`` with a reason; ``env_converters`` overrides it for variables whose syntax
    differs (``DYN_LOG`` is a Rust log filter). The default is used as is, never converted.
    A flag whose default is a bool is a switch (``--x`` / ``--no-x``); ``convert`` then reads
    only the environment. ``default_text`` replaces the rendered default in the help line.
    """

    dest: str
    convert: Converter
    default: Any
    metavar: str | None
    help: str
    fallback_envs: tuple[str, ...] = ()
    env_converters: Mapping[str, Converter] = field(default_factory=dict)
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def envs(self) -> tuple[str, ...]:
        return ("SGLMESH_" + self.dest.upper(), *self.fallback_envs)

    @property
    def help_line(self) -> str:
        default = self.default_text if self.default_text is not None else _render(self.default)
        return f"{self.help} (env: {', '.join(self.envs)}; default: {default})"


@dataclass(frozen=True, slots=True)
class Setting:
    """A resolved value and where it came from: "flag", "default" or the variable's name."""

    value: Any
    source: str


def _render(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _argparse_type(flag: Flag) -> Converter:
    def convert(text: str) -> Any:
        try:
            return flag.convert(text)
        except ValueError as exc:
            # argparse prefixes "argument --flag: ", which names the flag for the user.
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.dest  # argparse shows it if anything else goes wrong
    return convert


def add_flags(group: argparse._ActionsContainer, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to ``group`` (a parser or an argument group), each defaulting to None."""
    for flag in flags:
        kind: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if isinstance(flag.default, bool)
            else {"metavar": flag.metavar, "type": _argparse_type(flag)}
        )
        help_text = flag.help_line.replace("%", "%%")
        group.add_argument(flag.flag, dest=flag.dest, default=None, help=help_text, **kind)


def resolve_flags(
    flags: Iterable[Flag], ns: argparse.Namespace, env: Mapping[str, str] | None = None
) -> dict[str, Setting]:
    """Each flag's value by precedence (flag > its variables in order > default), keyed by
    ``dest``. ``env`` defaults to ``os.environ``. A bad environment value is a ``FlagError``."""
    environ: Mapping[str, str] = os.environ if env is None else env
    settings: dict[str, Setting] = {}
    for flag in flags:
        given = getattr(ns, flag.dest, None)
        if given is not None:
            settings[flag.dest] = Setting(given, "flag")
            continue
        settings[flag.dest] = Setting(flag.default, "default")
        for var in flag.envs:
            raw = environ.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                value = flag.env_converters.get(var, flag.convert)(raw)
            except ValueError as exc:
                raise FlagError(
                    f"invalid value for {flag.flag} from environment variable {var}={raw!r}: {exc}"
                ) from None
            settings[flag.dest] = Setting(value, var)
            break
    return settings


def flag_values(
    flags: Iterable[Flag], ns: argparse.Namespace, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``resolve_flags`` without the sources: ``{dest: value}``."""
    return {dest: s.value for dest, s in resolve_flags(flags, ns, env).items()}


# --------------------------------------------------------------------------------------------
# Converters


def parse_bool(text: str) -> bool:
    """Read a bool the way environment variables spell it (true/1/yes/on, false/0/no/off)."""
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (true/1/yes/on or false/0/no/off), got {text!r}")


def int_converter(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An integer >= ``minimum``; ``meaning`` follows the bound in the error (" second")."""

    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}{meaning}, got {value}")
        return value

    return convert


def float_converter(minimum: float = -math.inf, *, strict: bool = False) -> Callable[[str], float]:
    """A finite number >= ``minimum`` (> with ``strict``)."""

    def convert(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
        return value

    return convert


def non_empty(what: str) -> Callable[[str], str]:
    """The text, stripped; blank is an error saying ``what`` was expected ("a file path")."""

    def convert(text: str) -> str:
        if not text.strip():
            raise ValueError(f"expected {what}, got an empty string")
        return text.strip()

    return convert


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the problem (and the flag),
    ``prog: error: ... (see 'prog --help')``, instead of a usage block of dozens of lines
    above the one line that matters. ``--help`` still prints everything."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def without_flags(
    argv: Sequence[str],
    bare: Collection[str] = (),
    valued: Mapping[str, str | None] | None = None,
) -> list[str]:
    """``argv`` minus some flags, for handing the rest to a parser that does not know them.

    ``bare`` flags take no value (``--x`` and ``--x=...`` are dropped). ``valued`` maps a flag
    that takes a value (``--x v`` or ``--x=v``) to the only value dropped, or None for any.
    """
    valued = valued or {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in bare:
            i += 1
            continue
        if name in valued:
            wanted = valued[name]
            if eq:
                if wanted is None or value == wanted:
                    i += 1
                    continue
            elif i + 1 < len(argv) and (wanted is None or argv[i + 1] == wanted):
                i += 2
                continue
            elif i + 1 >= len(argv) and wanted is None:
                i += 1
                continue
        out.append(arg)
        i += 1
    return out
