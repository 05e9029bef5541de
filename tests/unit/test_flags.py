"""``shared.flags``: one flag with environment twins, its help line, precedence and errors.

The environment is always passed as ``env=``, never read from os.environ.
"""

from __future__ import annotations

import argparse
import math

import pytest

from shared.flags import (
    Flag,
    FlagError,
    Setting,
    add_flags,
    flag_values,
    float_converter,
    int_converter,
    non_empty,
    parse_bool,
    resolve_flags,
    without_flags,
)

LIMIT = Flag(
    "request_limit",
    int_converter(0, " (0 = unlimited)"),
    0,
    "N",
    "most requests at once; 100% busy is fine",
    ("DYN_REQUEST_LIMIT", "OLD_LIMIT"),
)
LEVEL = Flag(
    "log_level",
    non_empty("a level"),
    "info",
    "LEVEL",
    "log level",
    ("DYN_LOG",),
    {"DYN_LOG": lambda text: text.split(",")[0].strip()},
)
SWITCH = Flag("health_check", parse_bool, True, None, "send canaries", ("DYN_HEALTH",))
PATH = Flag("template", non_empty("a file path"), None, "FILE", "a template")
FLAGS = (LIMIT, LEVEL, SWITCH, PATH)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svc", allow_abbrev=False)
    add_flags(p.add_argument_group("test"), FLAGS)
    return p


def test_names_follow_dest() -> None:
    assert LIMIT.flag == "--request-limit"
    assert LIMIT.envs == ("SGLMESH_REQUEST_LIMIT", "DYN_REQUEST_LIMIT", "OLD_LIMIT")
    assert PATH.envs == ("SGLMESH_TEMPLATE",)


@pytest.mark.parametrize(
    ("flag", "default"),
    [(LIMIT, "0"), (LEVEL, "info"), (SWITCH, "on"), (PATH, "none")],
)
def test_help_names_every_env_var_and_the_default(flag: Flag, default: str) -> None:
    assert flag.help_line.endswith(f"(env: {', '.join(flag.envs)}; default: {default})")


def test_help_renders_defaults_and_takes_an_override() -> None:
    def line(default: object, text: str | None = None) -> str:
        return Flag("x", str, default, None, "h", default_text=text).help_line

    assert line(5.0).endswith("default: 5)")
    assert line(0.25).endswith("default: 0.25)")
    assert line(False).endswith("default: off)")
    assert line(("a", "b")).endswith("default: a,b)")
    assert line(None, "the role's default").endswith("default: the role's default)")


def test_parser_help_lists_flags_and_escapes_percent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--request-limit N" in out and "100% busy" in out
    assert "--health-check, --no-health-check" in out
    for flag in FLAGS:
        for var in flag.envs:
            assert var in out


def test_every_flag_defaults_to_none_in_the_namespace() -> None:
    ns = parser().parse_args([])
    assert all(getattr(ns, f.dest) is None for f in FLAGS)


def test_precedence_flag_then_envs_in_order_then_default() -> None:
    p = parser()
    env = {"SGLMESH_REQUEST_LIMIT": "3", "DYN_REQUEST_LIMIT": "4", "OLD_LIMIT": "5"}
    assert flag_values([LIMIT], p.parse_args(["--request-limit", "2"]), env) == {"request_limit": 2}
    assert flag_values([LIMIT], p.parse_args([]), env) == {"request_limit": 3}
    del env["SGLMESH_REQUEST_LIMIT"]
    assert flag_values([LIMIT], p.parse_args([]), env) == {"request_limit": 4}
    del env["DYN_REQUEST_LIMIT"]
    assert flag_values([LIMIT], p.parse_args([]), env) == {"request_limit": 5}
    assert flag_values([LIMIT], p.parse_args([]), {}) == {"request_limit": 0}


def test_settings_say_where_each_value_came_from() -> None:
    ns = parser().parse_args(["--no-health-check"])
    settings = resolve_flags(FLAGS, ns, {"DYN_REQUEST_LIMIT": "7"})
    assert settings == {
        "request_limit": Setting(7, "DYN_REQUEST_LIMIT"),
        "log_level": Setting("info", "default"),
        "health_check": Setting(False, "flag"),
        "template": Setting(None, "default"),
    }


def test_blank_env_counts_as_unset() -> None:
    ns = parser().parse_args([])
    env = {"SGLMESH_REQUEST_LIMIT": "", "DYN_REQUEST_LIMIT": "  ", "OLD_LIMIT": "6"}
    assert flag_values([LIMIT], ns, env) == {"request_limit": 6}


def test_switch_reads_the_flag_and_the_environment() -> None:
    p = parser()
    assert flag_values([SWITCH], p.parse_args([]), {})["health_check"] is True
    assert flag_values([SWITCH], p.parse_args([]), {"DYN_HEALTH": "off"})["health_check"] is False
    ns = p.parse_args(["--health-check"])
    assert flag_values([SWITCH], ns, {"SGLMESH_HEALTH_CHECK": "0"})["health_check"] is True


def test_per_variable_converter() -> None:
    ns = parser().parse_args([])
    assert flag_values([LEVEL], ns, {"DYN_LOG": "debug,x=trace"}) == {"log_level": "debug"}
    assert flag_values([LEVEL], ns, {"SGLMESH_LOG_LEVEL": "a,b"}) == {"log_level": "a,b"}


def test_bad_env_value_names_the_flag_and_the_variable() -> None:
    ns = parser().parse_args([])
    with pytest.raises(FlagError) as info:
        resolve_flags(FLAGS, ns, {"DYN_REQUEST_LIMIT": "-1"})
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "invalid value for --request-limit from environment variable DYN_REQUEST_LIMIT='-1': "
        "must be >= 0 (0 = unlimited), got -1"
    )


def test_bad_flag_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--request-limit", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "svc: error: argument --request-limit: expected an integer, got 'many'" in err


def test_converters() -> None:
    assert int_converter(1)(" 3 ") == 3
    with pytest.raises(ValueError, match="must be >= 1 second, got 0"):
        int_converter(1, " second")("0")
    assert float_converter()("-2.5") == -2.5
    assert float_converter(0.0)("0") == 0.0
    with pytest.raises(ValueError, match="must be > 0, got 0"):
        float_converter(0.0, strict=True)("0")
    with pytest.raises(ValueError, match="finite"):
        float_converter()("inf")
    with pytest.raises(ValueError, match="expected a number"):
        float_converter()("soon")
    assert non_empty("a key")(" k ") == "k"
    with pytest.raises(ValueError, match="expected a key, got an empty string"):
        non_empty("a key")("  ")
    assert parse_bool(" YES ") is True and parse_bool("off") is False
    assert math.isclose(float_converter(0.0, strict=True)("1e-3"), 0.001)


def test_without_flags_drops_bare_and_valued_flags_in_both_spellings() -> None:
    argv = ["--a", "--b=1", "--config", "x.yaml", "--keep", "v", "--config=y", "--mode", "encode"]
    assert without_flags(argv, bare=("--a", "--b"), valued={"--config": None}) == [
        "--keep", "v", "--mode", "encode",
    ]  # fmt: skip
    # A valued flag with a required value goes only when it has that value.
    assert without_flags(["--mode", "encode", "--x"], valued={"--mode": "encode"}) == ["--x"]
    assert without_flags(["--mode=prefill"], valued={"--mode": "encode"}) == ["--mode=prefill"]
    assert without_flags(["--mode", "decode"], valued={"--mode": "encode"}) == ["--mode", "decode"]
    # A trailing valued flag without its value goes too (the parser would refuse it anyway).
    assert without_flags(["--p", "--config"], valued={"--config": None}) == ["--p"]
    # A prefix is not the flag.
    assert without_flags(["--abc", "--configs", "z"], bare=("--a",), valued={"--config": None}) == [
        "--abc", "--configs", "z",
    ]  # fmt: skip
