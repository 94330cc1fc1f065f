"""What the files and batches endpoints share: the batch service's handle, the
caller's project (whose files and batches they are), and its answers as responses."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from serve_app.api.pipeline import RequestContext
from serve_app.errors import APIError


def service(server: Any) -> Any:
    """The ``BatchService`` handle, or a 404 where the app has no batch API."""
    handle = getattr(server, "batch", None)
    if handle is None:
        raise APIError(404, "The Files and Batches API is not enabled on this server "
                       "(args.batch.enabled).", code="not_found")
    return handle


def owner(ctx: RequestContext) -> str:
    """Files and batches belong to the caller's project ("" without authentication):
    another project's are answered with 404, as if they did not exist."""
    return "" if ctx.principal is None else ctx.principal.project


def caller(ctx: RequestContext) -> dict[str, Any] | None:
    """Who a batch runs as: its lines may use the models the caller may use."""
    p = ctx.principal
    if p is None:
        return None
    return {"key": p.key, "project": p.project, "user": p.user, "models": list(p.models),
            "project_models": list(p.project_models)}


async def answer(call: Any) -> Any:
    """The body of the service's ``{"status", "body"}``; an error status raised."""
    result = await call
    if result["status"] != 200:
        e = result["body"]["error"]
        raise APIError(result["status"], e["message"], param=e.get("param"),
                       code=e.get("code"), type_=e.get("type"))
    return result["body"]


def json_response(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def query_limit(ctx: RequestContext, default: int, maximum: int) -> int:
    raw = ctx.request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise APIError(400, f"Invalid value for 'limit': an integer from 1 to {maximum}.",
                       param="limit", code="invalid_value")
    return value
