"""Request validation as OpenAI does it, per-engine options, and the OpenAPI document.

No Ray, no engine: a request body is turned into what an engine would get
(``to_generate``); errors are the ``APIError`` the client gets.
"""

from __future__ import annotations

import jsonschema
import pytest
from pydantic import ValidationError
from referencing import Registry, Resource

from serve_app.errors import APIError
from serve_app.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from serve_app.api.generation import to_generate
from serve_app.api.server import OpenAIServer
from serve_app.config import ModelConfig
from serve_app.openapi import openapi_document

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(extra: dict, model=ChatCompletionRequest):
    body = {**CHAT, **extra} if model is ChatCompletionRequest else {"model": "m", "prompt": "x",
                                                                     **extra}
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise APIError.from_validation(err) from None


@pytest.mark.parametrize("field,value", [
    ("stream", "yes"), ("stream", 1), ("ignore_eos", "true"), ("logprobs", "true"),
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True), ("n", "1"),
    ("seed", "7"), ("temperature", "1"), ("temperature", True), ("top_p", "0.5"),
    ("top_logprobs", "2"), ("max_completion_tokens", "3"), ("presence_penalty", "1"),
    ("stop", 5), ("model", 5),
])
def test_wrong_json_types_are_a_400_naming_the_field(field, value):
    with pytest.raises(APIError) as info:
        parse({field: value})
    assert info.value.status == 400 and info.value.param == field
    assert info.value.code == "invalid_value" and field in info.value.message


@pytest.mark.parametrize("options", [{"include_usage": "yes"},
                                     {"include_usage": True, "continuous_usage_stats": 1}])
def test_stream_options_are_strict_booleans(options):
    with pytest.raises(APIError) as info:
        parse({"stream": True, "stream_options": options})
    assert info.value.param.startswith("stream_options.")


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_completions_echo_is_strict_and_numbers_take_integers(model):
    if model is CompletionRequest:
        with pytest.raises(APIError, match="echo"):
            parse({"echo": "no"}, model)
    body = parse({"temperature": 1, "top_p": 1, "presence_penalty": -2, "frequency_penalty": 2,
                  "logit_bias": {"5": -100, "7": 100}, "stream": None, "ignore_eos": None},
                 model)
    assert body.temperature == 1.0 and isinstance(body.temperature, float)
    assert body.logit_bias == {"5": -100.0, "7": 100.0}
    assert not body.stream and not body.ignore_eos  # null is the default, as OpenAI's


@pytest.mark.parametrize("extra,param,needle", [
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"logit_bias": {"12": 101}}, "logit_bias", "'12'"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc'"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "'-1'"),
    ({"logit_bias": {"3": "1"}}, "logit_bias", "valid number"),
    ({"logit_bias": [1, 2]}, "logit_bias", "valid dictionary"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages.0.content.0.text", "valid string"),
    ({"stop": ["a", 1]}, "stop.1", "valid string"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
])
def test_out_of_range_values_name_the_parameter(extra, param, needle):
    with pytest.raises(APIError) as info:
        parse(extra)
    assert info.value.param == param and needle in info.value.message, info.value.message


class Engine:
    """What the server would send an engine of ``kind`` serving model ``m``."""

    def __init__(self, kind: str):
        self.cfg = ModelConfig(name="m", engine=kind)

    def _to_generate(self, endpoint: str, body):
        return to_generate(endpoint, body, self.cfg, "req-1")


def server(engine: str) -> Engine:
    return Engine(engine)


@pytest.mark.parametrize("name,value", [("presence_penalty", 0.5), ("frequency_penalty", -1),
                                        ("logit_bias", {"3": 5})])
def test_triton_rejects_penalties_and_bias_but_not_their_no_op_values(name, value):
    with pytest.raises(APIError) as info:
        server("triton")._to_generate("chat", parse({name: value}))
    assert info.value.status == 400 and info.value.param == name
    assert info.value.code == "unsupported_parameter"
    noop = {} if name == "logit_bias" else 0
    assert server("triton")._to_generate("chat", parse({name: noop})).extras == {}


@pytest.mark.parametrize("engine", ["zmq", "vllm"])
def test_engines_with_penalties_and_bias_get_them(engine):
    options = {"presence_penalty": 0.5, "frequency_penalty": 1, "logit_bias": {"3": 5}}
    req = server(engine)._to_generate("completion", parse(options, CompletionRequest))
    assert req.extras == {"presence_penalty": 0.5, "frequency_penalty": 1.0,
                          "logit_bias": {"3": 5.0}}


def test_unknown_model_is_a_404_model_not_found():
    with pytest.raises(APIError) as info:
        OpenAIServer({"models": [{"name": "m"}]}).model_config("nope", None)
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found",
                                                                      "model")


def _validator(doc: dict, ref: dict) -> jsonschema.Draft202012Validator:
    """A validator for ``ref`` (``#/components/...``) inside the OpenAPI document."""
    resource = Resource.from_contents(
        {**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"})
    registry = Registry().with_resource("urn:doc", resource)
    return jsonschema.Draft202012Validator({"$ref": "urn:doc" + ref["$ref"]}, registry=registry)


@pytest.mark.parametrize("auth", [False, True])
def test_openapi_document_describes_every_route(auth):
    doc = openapi_document(["tiny", "other"], auth)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    ops = {(path, method): op for path, item in doc["paths"].items()
           for method, op in item.items()}
    assert set(ops) == {("/health", "get"), ("/v1/models", "get"),
                        ("/v1/models/{model_id}", "get"), ("/v1/chat/completions", "post"),
                        ("/v1/completions", "post")}
    for (path, _), op in ops.items():
        errors = {s for s in op["responses"] if s != "200"}
        for status in errors:
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}
        if path == "/health":
            assert errors == set() and "security" not in op
            continue
        assert ("401" in errors) == auth == ("security" in op)
        assert {"429", "503"} <= errors
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = ops[(path, "post")]
        assert {"400", "404", "413", "415"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        request = _validator(doc, op["requestBody"]["content"]["application/json"]["schema"])
        body = {"model": "tiny", "max_tokens": 3, "logit_bias": {"5": 1}}
        body.update({"messages": CHAT["messages"]} if "chat" in path else {"prompt": "hi"})
        request.validate(body)
        assert not request.is_valid({**body, "model": "unknown"})  # only served names
        assert not request.is_valid({**body, "stream": "yes"})
    assert ("securitySchemes" in doc["components"]) == auth


def test_openapi_document_lists_exactly_the_accepted_fields():
    doc = openapi_document(["tiny"], False, engine_options={"top_k", "presence_penalty"},
                           max_tokens=63)
    schema = doc["components"]["schemas"]["CompletionRequest"]
    assert schema["additionalProperties"] is False  # the server answers others with a 400
    assert {"user", "metadata", "top_k", "logit_bias"} <= set(schema["properties"])
    request = _validator(doc, {"$ref": "#/components/schemas/CompletionRequest"})
    body = {"model": "tiny", "prompt": "hi", "user": "u", "top_k": 5, "max_tokens": 63}
    request.validate(body)
    assert not request.is_valid({**body, "frobnicate": 1})
    assert not request.is_valid({**body, "max_tokens": 64})  # the context's limit
    assert "top_k" not in openapi_document(["tiny"], False)["components"]["schemas"][
        "CompletionRequest"]["properties"]


# ---- embeddings ---------------------------------------------------------------------

def _embedding(body: dict):
    try:
        return EmbeddingRequest.model_validate({"model": "e", **body})
    except ValidationError as err:
        raise APIError.from_validation(err) from None


@pytest.mark.parametrize("value, inputs", [
    ("a text", ["a text"]), (["a", "b"], ["a", "b"]), ([101, 7, 102], [[101, 7, 102]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_every_embedding_input_form_is_a_list_of_inputs(value, inputs):
    assert _embedding({"input": value}).inputs() == inputs


@pytest.mark.parametrize("body, param, needle", [
    ({"input": ""}, "input", "at least 1 character"),
    ({"input": []}, "input", "at least 1 item"),
    ({"input": [[]]}, "input.0", "at least 1 item"),
    ({"input": ["a", 1]}, "input.1", "valid string"),
    ({"input": [1, -1]}, "input.1", "greater than or equal to 0"),
    ({"input": ["x"] * 2049}, "input", "at most 2048 inputs"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "x", "dimensions": "8"}, "dimensions", "valid integer"),
    ({}, "input", "Missing required parameter"),
])
def test_bad_embedding_requests_name_the_field(body, param, needle):
    with pytest.raises(APIError) as info:
        _embedding(body)
    assert (info.value.status, info.value.param) == (400, param) and needle in info.value.message


def test_openapi_lists_embeddings_only_where_a_model_serves_them():
    doc = openapi_document(["tiny"], False, embedding_models=["minilm"])
    op = doc["paths"]["/v1/embeddings"]["post"]
    assert set(op["responses"]["200"]["content"]) == {"application/json"}
    request = _validator(doc, op["requestBody"]["content"]["application/json"]["schema"])
    request.validate({"model": "minilm", "input": ["a", "b"], "encoding_format": "base64"})
    assert not request.is_valid({"model": "tiny", "input": "a"})  # a chat model
    assert not request.is_valid({"model": "minilm", "input": "a", "temperature": 1})
    only_embeddings = openapi_document([], False, embedding_models=["minilm"])["paths"]
    assert "/v1/chat/completions" not in only_embeddings and "/v1/embeddings" in only_embeddings
    assert "/v1/embeddings" not in openapi_document(["tiny"], False)["paths"]


@pytest.mark.parametrize("auth", [False, True])
def test_openapi_lists_files_and_batches_where_batch_is_enabled(auth):
    from serve_app.batch.protocol import BatchCreateRequest, file_object, new_batch, page

    assert not {p for p in openapi_document(["tiny"], auth)["paths"] if "/files" in p
                or "/batches" in p}
    doc = openapi_document(["tiny"], auth, batch=True)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    ops = {(path, method): op for path, item in doc["paths"].items()
           for method, op in item.items()}
    assert {key for key in ops if "/files" in key[0] or "/batches" in key[0]} == {
        ("/v1/files", "post"), ("/v1/files", "get"), ("/v1/files/{file_id}", "get"),
        ("/v1/files/{file_id}", "delete"), ("/v1/files/{file_id}/content", "get"),
        ("/v1/batches", "post"), ("/v1/batches", "get"), ("/v1/batches/{batch_id}", "get"),
        ("/v1/batches/{batch_id}/cancel", "post")}
    for (path, _), op in ops.items():
        if path != "/health":
            assert ("security" in op) == auth == ("401" in op["responses"])
    create = ops[("/v1/batches", "post")]
    assert {"400", "404", "413", "415", "429"} <= set(create["responses"])
    request = _validator(doc, create["requestBody"]["content"]["application/json"]["schema"])
    body = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}
    request.validate(body)
    assert not request.is_valid({**body, "endpoint": "/v1/embeddings"})
    assert not request.is_valid({**body, "extra": 1})
    # the objects the batch service returns fit what the document says of them
    batch = new_batch("batch_1", BatchCreateRequest(**body), now=100)
    file = file_object({"id": "file-1", "bytes": 3, "created_at": 1, "expires_at": None,
                        "filename": "in.jsonl", "purpose": "batch"})
    for key, obj in ((("/v1/batches", "post"), batch), (("/v1/files/{file_id}", "get"), file),
                     (("/v1/batches", "get"), page([batch], False))):
        schema = ops[key]["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema.validate(obj, schema)
    assert "multipart/form-data" in ops[("/v1/files", "post")]["requestBody"]["content"]
