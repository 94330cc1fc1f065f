"""``/v1/files``: upload (multipart), list, retrieve, content, delete.

The body is multipart, not JSON, so these endpoints declare no ``body`` and the
pipeline's ``ReadBody`` leaves the request alone; the upload is parsed here, its
size capped (``batch.max_file_bytes``) while it arrives, and sent to the batch
service (``serve_app.batch.service``) in parts.  Files belong to the caller's
project (``batch_calls.owner``).
"""

from __future__ import annotations

import asyncio
import re

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from serve_app.api.batch_calls import answer, json_response, owner, query_limit, service
from serve_app.api.endpoint import Endpoint
from serve_app.api.pipeline import ClosingStreamingResponse
from serve_app.batch.protocol import CHUNK
from serve_app.batch.protocol import file_too_large as _too_large
from serve_app.errors import APIError

_MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small fields
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _capped(request: Request, limit: int) -> Request:
    """The request with a receive channel that refuses more than ``limit`` bytes, so
    an upload without (or with a false) Content-Length cannot fill the disk."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit - _MULTIPART_OVERHEAD)
        return message
    return Request(request.scope, receive)


def _expires_s(form) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(400, "Invalid value for 'expires_after.anchor': only 'created_at'.",
                       param="expires_after.anchor", code="invalid_value")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = 0
    if not 3600 <= value <= 2_592_000:
        raise APIError(400, "Invalid value for 'expires_after.seconds': from 3600 to "
                       "2592000.", param="expires_after.seconds", code="invalid_value")
    return value


async def _create(server, ctx):
    svc = service(server)
    limit = server.config.batch.max_file_bytes
    request = ctx.request
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        raise APIError(415, f"Content-Type must be multipart/form-data, got '{ctype}'.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _MULTIPART_OVERHEAD:
        raise _too_large(limit)
    try:
        form = await _capped(request, limit + _MULTIPART_OVERHEAD).form(max_files=1,
                                                                         max_fields=8)
    except HTTPException as exc:  # starlette's multipart errors
        raise APIError(400, f"Invalid multipart body: {exc.detail}",
                       code="invalid_request") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "Missing required parameter: 'file'.", param="file",
                           code="missing_required_parameter")
        if not isinstance(purpose, str) or not purpose:
            raise APIError(400, "Missing required parameter: 'purpose'.", param="purpose",
                           code="missing_required_parameter")
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit)
        token = await answer(svc.file_begin.remote(owner(ctx), upload.filename or "upload",
                                                   purpose, _expires_s(form)))
        try:
            while chunk := await upload.read(CHUNK):
                await answer(svc.file_part.remote(token, chunk))
            return json_response(await answer(svc.file_end.remote(token)))
        except BaseException:
            svc.file_abort.remote(token)
            raise
    finally:
        await form.close()


async def _list(server, ctx):
    params = ctx.request.query_params
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "Invalid value for 'order': 'asc' or 'desc'.", param="order",
                       code="invalid_value")
    return json_response(await answer(service(server).file_list.remote(
        owner(ctx), params.get("purpose"), params.get("after"),
        query_limit(ctx, 10_000, 10_000), order)))


async def _get(server, ctx):
    return json_response(await answer(service(server).file_get.remote(
        owner(ctx), ctx.request.path_params["file_id"])))


async def _delete(server, ctx):
    return json_response(await answer(service(server).file_delete.remote(
        owner(ctx), ctx.request.path_params["file_id"])))


async def _content(server, ctx):
    svc, file_id = service(server), ctx.request.path_params["file_id"]
    meta = await answer(svc.file_get.remote(owner(ctx), file_id))  # 404 before streaming
    chunks = svc.options(stream=True).file_content.remote(owner(ctx), file_id)

    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):  # the client left: stop reading
            chunks.cancel()
            raise
    filename = _UNSAFE.sub("_", meta["filename"]) or "file"  # a client's name, in a header
    return ClosingStreamingResponse(
        body(), media_type="application/octet-stream",
        headers={"Content-Length": str(meta["bytes"]),
                 "Content-Disposition": f'attachment; filename="{filename}"'})


CREATE = Endpoint("file_create", "/v1/files", "POST", _create)
LIST = Endpoint("file_list", "/v1/files", "GET", _list)
GET = Endpoint("file_get", "/v1/files/{file_id}", "GET", _get)
DELETE = Endpoint("file_delete", "/v1/files/{file_id}", "DELETE", _delete)
CONTENT = Endpoint("file_content", "/v1/files/{file_id}/content", "GET", _content)
ENDPOINTS = (CREATE, LIST, GET, DELETE, CONTENT)
