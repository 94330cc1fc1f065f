"""OpenAI response framing: SSE chunks and whole responses, built once per request.

Per-chunk work is the data plane's hottest Python path (it runs for every
token group of every stream), so the constant part of each chunk is serialized
once per request and only the text is encoded per chunk.  The shapes are those of
``serve_app.openai_protocol``'s response models (tests/serve_app/test_framing.py).

``usage`` on a chunk (vLLM's ``stream_options.continuous_usage_stats``) is the usage
so far; without it chunks carry no ``usage`` key, as OpenAI's.

``hpcserve`` (``EXTENSION``) is hpcserve's own field: a workflow's trace, on the whole
response and on the stream's chunk with ``finish_reason``; absent otherwise.  The
last delta of a stream brings it in ``extras[EXTENSION]``.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import numpy as np
import orjson

from serve_app.protocol import EmbedResult, Usage

Kind = Literal["chat", "completion"]
EXTENSION = "hpcserve"
DONE = b"data: [DONE]\n\n"
_SSE_EOL = re.compile(rb"\r\n|\r|\n")


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


class ResponseFramer:
    """Frames one request's output as OpenAI chat or text completion objects."""

    def __init__(self, kind: Kind, model: str, id: str | None = None,
                 created: int | None = None):
        """``id``/``created``: a resumed stream's (``serve_app.continuation``)."""
        self.kind = kind
        self.model = model
        self.id = id or ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = orjson.dumps({"id": self.id, "object": obj, "created": self.created,
                             "model": model})[:-1]
        if kind == "chat":
            self._pre = head + b',"choices":[{"index":0,"delta":{"content":'
            self._post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._pre = head + b',"choices":[{"index":0,"text":'
            self._post = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._head = head
        self._post_open = self._post[:-3]  # without the closing '}\n\n'

    def _event(self, obj: dict) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def first_chunk(self, usage: Usage | None = None) -> bytes:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if self.kind != "chat":
            return b""
        return (b"data: " + self._head + b',"choices":[{"index":0,"delta":{"role":"assistant",'
                b'"content":""},"logprobs":null,"finish_reason":null}]' + _usage(usage)
                + b'}\n\n')

    def text_chunk(self, text: str, usage: Usage | None = None) -> bytes:
        if usage is None:
            return b"data: " + self._pre + orjson.dumps(text) + self._post
        return (b"data: " + self._pre + orjson.dumps(text) + self._post_open + _usage(usage)
                + b"}\n\n")

    def logprobs(self, entries: list[dict], text_offset: int = 0) -> dict:
        """Engine entries (chat-style ``{token, logprob, top_logprobs}``) as OpenAI
        chat ``{"content": [...]}`` or legacy completions' parallel lists."""
        if self.kind == "chat":
            return {"content": entries}
        offsets, pos = [], text_offset
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or ()}
                                 for e in entries],
                "text_offset": offsets}

    def chunk_with_logprobs(self, text: str, logprobs: dict,
                            usage: Usage | None = None) -> bytes:
        """The slow path, only for requests that asked for logprobs."""
        base = {"id": self.id, "created": self.created, "model": self.model}
        if usage is not None:
            base["usage"] = usage_dict(usage)
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                      "finish_reason": None}
            return self._event({**base, "object": "chat.completion.chunk", "choices": [choice]})
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}
        return self._event({**base, "object": "text_completion", "choices": [choice]})

    def final_chunks(self, finish_reason: str, usage: Usage | None,
                     include_usage: bool, continuous: bool = False,
                     extension: dict | None = None) -> bytes:
        """The chunk with ``finish_reason`` (with the usage too if ``continuous``, and
        ``extension`` as ``hpcserve``), the usage chunk if ``include_usage``, ``[DONE]``."""
        base = {"id": self.id, "created": self.created, "model": self.model}
        last = {**base, "usage": usage_dict(usage)} if continuous and usage else base
        if extension:
            last = {**last, EXTENSION: extension}
        if self.kind == "chat":
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
            out = self._event({**last, "object": "chat.completion.chunk", "choices": [choice]})
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
            out = self._event({**last, "object": "text_completion", "choices": [choice]})
        if include_usage and usage is not None:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            out += self._event({**base, "object": obj, "choices": [],
                                "usage": usage_dict(usage)})
        return out + DONE

    def error_event(self, body: dict) -> bytes:
        return self._event(body) + DONE

    def whole(self, text: str, finish_reason: str, usage: Usage,
              logprobs: dict | None = None, extension: dict | None = None) -> bytes:
        base = {"id": self.id, "created": self.created, "model": self.model,
                "usage": usage_dict(usage)}
        if extension:
            base[EXTENSION] = extension
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish_reason}
            return orjson.dumps({**base, "object": "chat.completion", "choices": [choice]})
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return orjson.dumps({**base, "object": "text_completion", "choices": [choice]})


def _usage(usage: Usage | None) -> bytes:
    return b"" if usage is None else b',"usage":' + orjson.dumps(usage_dict(usage))


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an event stream.  SSE ends lines only at CR, LF or CRLF; httpx's
    ``aiter_lines`` also splits at U+2028, U+0085, form feed..., which JSON leaves
    raw inside strings, so a chunk with such a token would be cut in two.  Splitting
    bytes is safe: no UTF-8 multi-byte sequence contains CR or LF."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        parts = _SSE_EOL.split(buf)
        buf = parts.pop()  # (a CRLF split across chunks yields one extra empty line: harmless)
        for part in parts:
            yield part.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


def embedding_list(model: str, result: EmbedResult, encoding_format: str) -> bytes:
    """An ``EmbeddingList`` body.  ``float``: each vector as JSON numbers (float32's
    shortest text, so they parse back to the same float32 values); ``base64``: its
    little-endian float32 bytes, as OpenAI sends them."""
    rows = np.ascontiguousarray(result.embeddings, dtype="<f4")
    if encoding_format == "base64":
        vectors = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        vectors = list(rows)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": result.prompt_tokens,
                                   "total_tokens": result.prompt_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)
