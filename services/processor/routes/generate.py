"""``/v1/chat/completions`` and ``/v1/completions``: decode, preprocess, admit, fan out to the
workers and hand the output to a writer (``services/processor/writers.py``).

``n > 1`` is served as ``n`` single-choice engine requests (:func:`fan_out`), merged back as
they come (:func:`merge`). A streaming request reads its first batch of output before the
response starts, so errors before any token still get their real HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from aiohttp import web

from proto.multimodal import Tensor
from proto.openai import ChatCompletionRequest, CompletionRequest
from proto.request import PreprocessedRequest
from proto.response import EngineOutput
from services.processor import metrics
from services.processor.chat_output import ChatParsing, chat_tools
from services.processor.context import RequestContext, Serving
from services.processor.failures import Failure
from services.processor.fields import decode_openai
from services.processor.images import image_parts
from services.processor.models import ServedModel
from services.processor.respond import OutputAssembler
from services.processor.writers import Generation, Outputs, write_stream, write_unary
from shared.router import BusyError

__all__ = ["chat", "completion", "fan_out", "merge"]

log = logging.getLogger(__name__)

# Prompt tokens read back to tell whether the chat template left a thinking block open.
_PROMPT_TAIL = 16


async def chat(s: Serving, ctx: RequestContext) -> web.StreamResponse:
    req, ignored = await s.prepare(ctx, decode_openai, ctx.body, ChatCompletionRequest)
    report_ignored(ignored, ctx.tracker.endpoint)
    model = s.model(req.model, ctx.tracker)
    pre = model.preprocessor
    assert pre is not None
    parsing = chat_tools(req, pre.card, pre.special_tokens)
    parts = image_parts(req)
    images: list[tuple[str, Tensor]] = []
    if parts:
        s.images.check(model, parts)
        images = [(e.hash, e.embedding) for e in await s.images.encode_all(parts)]
    if images or ctx.large:
        preq = await s.prepare(ctx, pre.preprocess_chat, req, parsing.guide, images)
    else:
        # Only the tokenizer leaves the loop (see ``offload.py``).
        prompt = pre.chat_prompt(req)
        token_ids = await s.offload.tokenize(pre.encode, prompt, False)
        preq = pre.chat_request(req, token_ids, parsing.guide)
    if parsing.reasoning is not None:
        tail = pre.tokenizer.decode(preq.token_ids[-_PROMPT_TAIL:], skip_special_tokens=False)
        parsing = parsing.after_prompt(tail)
    return await _generate(
        s, ctx, model, req, [preq], chat=True, logprobs=req.logprobs, parsing=parsing
    )


async def completion(s: Serving, ctx: RequestContext) -> web.StreamResponse:
    req, ignored = await s.prepare(ctx, decode_openai, ctx.body, CompletionRequest)
    report_ignored(ignored, ctx.tracker.endpoint)
    model = s.model(req.model, ctx.tracker)
    pre = model.preprocessor
    assert pre is not None
    s.admission.check_cost(len(req.prompts()) * (req.n or 1))
    if ctx.large:
        preqs = await s.prepare(ctx, pre.preprocess_completion, req)
    else:
        texts = pre.completion_texts(req)
        encoded = await s.offload.tokenize(pre.encode_all, texts) if texts else []
        preqs = pre.preprocess_completion(req, encoded)
    echo = None
    if req.echo:
        n = req.n or 1
        texts = [
            p if isinstance(p, str) else pre.tokenizer.decode(p, req.skip_special_tokens)
            for p in req.prompts()
        ]
        echo = [text for text in texts for _ in range(n)]
    return await _generate(
        s, ctx, model, req, preqs, chat=False, logprobs=req.logprobs is not None, echo=echo
    )


async def _generate(
    s: Serving,
    ctx: RequestContext,
    model: ServedModel,
    req: ChatCompletionRequest | CompletionRequest,
    preqs: list[PreprocessedRequest],
    *,
    chat: bool,
    logprobs: bool,
    echo: list[str] | None = None,
    parsing: ChatParsing | None = None,
) -> web.StreamResponse:
    pre = model.preprocessor
    assert pre is not None
    tracker = ctx.tracker
    retry_after = s.flags.retry_after
    try:
        s.dispatcher.check_capacity(model)
    except BusyError as exc:
        metrics.rejected.labels("busy").inc()
        raise Failure(503, str(exc), retry_after=retry_after) from None
    n = req.n or 1
    with s.admission.admitted(len(preqs) * n):
        streams = fan_out(preqs, n)
        tracker.prompt_tokens = sum(len(p.token_ids) for p in preqs)
        assembler = OutputAssembler(
            pre,
            [p.token_ids for p in streams],
            prompt_tokens=tracker.prompt_tokens,
            stop=req.stop_list(),
            logprobs=logprobs,
            keep_text=not req.stream,
            cache_owners=range(0, len(streams), n),
            skip_special_tokens=req.skip_special_tokens
            and not (parsing is not None and parsing.keep_special_tokens),
            include_stop=req.keep_stop(),
            echo=echo,
            parsing=parsing,
        )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        run = s.dispatcher.run
        outputs = (
            run(model, streams[0])
            if len(streams) == 1
            else merge([run(model, p, i) for i, p in enumerate(streams)])
        )
        async with contextlib.aclosing(outputs):
            # Errors before the first output propagate to the caller: a real HTTP status.
            first = await anext(outputs, None)
            gen = Generation(
                rid=rid,
                created=created,
                model=req.model,
                chat=chat,
                logprobs=logprobs,
                include_usage=req.include_usage(),
                assembler=assembler,
                tracker=tracker,
                outputs=outputs,
                first=first,
                retry_after=retry_after,
            )
            if not req.stream:
                return await write_unary(gen)
            return await write_stream(ctx.request, gen)


_IGNORED_LABELS: set[str] = set()
_MAX_IGNORED_LABELS = 64  # client-chosen names: bound the metric's label values


def report_ignored(fields: list[str], endpoint: str) -> None:
    """One warning per request naming the fields ignored, and the counter per field."""
    if not fields:
        return
    log.warning(
        "ignoring request fields no standard defines: %s",
        ", ".join(repr(f[:64]) for f in fields[:16]) + (" ..." if len(fields) > 16 else ""),
        extra={"endpoint": endpoint},
    )
    for field in fields:
        name = field[:64]
        if name not in _IGNORED_LABELS:
            if len(_IGNORED_LABELS) >= _MAX_IGNORED_LABELS:
                name = "other"
            else:
                _IGNORED_LABELS.add(name)
        metrics.ignored_fields.labels(name).inc()


def fan_out(preqs: list[PreprocessedRequest], n: int) -> list[PreprocessedRequest]:
    """One single-choice request per choice: ``n > 1`` then works on every engine and every
    topology (disaggregated too), and each choice migrates on its own. A given seed becomes
    ``seed + i`` so the choices differ but stay reproducible."""
    if n == 1:
        return preqs
    out = []
    for preq in preqs:
        opts = preq.sampling_options
        for i in range(n):
            seed = (
                opts.seed
                if opts.seed is None or i == 0
                else (opts.seed + i + 2**63) % 2**64 - 2**63
            )
            out.append(
                msgspec.structs.replace(
                    preq, sampling_options=msgspec.structs.replace(opts, n=None, seed=seed)
                )
            )
    return out


async def merge(streams: list[Outputs]) -> Outputs:
    """The tagged batches of several streams, as they come."""
    queue: asyncio.Queue[tuple[int, list[EngineOutput] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: Outputs) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
