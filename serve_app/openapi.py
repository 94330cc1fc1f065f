"""The OpenAPI document of the OpenAI surface (``GET /openapi.json``).

Routes take the raw ``Request`` (so that a wrong Content-Type is a 415 and an
oversized body a 413 before any parsing), which leaves FastAPI nothing to derive
schemas from.  The document is therefore written here, from the same pydantic models
that validate requests and describe responses (``serve_app.openai_protocol``), and
for one server instance: ``model`` lists the models it serves, the fields are those
it accepts, and the bearer scheme is required exactly when it has API keys.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from serve_app import openai_protocol as p
from serve_app.batch.protocol import BatchCreateRequest

_REF = "#/components/schemas/{model}"
_REQUESTS = (p.ChatCompletionRequest, p.CompletionRequest, p.EmbeddingRequest)
_RESPONSES = (p.ChatCompletion, p.ChatCompletionChunk, p.Completion, p.CompletionChunk,
              p.EmbeddingList, p.Model, p.ModelList, p.ErrorResponse, p.Health)
ERRORS = {
    400: "The request is invalid (malformed JSON, a wrong type or value, an unsupported "
         "option, too long for the context); `param` names the field.",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`).",
    404: "No such model (`code: model_not_found`), file or batch.",
    409: "The file is the input of an unfinished batch.",
    413: "The request body is larger than the server accepts.",
    415: "The body is not `application/json` (`multipart/form-data` for a file upload).",
    429: "Too many requests.",
    503: "No engine replica could serve the request (`code: engine_unavailable`), or a "
         "workflow step it needs failed (`code: workflow_step_failed`, naming the step).",
}
_SSE = ("Server-sent events: one `data: <{chunk} JSON>` event per piece of text, a last "
        "chunk with `finish_reason`, the usage chunk (`choices: []`) when "
        "`stream_options.include_usage` is set, then `data: [DONE]`.  An error after the "
        "stream started arrives as one `data: <ErrorResponse JSON>` event before `[DONE]`.")


@lru_cache(maxsize=1)
def _components() -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """Component schemas and the name each (model, mode) got (``-Input``/``-Output``
    only where a model's validation and serialization schemas differ)."""
    keys, top = models_json_schema(
        [(m, "validation") for m in (*_REQUESTS, BatchCreateRequest)]
        + [(m, "serialization") for m in _RESPONSES],
        ref_template=_REF)
    names = {(m.__name__, mode): ref["$ref"].rsplit("/", 1)[-1]
             for (m, mode), ref in keys.items()}
    return top["$defs"], names


def _ref(model: type, mode: str = "serialization") -> dict[str, str]:
    return {"$ref": _REF.format(model=_components()[1][(model.__name__, mode)])}


def _json(model: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _responses(ok: str, ok_content: dict[str, Any], errors: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": ok, "content": ok_content}}
    for status in errors:
        out[str(status)] = {"description": ERRORS[status], "content": _json(p.ErrorResponse)}
    return out


def _event(chunk: type) -> dict[str, Any]:
    """One server-sent event (OpenAPI before 3.2 describes an event stream by its events):
    its ``data`` is a chunk's JSON, an error's, or ``[DONE]``."""
    return {"type": "object", "required": ["data"],
            "description": _SSE.format(chunk=chunk.__name__),
            "properties": {
                "event": {"const": "message"},
                "data": {"description": f"A {chunk.__name__} or an ErrorResponse as JSON, "
                                        "or `[DONE]` (the last event).",
                         "anyOf": [{"const": "[DONE]"},
                                   {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"oneOf": [_ref(chunk),
                                                                _ref(p.ErrorResponse)]}}]}}}


def _generation(request: type, whole: type, chunk: type, summary: str,
                errors: tuple[int, ...]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": _ref(request, "validation")}}},
        "responses": _responses(
            f"A {whole.__name__} (`stream: false`) or an event stream of {chunk.__name__} "
            "(`stream: true`).",
            {**_json(whole),
             "text/event-stream": {"schema": _event(chunk)}},
            errors),
    }


def _object(kind: str, description: str, fields: Iterable[str]) -> dict[str, Any]:
    """A file, batch or list object (``serve_app.batch.protocol`` builds them as dicts)."""
    return {"application/json": {"schema": {
        "type": "object", "description": description, "required": ["object", *fields],
        "properties": {"object": {"const": kind}}}}}


_FILE = _object("file", "A file: id, bytes, created_at, expires_at, filename, purpose, "
                "status.", ["id", "bytes", "created_at", "filename", "purpose"])
_BATCH = _object("batch", "A batch: id, endpoint, input_file_id, status, every *_at time, "
                 "request_counts, usage, errors, output_file_id, error_file_id.",
                 ["id", "endpoint", "input_file_id", "status", "request_counts"])
_PAGE = _object("list", "A page, newest first: data, first_id, last_id, has_more.",
                ["data", "has_more"])


def _batch_paths(errors: tuple[int, ...], post: tuple[int, ...]) -> dict[str, Any]:
    """``/v1/files`` and ``/v1/batches`` (``batch.enabled``; docs/batch.md)."""
    def param(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    page = [{"name": "after", "in": "query", "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}]
    upload = {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "JSONL, one request per line (batch.max_file_bytes at most)"},
        "purpose": {"const": "batch"},
        "expires_after[anchor]": {"const": "created_at"},
        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}
    files_page = [*page, {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                  {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}}]
    found = (*errors, 404)
    return {
        "/v1/files": {
            "post": {"summary": "Upload a batch input file",
                     "requestBody": {"required": True, "content": {
                         "multipart/form-data": {"schema": upload}}},
                     "responses": _responses("The file.", _FILE, post)},
            "get": {"summary": "The caller's project's files", "parameters": files_page,
                    "responses": _responses("A page of files.", _PAGE, errors)}},
        "/v1/files/{file_id}": {
            "get": {"summary": "One file", "parameters": [param("file_id")],
                    "responses": _responses("The file.", _FILE, found)},
            "delete": {"summary": "Delete a file", "parameters": [param("file_id")],
                       "responses": _responses("`{id, object: file, deleted: true}`.",
                                               _object("file", "Deleted.", ["id", "deleted"]),
                                               (*found, 409))}},
        "/v1/files/{file_id}/content": {"get": {
            "summary": "A file's content (input, output or error lines)",
            "parameters": [param("file_id")],
            "responses": _responses("JSONL.", {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}, found)}},
        "/v1/batches": {
            "post": {"summary": "Create a batch over an uploaded file",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref(BatchCreateRequest, "validation")}}},
                     "responses": _responses("The batch.", _BATCH, post)},
            "get": {"summary": "The caller's project's batches", "parameters": page,
                    "responses": _responses("A page of batches.", _PAGE, errors)}},
        "/v1/batches/{batch_id}": {"get": {
            "summary": "One batch", "parameters": [param("batch_id")],
            "responses": _responses("The batch.", _BATCH, found)}},
        "/v1/batches/{batch_id}/cancel": {"post": {
            "summary": "Cancel a batch (its finished lines are kept)",
            "parameters": [param("batch_id")],
            "responses": _responses("The batch, cancelling.", _BATCH, found)}},
    }


def openapi_document(model_names: list[str], auth: bool, *, engine_options: Iterable[str] = (),
                     max_tokens: int | None = None, version: str = "0.1.0",
                     embedding_models: list[str] = (), batch: bool = False) -> dict:
    """The document for a server serving ``model_names`` (chat and completions) and
    ``embedding_models``; ``auth``: it checks API keys; ``batch``: it serves the Files
    and Batches API.  A path is listed when some model serves it.

    Exactly the fields the server accepts are listed (the request models allow extra
    keys only for the ingress to name them in a 400): the models' own, the ignored
    ones and ``engine_options`` (options some served engine takes beyond them, such as
    vLLM's ``top_k``).  ``max_tokens``: the largest any served model's context leaves.
    """
    schemas = copy.deepcopy(_components()[0])
    for request in _REQUESTS:
        schema = schemas[_components()[1][(request.__name__, "validation")]]
        props = schema["properties"]
        embed = request is p.EmbeddingRequest
        names = list(embedding_models if embed else model_names)
        if names:  # else a 404 (or a 400: a model of the other task)
            props["model"] = {**props["model"], "enum": names,
                              "description": "One of the models this server serves"
                                             + (" embeddings with." if embed else " text with.")}
        for name in sorted(set(p.IGNORED_FIELDS) | set(() if embed else engine_options)):
            props.setdefault(name, {"description": "Accepted; ignored."
                                    if name in p.IGNORED_FIELDS else "An engine option."})
        schema["additionalProperties"] = False  # any other field is a 400 naming it
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in props.get(name, {}).get("anyOf", ()):
                if max_tokens and branch.get("type") == "integer":
                    branch["maximum"] = min(branch["maximum"], max_tokens)
    secured = (401,) if auth else ()
    common = (*secured, 429, 503)
    post = (400, *secured, 404, 413, 415, 429, 503)
    paths: dict[str, Any] = {
        "/health": {"get": {"summary": "Liveness of the replica that answers",
                            "responses": _responses("Alive.", _json(p.Health), ())}},
        "/v1/models": {"get": {"summary": "The models this server serves",
                               "responses": _responses("The model list.", _json(p.ModelList),
                                                       common)}},
        "/v1/models/{model_id}": {"get": {
            "summary": "One model",
            "parameters": [{"name": "model_id", "in": "path", "required": True,
                            "schema": {"type": "string", "examples": list(model_names)}}],
            "responses": _responses("The model.", _json(p.Model), (*secured, 404, 429, 503))}},
    }
    if model_names:
        paths["/v1/chat/completions"] = {"post": _generation(
            p.ChatCompletionRequest, p.ChatCompletion, p.ChatCompletionChunk,
            "Chat completion", post)}
        paths["/v1/completions"] = {"post": _generation(
            p.CompletionRequest, p.Completion, p.CompletionChunk, "Text completion", post)}
    if embedding_models:
        paths["/v1/embeddings"] = {"post": {
            "summary": "Embeddings (models with `task: embed`)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref(p.EmbeddingRequest, "validation")}}},
            "responses": _responses("The embeddings, in input order.",
                                    _json(p.EmbeddingList), post)}}
    if batch:
        paths.update(_batch_paths(common, (400, *secured, 404, 413, 415, 429, 503)))
    if auth:
        for path, item in paths.items():
            if path != "/health":
                for operation in item.values():
                    operation["security"] = [{"bearerAuth": []}]
    components: dict[str, Any] = {"schemas": schemas}
    if auth:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0",
            "info": {"title": "hpcserve", "version": version,
                     "description": "An OpenAI-compatible LLM endpoint. Every error is "
                                    "`{\"error\": {\"message\", \"type\", \"param\", "
                                    "\"code\"}}`."},
            "paths": paths, "components": components}
