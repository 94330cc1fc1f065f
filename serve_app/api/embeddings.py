"""``POST /v1/embeddings``: OpenAI's embeddings for a model with ``task: embed``.

``input`` (a text, texts, token ids, or lists of token ids) becomes one
``EmbedRequest``; the engine embeds all of it, batching with concurrent requests, and
checks what only it can (an input longer than the context is the same 400
``context_length_exceeded`` as in chat; ``dimensions`` on a model that cannot
shorten its vectors is a 400 naming it).  The usage lands in ``ctx.usage`` for the
pipeline's account step.
"""

from __future__ import annotations

from starlette.responses import Response

from serve_app.api.endpoint import Endpoint
from serve_app.api.engine_call import check_available, first_answer
from serve_app.errors import APIError
from serve_app.framing import embedding_list
from serve_app.openai_protocol import IGNORED_FIELDS, EmbeddingRequest
from serve_app.protocol import EmbedRequest, Usage


async def _handle(server, ctx) -> Response:
    body: EmbeddingRequest = ctx.body
    cfg = server.models.get(body.model)  # None: a workflow's name
    if cfg is None or cfg.task != "embed":
        what = "a workflow" if cfg is None else f"task '{cfg.task}': chat and completions"
        raise APIError(400, f"The model '{body.model}' does not serve embeddings ({what}). "
                       f"Models with task 'embed': "
                       f"{sorted(m.name for m in server.config.models if m.task == 'embed')}.",
                       param="model", code="unsupported_model")
    for name in body.extra_fields():
        if name not in IGNORED_FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {name}",
                           param=name, code="unsupported_parameter")
    request = EmbedRequest(request_id=ctx.request_id, model=body.model, inputs=body.inputs(),
                           dimensions=body.dimensions)
    check_available(server, body.model)
    result = await first_answer(server, body.model, server._embed(request),
                                cfg.cold_start_timeout_s)
    ctx.usage = Usage(result.prompt_tokens, 0)
    return Response(embedding_list(body.model, result, body.encoding_format),
                    media_type="application/json")


ENDPOINT = Endpoint("embeddings", "/v1/embeddings", "POST", _handle, body=EmbeddingRequest,
                    generates=True)
