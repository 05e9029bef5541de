"""From one command line to a running engine: one set of flags for SGLang, torch or the sim."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.engine.args import parse_engine_args
from shared.engine.registry import create_engine
from shared.engine.sim.engine import SimEngine
from shared.model import make_test_tokenizer


async def test_command_line_to_running_sim_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_test_tokenizer(tmp_path / "model")
    args = parse_engine_args(
        [
            "--model-path", str(model),
            "--served-model-name", "tiny,tiny-alias",
            "--page-size", "32",
            "--max-total-tokens", "8192",
            "--max-running-requests", "7",
            "--dp-size", "2",
            "--engine", "auto",
            "--speedup-ratio", "0",
            "--random-seed", "5",
        ],
        prog="test",
        use_sglang=False,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="shared.engine.registry"):
        engine = create_engine(args)
    assert isinstance(engine, SimEngine)
    (record,) = [r for r in caplog.records if r.getMessage() == "engine selected"]
    assert record.engine == "sim"  # type: ignore[attr-defined]
    # The tiny test model has no weights: auto falls back to the simulator, and says why.
    assert "no *.safetensors weights" in record.reason  # type: ignore[attr-defined]
    assert any("SIMULATED tokens" in r.getMessage() for r in caplog.records)
    await engine.start()
    try:
        info = engine.info
        assert (info.engine, info.page_size, info.max_total_tokens) == ("sim", 32, 8192)
        assert (info.max_running_requests, info.dp_size) == (7, 2)
        assert info.served_model_name == "tiny"
        outs = [
            out
            async for out in engine.async_generate(
                input_ids=[5, 6, 7, 8],
                sampling_params={"max_new_tokens": 6, "ignore_eos": True},
                rid="r1",
            )
        ]
        assert sum(len(o["output_ids"]) for o in outs) == 6
        assert outs[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    finally:
        await engine.shutdown()


def test_embedding_needs_the_encode_service(tmp_path: Path) -> None:
    model = make_test_tokenizer(tmp_path / "model")
    args = parse_engine_args(
        ["--model-path", str(model), "--engine", "sim", "--is-embedding"],
        prog="test",
        use_sglang=False,
    )
    with pytest.raises(ValueError, match="encode service"):
        create_engine(args)
