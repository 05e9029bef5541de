"""``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``: parsed (flag or env twin), listed in
``--help``, a bad name a one-line error naming the flag, and carried in the model card."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.engine.protocol import EngineInfo
from shared.model import prepare_default_model
from shared.parser_names import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES
from shared.worker.args import WorkerConfig, parse_worker_args
from shared.worker.registration import model_card


@pytest.fixture(scope="module")
def smol() -> Path:
    return prepare_default_model()


def parse(smol: Path, *argv: str, env: dict[str, str] | None = None) -> WorkerConfig:
    return parse_worker_args(
        ["--engine", "sim", "--model-path", str(smol), *argv], env=env or {}, use_sglang=False
    )


def info(smol: Path) -> EngineInfo:
    return EngineInfo(
        engine="sim", model_path=str(smol), served_model_name="m", page_size=16,
        max_total_tokens=1024, max_running_requests=8, max_prefill_tokens=512,
        context_length=2048,
    )  # fmt: skip


def test_flags_go_into_the_model_card(smol: Path) -> None:
    config = parse(smol, "--dyn-tool-call-parser", "hermes", "--dyn-reasoning-parser", "qwen3")
    card = model_card(info(smol), config, 7)
    assert (card.tool_call_parser, card.reasoning_parser) == ("hermes", "qwen3")
    plain = model_card(info(smol), parse(smol), 7)
    assert plain.tool_call_parser is None and plain.reasoning_parser is None


def test_env_twins(smol: Path) -> None:
    config = parse(
        smol, env={"SGLMESH_DYN_TOOL_CALL_PARSER": "mistral", "DYN_REASONING_PARSER": "deepseek_r1"}
    )
    assert config.worker.dyn_tool_call_parser == "mistral"
    assert config.worker.dyn_reasoning_parser == "deepseek_r1"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--dyn-tool-call-parser", "nope"], {}, "--dyn-tool-call-parser"),
        (["--dyn-reasoning-parser", "nope"], {}, "--dyn-reasoning-parser"),
        ([], {"SGLMESH_DYN_TOOL_CALL_PARSER": "nope"}, "SGLMESH_DYN_TOOL_CALL_PARSER"),
    ],
)
def test_an_unknown_name_is_one_line_naming_the_flag(
    smol: Path, argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(smol, *argv, env=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert named in err and ("hermes" in err or "qwen3" in err)
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_help_lists_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_worker_args(["--help"], env={}, use_sglang=False)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--dyn-tool-call-parser NAME" in out and "--dyn-reasoning-parser NAME" in out
    assert ", ".join(TOOL_CALL_PARSER_NAMES) in out
    assert ", ".join(REASONING_PARSER_NAMES) in out
    assert "DYN_TOOL_CALL_PARSER" in out and "DYN_REASONING_PARSER" in out
