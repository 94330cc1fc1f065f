"""The ZMQ engine wire protocol (version 1).

Any runtime that cannot live inside a Ray actor (an MPI job, a C++ server, a
model in another Python) can serve through hpcserve by speaking this protocol.

Transport
---------
The engine binds a ZeroMQ **ROUTER** socket (e.g. ``tcp://127.0.0.1:5555``); clients
connect **DEALER** sockets.  A client sends single-frame messages; the ROUTER sees
``[client identity, message]`` and answers to that identity, so one DEALER socket
multiplexes any number of concurrent requests.  Every message is one **msgpack map**
with a string ``type`` field; unknown fields are ignored (add fields, never change
their meaning).  ``request_id`` is chosen by the client and is unique per client
connection; control messages (health, stats, info) carry a ``request_id`` too and the
reply echoes it.

Client → engine
---------------
``submit``   ``{type, request_id, prompt, messages, sampling, continuation}``
    Exactly one of ``prompt`` (text, sent to the model as-is) or ``messages`` (list
    of OpenAI chat messages, ``{role, content, ...}``; the engine applies its own chat
    template) is non-nil.  ``continuation`` (string, may be empty) is appended to the
    rendered prompt; only text after it is generated.  ``sampling`` is a map:
    ``max_tokens`` (int or nil = up to the context), ``temperature`` (0 = greedy, nil = 1.0),
    ``top_p``, ``seed`` (int or nil), ``stop`` (list of strings; the stream ends
    before the first occurrence and nothing after it is sent), ``ignore_eos`` (bool),
    and optionally (OpenAI's semantics, over the generated tokens; nil or absent = none)
    ``presence_penalty`` and ``frequency_penalty`` (numbers in [-2, 2]) and
    ``logit_bias`` (map of token id as a decimal string to a number in [-100, 100]).
``embed``    ``{type, request_id, inputs, dimensions}`` (an engine started with
    ``--task embed``): ``inputs`` is a list whose items are each a text (tokenized by
    the engine, special tokens included) or a list of token ids (used as they are);
    ``dimensions`` is nil or the length the client wants (Matryoshka models only).
    The engine batches the inputs of concurrent ``embed`` requests into shared
    forward passes and answers each request with one ``embedding`` or ``error``.
``abort``    ``{type, request_id}``: stop generating and free the request.  The engine
    answers with a final ``delta`` whose ``finish_reason`` is ``"abort"`` if the
    request was still known; aborting an unknown id is not an error.
``health``   ``{type, request_id}``
``stats``    ``{type, request_id}``
``info``     ``{type, request_id}``

Engine → client
---------------
``delta``        ``{type, request_id, text, num_tokens, finish_reason, usage}``
    ``text`` is new UTF-8 text (never a split character), ``num_tokens`` the number
    of generated tokens it covers (a token that completed no character yet is counted
    in a later delta).  The last delta of a request has ``finish_reason`` in
    ``"stop" | "length" | "abort" | "error"`` and ``usage = {prompt_tokens,
    completion_tokens}``; earlier deltas have both nil.
``embedding``    ``{type, request_id, data, shape, prompt_tokens}``: ``data`` is the
    embeddings as little-endian float32 bytes, row-major, ``shape`` is ``[inputs,
    dimensions]`` and ``prompt_tokens`` counts the tokens of all inputs.
``error``        ``{type, request_id, message, status, param, code}``
    The request failed and is finished.  ``status`` is the HTTP status the error
    deserves (400: the request's fault, e.g. ``code = "context_length_exceeded"``
    with ``param = "messages"`` or ``"prompt"``; 500: the engine's).
``health_ok``    ``{type, request_id, ok, detail}``: ``ok`` is false when the engine is
    up but cannot generate (its generation loop died).
``stats_reply``  ``{type, request_id, stats}``: engine counters, a map (see
    ``Batcher.stats``); ``decode_steps_by_batch_size`` has string keys.
``info_reply``   ``{type, request_id, model, max_model_len, task, dimensions}``
    (``task`` is ``"generate"`` or ``"embed"``; ``dimensions`` the embedding size, or nil)
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateDelta,
    GenerateRequest,
    Usage,
)

PROTOCOL_VERSION = 1
# Optional ``sampling`` entries that are ``GenerateRequest.extras`` inside hpcserve.
OPTIONS = ("presence_penalty", "frequency_penalty", "logit_bias")

SUBMIT = "submit"
EMBED = "embed"
ABORT = "abort"
HEALTH = "health"
STATS = "stats"
INFO = "info"
DELTA = "delta"
EMBEDDING = "embedding"
ERROR = "error"
HEALTH_OK = "health_ok"
STATS_REPLY = "stats_reply"
INFO_REPLY = "info_reply"


class WireError(ValueError):
    """A frame that is not a msgpack map with a string ``type``."""


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"not msgpack: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("a message must be a msgpack map with a string 'type'")
    return message


def submit_message(request: GenerateRequest) -> dict[str, Any]:
    """The ``submit`` frame for a request (templating is left to the engine)."""
    s = request.sampling
    options = {k: request.extras[k] for k in OPTIONS if request.extras.get(k) is not None}
    return {
        "type": SUBMIT,
        "request_id": request.request_id,
        "prompt": request.prompt,
        "messages": (
            [m.model_dump(exclude_none=True) for m in request.messages]
            if request.messages is not None else None
        ),
        "sampling": {
            "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "seed": s.seed, "stop": list(s.stop), "ignore_eos": s.ignore_eos, **options,
        },
        "continuation": request.continuation,
    }


def request_from_submit(message: dict[str, Any], model: str) -> GenerateRequest:
    """Validate a ``submit`` frame into the internal request (raises pydantic errors).

    Penalties and logit bias travel in ``sampling`` on the wire and in ``extras``
    inside hpcserve (the batcher validates them)."""
    sampling = message.get("sampling") or {}
    extras = {}
    if isinstance(sampling, dict):
        extras = {k: sampling[k] for k in OPTIONS if sampling.get(k) is not None}
        sampling = {k: v for k, v in sampling.items() if k not in OPTIONS}
    return GenerateRequest(
        request_id=str(message.get("request_id")),
        model=model,
        prompt=message.get("prompt"),
        messages=message.get("messages"),
        sampling=sampling,
        continuation=message.get("continuation") or "",
        extras=extras,
    )


def delta_message(request_id: str, delta: GenerateDelta) -> dict[str, Any]:
    usage = delta.usage
    return {
        "type": DELTA,
        "request_id": request_id,
        "text": delta.text,
        "num_tokens": delta.num_tokens,
        "finish_reason": delta.finish_reason,
        "usage": (
            {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            if usage is not None else None
        ),
    }


def delta_from_message(message: dict[str, Any]) -> GenerateDelta:
    usage = message.get("usage")
    return GenerateDelta(
        text=message.get("text") or "",
        num_tokens=int(message.get("num_tokens") or 0),
        finish_reason=message.get("finish_reason"),
        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        if usage else None,
    )


def embed_message(request: EmbedRequest) -> dict[str, Any]:
    return {"type": EMBED, "request_id": request.request_id, "inputs": request.inputs,
            "dimensions": request.dimensions}


def embed_request_from_message(message: dict[str, Any], model: str) -> EmbedRequest:
    """Validate an ``embed`` frame (raises pydantic errors)."""
    return EmbedRequest(request_id=str(message.get("request_id")), model=model,
                        inputs=message.get("inputs"), dimensions=message.get("dimensions"))


def embedding_message(request_id: str, result: EmbedResult) -> dict[str, Any]:
    array = np.ascontiguousarray(result.embeddings, dtype="<f4")
    return {"type": EMBEDDING, "request_id": request_id, "data": array.tobytes(),
            "shape": list(array.shape), "prompt_tokens": result.prompt_tokens}


def embedding_from_message(message: dict[str, Any]) -> EmbedResult:
    shape = tuple(int(n) for n in message["shape"])
    array = np.frombuffer(message["data"], dtype="<f4").reshape(shape)
    return EmbedResult(embeddings=array.astype(np.float32, copy=False),
                       prompt_tokens=int(message.get("prompt_tokens") or 0))


def event_message(request_id: str, event: GenerateDelta | EmbedResult) -> dict[str, Any]:
    """What the engine sends for one of its batcher's events."""
    if isinstance(event, EmbedResult):
        return embedding_message(request_id, event)
    return delta_message(request_id, event)


def error_message(request_id: str | None, message: str, *, status: int = 500,
                  param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"type": ERROR, "request_id": request_id, "message": message,
            "status": status, "param": param, "code": code}
