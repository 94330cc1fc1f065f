"""``/v1/batches``: create, list (newest first, ``after`` and ``limit``), retrieve,
cancel.  The batch service (``serve_app.batch.service``) runs them; batches belong
to the caller's project and run with the caller's model access."""

from __future__ import annotations

from serve_app.api.batch_calls import answer, caller, json_response, owner, query_limit, service
from serve_app.api.endpoint import Endpoint
from serve_app.batch.protocol import BatchCreateRequest


async def _create(server, ctx):
    return json_response(await answer(service(server).batch_create.remote(
        owner(ctx), caller(ctx), ctx.body.model_dump())))


async def _list(server, ctx):
    return json_response(await answer(service(server).batch_list.remote(
        owner(ctx), ctx.request.query_params.get("after"), query_limit(ctx, 20, 100))))


async def _get(server, ctx):
    return json_response(await answer(service(server).batch_get.remote(
        owner(ctx), ctx.request.path_params["batch_id"])))


async def _cancel(server, ctx):
    return json_response(await answer(service(server).batch_cancel.remote(
        owner(ctx), ctx.request.path_params["batch_id"])))


CREATE = Endpoint("batch_create", "/v1/batches", "POST", _create, body=BatchCreateRequest)
LIST = Endpoint("batch_list", "/v1/batches", "GET", _list)
GET = Endpoint("batch_get", "/v1/batches/{batch_id}", "GET", _get)
CANCEL = Endpoint("batch_cancel", "/v1/batches/{batch_id}/cancel", "POST", _cancel)
ENDPOINTS = (CREATE, LIST, GET, CANCEL)
