"""Sampling on real logits: SGLang's sampling parameters, batched over a step's rows.

Order, as SGLang's sampler applies it: ``logit_bias``; penalties (repetition over prompt and
output, frequency and presence over the output, as vLLM and SGLang define them); stop tokens
masked while fewer than ``min_new_tokens`` tokens exist; then greedy rows take the argmax, and
sampled rows divide by ``temperature``, keep ``top_k``, then ``top_p``, then ``min_p``, and
draw. Logprobs are those of the distribution the token was drawn from before truncation
(after temperature, as SGLang reports them; raw for greedy rows).

Draws are stateless: row ``r``'s uniform number is a hash of (its seed, the absolute position
of the token being generated), and the token is where it falls in the cumulative distribution.
So a request's sampled stream does not depend on which other requests shared its batches, on
retraction, on prefill/decode disaggregation (the prefill draws position ``n``, the decode
``n + 1`` ...) or on migration (a migrated request continues at the same absolute positions):
with a fixed seed, every topology produces the same text. Greedy ties resolve to the lowest
token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.engine.cpu.request import SamplingParams, TokenLogprob

__all__ = ["SampleRow", "sample"]

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SampleRow:
    """One row of a step's logits: whose it is and what decides its token."""

    params: SamplingParams
    position: int  # absolute position of the token being sampled
    prompt: list[int]  # needed by the repetition penalty only
    output: list[int]  # needed by the penalties only
    logprobs: int  # -1: none; 0: the chosen token's; k > 0: and the top k
    generated: int = -1  # output tokens so far (-1: len(output))


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on ``(seed, position)``."""
    return (_mix(_mix(seed) ^ position) >> 11) * (1.0 / (1 << 53))


def _penalize(logits: torch.Tensor, row: SampleRow) -> None:
    p = row.params
    vocab = logits.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.output)), dtype=torch.long)
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(
            picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
        )
    if row.output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(row.output, dtype=torch.long), minlength=vocab)
        counts = counts[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _truncate(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top_k, top_p and min_p applied to one row's probabilities (renormalised by the draw)."""
    if params.top_k > 0 and params.top_k < probs.shape[0]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, 0)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cumulative - sorted_probs) >= params.top_p * cumulative[-1]
        sorted_probs = torch.where(drop, 0.0, sorted_probs)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs


def _draw(probs: torch.Tensor, u: float) -> int:
    cumulative = torch.cumsum(probs, 0)
    target = torch.tensor([u * float(cumulative[-1])], dtype=cumulative.dtype)
    index = int(torch.searchsorted(cumulative, target, right=True)[0])
    index = min(index, probs.shape[0] - 1)
    # Never a zero-probability token (a u landing exactly on a boundary).
    while probs[index] <= 0 and index > 0:
        index -= 1
    return index


def sample(
    logits: torch.Tensor, rows: list[SampleRow]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of ``logits`` (``[rows, vocab]``), with logprobs where asked."""
    logits = logits.float()
    for i, row in enumerate(rows):
        p = row.params
        line = logits[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            line.index_add_(0, ids, torch.tensor(list(p.logit_bias.values())))
        if p.penalized:
            _penalize(line, row)
        generated = row.generated if row.generated >= 0 else len(row.output)
        if generated < p.min_new_tokens and p.stop_token_ids:
            stop = torch.tensor(sorted(p.stop_token_ids), dtype=torch.long)
            line[stop[stop < line.shape[0]]] = float("-inf")
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    tokens = [0] * len(rows)
    if greedy:
        picked = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = token
    scaled = logits
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        temperatures = torch.tensor(
            [[rows[i].params.temperature] if i in sampled else [1.0] for i in range(len(rows))]
        )
        scaled = logits / temperatures
        probs = torch.softmax(scaled[sampled], dim=-1)
        for k, i in enumerate(sampled):
            row = rows[i]
            kept = _truncate(probs[k], row.params)
            tokens[i] = _draw(kept, uniform(row.params.seed, row.position))
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    asked = [i for i, row in enumerate(rows) if row.logprobs >= 0]
    if asked:
        lp = torch.log_softmax(scaled[asked], dim=-1)
        for k, i in enumerate(asked):
            chosen = float(lp[k, tokens[i]])
            top = None
            if rows[i].logprobs > 0:
                values, ids = torch.topk(lp[k], rows[i].logprobs)
                top = list(zip(values.tolist(), ids.tolist(), strict=True))
            logprobs[i] = (chosen, top)
    return tokens, logprobs
