"""What a sentence-embedding model directory says about itself (the sentence-transformers layout).

Why read these files and not hard-code MiniLM: the pooling, the normalisation and the input
limit are part of the model, written by its authors next to the weights --
``modules.json`` (which modules run, in order: Transformer, Pooling, optionally Normalize),
``1_Pooling/config.json`` (the pooling mode), ``sentence_bert_config.json`` (``max_seq_length``,
the longest input the model was meant to see) -- and ``config.json`` holds the encoder's own
shape. Reading them is what makes our vectors equal sentence-transformers' own for any model in
this layout, not just the default one.

Matryoshka truncation (a request's ``dimensions``) is allowed only when the model says it was
trained for it, as SGLang decides: ``matryoshka_dimensions`` (the sizes allowed) or
``is_matryoshka: true`` (any size) in ``config.json``, or in SGLang's
``--json-model-override-args``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["POOLING_MODES", "ModelFilesError", "SentenceModelSpec", "matryoshka_dimensions"]

# sentence-transformers' Pooling config keys, by the mode name the mesh reports.
POOLING_MODES = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING = "sentence_transformers.models.Pooling"


class ModelFilesError(ValueError):
    """The directory is not a sentence-embedding model this engine can run."""


def _read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelFilesError(f"{path} is missing") from None
        return {}
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} is not a JSON object")
    return data


def _modules(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {path / 'modules.json'}: {exc}") from exc
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


@dataclass(frozen=True, slots=True)
class SentenceModelSpec:
    """The model's pooling, normalisation, limits and shape."""

    path: Path
    pooling: str
    normalize: bool
    max_input_tokens: int
    dimensions: int
    vocab_size: int
    matryoshka_dimensions: list[int] | None

    @classmethod
    def from_dir(cls, path: Path, overrides: dict[str, Any] | None = None) -> SentenceModelSpec:
        """Read ``path``; ``overrides`` patch ``config.json`` (SGLang's
        ``--json-model-override-args``). Raises ModelFilesError naming the file at fault."""
        config = {**_read_json(path / "config.json", required=True), **(overrides or {})}
        modules = _modules(path)
        pooling_dir = next(
            (m.get("path", "") for m in modules if m.get("type") == _POOLING), "1_Pooling"
        )
        pooling_cfg = _read_json(path / str(pooling_dir) / "config.json")
        modes = [name for name, key in POOLING_MODES.items() if pooling_cfg.get(key)]
        if len(modes) > 1:
            raise ModelFilesError(
                f"{path / str(pooling_dir) / 'config.json'} asks for several poolings {modes}; "
                "only one is supported"
            )
        pooling = modes[0] if modes else "mean"  # sentence-transformers' own default
        # Without modules.json the layout is a bare encoder: sentence-transformers then adds
        # mean pooling and no normalisation, and so do we.
        normalize = any(m.get("type") == _NORMALIZE for m in modules)
        hidden = config.get("hidden_size")
        if not isinstance(hidden, int) or hidden < 1:
            raise ModelFilesError(f"{path / 'config.json'} has no hidden_size")
        dims = pooling_cfg.get("word_embedding_dimension", hidden)
        vocab = config.get("vocab_size")
        if not isinstance(vocab, int) or vocab < 1:
            raise ModelFilesError(f"{path / 'config.json'} has no vocab_size")
        positions = config.get("max_position_embeddings")
        limit = _read_json(path / "sentence_bert_config.json").get("max_seq_length") or positions
        if not isinstance(limit, int) or limit < 1:
            raise ModelFilesError(
                f"{path} states no input limit (sentence_bert_config.json max_seq_length or "
                "config.json max_position_embeddings)"
            )
        if isinstance(positions, int) and positions > 0:
            limit = min(limit, positions)
        return cls(
            path=path,
            pooling=pooling,
            normalize=normalize,
            max_input_tokens=limit,
            dimensions=int(dims),
            vocab_size=vocab,
            matryoshka_dimensions=matryoshka_dimensions(config),
        )


def matryoshka_dimensions(config: dict[str, Any]) -> list[int] | None:
    """SGLang's rule: the listed sizes, [] (any size) for ``is_matryoshka``, else None."""
    listed = config.get("matryoshka_dimensions")
    if isinstance(listed, list) and listed:
        return sorted({int(d) for d in listed if isinstance(d, int) and d > 0})
    if config.get("is_matryoshka") is True:
        return []
    return None
