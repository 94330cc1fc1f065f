"""The direct ingress: the engine replica answers HTTP itself.

With ``ingress: direct`` (and ``auto``, the default) a one-model app has a single
deployment whose replicas hold both the OpenAI surface and the engine; with several
models each always-on model gets such an application of its own (``serve_app.layout``).
Serve's HAProxy sends each request straight to a replica's own HTTP port on its
worker node, so a token goes engine -> replica -> HAProxy -> client: the same number
of hops as a bare vLLM server behind a load balancer, and no gRPC hop or second
Python process touches it.

What is traded away is the routed ingress's mid-stream failover: a replica that dies
mid-stream ends that stream with an error event instead of continuing on another
replica, and an engine failure before the first token is a 503 rather than a retry
(``max_retries`` applies to the routed ingress only).  A replica that dies before
answering at all is HAProxy's to retry (``cluster.head.HAPROXY_RETRY_ON``).  Planned moves (allocation
rotation, scale-down) still lose nothing: Serve drains a replica by taking it out of
HAProxy first and letting its streams finish
(``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``, set by the head).

The engine is held by an ``EngineDeployment`` object (not a deployment of its own),
the same class the routed ingress calls through Serve: coalescing, health, stats
and the graceful stop are that class's in both modes.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from ray import serve

from serve_app.api.server import OpenAIServer, openai_deployment
from serve_app.engines.deployment import EngineDeployment
from serve_app.errors import APIError, as_engine_error
from serve_app.layout import LEDGER_DEPLOYMENT
from serve_app.protocol import EmbedRequest, EmbedResult, GenerateDelta, GenerateRequest


def _client_error(exc: Exception) -> Exception:
    """An engine's 4xx as the ``APIError`` the client gets; anything else unchanged."""
    engine_error = as_engine_error(exc)
    return exc if engine_error is None else APIError.from_engine(engine_error)


class EngineIngress(OpenAIServer):
    """OpenAI routes in front of the app's one model's engine, in the same replica."""

    def __init__(self, config: dict[str, Any], ledger: Any = None, batch: Any = None,
                 ledger_app: str | None = None):
        if ledger_app is not None:  # a model's own application: the router app's ledger
            ledger = serve.get_deployment_handle(LEDGER_DEPLOYMENT, ledger_app,
                                                 _check_exists=False)
        super().__init__(config, ledger, batch)
        (model,) = self.config.models
        self.host = EngineDeployment(model.model_dump())

    async def _engine_stream(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        try:
            async with aclosing(self.host.generate(req)) as stream:
                async for deltas in stream:
                    yield deltas
        except Exception as exc:
            error = _client_error(exc)
            if error is exc:
                raise
            raise error from None

    async def _embed(self, req: EmbedRequest) -> EmbedResult:
        try:
            return await self.host.embed(req)
        except Exception as exc:
            error = _client_error(exc)
            if error is exc:
                raise
            raise error from None

    # What Serve, the batch service and the tests call on an engine deployment, forwarded.
    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        async with aclosing(self.host.generate(req)) as stream:
            async for deltas in stream:
                yield deltas

    async def check_health(self) -> None:
        await self.host.check_health()

    async def model_info(self) -> dict[str, Any]:
        return await self.host.model_info()

    async def stats(self) -> dict[str, Any]:
        return await self.host.stats()

    def __del__(self) -> None:
        """Serve's graceful stop: let the engine stop what it started, now."""
        host = self.__dict__.pop("host", None)
        if host is not None:
            host.shutdown()


DirectIngress = openai_deployment(EngineIngress, name="EngineIngress")


def engine_ingress(**options: Any):
    """The deployment for ``ingress: direct`` (``options``: the model's)."""
    return DirectIngress.options(**options)
