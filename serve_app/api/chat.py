"""``POST /v1/chat/completions``."""

from __future__ import annotations

from serve_app.api.endpoint import Endpoint
from serve_app.api.generation import serve_generation
from serve_app.openai_protocol import ChatCompletionRequest


async def _handle(server, ctx):
    return await serve_generation(server, ctx, "chat")


ENDPOINT = Endpoint("chat", "/v1/chat/completions", "POST", _handle,
                    body=ChatCompletionRequest, generates=True)
