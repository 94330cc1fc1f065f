"""``POST /v1/embeddings`` end to end on a real model (all-MiniLM-L6-v2, ZMQ engine).

Both ingress modes: ``direct`` (the embedding model's replica answers HTTP) and
``routed`` (the head's ingress in front of it, with a chat model beside it).  The
official ``openai`` client for every input form and both encodings; raw httpx for
what the SDK would refuse to send; the engine's stats for batching under load.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.serve_app.embedding_support import (
    TEXTS,
    assert_semantics,
    cosines,
    minilm_dir,
    reference_embeddings,
)

API_KEY = "embed-key-1"


@pytest.fixture(scope="module", params=["direct", "routed"])
def stack(hpcserve_stack, stats_probe, request):
    minilm = {"name": "minilm", "engine": "zmq", "task": "embed", "max_model_len": 256,
              "engine_args": {"model_path": str(minilm_dir()), "max_batch": 16},
              "resources": {"hpc_slot": 0.5}}
    models = [minilm]
    if request.param == "routed":
        models.append({"name": "tiny", "engine": "zmq", "max_model_len": 2048,
                       "resources": {"hpc_slot": 0.5}})
    s = hpcserve_stack(args={"api_keys": [API_KEY], "ingress": request.param,
                             "models": models}, name=f"embed-{request.param}")
    s.mode = request.param
    s.probe = stats_probe(s.head, "engine-minilm")
    yield s
    s.probe.close()
    s.down()


def _post(stack, body) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/embeddings", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def test_up_waits_for_the_first_embedding(stack):
    expected = "first token served" if stack.mode == "routed" else "first embedding served"
    assert expected in stack.up_output


def test_embeddings_match_the_reference_and_keep_meaning(stack):
    r = stack.client().embeddings.create(model="minilm", input=TEXTS)
    ours = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == list(range(len(TEXTS))) and r.model == "minilm"
    assert cosines(ours, reference_embeddings(minilm_dir(), TEXTS)).min() >= 0.9999
    assert_semantics(ours)
    tokenizer_counts = r.usage.prompt_tokens
    assert tokenizer_counts == r.usage.total_tokens > len(TEXTS)


def test_every_input_form(stack):
    client = stack.client()
    one = client.embeddings.create(model="minilm", input=TEXTS[0])
    many = client.embeddings.create(model="minilm", input=TEXTS[:2])
    assert len(one.data) == 1 and len(many.data) == 2
    assert np.allclose(one.data[0].embedding, many.data[0].embedding, atol=1e-5)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_dir())(TEXTS[:2])["input_ids"]
    tokens = client.embeddings.create(model="minilm", input=ids[0])
    token_lists = client.embeddings.create(model="minilm", input=ids)
    assert tokens.usage.prompt_tokens == len(ids[0])
    assert cosines(np.array([tokens.data[0].embedding]),
                   np.array([one.data[0].embedding]))[0] > 0.99999
    assert cosines(np.array([d.embedding for d in token_lists.data]),
                   np.array([d.embedding for d in many.data])).min() > 0.99999


def test_base64_decodes_to_the_same_floats(stack):
    floats = _post(stack, {"model": "minilm", "input": TEXTS[:3]}).json()
    packed = _post(stack, {"model": "minilm", "input": TEXTS[:3],
                           "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
    # the SDK asks for base64 by default and decodes it itself (one input, not a
    # batch of three: on AMX CPUs oneDNN's kernels for another batch shape round
    # differently in the last bits, so equal to float32 precision, not bit for bit)
    sdk = stack.client().embeddings.create(model="minilm", input=TEXTS[0])
    np.testing.assert_allclose(np.array(sdk.data[0].embedding, dtype=np.float32),
                               np.array(floats["data"][0]["embedding"], dtype=np.float32),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("body, param, code", [
    ({"input": "word " * 300}, "input", "context_length_exceeded"),
    ({"input": ["fine", "word " * 300]}, "input", "context_length_exceeded"),
    ({"input": "hi", "dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": ["a", 1]}, "input", "invalid_value"),
    ({"input": [101, 99999, 102]}, "input", "invalid_value"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "hi", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "hi", "temperature": 0.5}, "temperature", "unsupported_parameter"),
    ({}, "input", "missing_required_parameter"),
])
def test_bad_inputs_are_400s_naming_the_field(stack, body, param, code):
    r = _post(stack, {"model": "minilm", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    # a list's item is named by its index, as chat's messages.0.role
    found = (error["param"].split(".")[0], error["code"], error["type"])
    assert found == (param, code, "invalid_request_error"), error


def test_the_sdk_gets_the_context_400(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().embeddings.create(model="minilm", input="word " * 300)
    assert info.value.code == "context_length_exceeded"


def test_the_model_is_listed_with_its_task(stack):
    models = {m.id: m for m in stack.client().models.list().data}
    assert models["minilm"].task == "embed" and models["minilm"].max_model_len == 256
    assert set(models) == ({"minilm", "tiny"} if stack.mode == "routed" else {"minilm"})


def test_chat_to_an_embedding_model_is_a_clear_400(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "unsupported_model" and "/v1/embeddings" in info.value.message


def test_embeddings_from_a_chat_model_are_a_clear_400(stack):
    if stack.mode == "direct":
        pytest.skip("one model per direct app")
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().embeddings.create(model="tiny", input="hi")
    assert info.value.code == "unsupported_model" and "'minilm'" in info.value.message


def test_unknown_model_is_404(stack):
    r = _post(stack, {"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_openapi_document_lists_the_endpoint(stack):
    doc = httpx.get(stack.base_url.removesuffix("/v1") + "/openapi.json", timeout=30).json()
    assert "/v1/embeddings" in doc["paths"]
    assert ("/v1/chat/completions" in doc["paths"]) == (stack.mode == "routed")


def test_concurrent_requests_are_batched(stack):
    """32 clients at once: the engine's forward passes hold several requests."""
    before = stack.probe.stats()
    client = stack.client()
    texts = [f"request number {i} about batching" for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda t: client.embeddings.create(model="minilm", input=t),
                                texts))
    assert all(len(r.data) == 1 for r in results)
    after = stack.probe.stats()
    new = {int(k): v - before["embed_batches_by_requests"].get(k, 0)
           for k, v in after["embed_batches_by_requests"].items()}
    batched = sum(v * k for k, v in new.items() if k > 1)
    print("forward passes by requests in them:", json.dumps(new))
    assert after["embed_requests"] - before["embed_requests"] == 64
    assert batched >= 8, new  # at least some requests shared a pass with others
