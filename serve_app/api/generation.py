"""What chat and completions share: an OpenAI body -> ``GenerateRequest`` -> the
engine's delta stream -> SSE chunks or one JSON body.

Errors the client caused are raised as ``APIError`` before anything is streamed, so
they keep their 4xx status; once streaming, a failure is an error event.  The
engine's usage lands in ``ctx.usage`` for the pipeline's account step.

A workflow's name (``serve_app.workflows``) goes the same way: the client's options
are checked against the engine of its final step's model, and its stream is that
step's, with the usage of every step and the trace (``hpcserve``) on its last delta.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from starlette.responses import Response

from serve_app import continuation
from serve_app.api.engine_call import check_available, first_answer
from serve_app.api.pipeline import ClosingStreamingResponse, RequestContext
from serve_app.config import ModelConfig
from serve_app.engines.base import capabilities
from serve_app.errors import APIError, as_engine_error
from serve_app.framing import EXTENSION, ResponseFramer
from serve_app.openai_protocol import IGNORED_FIELDS, Continuation
from serve_app.protocol import GenerateDelta, GenerateRequest, SamplingParams, Usage

# Options with engine-specific support: a 400 naming them where the engine lacks them,
# unless the value asks for nothing (0, false, empty), which every engine honours.
_ENGINE_SPECIFIC = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                    "echo", "suffix", "presence_penalty", "frequency_penalty", "logit_bias")


def _given(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != {} and value != []


def _prompt_tokens(deltas: list[GenerateDelta]) -> int:
    return next((d.usage.prompt_tokens for d in deltas if d.usage is not None), 0)


async def _first(stream: AsyncIterator[list[GenerateDelta]]) -> list[GenerateDelta]:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return []


async def _prepend(first: list[GenerateDelta], rest: AsyncIterator[list[GenerateDelta]]):
    """The stream with its already-awaited first item put back in front (the caller
    closes ``rest``: ``_sse`` does, ``whole_answer`` reads it to its end)."""
    if first:
        yield first
    async for item in rest:
        yield item


def to_generate(kind: str, body, cfg: ModelConfig, request_id: str) -> GenerateRequest:
    """The engine's request for an OpenAI body, or the 400 that names what is wrong."""
    if cfg.task != "generate":
        raise APIError(400, f"The model '{body.model}' serves embeddings (task "
                       f"'{cfg.task}'), not {'chat' if kind == 'chat' else 'completions'}; "
                       f"use POST /v1/embeddings.", param="model", code="unsupported_model")
    allowed = capabilities(cfg.engine).options
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_parameter")
    extras = {}
    for name, value in body.extra_fields().items():
        if name in IGNORED_FIELDS and name not in allowed:
            continue  # harmless for engines without it (e.g. `user`)
        if name not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {name}",
                           param=name, code="unsupported_parameter")
        extras[name] = value
    for name in _ENGINE_SPECIFIC:
        value = getattr(body, name, None)
        if name not in allowed:
            if _given(value):
                raise APIError(400, f"'{name}' is not supported by the {cfg.engine} "
                               f"engine serving '{body.model}'.", param=name,
                               code="unsupported_parameter")
        elif value not in (None, False):
            extras[name] = value
    max_tokens = max_tokens_of(body)
    if cfg.max_model_len and max_tokens and max_tokens >= cfg.max_model_len:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the model's context "
                       f"length {cfg.max_model_len}.", param="max_tokens",
                       code="context_length_exceeded")
    sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, stop=body.stop or [],
                              ignore_eos=bool(body.ignore_eos))
    common = dict(request_id=request_id, model=body.model, sampling=sampling, extras=extras)
    if kind == "chat":
        return GenerateRequest(messages=body.messages, **common)
    return GenerateRequest(prompt=body.prompt_text(), **common)


def _resume(req: GenerateRequest, resumed, streamed: bool) -> tuple[GenerateRequest, bool]:
    """The request continuing a stream another replica began (``serve_app.continuation``):
    its text follows the prompt, and the tokens it counted come off the budget; and
    whether that budget is spent (``_only_the_end``)."""
    if not streamed:
        raise APIError(400, "hpcserve.continuation resumes a stream of a model, not a "
                       "whole response or a workflow.", param="hpcserve.continuation",
                       code="invalid_request")
    budget = req.sampling.max_tokens
    left = None if budget is None else budget - resumed.tokens
    sampling = req.sampling.model_copy(update={
        "max_tokens": None if left is None else max(1, left)})
    return (req.model_copy(update={"continuation": resumed.text, "sampling": sampling}),
            left is not None and left <= 0)


async def _only_the_end(stream: AsyncIterator[list[GenerateDelta]]):
    """A resumed stream whose ``max_tokens`` the client already has (it was cut between
    its last token and the chunk that ends it): the engine is asked for one token, for
    the prompt's count, and none of it is sent; the stream ends ``length``.  If the
    engine refuses (the text appended, the prompt may no longer fit ``max_model_len``)
    or fails, the stream ends all the same: the client has every token."""
    try:
        async with aclosing(stream):
            async for deltas in stream:
                yield [GenerateDelta(usage=d.usage, finish_reason=d.finish_reason and "length")
                       for d in deltas]
                if any(d.finish_reason for d in deltas):
                    return
    except Exception:  # noqa: BLE001 - nothing is left to generate
        # usage: the tokens the client has (``_sse`` counts them); the prompt's unknown
        yield [GenerateDelta(finish_reason="length", usage=Usage(0, 0))]


def max_tokens_of(body) -> int | None:
    return getattr(body, "max_completion_tokens", None) or body.max_tokens


async def serve_generation(server, ctx: RequestContext, kind: str) -> Response:
    body = ctx.body
    workflow = server.workflows.get(body.model)
    cfg = server.models[body.model if workflow is None else workflow.final_model()]
    req = to_generate(kind, body, cfg, ctx.request_id)
    resumed = body.hpcserve.continuation if body.hpcserve is not None else None
    if workflow is not None and body.hpcserve is not None:
        req.extras[EXTENSION] = body.hpcserve.model_dump(exclude={"continuation"})
    spent = False
    if resumed is not None:
        req, spent = _resume(req, resumed, bool(body.stream and workflow is None))
        framer = ResponseFramer(kind, body.model, resumed.id, resumed.created)
    else:
        framer = ResponseFramer(kind, body.model)
    # a workflow's steps wait for their own models (each its cold_start_timeout_s)
    wait_s = cfg.cold_start_timeout_s if workflow is None else None
    check_available(server, body.model)
    if workflow is None:
        stream = server._engine_stream(req)
        stream = _only_the_end(stream) if spent else stream
    else:  # its steps' tokens count even if the request ends before its final step
        stream = server._workflow_stream(req, lambda usage: setattr(ctx, "usage", usage))
    first = await first_answer(server, body.model, _first(stream), wait_s, stream.aclose)
    if body.stream:
        options = body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options.continuous_usage_stats)  # as vLLM
        events = _sse(ctx, framer, first, stream, include_usage, continuous,
                      bool(req.extras.get("logprobs")), resumed,
                      continuation.RELAYED_HEADER in ctx.request.headers)
        return ClosingStreamingResponse(events, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})
    text, finish, usage, entries, extension = await whole_answer(_prepend(first, stream))
    ctx.usage = usage
    logprobs = framer.logprobs(entries) if req.extras.get("logprobs") else None
    return Response(framer.whole(text, finish, usage, logprobs, extension),
                    media_type="application/json")


async def whole_answer(stream: AsyncIterator[list[GenerateDelta]]
                       ) -> tuple[str, str, Usage, list[dict], Any]:
    """(text, finish reason, usage, logprobs entries, workflow extension) of a whole
    engine stream."""
    text, finish, usage, entries, extension = [], "stop", Usage(), [], None
    async for deltas in stream:
        for delta in deltas:
            text.append(delta.text)
            if delta.extras:
                entries += delta.extras.get("logprobs") or ()
            if delta.finish_reason:
                finish, usage = delta.finish_reason, delta.usage or usage
                extension = delta.extras.get(EXTENSION)
    return "".join(text), finish, usage, entries, extension


async def _sse(ctx: RequestContext, framer: ResponseFramer, first: list[GenerateDelta],
               rest: AsyncIterator[list[GenerateDelta]], include_usage: bool,
               continuous: bool, with_logprobs: bool, resumed: Continuation | None = None,
               relayed: bool = False):
    """The event stream; with ``continuous`` (vLLM's ``continuous_usage_stats``)
    every chunk carries the usage so far: the prompt's tokens (engines report them
    with their first delta) and the completion tokens sent until then.  When the
    stream ends, however it ends, the usage so far goes to ``ctx`` (a stream cut
    short is still accounted) -- once, not per chunk.  A ``resumed`` stream (what
    the client already has) opens with no role chunk, and its usage counts those
    tokens as completion, as the client saw them.  For the failover relay
    (``relayed``) every text chunk carries the completion tokens so far as an SSE
    comment, which the relay takes out; and an engine lost mid-stream is the
    relay's to resume, so the replica that finishes the stream accounts all of it."""
    prompt, completion = _prompt_tokens(first), resumed.tokens if resumed else 0
    ctx.usage = Usage(prompt, completion)
    finish, usage, extension = "stop", None, None
    offset = len(resumed.text) if resumed else 0
    try:
        async with aclosing(rest):  # the engine stream closes even if the client left
            if resumed is None:  # (and during this)
                yield framer.first_chunk(Usage(prompt, 0) if continuous else None)
            async for deltas in _prepend(first, rest):
                text = "".join(d.text for d in deltas)
                completion += sum(d.num_tokens for d in deltas)
                prompt = _prompt_tokens(deltas) or prompt
                so_far = Usage(prompt, completion) if continuous else None
                if with_logprobs:
                    entries = [e for d in deltas for e in d.extras.get("logprobs") or ()]
                    if text or entries:
                        chunk = framer.chunk_with_logprobs(text, framer.logprobs(entries, offset),
                                                           so_far)
                        yield continuation.with_count(chunk, completion) if relayed else chunk
                    offset += len(text)
                elif text:
                    chunk = framer.text_chunk(text, so_far)
                    yield continuation.with_count(chunk, completion) if relayed else chunk
                last = deltas[-1] if deltas else None
                if last is not None and last.finish_reason:
                    finish, usage = last.finish_reason, last.usage or so_far
                    if resumed is not None and usage is not None:
                        usage = Usage(usage.prompt_tokens, completion)
                    extension = last.extras.get(EXTENSION)
    except Exception as exc:  # mid-stream: the status is already sent
        err = as_engine_error(exc)
        api = exc if isinstance(exc, APIError) else APIError.from_engine(err) if err else \
            APIError(503, f"The engine failed mid-stream: {type(exc).__name__}",
                     type_="server_error", code="engine_unavailable")
        ctx.status = api.status
        if relayed and api.code == "engine_unavailable":
            ctx.state[continuation.HANDED_OVER] = True
        yield framer.error_event(api.body())
        return
    finally:
        ctx.usage = usage or Usage(prompt, completion)
    yield framer.final_chunks(finish, usage, include_usage, continuous, extension)
