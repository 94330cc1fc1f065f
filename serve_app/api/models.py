"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use,
each with its live ``status`` (``serve_app.model_state``); a workflow's status is
derived from those of its models."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from serve_app.api.endpoint import Endpoint
from serve_app.openai_protocol import model_object
from serve_app.workflows.base import WorkflowConfig


def _object(server, m) -> dict:
    if isinstance(m, WorkflowConfig):  # a workflow: its kind and models, no engine of its own
        return model_object(m.name, server.created, "workflow", None,
                            server.model_status(m.name), workflow=m.describe())
    return model_object(m.name, server.created, m.engine, m.max_model_len,
                        server.model_status(m.name), task=m.task)


async def _list(server, ctx) -> Response:
    data = [_object(server, m) for m in server.visible_models(ctx.principal)]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")


async def _get(server, ctx) -> Response:
    m = server.model_config(ctx.request.path_params["model_id"], ctx.principal)
    return Response(orjson.dumps(_object(server, m)), media_type="application/json")


LIST = Endpoint("models", "/v1/models", "GET", _list)
GET = Endpoint("model", "/v1/models/{model_id:path}", "GET", _get)
