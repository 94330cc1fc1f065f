"""The event stream a replica sends, plain and for the failover relay (``_sse``)."""

from __future__ import annotations

import asyncio

import orjson
from starlette.requests import Request

from serve_app import continuation
from serve_app.api.endpoint import Endpoint
from serve_app.api.generation import _sse
from serve_app.api.pipeline import RequestContext
from serve_app.framing import ResponseFramer
from serve_app.openai_protocol import Continuation
from serve_app.protocol import GenerateDelta, Usage


def _ctx() -> RequestContext:
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    return RequestContext(request, Endpoint("t", "/", "POST", handle=None))


async def _engine(fail: bool = False):
    yield [GenerateDelta("Hel", 2, usage=Usage(7, 0))]
    if fail:
        raise RuntimeError("engine process died")
    yield [GenerateDelta("lo", 1), GenerateDelta("", 0, "length", Usage(7, 3))]


def _run(resumed=None, relayed=False, fail=False) -> tuple[bytes, RequestContext]:
    """The stream's bytes for the engine output above, and the request's context."""
    ctx = _ctx()
    framer = ResponseFramer("chat", "m", *((resumed.id, resumed.created) if resumed else ()))

    async def run():
        rest = _engine(fail)
        first = await anext(rest)
        stream = _sse(ctx, framer, first, rest, True, False, False, resumed, relayed)
        return b"".join([chunk async for chunk in stream])
    return asyncio.run(run()), ctx


def _data(raw: bytes) -> list[dict]:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]


def test_a_plain_stream_opens_with_the_role_and_has_no_counts():
    raw, ctx = _run()
    events = _data(raw)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert b"\n:" not in raw and events[-1]["usage"]["completion_tokens"] == 3
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (7, 3)


def test_a_relayed_stream_carries_the_tokens_so_far_and_the_relay_takes_them_out():
    raw, _ = _run(relayed=True)
    plain, last = continuation.without_counts(raw)
    assert last == 3 and b":2\ndata: " in raw
    assert _shape(plain) == _shape(_run()[0]) and plain.endswith(b"data: [DONE]\n\n")


def _shape(raw: bytes) -> list[dict]:
    """The events without what differs between two responses (id, created)."""
    return [{k: v for k, v in e.items() if k not in ("id", "created")} for e in _data(raw)]


def test_a_resumed_stream_is_the_same_response_continued():
    """No second role chunk, the first replica's id and created, and usage counting the
    tokens the client already had as completion."""
    resumed = Continuation(text="Once", id="chatcmpl-first", created=11, tokens=4)
    raw, ctx = _run(resumed)
    events = _data(raw)
    assert all("role" not in (e["choices"] or [{}])[0].get("delta", {}) for e in events)
    assert {(e["id"], e["created"]) for e in events} == {("chatcmpl-first", 11)}
    assert events[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (7, 7)


def test_an_engine_lost_under_a_relayed_stream_is_left_to_the_resuming_replica():
    raw, ctx = _run(relayed=True, fail=True)
    assert b'"code":"engine_unavailable"' in raw and ctx.state[continuation.HANDED_OVER]
    _, plain_ctx = _run(fail=True)  # not relayed: nobody resumes it, it is accounted here
    assert continuation.HANDED_OVER not in plain_ctx.state


def test_a_stream_cut_after_its_last_token_is_resumed_with_only_its_end():
    """The client has all ``max_tokens`` tokens but not the chunk that ends the stream:
    the resuming replica sends no more text (not one token over), only that end."""
    from serve_app.api.generation import _only_the_end, _resume
    from serve_app.protocol import GenerateRequest, SamplingParams
    resumed = Continuation(text="Once upon", id="chatcmpl-first", created=11, tokens=3)
    request = GenerateRequest(request_id="r", model="m", prompt="p",
                              sampling=SamplingParams(max_tokens=3))
    asked, spent = _resume(request, resumed, streamed=True)
    assert spent and asked.sampling.max_tokens == 1  # one token asked, for the prompt's count
    assert _resume(request, resumed.model_copy(update={"tokens": 2}), True)[1] is False
    ctx = _ctx()

    async def run():
        rest = _only_the_end(_engine())
        first = await anext(rest)
        stream = _sse(ctx, ResponseFramer("chat", "m", "chatcmpl-first", 11), first, rest,
                      True, False, False, resumed, False)
        return b"".join([chunk async for chunk in stream])
    events = _data(asyncio.run(run()))
    assert [c["delta"] for e in events for c in e["choices"]] in ([{}], [{"content": ""}])
    assert [c["finish_reason"] for e in events for c in e["choices"]] == ["length"]
    assert events[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (7, 3)


def test_a_resumed_stream_with_nothing_left_ends_even_if_the_engine_refuses():
    """With the text appended the prompt may no longer fit ``max_model_len``: the
    engine's refusal does not turn a stream the client has whole into an error."""
    from serve_app.api.generation import _only_the_end

    async def refuses():
        raise ValueError("prompt too long")
        yield  # an async generator

    async def run():
        return [batch async for batch in _only_the_end(refuses())]
    (batch,) = asyncio.run(run())
    assert [(d.text, d.num_tokens, d.finish_reason) for d in batch] == [("", 0, "length")]
    assert batch[0].usage is not None  # so a client that asked for usage gets its chunk
