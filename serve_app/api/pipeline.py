"""The checks every endpoint shares, as an ordered chain of steps around the handler.

A ``Step`` has ``before`` (may refuse the request by raising ``APIError``) and
``after`` (runs for every step whose ``before`` passed, in reverse order, once the
response is complete -- for a stream, when its last chunk is sent or the client
goes away).  The chain is the same in both ingress modes because the server class
that owns it is the same (``server.OpenAIServer``); steps with nothing to do for a
config are left out of the chain, so a feature that is off costs nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol

import anyio
import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serve_app import continuation
from serve_app.errors import APIError
from serve_app.protocol import Usage

if TYPE_CHECKING:
    from serve_app.api.endpoint import Endpoint

log = logging.getLogger("hpcserve.ingress")


@dataclass
class RequestContext:
    """What the steps learn about one request, in the order they learn it."""

    request: Request
    endpoint: "Endpoint"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    principal: Any = None               # serve_app.access.principal.Principal
    body: Any = None
    model: str | None = None
    cost_estimate: int = 0              # tokens the request may use, for admission
    usage: Usage | None = None          # set by the handler when the engine reports it
    status: int = 200
    response_headers: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # per-step scratch space


class Step(Protocol):
    async def before(self, ctx: RequestContext) -> None: ...
    def after(self, ctx: RequestContext) -> None: ...


class ReadBody:
    """Content type, size limit, JSON object, then the endpoint's pydantic model."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    async def before(self, ctx: RequestContext) -> None:
        if ctx.endpoint.body is None:
            return
        ctx.body = ctx.endpoint.body.model_validate(await self._json(ctx))
        ctx.model = getattr(ctx.body, "model", None)

    def after(self, ctx: RequestContext) -> None:
        pass

    async def _json(self, ctx: RequestContext) -> dict:
        request = ctx.request
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got '{ctype}'.",
                           code="unsupported_media_type")
        limit = self.max_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"Request body exceeds {limit} bytes.", code="body_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise APIError(413, f"Request body exceeds {limit} bytes.",
                               code="body_too_large")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise APIError(400, f"Invalid JSON body: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        options = data.get("hpcserve")
        if isinstance(options, dict) and "continuation" in options:
            if not continuation.verified(bytes(raw),
                                         request.headers.get(continuation.SIGNATURE_HEADER)):
                raise APIError(400, "hpcserve.continuation is set only by hpcserve's "
                               "failover relay.", param="hpcserve.continuation",
                               code="invalid_request")
            ctx.state[continuation.RESUMED] = True
        return data


Handler = Callable[[RequestContext], Awaitable[Response]]


CLOSE_TIMEOUT_S = 10.0  # a stream's clean-up (engine aborts) never holds a request longer


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its body however the response ends.

    Starlette leaves the body's generator suspended when the response is cancelled
    while a chunk is being sent (the client left): the engine call beneath it would
    run to its end and the request stay unaccounted until the garbage collector
    closed it.  Closing it here cancels what it was waiting on, at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                try:
                    await self.body_iterator.aclose()
                except Exception:  # the response's own outcome is what matters
                    log.exception("closing a streamed response failed")


class Pipeline:
    def __init__(self, steps: list[Step]):
        self.steps = steps

    async def run(self, ctx: RequestContext, handler: Handler) -> Response:
        entered: list[Step] = []
        try:
            for step in self.steps:
                await step.before(ctx)
                entered.append(step)
            response = await handler(ctx)
        except ValidationError as err:
            self._after(entered, ctx, 400)
            raise APIError.from_validation(err) from None
        except APIError as err:
            self._after(entered, ctx, err.status)
            if ctx.response_headers:
                err.headers = {**ctx.response_headers, **(err.headers or {})}
            raise
        except BaseException:
            self._after(entered, ctx, 500)
            raise
        response.headers.update(ctx.response_headers)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._then_after(response.body_iterator, entered, ctx)
        else:
            self._after(entered, ctx, response.status_code)
        return response

    async def _then_after(self, body: AsyncIterator, entered: list[Step],
                          ctx: RequestContext) -> AsyncIterator:
        try:
            async with aclosing(body):
                async for chunk in body:
                    yield chunk
        finally:
            self._after(entered, ctx, ctx.status)

    @staticmethod
    def _after(entered: list[Step], ctx: RequestContext, status: int) -> None:
        if ctx.status == 200:
            ctx.status = status
        for step in reversed(entered):
            try:
                step.after(ctx)
            except Exception:  # an account step failing must not fail the response
                log.exception("pipeline step %s failed after the request",
                              type(step).__name__)
