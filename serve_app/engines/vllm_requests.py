"""Translate between hpcserve's internal protocol and vLLM's OpenAI request models.

Why go through vLLM's own ``ChatCompletionRequest``/``CompletionRequest`` instead of
building ``SamplingParams`` by hand: the bare vLLM server derives sampling defaults,
``max_tokens``, structured outputs (``response_format``), tool templating and
validation from exactly these models.  Using them is what makes a request served
through hpcserve produce the same tokens as the same request sent to bare vLLM, and
vLLM's own validation errors reach the client unchanged (as ``EngineError``).

Imported only inside a vLLM replica (it imports vLLM).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VLLMChatRequest,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest as VLLMCompletionRequest,
)
from vllm.entrypoints.serve.exception_handling.error_response import (
    create_error_response,
)

from serve_app.protocol import EngineError, GenerateRequest
from serve_app.templating import template_message

# vLLM's internal names for the prompt's length limits -> the field a client sent.
_PROMPT_PARAMS = {"input_tokens", "input_text", "prompt_token_ids", "max_model_len"}
_LEADING_NAME = re.compile(r"[`'\"]?([a-z_]+)[`'\"]? ")
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


def to_vllm_request(request: GenerateRequest, model_name: str
                    ) -> VLLMChatRequest | VLLMCompletionRequest:
    """The vLLM OpenAI request equivalent to ``request`` (always ``stream=True``).

    ``stream=True`` makes vLLM build ``RequestOutputKind.DELTA`` sampling params and
    apply its streaming validation rules; whether the *client* streams is the
    ingress's business.  Options in ``request.extras`` that vLLM's request model
    does not define are rejected here, naming the option, rather than being
    silently ignored (vLLM's models accept and drop unknown fields).
    """
    chat = request.messages is not None
    model_cls = VLLMChatRequest if chat else VLLMCompletionRequest
    s = request.sampling
    data: dict[str, Any] = {
        "model": model_name, "stream": True, "seed": s.seed, "stop": list(s.stop),
        "ignore_eos": s.ignore_eos,
    }
    for name in ("temperature", "top_p"):  # unset: vLLM applies the model's defaults
        if getattr(s, name) is not None:
            data[name] = getattr(s, name)
    if chat:
        data["messages"] = [template_message(m) for m in request.messages]
        if s.max_tokens is not None:
            data["max_completion_tokens"] = s.max_tokens
    else:
        if request.prompt is None:
            raise EngineError("A request needs a prompt or messages.", param="prompt",
                              code="missing_required_parameter")
        data["prompt"] = request.prompt
        data["max_tokens"] = s.max_tokens
    if s.logprobs is not None:
        data["logprobs"] = s.logprobs if not chat else True
        if chat:
            data["top_logprobs"] = s.logprobs
    fields = set(model_cls.model_fields)
    for name, value in request.extras.items():
        if name not in fields or name in ("stream", "model", "n", "stream_options"):
            raise EngineError(f"'{name}' is not supported by vLLM's "
                              f"{'chat' if chat else 'completions'} API.", param=name,
                              code="unsupported_parameter")
        data[name] = value
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise EngineError(f"Invalid value for '{param}': {first['msg']}", param=param,
                          code="invalid_value") from None
    except ValueError as err:  # vLLM's own model validators (VLLMValidationError is one)
        raise engine_error(err, chat) or err from None


def engine_error(exc: BaseException, chat: bool) -> EngineError | None:
    """An ``EngineError`` for a client-caused vLLM error, None for a server fault.

    The status comes from vLLM's own classifier (the one its API server uses), so
    what bare vLLM answers with a 4xx is a 4xx here too.  vLLM wraps errors raised
    while adding a request in ``EngineGenerateError``; the cause is classified.
    """
    if isinstance(exc, EngineError):
        return exc
    candidates = [exc]
    if exc.__cause__ is not None:
        candidates.append(exc.__cause__)
    for candidate in candidates:
        if not isinstance(candidate, Exception):
            continue
        info = create_error_response(candidate).error
        if 400 <= int(info.code) < 500:
            return _client_error(info.message, int(info.code), info.param, chat)
    return None


def error_response_to_engine_error(response: Any, chat: bool) -> EngineError:
    """vLLM's renderer returns (rather than raises) some errors as ``ErrorResponse``."""
    info = response.error
    status = int(info.code) if 400 <= int(info.code) < 600 else 400
    return _client_error(info.message, status, info.param, chat)


def _client_error(message: str, status: int, param: str | None, chat: bool) -> EngineError:
    code = "invalid_value"
    if param is None:  # many vLLM checks name the option only in the text ("top_k must ...")
        match = _LEADING_NAME.match(message)
        fields = (VLLMChatRequest if chat else VLLMCompletionRequest).model_fields
        if match and match.group(1) in fields:
            param = match.group(1)
    if "maximum context length" in message or "maximum model length" in message:
        code = "context_length_exceeded"
        param = param if param not in _PROMPT_PARAMS else None
        param = param or ("messages" if chat else "prompt")
    elif param in _PROMPT_PARAMS:
        param = "messages" if chat else "prompt"
    return EngineError(message, status=status, param=param, code=code)


def finish_reason(reason: str | None) -> str:
    return _FINISH.get(reason or "stop", "stop")


def logprobs_content(token_ids, logprobs, tokenizer) -> list[dict[str, Any]]:
    """OpenAI chat-style logprob entries for a delta's tokens (``extras['logprobs']``)."""
    out = []
    for token_id, top in zip(token_ids, logprobs or ()):
        def entry(tid, lp):
            token = lp.decoded_token if lp.decoded_token is not None else \
                tokenizer.decode([tid])
            return {"token": token, "logprob": max(lp.logprob, -9999.0),
                    "bytes": list(token.encode("utf-8", errors="replace"))}
        chosen = top.get(token_id)
        item = entry(token_id, chosen) if chosen is not None else {
            "token": tokenizer.decode([token_id]), "logprob": None, "bytes": None}
        item["top_logprobs"] = [entry(t, lp) for t, lp in
                                sorted(top.items(), key=lambda kv: kv[1].rank or 0)
                                if lp.rank is not None and lp.rank > 0][:len(top)]
        out.append(item)
    return out
