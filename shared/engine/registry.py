"""Engine kinds: which engines a worker can run, how each is built, how ``--engine auto`` picks.

Why a registry: the set of engines is open (SGLang on GPUs, the torch CPU engine, the
simulator; more to come), and everything that depends on the kind -- the ``--engine`` choices
and help, the auto choice, building the engine, where its ``sglang:*`` metrics come from,
whether ``--model-path`` may be a hub id -- is one row here instead of lists and if-chains
spread over modules.

``--engine auto`` takes the first kind, in registration order, that says it fits this machine
and command line: SGLang when it is installed and a GPU is visible; else the torch engine when
torch and transformers are installed and the model directory has weights; else the simulator.
One log line says which and why, so nobody wonders why a laptop serves simulated tokens.
Nothing heavy is imported to decide (no torch, no sglang): packages are looked up, not loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from shared.registry import NamedRegistry

if TYPE_CHECKING:
    from shared.engine.args import EngineArgs
    from shared.engine.protocol import Engine

__all__ = [
    "AUTO",
    "ENGINES",
    "EngineKind",
    "EngineSelectionError",
    "create_engine",
    "engine_kind",
    "engine_names",
    "gpu_visible",
    "has_weights",
    "package_installed",
    "register",
    "resolve",
]

log = logging.getLogger(__name__)

AUTO = "auto"


class EngineSelectionError(ValueError):
    """``--engine`` asked for something this machine cannot run."""


@dataclass(frozen=True, slots=True)
class EngineKind:
    """One engine a worker can run (see the module docstring)."""

    name: str
    help: str  # what it is for, in ``--help``
    # Why ``--engine NAME`` cannot run here (a package to install), or None.
    missing: Callable[[], str | None]
    # Does ``--engine auto`` take this kind here, and why (for the log line).
    auto: Callable[[EngineArgs, Mapping[str, str]], tuple[bool, str]]
    build: Callable[[EngineArgs], Engine]
    # Where the worker's ``sglang:*`` metrics come from: the engine itself (SGLang writes them
    # into PROMETHEUS_MULTIPROC_DIR) or the worker, reading a CPU engine's schedulers.
    metrics: Literal["engine", "scheduler"]
    # ``--model-path`` may name a hub repository (the engine downloads it).
    hub_ids: bool = False
    # The engine holds EOS back until ``min_new_tokens`` without a tokenizer of its own (it
    # knows its eos ids); SGLang started with ``--skip-tokenizer-init`` does not, and then the
    # worker asks for ``ignore_eos`` and the processor enforces the floor.
    min_tokens_without_tokenizer: bool = True


ENGINES: NamedRegistry[EngineKind] = NamedRegistry(
    "engine", error=EngineSelectionError, reserved=(AUTO,)
)


def register(kind: EngineKind) -> None:
    """Add an engine kind; a later registration of the same name replaces the earlier."""
    ENGINES.register(kind)


def engine_names() -> tuple[str, ...]:
    """Registered kinds in ``--engine auto``'s order of preference."""
    return ENGINES.names()


def engine_kind(name: str) -> EngineKind:
    return ENGINES.get(name)


def resolve(args: EngineArgs, env: Mapping[str, str] | None = None) -> tuple[EngineKind, str]:
    """The kind ``args.engine`` names (or ``auto`` picks), and why, for one log line."""
    environ = os.environ if env is None else env
    if args.engine != AUTO:
        kind = engine_kind(args.engine)
        why = kind.missing()
        if why is not None:
            raise EngineSelectionError(f"--engine {kind.name} {why}")
        return kind, f"--engine {kind.name}"
    passed: list[str] = []
    for kind in ENGINES:
        ok, why = kind.auto(args, environ)
        if ok:
            return kind, f"--engine auto: {why}" + (f" ({'; '.join(passed)})" if passed else "")
        passed.append(f"not {kind.name}: {why}")
    raise EngineSelectionError("--engine auto found no engine that can run here")


def create_engine(args: EngineArgs, env: Mapping[str, str] | None = None) -> Engine:
    """Build (not start) the engine ``args`` ask for. Raises EngineSelectionError."""
    kind, reason = resolve(args, env)
    log.info("engine selected", extra={"engine": kind.name, "reason": reason})
    if kind.name == "sim" and args.engine == AUTO and args.model_path:
        log.warning(
            "serving SIMULATED tokens (not a model's answers): %s. Run `sglmesh model "
            "prepare` for the default model's weights, or pass --engine sim to silence this",
            reason,
        )
    return kind.build(args)


# --------------------------------------------------------------------------------------------
# What the built-in kinds look for (looked up, never imported)


def package_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_visible(env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Is a GPU visible to this process? Decided without importing torch (seconds, and it is
    absent from CPU installs): the CUDA/ROCm device nodes, then ``nvidia-smi``."""
    environ = os.environ if env is None else env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    nodes = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    if nodes:
        return True, f"GPU device nodes found ({', '.join('/dev/' + n for n in nodes)})"
    if Path("/dev/kfd").exists():
        return True, "ROCm device node /dev/kfd found"
    if shutil.which("nvidia-smi") and not Path("/dev").exists():
        # No /dev to look at (unusual sandboxes): the driver tool is the only evidence left.
        return True, "nvidia-smi is on PATH"
    return False, "no GPU device node (/dev/nvidia*, /dev/kfd)"


def has_weights(model_path: str) -> bool:
    """A local model directory with safetensors weights."""
    path = Path(os.path.expanduser(model_path)) if model_path else None
    return path is not None and path.is_dir() and any(path.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# The built-in kinds, in auto's order


def _sglang_missing() -> str | None:
    if package_installed("sglang"):
        return None
    return "needs the sglang package (pip install sglang) and a GPU; on a CPU use --engine torch"


def _sglang_auto(args: EngineArgs, env: Mapping[str, str]) -> tuple[bool, str]:
    if not package_installed("sglang"):
        return False, "sglang is not installed"
    has_gpu, why = gpu_visible(env)
    if not has_gpu:
        return False, f"sglang is installed but {why}"
    return True, f"sglang is installed and {why}"


def _build_sglang(args: EngineArgs) -> Engine:
    from shared.engine.sglang_engine import SglangEngine

    return SglangEngine(args)


def _torch_missing() -> str | None:
    missing = [p for p in ("torch", "transformers", "safetensors") if not package_installed(p)]
    if not missing:
        return None
    return f"needs {', '.join(missing)}: pip install 'sglmesh[cpu]' (torch==2.13.0, the CPU build)"


def _torch_auto(args: EngineArgs, env: Mapping[str, str]) -> tuple[bool, str]:
    why = _torch_missing()
    if why is not None:
        return False, why.split(":")[0]
    if args.is_embedding:
        return False, "the torch engine serves LLMs, not embeddings"
    if not has_weights(args.model_path):
        return False, f"{args.model_path!r} has no *.safetensors weights"
    return True, "torch is installed and the model has weights"


def _build_torch(args: EngineArgs) -> Engine:
    from shared.engine.pytorch.engine import TorchEngine, torch_config

    _refuse_embedding(args, "torch")
    if args.enable_multimodal:
        raise EngineSelectionError(
            "--enable-multimodal: the torch engine serves text-only models and refuses images; "
            "run the LLM workers on --engine sim (or sglang with a vision-language model)"
        )
    return TorchEngine(torch_config(args))


def _build_sim(args: EngineArgs) -> Engine:
    from shared.engine.sim.engine import SimEngine, sim_config

    _refuse_embedding(args, "simulated")
    return SimEngine(sim_config(args))


def _refuse_embedding(args: EngineArgs, what: str) -> None:
    if args.is_embedding:
        raise ValueError(
            f"the {what} engine generates tokens only; embeddings need the encode service"
        )


register(
    EngineKind(
        name="sglang",
        help="SGLang (sgl.Engine) on GPUs: production serving",
        missing=_sglang_missing,
        auto=_sglang_auto,
        build=_build_sglang,
        metrics="engine",
        hub_ids=True,
        min_tokens_without_tokenizer=False,
    )
)
register(
    EngineKind(
        name="torch",
        help="the model's real forward pass on CPU (transformers' model code over the mesh's "
        "paged KV pool): real answers on a laptop or in CI",
        missing=_torch_missing,
        auto=_torch_auto,
        build=_build_torch,
        metrics="scheduler",
    )
)
register(
    EngineKind(
        name="sim",
        help="the simulator: a GPU's timing and deterministic tokens, no model; for scale "
        "tests and benchmarks of the mesh",
        missing=lambda: None,
        auto=lambda args, env: (True, "no real engine can run here"),
        build=_build_sim,
        metrics="scheduler",
    )
)
