"""Merging a generate stream's token chunks that wait for the same response frame.

Why: a worker writes to a caller at most once per ``--response-flush-interval``, so an engine
that steps faster than that leaves several chunks of one stream waiting for one frame, each a
few token ids. Sent as they are, every one costs an encode here and a decode, a detokenizer
step and a Python pass in the processor. Merged, they cost that once, and the processor reads
what SGLang hands a reader that fell behind: the increments concatenated, the newest's
finish, stop reason and usage.

Only plain token chunks merge: a chunk that ends its choice, carries text, prefill bootstrap
data, engine data or usage, or whose logprobs the next one lacks (or has where it lacks
them), keeps its place, so the processor sees the same tokens, finishes and metadata.
"""

from __future__ import annotations

from typing import Any

from proto.response import EngineOutput

__all__ = ["coalesce_outputs"]


def _open(chunk: Any) -> bool:
    """A chunk later tokens may join: an unfinished plain token chunk."""
    return (
        type(chunk) is EngineOutput
        and chunk.finish_reason is None
        and chunk.text is None
        and chunk.stop_reason is None
        and chunk.completion_usage is None
        and chunk.disaggregated_params is None
        and chunk.engine_data is None
    )


def _owned(chunk: EngineOutput) -> EngineOutput:
    """A copy of an open chunk whose lists this module may extend."""
    return EngineOutput(
        token_ids=list(chunk.token_ids),
        index=chunk.index,
        log_probs=None if chunk.log_probs is None else list(chunk.log_probs),
        top_logprobs=None if chunk.top_logprobs is None else list(chunk.top_logprobs),
        cum_log_probs=chunk.cum_log_probs,
    )


def coalesce_outputs(chunks: list[Any]) -> list[Any]:
    """``chunks`` with each run of mergeable ``EngineOutput`` chunks as one (a new chunk:
    the handler's are not changed); anything else passes through in its place."""
    out: list[Any] = []
    head: EngineOutput | None = None  # the last chunk of ``out`` while later ones may join it
    owned = False  # whether ``head`` is this module's copy
    for chunk in chunks:
        if (
            head is not None
            and type(chunk) is EngineOutput
            and chunk.index == head.index
            and chunk.text is None
            and chunk.disaggregated_params is None
            and (chunk.log_probs is None) is (head.log_probs is None)
            and (chunk.top_logprobs is None) is (head.top_logprobs is None)
        ):
            if not owned:
                head = out[-1] = _owned(head)
                owned = True
            head.token_ids += chunk.token_ids
            if chunk.log_probs is not None:
                head.log_probs += chunk.log_probs  # type: ignore[operator]
            if chunk.top_logprobs is not None:
                head.top_logprobs += chunk.top_logprobs  # type: ignore[operator]
            head.cum_log_probs = chunk.cum_log_probs
            if not _open(chunk):  # it ends the run: its finish, stop reason, usage, data
                head.finish_reason = chunk.finish_reason
                head.stop_reason = chunk.stop_reason
                head.completion_usage = chunk.completion_usage
                head.engine_data = chunk.engine_data
                head = None
            continue
        out.append(chunk)
        head = chunk if _open(chunk) else None
        owned = False
    return out
