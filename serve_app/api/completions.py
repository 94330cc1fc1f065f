"""``POST /v1/completions``."""

from __future__ import annotations

from serve_app.api.endpoint import Endpoint
from serve_app.api.generation import serve_generation
from serve_app.openai_protocol import CompletionRequest


async def _handle(server, ctx):
    return await serve_generation(server, ctx, "completion")


ENDPOINT = Endpoint("completion", "/v1/completions", "POST", _handle,
                    body=CompletionRequest, generates=True)
