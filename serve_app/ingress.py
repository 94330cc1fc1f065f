"""The routed ingress: one replica on the head in front of the engine deployments.

Used for what needs a router: workflows, models that may scale to zero (it bounds a
cold request's wait) and streams that must survive an engine replica dying
(failover on, or ``ingress: routed`` for every model): the ingress retries on
another replica, continuing from the text already sent (an embedding request is
simply sent again).  With ``direct``/``auto`` the other models answer from
applications of their own (``serve_app.layout``) and this router reaches them by name.  A workflow's name
runs the workflow here, next to the engine handles its steps call
(``serve_app.workflows``).  The engines are
``serve_app.engines.deployment.EngineDeployment`` deployments; the HTTP surface
itself is ``serve_app.api``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import APIError, as_engine_error
from serve_app.api.server import OpenAIServer, openai_deployment
from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateDelta,
    GenerateRequest,
    Usage,
)
from serve_app.workflows import build_workflow
from serve_app.workflows.base import UsageSink

log = logging.getLogger("hpcserve.ingress")


class RoutedIngress(OpenAIServer):
    COLD_START_WAIT = True  # the engine deployment may be scaled to zero

    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle],
                 ledger: DeploymentHandle | None = None, batch: DeploymentHandle | None = None,
                 remote: dict[str, tuple[str, str]] | None = None):
        """``remote``: model -> (deployment, app) of engines in an application of their
        own (``serve_app.layout``), reached by name (they may deploy after us)."""
        super().__init__(config, ledger, batch)
        self.handles = {**engines, **{
            model: serve.get_deployment_handle(name, app, _check_exists=False)
            for model, (name, app) in (remote or {}).items()}}
        self.engines = {name: h.options(stream=True) for name, h in self.handles.items()}
        self.workflow_runners = {w.name: build_workflow(w, self._engine_stream, self.models)
                                 for w in self.config.workflows}

    def _workflow_stream(self, req: GenerateRequest, on_usage: UsageSink | None = None
                         ) -> AsyncIterator[list[GenerateDelta]]:
        return self.workflow_runners[req.model].run(req, on_usage)

    async def _embed(self, req: EmbedRequest) -> EmbedResult:
        """Embed on an engine replica; a replica that died is retried on another."""
        attempt = 0
        while True:
            try:
                return await self.handles[req.model].embed.remote(req)
            except Exception as exc:
                self._retry_or_raise(exc, attempt, self.config.max_retries, req.request_id)
                attempt += 1

    @staticmethod
    def _retry_or_raise(exc: Exception, attempt: int, max_retries: int,
                        request_id: str) -> None:
        """Returns when the failed engine call may be retried; raises otherwise
        (an engine's 4xx as the ``APIError`` the client gets)."""
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        engine_error = as_engine_error(exc)
        if engine_error is not None:
            raise APIError.from_engine(engine_error) from None
        if not isinstance(exc, RayError) or attempt >= max_retries:
            raise exc
        log.warning("engine call for %s failed (%s); retry %d on another replica",
                    request_id, type(exc).__name__, attempt + 1)

    async def _engine_stream(self, req: GenerateRequest, retries: int | None = None
                             ) -> AsyncIterator[list[GenerateDelta]]:
        """Stream from an engine replica, failing over to another if it dies.

        Text already yielded is passed as ``continuation`` so the new replica
        generates only what follows; token budgets and usage are carried over.
        ``retries``: how many times (None: the app's ``max_retries``).
        """
        max_retries = self.config.max_retries if retries is None else retries
        handle = self.engines[req.model]
        sent_text, sent_tokens, attempt, prompt_tokens = "", 0, 0, 0
        budget = req.sampling.max_tokens
        while True:
            call = None
            try:
                call = handle.generate.remote(req)
                async for deltas in call:
                    for d in deltas:
                        sent_text += d.text
                        sent_tokens += d.num_tokens
                        if d.usage is not None:
                            prompt_tokens = prompt_tokens or d.usage.prompt_tokens
                            if attempt:
                                d.usage = Usage(d.usage.prompt_tokens, sent_tokens)
                    yield deltas
                return
            except (asyncio.CancelledError, GeneratorExit):
                # closed while suspended at the yield (the client left while its last
                # chunk was being sent): nothing cancels the engine's request but this
                if call is not None:
                    try:
                        call.cancel()
                    except Exception:  # best effort: the call may be over already
                        log.debug("cancelling %s failed", req.request_id, exc_info=True)
                raise
            except Exception as exc:
                if isinstance(exc, RayError) and budget is not None and sent_tokens >= budget:
                    # cut between its last token and its end: only the end is left
                    yield [GenerateDelta(finish_reason="length",
                                         usage=Usage(prompt_tokens, sent_tokens))]
                    return
                self._retry_or_raise(exc, attempt, max_retries, req.request_id)
                attempt += 1
                sampling = req.sampling.model_copy(update={
                    "max_tokens": None if budget is None else max(1, budget - sent_tokens)})
                req = req.model_copy(update={"continuation": sent_text, "sampling": sampling})


Ingress = openai_deployment(RoutedIngress, name="Ingress", max_ongoing_requests=4096)
