"""The ``sglmesh`` dispatcher: help, errors, lazy loading and hand-over of arguments."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sglmesh import cli
from sglmesh.cli import COMMANDS, Command, main

REPO = Path(__file__).resolve().parents[2]
RESERVED = ("infra", "worker", "processor", "prefill", "decode", "encode", "publisher", "status")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throw-away package of target modules, importable for this test only."""
    pkg = "sglmesh_cli_test_targets"
    root = tmp_path / pkg
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "ok.py").write_text(
        textwrap.dedent(
            """
            seen: list[list[str]] = []

            def main(argv):
                seen.append(argv)
                return 3

            def returns_none(argv):
                return None

            def exits(argv):
                raise SystemExit(5)

            def exits_message(argv):
                raise SystemExit("fatal: bad thing")

            def interrupted(argv):
                raise KeyboardInterrupt
            """
        )
    )
    (root / "broken_dep.py").write_text("import sglmesh_no_such_dependency_xyz\n")
    (root / "no_main.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


def _use(monkeypatch: pytest.MonkeyPatch, name: str, module: str, function: str = "main") -> None:
    monkeypatch.setitem(COMMANDS, name, Command(module, function, f"help for {name}"))


def test_reserved_commands_are_in_the_table() -> None:
    assert set(RESERVED) <= set(COMMANDS)
    assert COMMANDS["infra"] == Command("shared.infra", "main", COMMANDS["infra"].help)
    assert all(cmd.help and "\n" not in cmd.help for cmd in COMMANDS.values())


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_help_lists_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: sglmesh" in out
    for name, command in COMMANDS.items():
        assert f"  {name} " in out
        assert command.help in out


def test_no_arguments_shows_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no command given" in err
    for name in COMMANDS:
        assert name in err


def test_argv_defaults_to_sys_argv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["sglmesh", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("sglmesh ")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        expected = importlib.metadata.version("sglmesh")
    except importlib.metadata.PackageNotFoundError:
        expected = "0.0.0"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sglmesh {expected}"


def test_version_fallback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "sglmesh 0.0.0"


def test_unknown_command_lists_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wrker", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'wrker'" in err
    assert "did you mean 'worker'" in err
    for name in COMMANDS:
        assert name in err


def test_unknown_option_before_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--namespace", "x", "worker"]) == 2
    assert "unknown option '--namespace'" in capsys.readouterr().err


def test_missing_module_is_not_available_yet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use(monkeypatch, "ghost", "sglmesh_no_such_package_abc.main")
    assert main(["ghost", "--x"]) == 2
    assert capsys.readouterr().err.strip() == "sglmesh ghost: not available yet"


@pytest.mark.parametrize(
    "name", [n for n in RESERVED if not _module_exists(COMMANDS[n].module)] or ["<none>"]
)
def test_reserved_commands_without_a_module_say_so(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if name == "<none>":
        pytest.skip("every reserved command has its module now")
    assert main([name, "--help"]) == 2
    assert capsys.readouterr().err.strip() == f"sglmesh {name}: not available yet"


def test_module_without_function_is_not_available_yet(
    targets: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use(monkeypatch, "half", f"{targets}.no_main")
    assert main(["half"]) == 2
    assert "sglmesh half: not available yet" in capsys.readouterr().err


def test_missing_dependency_of_a_target_is_not_disguised(
    targets: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "dep", f"{targets}.broken_dep")
    with pytest.raises(ModuleNotFoundError, match="sglmesh_no_such_dependency_xyz"):
        main(["dep"])


def test_dispatch_hands_arguments_over_untouched(
    targets: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "tgt", f"{targets}.ok")
    argv = ["--model-path", "x", "--tp", "2", "--foo=bar", "--help", "--", "-v", "", "a b"]
    assert main(["tgt", *argv]) == 3
    module = sys.modules[f"{targets}.ok"]
    assert module.seen == [argv]
    assert main(["tgt"]) == 3
    assert module.seen[-1] == []


def test_help_subcommand_asks_the_target(targets: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, "tgt", f"{targets}.ok")
    assert main(["help", "tgt"]) == 3
    assert sys.modules[f"{targets}.ok"].seen[-1] == ["--help"]


@pytest.mark.parametrize(
    ("function", "code"),
    [("returns_none", 0), ("exits", 5), ("exits_message", 1), ("interrupted", 130)],
)
def test_exit_codes(
    function: str,
    code: int,
    targets: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use(monkeypatch, "tgt", f"{targets}.ok", function)
    assert main(["tgt"]) == code
    if function == "exits_message":
        assert "fatal: bad thing" in capsys.readouterr().err


def test_targets_are_imported_lazily() -> None:
    script = (
        "import sys\n"
        "from sglmesh.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['nope']) == 2\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('shared', 'services')]\n"
        "loaded += [m for m in ('msgspec', 'nats', 'aetcd', 'asyncio') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]"


def test_python_dash_m_sglmesh() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "sglmesh", "--version"], cwd=REPO, capture_output=True, text=True
    )
    assert version.returncode == 0
    assert version.stdout.startswith("sglmesh ")
    unknown = subprocess.run(
        [sys.executable, "-m", "sglmesh", "nope"], cwd=REPO, capture_output=True, text=True
    )
    assert unknown.returncode == 2
    assert "unknown command 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@pytest.mark.skipif(not _module_exists("shared.infra"), reason="shared/infra.py not written yet")
def test_infra_help_through_the_real_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sglmesh", "infra", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_cli_module_exports() -> None:
    assert cli.main is main
