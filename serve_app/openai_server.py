"""The OpenAI-compatible HTTP surface: validate, authenticate, frame.

``OpenAIServer`` holds everything that speaks HTTP; subclasses say only where the
token stream comes from (``_engine_stream``):

* ``serve_app.ingress.Ingress`` -- one replica on the head routing to engine
  deployments, with failover (several models, replicas that may die);
* ``serve_app.engine_ingress`` -- the engine replica serves HTTP itself (one model,
  no extra hop: HAProxy -> engine replica).

A request goes: parse + validate (``_parse``) -> internal ``GenerateRequest``
(``_to_generate``) -> ``_engine_stream`` -> SSE chunks or one JSON body.  Errors
the client caused are raised as ``APIError`` before anything is streamed, so they
keep their 4xx status.

Routes are registered per class by ``openai_app`` (not with decorators) because
Serve's ``@serve.ingress`` rewrites the FastAPI app it is given: each deployment
class needs an app of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from serve_app.config import AppConfig
from serve_app.engines.base import ENGINE_OPTIONS
from serve_app.errors import APIError, as_engine_error
from serve_app.framing import ResponseFramer
from serve_app.model_state import ModelStateCache
from serve_app.openai_protocol import (
    IGNORED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    model_object,
)
from serve_app.openapi import openapi_document
from serve_app.protocol import GenerateDelta, GenerateRequest, SamplingParams, Usage

log = logging.getLogger("hpcserve.ingress")


async def _api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error in ingress")
    return APIError(500, f"internal error: {type(exc).__name__}",
                    type_="server_error").response()


async def _prepend(first: list[GenerateDelta], rest: AsyncIterator[list[GenerateDelta]]):
    """The stream with its already-awaited first item put back in front."""
    if first:
        yield first
    async for item in rest:
        yield item


# Options with engine-specific support: a 400 naming them where the engine lacks them,
# unless the value asks for nothing (0, false, empty), which every engine honours.
_ENGINE_SPECIFIC = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                    "echo", "suffix", "presence_penalty", "frequency_penalty", "logit_bias")


def _given(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != {} and value != []


def _prompt_tokens(deltas: list[GenerateDelta]) -> int:
    return next((d.usage.prompt_tokens for d in deltas if d.usage is not None), 0)


class OpenAIServer:
    COLD_START_WAIT = False  # a subclass whose engine may have no replica sets it
    """The routes and request handling; ``_engine_stream`` is the subclass's."""

    def __init__(self, config: dict[str, Any]):
        self.config = AppConfig.model_validate(config)
        self.models = {m.name: m for m in self.config.models}
        self.api_keys = [k.encode() for k in self.config.load_api_keys()]
        self.created = int(time.time())
        self._openapi: bytes | None = None
        self.model_state = ModelStateCache()

    def _engine_stream(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        raise NotImplementedError

    # ---- routes -----------------------------------------------------------
    async def health(self) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def openapi(self) -> Response:
        if self._openapi is None:
            models = self.config.models
            options = set().union(*(ENGINE_OPTIONS[m.engine] for m in models))
            limits = [m.max_model_len for m in models]
            self._openapi = orjson.dumps(openapi_document(
                list(self.models), bool(self.api_keys), engine_options=options,
                max_tokens=None if None in limits else max(limits) - 1))
        return Response(self._openapi, media_type="application/json")

    async def list_models(self, request: Request) -> Response:
        self._authenticate(request)
        data = [model_object(m.name, self.created, m.engine, m.max_model_len,
                             self.model_state.status(m.name)) for m in self.config.models]
        return Response(orjson.dumps({"object": "list", "data": data}),
                        media_type="application/json")

    async def get_model(self, request: Request, model_id: str) -> Response:
        self._authenticate(request)
        m = self._model_config(model_id)
        return Response(orjson.dumps(model_object(m.name, self.created, m.engine,
                                                  m.max_model_len,
                                                  self.model_state.status(m.name))),
                        media_type="application/json")

    async def chat_completions(self, request: Request) -> Response:
        self._authenticate(request)
        body = await self._parse(request, ChatCompletionRequest)
        return await self._serve("chat", body)

    async def completions(self, request: Request) -> Response:
        self._authenticate(request)
        body = await self._parse(request, CompletionRequest)
        return await self._serve("completion", body)

    # ---- request handling -------------------------------------------------
    def _authenticate(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(token.strip().encode(), k) for k in self.api_keys):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: "
                           "Bearer <key>'.", code="invalid_api_key")

    async def _parse(self, request: Request, model: type[BaseModel]):
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got '{ctype}'.",
                           code="unsupported_media_type")
        limit = self.config.max_request_bytes
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
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise APIError.from_validation(err) from None

    def _model_config(self, name: str):
        cfg = self.models.get(name)
        if cfg is None:
            raise APIError(404, f"The model '{name}' does not exist. Available: "
                           f"{sorted(self.models)}.", param="model", code="model_not_found")
        return cfg

    def _to_generate(self, kind: str, body) -> GenerateRequest:
        cfg = self._model_config(body.model)
        allowed = ENGINE_OPTIONS[cfg.engine]
        if body.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", param="n",
                           code="unsupported_parameter")
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
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if cfg.max_model_len and max_tokens and max_tokens >= cfg.max_model_len:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the model's context "
                           f"length {cfg.max_model_len}.", param="max_tokens",
                           code="context_length_exceeded")
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, seed=body.seed, stop=body.stop or [],
                                  ignore_eos=bool(body.ignore_eos))
        common = dict(request_id=uuid.uuid4().hex, model=body.model, sampling=sampling,
                      extras=extras)
        if kind == "chat":
            return GenerateRequest(messages=body.messages, **common)
        return GenerateRequest(prompt=body.prompt_text(), **common)

    async def _serve(self, kind: str, body) -> Response:
        req = self._to_generate(kind, body)
        framer = ResponseFramer(kind, body.model)
        wait_s = self.models[body.model].cold_start_timeout_s
        status = self.model_state.status(body.model)
        if status and status["state"] == "unavailable":  # no replica, and none can come
            raise APIError(503, f"The model '{body.model}' is unavailable: "
                           f"{status.get('reason') or 'no allocation can host it'}.",
                           type_="server_error", code="model_unavailable",
                           headers={"Retry-After": "60"})
        stream = self._engine_stream(req)
        try:
            # errors before this point keep their 4xx.  Where the engine may have no
            # replica (routed: a cold model, a batch job on its way) wait at most
            # cold_start_timeout_s; an engine replica serving HTTP itself is the
            # replica, so it skips the timer task on every request.
            first = await (asyncio.wait_for(anext(stream), wait_s) if self.COLD_START_WAIT
                           else anext(stream))
        except StopAsyncIteration:
            first = []
        except asyncio.TimeoutError:
            await stream.aclose()
            status = self.model_state.status(body.model) or {}
            raise APIError(503, f"The model '{body.model}' is starting "
                           f"({status.get('state', 'no replica yet')}) and did not answer "
                           f"within cold_start_timeout_s={wait_s:g}; retry later.",
                           type_="server_error", code="model_starting",
                           headers={"Retry-After": "30"}) from None
        except APIError:
            raise
        except Exception as exc:
            log.warning("engine for %s unavailable: %r", body.model, exc)
            raise APIError(503, f"No engine replica for '{body.model}' could serve the "
                           f"request ({type(exc).__name__}).", type_="server_error",
                           code="engine_unavailable") from None
        if body.stream:
            options = body.stream_options
            include_usage = bool(options and options.include_usage)
            continuous = include_usage and bool(options.continuous_usage_stats)  # as vLLM
            return StreamingResponse(self._sse(framer, first, stream, include_usage,
                                               continuous, bool(req.extras.get("logprobs"))),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finish, usage, entries = [], "stop", Usage(), []
        async for deltas in _prepend(first, stream):
            for delta in deltas:
                text.append(delta.text)
                if delta.extras:
                    entries += delta.extras.get("logprobs") or ()
                if delta.finish_reason:
                    finish, usage = delta.finish_reason, delta.usage or usage
        logprobs = framer.logprobs(entries) if req.extras.get("logprobs") else None
        return Response(framer.whole("".join(text), finish, usage, logprobs),
                        media_type="application/json")

    async def _sse(self, framer: ResponseFramer, first: list[GenerateDelta],
                   rest: AsyncIterator[list[GenerateDelta]], include_usage: bool,
                   continuous: bool, with_logprobs: bool):
        """The event stream; with ``continuous`` (vLLM's ``continuous_usage_stats``)
        every chunk carries the usage so far: the prompt's tokens (engines report
        them with their first delta) and the completion tokens sent until then."""
        prompt, completion = _prompt_tokens(first), 0
        yield framer.first_chunk(Usage(prompt, 0) if continuous else None)
        finish, usage, offset = "stop", None, 0
        try:
            async for deltas in _prepend(first, rest):
                text = "".join(d.text for d in deltas)
                if continuous:
                    completion += sum(d.num_tokens for d in deltas)
                    prompt = _prompt_tokens(deltas) or prompt
                so_far = Usage(prompt, completion) if continuous else None
                if with_logprobs:
                    entries = [e for d in deltas for e in d.extras.get("logprobs") or ()]
                    if text or entries:
                        yield framer.chunk_with_logprobs(text, framer.logprobs(entries, offset),
                                                         so_far)
                    offset += len(text)
                elif text:
                    yield framer.text_chunk(text, so_far)
                last = deltas[-1] if deltas else None
                if last is not None and last.finish_reason:
                    finish, usage = last.finish_reason, last.usage or so_far
        except Exception as exc:  # mid-stream: the status is already sent
            err = as_engine_error(exc)
            api = APIError.from_engine(err) if err else APIError(
                503, f"The engine failed mid-stream: {type(exc).__name__}",
                type_="server_error", code="engine_unavailable")
            yield framer.error_event(api.body())
            return
        yield framer.final_chunks(finish, usage, include_usage, continuous)


def openai_app(server_cls: type[OpenAIServer]) -> FastAPI:
    """A FastAPI app with the OpenAI routes bound to ``server_cls``'s methods."""
    app = FastAPI(title="hpcserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # FastAPI's own document would be empty (raw-Request routes): serve_app.openapi's.
    app.add_api_route("/openapi.json", server_cls.openapi, methods=["GET"],
                      include_in_schema=False)
    app.add_api_route("/health", server_cls.health, methods=["GET"])
    app.add_api_route("/v1/models", server_cls.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server_cls.get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", server_cls.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server_cls.completions, methods=["POST"])
    return app


def openai_deployment(server_cls: type[OpenAIServer], **options: Any):
    """``server_cls`` as a Serve deployment that answers HTTP itself."""
    return serve.deployment(**options)(serve.ingress(openai_app(server_cls))(server_cls))
