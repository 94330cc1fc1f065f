"""Turn a ``GenerateRequest`` into the exact prompt text a model continues.

Engines that tokenize themselves (the ZMQ engine, Triton) share this so that the
same request renders the same way everywhere; vLLM applies its own template.
"""

from __future__ import annotations

from typing import Any

from serve_app.protocol import ChatMessage, GenerateRequest


def render_prompt(tokenizer: Any, request: GenerateRequest) -> str:
    """The prompt as-is, or the chat messages through the model's chat template.

    ``request.continuation`` (text a client already received from a replica that
    died) is appended last, so generation resumes exactly where the stream broke.
    """
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            [template_message(m) for m in request.messages],
            add_generation_prompt=True,
            tokenize=False,
        )
    elif request.prompt is not None:
        text = request.prompt
    else:
        raise ValueError("a GenerateRequest needs a prompt or messages")
    return text + request.continuation


def prompt_token_ids(tokenizer: Any, text: str, request: GenerateRequest) -> list[int]:
    """``text`` (what ``render_prompt`` made of ``request``) as the engine's token ids.

    A chat template already wrote any BOS; a raw prompt gets the model's own.
    """
    return tokenizer(text, add_special_tokens=request.messages is None)["input_ids"]


def client_prompt_tokens(tokenizer: Any, request: GenerateRequest, prompt_ids: list[int]) -> int:
    """The prompt tokens usage reports: those of the client's prompt.

    ``prompt_ids`` is the rendered prompt the engine runs, continuation included.  A
    failed-over stream's continuation was completion for the replica that died (and
    the ingress counts it as such), so it is left out: the prompt is counted as the
    first replica counted it, without the continuation.
    """
    if not request.continuation:
        return len(prompt_ids)
    base = request.model_copy(update={"continuation": ""})
    return len(prompt_token_ids(tokenizer, render_prompt(tokenizer, base), base))


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content flattened to a string.

    Templates index ``message['content']`` as text; OpenAI content parts would
    render as a Python list repr, so they are flattened first.  Optional fields
    (name, tool calls) are passed only when set, so templates that test for their
    presence behave as with a plain dict.
    """
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out
