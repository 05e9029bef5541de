"""Which engine an embedding worker runs, and what it tells the mesh about the model.

``--engine auto`` (the default) takes SGLang (``--is-embedding``) when sglang is installed and
a GPU is visible -- the engine registry's own test -- and otherwise the CPU sentence-embedding
engine (``services.encode.torch_engine``); ``--engine sglang`` and ``--engine torch`` ask for
one; the simulator generates tokens only and cannot embed. This sits beside the engine
registry (``shared.engine.registry``), which knows LLM engines: an embedding worker's CPU
engine is the encode service's own.

:func:`embedding_info` reads the card's :class:`~proto.discovery.EmbeddingInfo` from the
running engine: the CPU engine's model files, or SGLang's resolved model config (hidden size,
context length, Matryoshka dimensions, vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proto.discovery import EmbeddingInfo
from services.encode.batcher import BatchLimits, BatchStats
from services.encode.model_files import ModelFilesError, SentenceModelSpec, matryoshka_dimensions
from services.encode.torch_engine import TorchEmbeddingEngine
from shared.engine.args import EngineArgs, EngineSelectionError, model_overrides
from shared.engine.registry import AUTO, engine_kind, package_installed

__all__ = ["CPU_ENGINE", "choose_engine", "create_embedding_engine", "embedding_info"]

CPU_ENGINE = "torch"
_CPU_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")


def _cpu_missing() -> str | None:
    missing = [p for p in _CPU_PACKAGES if not package_installed(p)]
    if not missing:
        return None
    return f"needs {', '.join(missing)}: pip install 'sglmesh[embed]' (torch==2.13.0, CPU)"


def choose_engine(args: EngineArgs) -> tuple[str, str]:
    """(``"sglang"`` or ``"torch"``, why). Raises EngineSelectionError naming ``--engine``."""
    if args.engine == "sim":
        raise EngineSelectionError(
            "--engine sim generates tokens only; an embedding worker runs torch (CPU) or sglang"
        )
    if args.engine in (AUTO, "sglang"):
        sglang = engine_kind("sglang")
        if args.engine == "sglang":
            why = sglang.missing()
            if why is not None:
                raise EngineSelectionError(f"--engine sglang {why}")
            return "sglang", "--engine sglang"
        ok, why = sglang.auto(args, {})
        if ok:
            return "sglang", f"--engine auto: {why}"
    missing = _cpu_missing()
    if missing is not None:
        raise EngineSelectionError(f"--engine {CPU_ENGINE} {missing}")
    return CPU_ENGINE, f"--engine {args.engine}: the CPU sentence-embedding engine"


def create_embedding_engine(
    args: EngineArgs, limits: BatchLimits, *, threads: int, stats: BatchStats | None = None
) -> Any:
    """Build (not start) the engine :func:`choose_engine` picks."""
    kind, _ = choose_engine(args)
    if kind == "sglang":
        return engine_kind("sglang").build(args)
    try:
        spec = SentenceModelSpec.from_dir(
            Path(args.model_path).expanduser(), model_overrides(args.json_model_override_args)
        )
    except ModelFilesError as exc:
        raise EngineSelectionError(f"--model-path: {exc}") from exc
    return TorchEmbeddingEngine(
        spec, served_model_name=args.model_name, limits=limits, threads=threads, stats=stats
    )


def embedding_info(engine: Any) -> EmbeddingInfo:
    """The model's embedding facts, from the running engine."""
    if isinstance(engine, TorchEmbeddingEngine):
        spec = engine.spec
        return EmbeddingInfo(
            dimensions=spec.dimensions,
            max_input_tokens=spec.max_input_tokens,
            pooling=spec.pooling,
            normalized=spec.normalize,
            matryoshka_dimensions=spec.matryoshka_dimensions,
            vocab_size=spec.vocab_size,
        )
    return sglang_embedding_info(engine.tokenizer_manager.model_config, engine.info.context_length)


def sglang_embedding_info(config: Any, context_length: int) -> EmbeddingInfo:
    """From SGLang's ``ModelConfig``: its ``hidden_size``, ``context_len``, ``vocab_size`` and
    the Matryoshka settings it resolved (``is_matryoshka``, ``matryoshka_dimensions``).
    SGLang pools and normalises as the model's own pooler does (``normalize`` on by default)."""
    hf = getattr(config, "hf_config", None)
    overrides = {
        key: getattr(hf, key)
        for key in ("matryoshka_dimensions", "is_matryoshka")
        if getattr(hf, key, None) is not None
    }
    return EmbeddingInfo(
        dimensions=int(config.hidden_size),
        max_input_tokens=int(getattr(config, "context_len", 0) or context_length),
        pooling="model",
        normalized=True,
        matryoshka_dimensions=matryoshka_dimensions(overrides),
        vocab_size=int(config.vocab_size) if getattr(config, "vocab_size", None) else None,
    )
