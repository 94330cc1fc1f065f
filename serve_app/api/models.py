"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use,
each with its live ``status`` (``serve_app.model_state``)."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from serve_app.api.endpoint import Endpoint
from serve_app.openai_protocol import model_object


def _object(server, m) -> dict:
    return model_object(m.name, server.created, m.engine, m.max_model_len,
                        server.model_state.status(m.name), task=m.task)


async def _list(server, ctx) -> Response:
    data = [_object(server, m) for m in server.visible_models(ctx.principal)]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")


async def _get(server, ctx) -> Response:
    m = server.model_config(ctx.request.path_params["model_id"], ctx.principal)
    return Response(orjson.dumps(_object(server, m)), media_type="application/json")


LIST = Endpoint("models", "/v1/models", "GET", _list)
GET = Endpoint("model", "/v1/models/{model_id:path}", "GET", _get)
