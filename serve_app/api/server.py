"""``OpenAIServer``: the OpenAI routes, the request pipeline, and where tokens come from.

Subclasses say only where the engine's answers come from (``_engine_stream`` for
generation, ``_workflow_stream`` for a workflow's name, ``_embed`` for embeddings):

* ``serve_app.ingress.RoutedIngress`` -- one replica on the head routing to engine
  deployments, with failover (workflows, cold models, replicas that may die);
* ``serve_app.engine_ingress`` -- the engine replica serves HTTP itself (each
  always-on model, no extra hop: HAProxy -> engine replica).

Both run the same pipeline (``serve_app.api.pipeline``) built from the same config.
Routes are generated per endpoint (``ENDPOINTS``) rather than written as decorated
methods because Serve's ``@serve.ingress`` rewrites the FastAPI app it is given:
each deployment class needs an app of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve_app.access.steps import AuthorizeModel, access_steps
from serve_app.api import batches, chat, completions, embeddings, files, models
from serve_app.api.endpoint import Endpoint
from serve_app.api.pipeline import Pipeline, ReadBody, RequestContext
from serve_app.config import AppConfig, ModelConfig
from serve_app.engines.base import capabilities
from serve_app.errors import APIError
from serve_app.model_state import ModelStateCache
from serve_app.openapi import openapi_document
from serve_app.protocol import EmbedRequest, EmbedResult, GenerateDelta, GenerateRequest
from serve_app.workflows.base import UsageSink, WorkflowConfig, derived_status

log = logging.getLogger("hpcserve.ingress")

ENDPOINTS: tuple[Endpoint, ...] = (models.LIST, models.GET, chat.ENDPOINT,
                                   completions.ENDPOINT, embeddings.ENDPOINT, *files.ENDPOINTS,
                                   *batches.ENDPOINTS)


class OpenAIServer:
    """The routes and request handling; ``_engine_stream`` and ``_embed`` are the
    subclass's (errors the client caused raised as ``APIError``)."""

    COLD_START_WAIT = False  # a subclass whose engine may have no replica sets it

    def __init__(self, config: dict[str, Any], ledger: Any = None, batch: Any = None):
        self.config = AppConfig.model_validate(config)
        self.batch = batch  # the BatchService handle (serve_app.batch), if enabled
        self.models = {m.name: m for m in self.config.models}
        self.workflows = {w.name: w for w in self.config.workflows}  # routed ingress only
        self.created = int(time.time())
        self.model_state = ModelStateCache()
        served = {**self.models, **self.workflows}  # every name a client may ask for
        before, after = access_steps(self.config, ledger, served)
        self.pipeline = Pipeline([*before, ReadBody(self.config.max_request_bytes),
                                  AuthorizeModel(self.model_config), *after])
        self._openapi: bytes | None = None

    def _engine_stream(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        raise NotImplementedError

    def _workflow_stream(self, req: GenerateRequest, on_usage: UsageSink | None = None
                         ) -> AsyncIterator[list[GenerateDelta]]:
        """A workflow's stream (``req.model`` names it); ``on_usage`` hears the usage of
        its steps so far.  The routed ingress's: configs with workflows use it."""
        raise NotImplementedError

    async def _embed(self, req: EmbedRequest) -> EmbedResult:
        raise NotImplementedError

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        ctx = RequestContext(request, endpoint)
        return await self.pipeline.run(ctx, lambda c: endpoint.handle(self, c))

    # ---- what endpoints ask -----------------------------------------------
    def visible_models(self, principal: Any) -> list[ModelConfig | WorkflowConfig]:
        return [m for m in (*self.config.models, *self.config.workflows)
                if principal is None or principal.may_use(m.name)]

    def model_config(self, name: str, principal: Any) -> ModelConfig | WorkflowConfig:
        """The model's (or workflow's) config, or the same 404 whether it does not exist
        or the caller may not use it (never which models exist beyond the caller's)."""
        cfg = self.models.get(name) or self.workflows.get(name)
        if cfg is None or (principal is not None and not principal.may_use(name)):
            visible = sorted(m.name for m in self.visible_models(principal))
            raise APIError(404, f"The model '{name}' does not exist. Available: {visible}.",
                           param="model", code="model_not_found")
        return cfg

    def model_status(self, name: str) -> dict | None:
        """A model's live state; a workflow's, derived from those of its models."""
        workflow = self.workflows.get(name)
        if workflow is None:
            return self.model_state.status(name)
        return derived_status(workflow, self.model_state.status)

    # ---- routes outside the pipeline --------------------------------------
    async def health(self) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def openapi(self) -> Response:
        if self._openapi is None:
            generators = [m for m in self.config.models if m.task == "generate"]
            options = set().union(*(capabilities(m.engine).options for m in generators))
            limits = [m.max_model_len for m in generators]
            self._openapi = orjson.dumps(openapi_document(
                [*(m.name for m in generators), *self.workflows], self.config.authenticated,
                engine_options=options,
                max_tokens=None if None in limits or not limits else max(limits) - 1,
                embedding_models=[m.name for m in self.config.models if m.task == "embed"],
                batch=self.config.batch.enabled))
        return Response(self._openapi, media_type="application/json")


async def _api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error in ingress")
    return APIError(500, f"internal error: {type(exc).__name__}",
                    type_="server_error").response()


def _route(server_cls: type[OpenAIServer], endpoint: Endpoint):
    async def route(self, request: Request) -> Response:
        return await self.handle(request, endpoint)
    # Serve's class-based view finds a class's routes by their qualified name.
    route.__name__ = endpoint.name
    route.__qualname__ = f"{server_cls.__qualname__}.{endpoint.name}"
    return route


def openai_app(server_cls: type[OpenAIServer]) -> FastAPI:
    """A FastAPI app with the OpenAI routes bound to ``server_cls``."""
    app = FastAPI(title="hpcserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # FastAPI's own document would be empty (raw-Request routes): serve_app.openapi's.
    app.add_api_route("/openapi.json", server_cls.openapi, methods=["GET"],
                      include_in_schema=False)
    app.add_api_route("/health", server_cls.health, methods=["GET"])
    for endpoint in ENDPOINTS:
        app.add_api_route(endpoint.path, _route(server_cls, endpoint),
                          methods=[endpoint.method])
    return app


def openai_deployment(server_cls: type[OpenAIServer], **options: Any):
    """``server_cls`` as a Serve deployment that answers HTTP itself."""
    return serve.deployment(**options)(serve.ingress(openai_app(server_cls))(server_cls))
