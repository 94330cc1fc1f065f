"""The direct ingress: the engine replica answers HTTP itself.

With ``ingress: direct`` (and ``auto``, the default, for one model) a one-model app
has a single deployment whose replicas hold both the OpenAI surface and the engine.
Serve's HAProxy sends each request straight to a replica's own HTTP port on its
worker node, so a token goes engine -> replica -> HAProxy -> client: the same number
of hops as a bare vLLM server behind a load balancer, and no gRPC hop or second
Python process touches it.

What is traded away is the routed ingress's retries: a replica that dies mid-stream
ends that stream with an error event instead of continuing on another replica, and
an engine failure before the first token is a 503 rather than a retry
(``max_retries`` applies to the routed ingress only).  Planned moves (allocation
rotation, scale-down) still lose nothing: Serve drains a replica by taking it out of
HAProxy first and letting its streams finish
(``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``, set by the head).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from serve_app.engines.base import engine_class
from serve_app.errors import APIError, as_engine_error
from serve_app.api.server import OpenAIServer, openai_deployment
from serve_app.protocol import GenerateDelta, GenerateRequest


class EngineIngress(OpenAIServer):
    """OpenAI routes in front of an engine object living in the same replica."""

    engine_cls: type  # the raw engine class; set by ``engine_ingress``

    def __init__(self, config: dict[str, Any], ledger: Any = None, batch: Any = None,
                 **engine_kwargs: Any):
        super().__init__(config, ledger, batch)
        self.engine = self.engine_cls(**engine_kwargs)

    async def _engine_stream(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        try:
            async for deltas in self.engine.generate(req):
                yield deltas
        except Exception as exc:
            engine_error = as_engine_error(exc)
            if engine_error is None:
                raise
            raise APIError.from_engine(engine_error) from None

    # What Serve, the batch service and the tests call on an engine deployment, forwarded.
    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        async for deltas in self.engine.generate(req):
            yield deltas

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def model_info(self) -> dict[str, Any]:
        return await self.engine.model_info()

    async def stats(self) -> dict[str, Any]:
        return await self.engine.stats()

    def __del__(self) -> None:
        """Serve's graceful stop: let the engine stop what it started, now."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None and hasattr(engine, "__del__"):
            engine.__del__()


def engine_ingress(kind: str, **options: Any):
    """The deployment for ``ingress: direct``: engine ``kind`` answering HTTP."""
    raw = engine_class(kind).func_or_class
    cls = type(f"{raw.__name__}Ingress", (EngineIngress,), {"engine_cls": raw})
    return openai_deployment(cls, **options)
