"""What a Triton replica sends and reads: its ``engine_args`` model and the tensors.

Why a module of its own (as vllm_requests.py is for vLLM): the model conventions
-- tensor names, sampling as one JSON string or one tensor per parameter, which
outputs to read -- are pure data translation, independent of how the replica
reaches the server (gRPC stream or HTTP SSE, serve_app/engines/triton.py) and of
the server's lifecycle.  Everything here is a plain function of the validated
``TritonEngineArgs``, so it can be read and checked without a Triton server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.protocol import EngineError, GenerateRequest
from serve_app.templating import client_prompt_tokens, prompt_token_ids, render_prompt

# (our name, numpy dtype, Triton dtype) for ``sampling: tensors``.
_SAMPLING_TENSORS = {"max_tokens": (np.int32, "INT32"), "temperature": (np.float32, "FP32"),
                     "top_p": (np.float32, "FP32"), "seed": (np.uint64, "UINT64"),
                     "stop": (np.object_, "BYTES")}


class TritonEngineArgs(BaseModel):
    """``engine_args`` of a Triton model; unknown keys are an error at deploy time."""

    model_config = ConfigDict(extra="forbid")

    # where the server is
    url: str | None = Field(None, description="host:port of a running server (grpc or http "
                            "port, per protocol); the replica starts none")
    model_repository: str | None = Field(None, description="start tritonserver on this repo")
    triton_model: str | None = Field(None, description="model name inside Triton "
                                     "(default: the hpcserve model name)")
    protocol: Literal["grpc", "http"] = Field("grpc", description=(
        "grpc: one stream_infer stream per request; http: generate_stream (SSE)"))
    binary: str | None = Field(None, description="default: the one inside nvidia-pytriton")
    host: str = Field("127.0.0.1", description="where a started server listens")
    http_port: int | None = Field(None, description="a started server's ports (free ones "
                                  "when unset; metrics off without metrics_port)")
    grpc_port: int | None = Field(None, description="as http_port")
    metrics_port: int | None = Field(None, description="as http_port")
    backend_directory: str | None = Field(None, description="tritonserver --backend-directory")
    python_env: str | None = Field(None, description="env whose python the Python-backend "
                                   "stub uses (needs numpy<2 with Triton 2.51)")
    server_args: list[str] = Field(default_factory=list, description="extra tritonserver flags")
    server_env: dict[str, str] = Field(default_factory=dict, description=(
        "extra environment of a started server"))
    startup_timeout_s: float = Field(600.0, description="wait this long for server and model")
    request_timeout_s: float = Field(600.0, description="one request's stream at most")
    # the model's conventions
    tokenizer: str | None = Field(None, description="HF tokenizer dir for chat templates")
    max_model_len: int | None = Field(None, description=(
        "prompt + max_tokens limit (default: config.json next to the tokenizer)"))
    stream: bool = Field(True, description="the stream input; false for non-decoupled models")
    sampling: Literal["json", "tensors"] = Field("json", description=(
        "json: one sampling_parameters tensor (vLLM backend); tensors: one per parameter "
        "(TensorRT-LLM)"))
    output_mode: Literal["delta", "cumulative"] = Field("delta", description=(
        "what each streamed response holds: new text, or all text so far"))
    batch_dim: bool = Field(False, description="a leading batch dimension of 1 on every "
                            "tensor (models with max_batch_size > 0)")
    inputs: dict[str, str | None] = Field(default_factory=dict, description=(
        "rename inputs; null drops one the model lacks"))
    outputs: dict[str, str | None] = Field(default_factory=dict, description=(
        "names of the outputs to read (text_output, finish_reason, num_output_tokens)"))
    sampling_keys: dict[str, str | None] = Field(default_factory=dict, description=(
        "rename a sampling parameter; null: not sent"))
    extra_inputs: dict[str, bool | int | float | str] = Field(default_factory=dict,
                                                              description=(
        "constant inputs sent with every request"))

    @model_validator(mode="after")
    def _defaults(self) -> TritonEngineArgs:
        if self.url and self.model_repository:
            raise ValueError("set url (use a running server) or model_repository "
                             "(start one), not both")
        self.inputs = {"text_input": "text_input", "stream": "stream",
                       "sampling_parameters": "sampling_parameters",
                       "exclude_input_in_output": "exclude_input_in_output",
                       "return_finish_reason": "return_finish_reason",
                       "return_num_output_tokens": "return_num_output_tokens", **self.inputs}
        self.outputs = {"text_output": "text_output", "finish_reason": None,
                        "num_output_tokens": None, **self.outputs}
        default_keys = {k: k for k in ("max_tokens", "temperature", "top_p", "seed", "stop",
                                       "ignore_eos")}
        if self.sampling == "tensors":
            default_keys.update(seed="random_seed", stop="stop_words", ignore_eos=None)
        self.sampling_keys = {**default_keys, **self.sampling_keys}
        return self


def render_request_prompt(request: GenerateRequest, tokenizer: Any, model_name: str,
                          max_model_len: int | None) -> tuple[str, int | None, int]:
    """The prompt text, its token count (None without a tokenizer) and the prompt tokens
    usage reports (``client_prompt_tokens``; 0 without a tokenizer); checks the context."""
    param = "messages" if request.messages is not None else "prompt"
    if request.messages is not None and tokenizer is None:
        raise EngineError(f"model '{model_name}' has no tokenizer configured, so it "
                          "serves completions only", status=400, param="messages",
                          code="chat_not_supported")
    if tokenizer is None:
        return render_prompt(None, request), None, 0
    try:
        prompt = render_prompt(tokenizer, request)
    except Exception as exc:  # a template that rejects the conversation
        raise EngineError(f"cannot apply the chat template: {exc}", status=400,
                          param=param, code="invalid_prompt") from exc
    ids = prompt_token_ids(tokenizer, prompt, request)
    n = len(ids)
    room = (max_model_len or 0) - n
    if max_model_len and (room < 1 or (request.sampling.max_tokens or 1) > room):
        raise EngineError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {n + (request.sampling.max_tokens or 1)} tokens ({n} in the "
            f"{param}, {request.sampling.max_tokens or 1} in the completion).",
            status=400, param=param, code="context_length_exceeded")
    return prompt, n, client_prompt_tokens(tokenizer, request, ids)


def sampling_values(args: TritonEngineArgs, request: GenerateRequest,
                    max_tokens: int | None) -> dict:
    """The request's sampling parameters under the model's names (``sampling_keys``)."""
    s = request.sampling
    values = {"max_tokens": max_tokens, "temperature": s.temperature, "top_p": s.top_p,
              "seed": s.seed, "stop": s.stop or None, "ignore_eos": s.ignore_eos or None}
    return {args.sampling_keys[k]: v for k, v in values.items()
            if v is not None and args.sampling_keys.get(k)}


def input_tensors(args: TritonEngineArgs, prompt: str,
                  sampling: dict) -> dict[str, tuple[np.ndarray, str]]:
    """Input tensors by Triton name: (numpy array without batch dim, Triton dtype)."""
    names = args.inputs
    tensors = {names["text_input"]: (np.array([prompt.encode()], dtype=np.object_), "BYTES")}
    if names.get("stream"):
        tensors[names["stream"]] = (np.array([args.stream]), "BOOL")
    if names.get("exclude_input_in_output"):
        tensors[names["exclude_input_in_output"]] = (np.array([True]), "BOOL")
    if args.sampling == "json":
        tensors[names["sampling_parameters"]] = (
            np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES")
    else:
        ours = {v: k for k, v in args.sampling_keys.items() if v}
        for name, value in sampling.items():
            dtype, triton = _SAMPLING_TENSORS.get(ours[name], (np.object_, "BYTES"))
            items = value if isinstance(value, list) else [value]
            if dtype is np.object_:
                items = [str(v).encode() for v in items]
            tensors[name] = (np.array(items, dtype=dtype), triton)
    for name in ("finish_reason", "num_output_tokens"):  # vLLM backend: ask for them
        flag = names.get(f"return_{name}")
        if args.outputs.get(name) and flag:
            tensors[flag] = (np.array([True]), "BOOL")
    for name, value in args.extra_inputs.items():
        tensors[name] = constant_tensor(value)
    return tensors


def decode_outputs(args: TritonEngineArgs, get: Callable[[str], Any]) -> dict[str, Any]:
    """Outputs we use, by our name; ``get(triton_name)`` returns a value or None."""
    out = {}
    for ours, name in args.outputs.items():
        value = get(name) if name else None
        if value is not None:
            out[ours] = value.decode() if isinstance(value, bytes) else value
    return out


def first_value(value: Any) -> Any:
    """The first element of an output (numpy array or JSON list) as a Python value."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)
        if not value.size:
            return None
        value = value[0]
        return value.item() if isinstance(value, np.generic) else value
    return value[0] if isinstance(value, list) and value else value


def constant_tensor(value: bool | int | float | str) -> tuple[np.ndarray, str]:
    """An ``extra_inputs`` constant as (numpy array, Triton dtype)."""
    if isinstance(value, bool):
        return np.array([value]), "BOOL"
    if isinstance(value, int):
        return np.array([value], dtype=np.int32), "INT32"
    if isinstance(value, float):
        return np.array([value], dtype=np.float32), "FP32"
    return np.array([value.encode()], dtype=np.object_), "BYTES"
