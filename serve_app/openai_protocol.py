"""OpenAI wire models: what clients send and what they get back.

Kept apart from serving logic (as in vLLM's entrypoints) so the ingress reads as a
translation between these models and the internal protocol.  Unknown fields are
rejected with a 400 naming them, except those listed in ``IGNORED_FIELDS`` which
clients commonly send and which have no effect on a single-choice text response.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.protocol import ChatMessage

# Accepted and ignored: they do not change the text we generate.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                  "presence_penalty", "frequency_penalty", "logit_bias"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationParams(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by the engine / ingress

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    # None: the engine's / model's own default (vLLM reads generation_config.json).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension, used by benchmarks

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are supported")
        return stops

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class CompletionRequest(_GenerationParams):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, gt=0)  # OpenAI's completions default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hpcserve"
    max_model_len: int | None = None
