"""The internal engine protocol: one request shape in, a stream of deltas out
(generation), or inputs in and one matrix of embeddings out (``EmbedRequest``).

Every engine (ZMQ, vLLM, Triton) implements exactly this, so the ingress frames
OpenAI responses once and engines never see HTTP.  Requests are validated pydantic
models (they cross a process boundary once per request); deltas are slotted
dataclasses because they cross it once per chunk and must pickle cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Flatten OpenAI content parts (text only) to a string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class SamplingParams(BaseModel):
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float | None = None  # None: the model's default (1.0 if it has none)
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


class GenerateRequest(BaseModel):
    """What the ingress asks an engine to do.

    Exactly one of ``prompt`` or ``messages`` is set.  ``continuation`` is text the
    client has already received from a replica that died mid-stream: the engine
    appends it to the (templated) prompt and generates only what follows, so the
    client sees one uninterrupted stream.
    """

    request_id: str
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    continuation: str = ""
    extras: dict[str, Any] = Field(default_factory=dict)


class EmbedRequest(BaseModel):
    """Embed each input: a text (the engine tokenizes it, special tokens included) or
    a list of token ids of the model's own tokenizer (used as they are).
    ``dimensions``: the client asked for shorter vectors (Matryoshka models only)."""

    request_id: str
    model: str
    inputs: list[str | list[int]] = Field(min_length=1)
    dimensions: int | None = None


@dataclass(slots=True)
class EmbedResult:
    """One row per input, in order (float32, ``[len(inputs), dimensions]``).
    ``prompt_tokens``: the inputs' tokens, all counted."""

    embeddings: np.ndarray
    prompt_tokens: int


FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(slots=True)
class Usage:
    """Token counts as OpenAI reports them.  ``prompt_tokens`` is the client's prompt:
    a failed-over request's ``continuation`` is not counted in it (its tokens were
    completion tokens of the replica that died)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class GenerateDelta:
    """A piece of generated text.

    ``num_tokens`` counts the tokens in ``text`` (several when the engine coalesced
    deltas that were ready together).  The last delta of a stream has
    ``finish_reason`` and ``usage`` set.
    """

    text: str = ""
    num_tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class EngineError(Exception):
    """An error the engine attributes to the request (reaches the client as 4xx).

    ``status`` is the HTTP status the ingress should answer with; ``param`` names the
    offending request field when known.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def __reduce__(self):  # keep kwargs across Ray's pickling
        return (_rebuild_engine_error, (self.message, self.status, self.param, self.code))


def _rebuild_engine_error(message, status, param, code):
    return EngineError(message, status=status, param=param, code=code)
