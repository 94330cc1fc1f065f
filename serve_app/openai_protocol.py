"""OpenAI wire models: what clients send and what they get back.

Kept apart from serving logic (as in vLLM's entrypoints) so the ingress reads as a
translation between these models and the internal protocol.  Unknown fields are
rejected with a 400 naming them, except those listed in ``IGNORED_FIELDS`` which
clients commonly send and which have no effect on a single-choice text response.

Types are as strict as OpenAI's: ``"stream": "yes"`` or ``"max_tokens": "5"`` is a
400, not a silent coercion; numbers (temperature, penalties) accept integers.  The
response models describe exactly what ``serve_app.framing`` emits; they are used for
the OpenAPI document (``/openapi.json``) and checked against the framer's output.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)
from typing_extensions import Required, TypedDict

from serve_app.protocol import ChatMessage

# Accepted and ignored: they do not change the text we generate.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}

Number = Annotated[float, Strict()]  # a JSON number (integers too), never a string or bool
Penalty = Annotated[Number, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]+$", max_length=12)]
Bias = Annotated[Number, Field(ge=-100.0, le=100.0)]
INT64 = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = False
    # vLLM's extension (guidellm sends it): usage so far on every chunk; needs include_usage.
    continuous_usage_stats: StrictBool | None = False


class Continuation(BaseModel):
    """A stream resumed on another replica (``serve_app.continuation``): set by the
    failover relay, accepted only signed."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    id: StrictStr
    created: StrictInt
    tokens: StrictInt = Field(ge=0)


class HpcserveOptions(BaseModel):
    """hpcserve's own request options (the ``hpcserve`` field; OpenAI's clients send it
    with ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")
    trace_texts: StrictBool | None = Field(default=False, description=(
        "a workflow's trace (`hpcserve.trace` of the response) includes the text of "
        "every intermediate step"))
    continuation: Continuation | None = Field(default=None, description=(
        "set by hpcserve's failover relay only (signed); a client's is refused"))


class ContentPart(TypedDict, total=False):
    """An OpenAI content part; only ``text`` parts reach the model as text."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    type: Required[StrictStr]
    text: StrictStr


class Message(ChatMessage):
    """A chat message as clients send it (content parts checked, kept as dicts)."""

    content: StrictStr | list[ContentPart] | None = None


class _GenerationParams(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by the engine / ingress

    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, gt=0, le=2**31 - 1)
    # None: the engine's / model's own default (vLLM reads generation_config.json).
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=-INT64 - 1, le=INT64)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    n: StrictInt | None = Field(default=1, ge=1, le=128)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False  # vLLM extension, used by benchmarks
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenId, Bias] | None = Field(
        default=None, description="token id (a string) -> bias added to its logit")
    hpcserve: HpcserveOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        return [v] if isinstance(v, str) else v

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class ChatCompletionRequest(_GenerationParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, gt=0, le=2**31 - 1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class CompletionRequest(_GenerationParams):
    prompt: StrictStr | list[StrictStr] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=16, gt=0, le=2**31 - 1)  # OpenAI's default
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool | None = False
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


Text = Annotated[StrictStr, Field(min_length=1)]
Tokens = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: ``input`` is a text, a list of texts, a list of token
    ids (the model's own tokenizer's), or a list of those."""

    model_config = ConfigDict(extra="allow")  # extras: a 400 naming them (the ingress)

    model: StrictStr = Field(min_length=1)
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | Tokens | Annotated[list[Tokens], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1, description=(
        "shorter vectors, for Matryoshka models only (else a 400 naming it)"))

    @field_validator("input", mode="before")
    @classmethod
    def _at_most(cls, value: Any) -> Any:
        """Said plainly (the union would name a member's first item instead)."""
        if isinstance(value, list) and len(value) > MAX_EMBED_INPUTS and (
                not value or not isinstance(value[0], int)):
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(value)}")
        return value

    def inputs(self) -> list[str | list[int]]:
        """Always a list of inputs, each a text or a list of token ids."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


# ---- responses (what serve_app.framing writes) ------------------------------------
FinishReason = Literal["stop", "length", "abort", "error"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float | None
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[ChatLogprob]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class StepTrace(_Out):
    """One model call of a workflow, in the order the calls started; times in seconds
    from the request's start."""

    step: str = Field(description="e.g. draft, critique, revise, final")
    round: int
    role: Literal["member", "judge"]
    model: str
    member: int | None = Field(default=None, description="the member's place in the panel")
    status: Literal["pending", "running", "ok", "failed", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    start_s: float | None
    end_s: float | None
    latency_s: float | None
    ttft_s: float | None
    finish_reason: FinishReason | None
    error: str | None = None
    text: str | None = Field(default=None, description="with `hpcserve.trace_texts` only")


class Extension(_Out):
    """hpcserve's own field of a response: how a workflow made it.  ``usage`` is the
    sum over every step of ``trace``."""

    workflow: str
    kind: str
    trace: list[StepTrace]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    usage: Usage
    hpcserve: Extension | None = None
    choices: list[ChatChoice]


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    """One ``data:`` event of a chat stream.  The last one before ``[DONE]`` has no
    choices and the usage (``stream_options.include_usage``); with
    ``continuous_usage_stats`` every chunk carries the usage so far."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    hpcserve: Extension | None = Field(default=None, description=(
        "a workflow's trace, on the chunk with `finish_reason`"))


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    usage: Usage
    hpcserve: Extension | None = None
    choices: list[CompletionChoice]


class CompletionChunkChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(_Out):
    """One ``data:`` event of a completions stream (same framing rules as chat)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    hpcserve: Extension | None = Field(default=None, description=(
        "a workflow's trace, on the chunk with `finish_reason`"))


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description=(
        "the vector; with `encoding_format: base64`, its little-endian float32 bytes "
        "in base64"))


class EmbeddingList(_Out):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelStatus(_Out):
    """Published by the control loop (cluster.model_state)."""

    state: Literal["ready", "scaling", "starting", "queued", "cold", "unavailable"]
    running_replicas: int
    target_replicas: int
    walltime_left_s: int | None = None
    reason: str | None = None
    expected_start: int | None = None  # queued: when the scheduler expects the job to start


class Model(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hpcserve"
    engine: str
    task: Literal["generate", "embed"] = Field("generate", description=(
        "generate: chat and completions; embed: embeddings"))
    max_model_len: int | None = None
    status: ModelStatus | None = None
    workflow: dict[str, Any] | None = Field(default=None, description=(
        "a workflow's kind and models (its `engine` is `workflow`; its status is "
        "derived from those of its models)"))


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    error: ErrorBody


class Health(_Out):
    status: Literal["ok"]



def model_object(name: str, created: int, engine: str, max_model_len: int | None,
                 status: dict | None = None, workflow: dict | None = None,
                 task: str = "generate") -> dict:
    """A served model as an OpenAI model object (``Model``); ``status`` is the control
    loop's live state of it (``ModelStatus``), when known; ``workflow`` describes a
    workflow served under the name."""
    out = {"id": name, "object": "model", "created": created, "owned_by": "hpcserve",
           "engine": engine, "task": task, "max_model_len": max_model_len,
           "status": status}
    if workflow is not None:
        out["workflow"] = workflow
    return out
