"""Loading a causal LM for the torch engine: transformers' model code, our attention, real weights.

Why transformers' model definitions rather than layers written here: every architecture it
defines through the attention interface comes along, and its numerics are the reference the
parity tests compare against. The model is built with ``attn_implementation`` set to the
paged attention (``attention.py``) and its weights are read from the directory's safetensors
(``local_files_only``: no hub at run time).

Only architectures whose attention is verified to run over the pages are accepted; anything
else is refused with one line naming the architecture and what is supported, before a byte of
weights is read. Missing weights are the same kind of one-line error, pointing at
``sglmesh model prepare``.

``dtype`` ``float32`` is the default (the parity tests' reference); ``bfloat16`` halves the
weights' and the KV pool's memory and uses the CPU's bf16 units where it has them: its linear
layers (the LM head included) run on oneDNN with weights packed once at load, which is what
makes bf16 pay at small batches (``bench/torch_engine.py``); in float32 MKL's plain matmul is
as fast or faster, so nothing is packed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.engine.pytorch import attention

__all__ = ["DTYPES", "LoadedModel", "ModelLoadError", "load_model"]

log = logging.getLogger(__name__)

# The architectures whose transformers code runs over the paged attention as-is (checked by
# the parity tests): decoder-only, full causal attention, rotary positions from position_ids.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot run on the torch engine; the message is one line saying why."""


class PackedLinear(torch.nn.Module):
    """A linear layer on oneDNN with its weight packed for it (bfloat16)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return out


def _pack_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` by a :class:`PackedLinear`; how many were replaced."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)


def _can_pack(dtype: torch.dtype) -> bool:
    return (
        dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@dataclass(slots=True)
class LoadedModel:
    """A model ready for :class:`~shared.engine.pytorch.runner.TorchRunner`."""

    body: torch.nn.Module  # token ids -> final hidden states (``model.model`` for Llama)
    lm_head: torch.nn.Module  # hidden states -> logits
    config: Any
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def _check_directory(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object")
    archs = config.get("architectures") or []
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"the torch engine cannot run {', '.join(archs) or 'an unnamed architecture'} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); serve it with --engine sglang "
            "on a GPU"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} has no *.safetensors weights: run `sglmesh model prepare` for the default "
            "model, or point --model-path at a Hugging Face directory with safetensors"
        )


_loaded: dict[tuple[str, str], LoadedModel] = {}
_loading = threading.Lock()


def load_model(model_path: str, *, dtype: str = "float32") -> LoadedModel:
    """Build the model of ``model_path`` over the paged attention, weights loaded, eval mode.

    Read-only after loading, so engines of one process share it (tests start many; a worker
    starts one): a second call for the same directory and dtype returns the same model.
    Raises :class:`ModelLoadError` with one line for anything a user can fix.
    """
    key = (os.path.realpath(os.path.expanduser(model_path)), dtype)
    with _loading:
        model = _loaded.get(key)
        if model is None:
            model = _loaded[key] = _load(model_path, dtype)
        return model


def _load(model_path: str, dtype: str) -> LoadedModel:
    if dtype not in DTYPES:
        raise ModelLoadError(f"the torch engine runs {', '.join(DTYPES)}, not {dtype!r} (--dtype)")
    path = Path(os.path.expanduser(model_path))
    if not path.is_dir():
        raise ModelLoadError(f"--model-path {model_path!r} is not a local model directory")
    _check_directory(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    attention.register()
    torch_dtype = DTYPES[dtype]
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype,
            attn_implementation=attention.ATTENTION_NAME,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"the model in {path} failed to load: {first}") from None
    model.eval()
    model.requires_grad_(False)
    config = model.config
    if model.get_output_embeddings() is None:
        raise ModelLoadError(f"the model in {path} has no output embeddings (not a causal LM)")
    if _can_pack(torch_dtype):
        packed = _pack_linears(model)
        log.info("packed %d linear layers for oneDNN (%s)", packed, dtype)
    body = getattr(model, model.base_model_prefix)
    lm_head = model.get_output_embeddings()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return LoadedModel(
        body=body,
        lm_head=lm_head,
        config=config,
        dtype=torch_dtype,
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(text.vocab_size),
    )
