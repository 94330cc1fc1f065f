"""The ZMQ engine's ``Embedder``: pooling read from sentence-transformers configs, the
real all-MiniLM-L6-v2 against the reference, batching across requests, the 400s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.protocol import EmbedRequest, EngineError
from serve_app.zmq_engine.embedder import Embedder, Pooling, load_embedder, pool
from tests.serve_app.embedding_support import (
    TEXTS,
    assert_semantics,
    cosines,
    minilm_dir,
    reference_embeddings,
)


def _st_dir(tmp_path: Path, pooling: dict | None, normalize: bool, *,
            extra_module: str | None = None, config: dict | None = None) -> Path:
    tmp_path.mkdir()
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"}]
    if pooling is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling"})
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    if extra_module:
        modules.append({"idx": 3, "name": "3", "path": "3", "type": extra_module})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (tmp_path / "config.json").write_text(json.dumps(config or {}))
    return tmp_path


def test_pooling_follows_the_sentence_transformers_config(tmp_path):
    cls = _st_dir(tmp_path / "cls", {"pooling_mode_cls_token": True}, normalize=False)
    assert Pooling.from_model_dir(cls) == Pooling("cls_token", False, 128)
    mean = _st_dir(tmp_path / "mean", {"pooling_mode_mean_tokens": True}, normalize=True,
                   config={"matryoshka_dimensions": [64, 128]})
    assert Pooling.from_model_dir(mean) == Pooling("mean_tokens", True, 128, True, [64, 128])
    # A plain transformers directory: what sentence-transformers does with one.
    (tmp_path / "plain").mkdir()
    assert Pooling.from_model_dir(tmp_path / "plain") == Pooling("mean_tokens", False)


def test_modules_it_cannot_run_are_refused_at_start(tmp_path):
    dense = _st_dir(tmp_path / "dense", {"pooling_mode_mean_tokens": True}, normalize=False,
                    extra_module="sentence_transformers.models.Dense")
    with pytest.raises(ValueError, match="Dense"):
        Pooling.from_model_dir(dense)
    two = _st_dir(tmp_path / "two", {"pooling_mode_mean_tokens": True,
                                     "pooling_mode_max_tokens": True}, normalize=False)
    with pytest.raises(ValueError, match="exactly one pooling mode"):
        Pooling.from_model_dir(two)


def test_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [99.0, 99.0]],
                           [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, Pooling("mean_tokens")).tolist() == [[2.0, 1.0], [4.0, 4.0]]
    assert pool(hidden, mask, Pooling("cls_token")).tolist() == [[1.0, 0.0], [2.0, 2.0]]
    assert pool(hidden, mask, Pooling("max_tokens")).tolist() == [[3.0, 2.0], [6.0, 6.0]]
    assert pool(hidden, mask, Pooling("lasttoken")).tolist() == [[3.0, 2.0], [6.0, 6.0]]
    unit = pool(hidden, mask, Pooling("mean_tokens", normalize=True))
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))


# ---- the real model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder(str(minilm_dir()), torch.float32, max_batch=4, max_model_len=None)


def _run(embedder: Embedder, requests: dict[str, list]) -> dict:
    for key, inputs in requests.items():
        embedder.add(key, EmbedRequest(request_id=key, model="m", inputs=inputs))
    results = {}
    while embedder.has_work():
        results.update(embedder.step())
    return results


def test_batched_embeddings_match_the_reference(embedder):
    """Padded batches of up to 4 inputs, across requests, give the reference's vectors."""
    requests = {f"r{i}": [text] for i, text in enumerate(TEXTS[:3])}
    requests["many"] = TEXTS[3:]
    results = _run(embedder, requests)
    ours = np.concatenate([results[k].embeddings for k in requests])
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert cosines(ours, reference_embeddings(minilm_dir(), TEXTS)).min() >= 0.9999
    assert_semantics(ours)
    tokenizer = embedder.tokenizer
    assert results["r0"].prompt_tokens == len(tokenizer(TEXTS[0])["input_ids"])


def test_concurrent_requests_share_forward_passes(embedder):
    before = embedder.stats()
    results = _run(embedder, {f"c{i}": [f"sentence number {i}"] for i in range(6)})
    after = embedder.stats()
    assert len(results) == 6
    new = {int(k): v - before["embed_batches_by_size"].get(k, 0)
           for k, v in after["embed_batches_by_size"].items()}
    assert {k: v for k, v in new.items() if v} == {4: 1, 2: 1}  # max_batch 4, then the rest
    assert after["embed_batches_by_requests"]["4"] >= 1


def test_token_ids_are_used_as_given(embedder):
    ids = embedder.tokenizer(TEXTS[0])["input_ids"]
    results = _run(embedder, {"text": [TEXTS[0]], "ids": [ids]})
    assert cosines(results["text"].embeddings, results["ids"].embeddings)[0] > 0.99999
    assert results["ids"].prompt_tokens == len(ids)


@pytest.mark.parametrize("inputs, dimensions, param, code", [
    (["word " * 300], None, "input", "context_length_exceeded"),  # 256 tokens (ST config)
    (["fine", [101, 99999]], None, "input", "invalid_value"),      # out of vocabulary
    (["fine", []], None, "input", "invalid_value"),
    (["fine"], 128, "dimensions", "unsupported_parameter"),         # not a Matryoshka model
])
def test_inputs_it_cannot_embed_are_400s_before_any_work(embedder, inputs, dimensions,
                                                          param, code):
    with pytest.raises(EngineError) as info:
        embedder.add("bad", EmbedRequest(request_id="bad", model="m", inputs=inputs,
                                         dimensions=dimensions))
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)
    assert not embedder.has_work()


def test_an_aborted_request_is_dropped(embedder):
    embedder.add("gone", EmbedRequest(request_id="gone", model="m", inputs=["bye"]))
    assert embedder.abort("gone") == [] and not embedder.has_work()
