"""``ResponseFramer``'s bytes are exactly what the OpenAPI response models describe.

The models in ``serve_app.openai_protocol`` forbid extra keys, so a field the framer
adds or drops without the models (and so ``/openapi.json``) following fails here.
"""

from __future__ import annotations

import orjson
import pytest

from serve_app.framing import DONE, ResponseFramer
from serve_app.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ErrorResponse,
)
from serve_app.protocol import Usage

CHUNK = {"chat": ChatCompletionChunk, "completion": CompletionChunk}
WHOLE = {"chat": ChatCompletion, "completion": Completion}
ENTRIES = [{"token": "he", "logprob": -0.5, "bytes": [104, 101],
            "top_logprobs": [{"token": "he", "logprob": -0.5, "bytes": [104, 101]},
                             {"token": "x", "logprob": -2.0, "bytes": [120]}]},
           {"token": "llo", "logprob": None, "bytes": None, "top_logprobs": []}]


def events(raw: bytes) -> list[dict]:
    """The JSON events of an SSE byte string (asserting the framing itself)."""
    assert raw.endswith(b"\n\n")
    out = []
    for event in raw.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        if event != DONE.strip():
            out.append(orjson.loads(event[6:]))
    return out


def strict(model, obj: dict):
    return model.model_validate_json(orjson.dumps(obj), strict=True)


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("continuous", [False, True], ids=["plain", "continuous"])
def test_a_stream_is_made_of_the_chunk_model(kind, continuous):
    framer = ResponseFramer(kind, "tiny")
    so_far = (lambda n: Usage(7, n)) if continuous else (lambda n: None)
    raw = (framer.first_chunk(so_far(0)) + framer.text_chunk("Hel\"lo\n", so_far(2))
           + framer.chunk_with_logprobs("hello", framer.logprobs(ENTRIES, 7), so_far(4))
           + framer.final_chunks("length", Usage(7, 4), include_usage=True,
                                 continuous=continuous))
    assert raw.endswith(DONE)
    chunks = [strict(CHUNK[kind], e) for e in events(raw)]
    assert len(chunks) == (5 if kind == "chat" else 4)  # chat opens with the role
    assert {c.id for c in chunks} == {framer.id}
    text = "".join((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text
                   for c in chunks if c.choices)
    assert text == "Hel\"lo\nhello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == 11
    if continuous:  # usage so far on every chunk, as vLLM's server sends it
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == ([0] if kind == "chat" else []) + [2, 4, 4, 4]
        assert all(c.usage.prompt_tokens == 7 for c in chunks)
    else:
        assert all(c.usage is None for c in chunks[:-1])
        assert all("usage" not in e for e in events(raw)[:-1])  # not even as null


def test_completion_logprobs_are_the_legacy_parallel_lists():
    framer = ResponseFramer("completion", "tiny")
    chunk = strict(CompletionChunk, events(framer.chunk_with_logprobs(
        "hello", framer.logprobs(ENTRIES, 3)))[0])
    lp = chunk.choices[0].logprobs
    assert lp.tokens == ["he", "llo"] and lp.text_offset == [3, 5]
    assert lp.token_logprobs == [-0.5, None] and lp.top_logprobs == [{"he": -0.5, "x": -2.0}, {}]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("with_logprobs", [False, True])
def test_a_whole_response_is_the_completion_model(kind, with_logprobs):
    framer = ResponseFramer(kind, "tiny")
    logprobs = framer.logprobs(ENTRIES) if with_logprobs else None
    body = strict(WHOLE[kind], orjson.loads(framer.whole("hello", "stop", Usage(3, 2),
                                                         logprobs)))
    assert body.usage.total_tokens == 5 and body.choices[0].finish_reason == "stop"
    assert (body.choices[0].logprobs is not None) == with_logprobs


def test_an_error_event_is_an_error_response():
    from serve_app.errors import APIError

    framer = ResponseFramer("chat", "tiny")
    raw = framer.error_event(APIError(503, "gone", code="engine_unavailable").body())
    (event,) = events(raw)
    assert strict(ErrorResponse, event).error.code == "engine_unavailable"
    assert raw.endswith(DONE)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_are_the_embedding_list_model(encoding):
    import base64

    import numpy as np

    from serve_app.framing import embedding_list
    from serve_app.openai_protocol import EmbeddingList
    from serve_app.protocol import EmbedResult

    vectors = np.array([[0.1, -1 / 3, 2.5e-8], [1.0, 0.0, -0.5]], dtype=np.float32)
    body = strict(EmbeddingList, orjson.loads(embedding_list("e", EmbedResult(vectors, 7),
                                                             encoding)))
    assert [d.index for d in body.data] == [0, 1]
    assert body.usage.prompt_tokens == body.usage.total_tokens == 7
    for row, item in zip(vectors, body.data):
        got = (np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
               if encoding == "base64" else np.array(item.embedding, dtype=np.float32))
        assert np.array_equal(got, row)  # exactly the engine's float32 values
