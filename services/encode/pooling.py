"""Pooling token states into one vector per input, as sentence-transformers' ``Pooling`` does.

Padding positions never count: every mode reads the attention mask. The formulas are the
model card's (mean: masked sum over the number of real tokens, clamped at 1e-9) so the vectors
match sentence-transformers' to float precision, however the batch was padded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["POOLERS", "normalize", "pool"]


def _mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    summed = (states * weights).sum(dim=1)
    return summed / torch.clamp(weights.sum(dim=1), min=1e-9)


def _mean_sqrt_len(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    summed = (states * weights).sum(dim=1)
    return summed / torch.sqrt(torch.clamp(weights.sum(dim=1), min=1e-9))


def _cls(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return states[:, 0]


def _max(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    filled = states.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(states.dtype).min)
    return filled.max(dim=1).values


def _last_token(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Right padding: the last real token sits at (number of real tokens - 1).
    last = mask.sum(dim=1).long() - 1
    return states[torch.arange(states.shape[0]), last.clamp(min=0)]


POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": _mean,
    "mean_sqrt_len": _mean_sqrt_len,
    "cls": _cls,
    "max": _max,
    "lasttoken": _last_token,
}


def pool(mode: str, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``states`` [batch, tokens, hidden] and ``mask`` [batch, tokens] -> [batch, hidden]."""
    try:
        pooler = POOLERS[mode]
    except KeyError:
        raise ValueError(f"unknown pooling {mode!r}; choose from {', '.join(POOLERS)}") from None
    return pooler(states, mask)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm per row (``torch.nn.functional.normalize``, as the Normalize module)."""
    return torch.nn.functional.normalize(vectors, p=2, dim=1)
