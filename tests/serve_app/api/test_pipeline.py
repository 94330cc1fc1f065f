"""The request pipeline's contract: steps run in order, a refusal stops the chain,
and every step that passed gets its ``after`` in reverse order once the response is
complete -- for a stream, only when the stream ends."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serve_app.api.endpoint import Endpoint
from serve_app.api.pipeline import ClosingStreamingResponse, Pipeline, RequestContext
from serve_app.errors import APIError


class Recorder:
    def __init__(self, name: str, log: list[str], refuse: bool = False):
        self.name, self.log, self.refuse = name, log, refuse

    async def before(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.before")
        if self.refuse:
            raise APIError(429, "no", headers={"Retry-After": "1"})
        ctx.response_headers[f"x-{self.name}"] = "1"

    def after(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.after:{ctx.status}")


def context() -> RequestContext:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    return RequestContext(request, Endpoint("t", "/", "GET", handle=None))


def run(pipeline: Pipeline, handler) -> Response:
    return asyncio.run(pipeline.run(context(), handler))


def test_steps_run_in_order_and_unwind_in_reverse_with_the_status():
    log: list[str] = []
    steps = [Recorder("a", log), Recorder("b", log)]

    async def handler(ctx):
        log.append("handler")
        return Response(b"{}", status_code=200)

    response = run(Pipeline(steps), handler)
    assert log == ["a.before", "b.before", "handler", "b.after:200", "a.after:200"]
    assert response.headers["x-a"] == response.headers["x-b"] == "1"


def test_a_refusal_stops_the_chain_and_only_passed_steps_unwind():
    log: list[str] = []
    steps = [Recorder("a", log), Recorder("b", log, refuse=True), Recorder("c", log)]

    async def handler(ctx):  # pragma: no cover - never reached
        log.append("handler")
        return Response(b"{}")

    with pytest.raises(APIError) as info:
        run(Pipeline(steps), handler)
    assert log == ["a.before", "b.before", "a.after:429"]
    assert info.value.headers == {"x-a": "1", "Retry-After": "1"}  # headers of passed steps


def test_a_stream_unwinds_only_when_its_last_chunk_is_sent():
    log: list[str] = []

    async def body():
        for part in (b"1", b"2"):
            log.append(f"chunk {part.decode()}")
            yield part

    async def handler(ctx):
        return StreamingResponse(body())

    async def consume():
        response = await Pipeline([Recorder("a", log)]).run(context(), handler)
        assert log == ["a.before"]
        async for _ in response.body_iterator:
            pass

    asyncio.run(consume())
    assert log == ["a.before", "chunk 1", "chunk 2", "a.after:200"]


@pytest.mark.parametrize("asgi", ["2.4", "2.0"])  # Starlette's two ways of streaming
def test_a_client_gone_while_a_chunk_is_sent_closes_the_stream_beneath(asgi):
    """The task is cancelled while ``send`` is blocked (a client that stopped
    reading, then left): the body and the generator under it close at once, so the
    engine call they wait on is cancelled and the steps unwind -- with Starlette's
    own response they would stay suspended until the garbage collector came."""
    log: list[str] = []

    async def engine():
        try:
            while True:
                yield b"token"
                await asyncio.sleep(0)
        finally:
            log.append("engine closed")

    async def body():  # a generator over another, as _sse over the engine stream
        async with aclosing(engine()) as stream:
            async for chunk in stream:
                yield chunk

    async def handler(ctx):
        return ClosingStreamingResponse(body())

    async def serve() -> None:
        sending = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sending.set()
                await asyncio.Event().wait()

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        response = await Pipeline([Recorder("a", log)]).run(context(), handler)
        task = asyncio.create_task(response(
            {"type": "http", "asgi": {"spec_version": asgi}}, receive, send))
        await asyncio.wait_for(sending.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["a.before", "engine closed", "a.after:200"]

    asyncio.run(serve())


def _post(body: bytes, headers: dict[str, str]) -> RequestContext:
    """A POST whose body arrives as a client's would."""
    from serve_app.openai_protocol import CompletionRequest
    raw = [(b"content-type", b"application/json")] + [
        (k.encode(), v.encode()) for k, v in headers.items()]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": raw}, receive)
    return RequestContext(request, Endpoint("t", "/", "POST", handle=None, body=CompletionRequest))


def test_a_continuation_is_read_only_signed_by_the_clusters_relay(monkeypatch):
    """``hpcserve.continuation`` makes the model take text as its own output: only the
    failover relay, signing with the key every node derives from the Ray token, may
    send it (``serve_app.continuation``)."""
    import orjson

    from serve_app import continuation
    from serve_app.api.pipeline import ReadBody
    body = orjson.dumps({"model": "m", "prompt": "p", "stream": True, "hpcserve": {
        "continuation": {"text": "t", "id": "cmpl-1", "created": 1, "tokens": 1}}})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cluster-token")
    continuation.relay_key.cache_clear()
    try:
        key = continuation.relay_key()
        signed = continuation.sign(key, body)
        for headers in ({}, {continuation.SIGNATURE_HEADER: "0" * 64},
                        {continuation.SIGNATURE_HEADER: continuation.sign(key, body + b" ")}):
            ctx = _post(body, headers)
            with pytest.raises(APIError) as info:
                asyncio.run(ReadBody(1 << 20).before(ctx))
            assert (info.value.status, info.value.param) == (400, "hpcserve.continuation")
            assert continuation.RESUMED not in ctx.state
        ctx = _post(body, {continuation.SIGNATURE_HEADER: signed})
        asyncio.run(ReadBody(1 << 20).before(ctx))
        assert ctx.body.hpcserve.continuation.text == "t" and ctx.state[continuation.RESUMED]
        # another cluster's token derives another key: its relay's signature is refused
        monkeypatch.setenv("RAY_AUTH_TOKEN", "other-cluster")
        continuation.relay_key.cache_clear()
        with pytest.raises(APIError):
            asyncio.run(ReadBody(1 << 20).before(_post(body, {continuation.SIGNATURE_HEADER: signed})))
    finally:
        continuation.relay_key.cache_clear()
