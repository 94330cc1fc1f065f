"""``EngineDeployment``: the one Serve deployment that hosts any engine.

What is the same for every engine lives here, once: building the engine from the
registry (``serve_app.engines.base``) with its validated ``engine_args``; coalescing
its token stream into fewer chunks (``coalesce``); refusing a task the model is not
configured for; health checks, stats and the graceful stop (Serve calls ``__del__``;
``atexit`` covers a replica that exits without it) that stops what the engine started.

With ``ingress: routed`` it is a Serve deployment of its own (``engine_deployment``);
with ``ingress: direct`` the replica that answers HTTP holds one as a plain object
(``serve_app.engine_ingress``), so both modes run the same code.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import ValidationError
from ray import serve

from serve_app.config import ModelConfig, describe_validation_error
from serve_app.engines.base import ENGINES, check_model
from serve_app.engines.coalesce import coalesce
from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    EngineError,
    GenerateDelta,
    GenerateRequest,
)

log = logging.getLogger("hpcserve.engines")


class _ClosedIfAbandoned:
    """Closes an engine stream if the task iterating it ends while it waits at a
    ``yield``; ``aclose()`` then waits for that close instead of starting another.

    Serve runs a streaming method inline in the task of its gRPC call, and grpc.aio
    drives it as ``async for msg in handler: await context.write(msg)``: a cancel
    (the caller left) that lands during the write ends that task with the handler
    -- and this generator -- suspended, never closed until garbage collection runs.
    Meanwhile coalesce's pump keeps the engine generating to ``max_tokens``
    (seen in a repeat harness: 2 of 32 cancelled workflow members).

    It watches the task that asks for the first item.  Every consumer of
    ``EngineDeployment.generate`` iterates it from one task for its whole life, or
    from a task that outlives the iteration (direct HTTP: the request's task takes
    the first chunk, Starlette's streaming task the rest); a consumer that ran each
    ``__anext__`` in a task of its own would be cut off after one item.
    """

    _closing: set[asyncio.Task] = set()  # strong references until each close is done

    def __init__(self, stream: AsyncGenerator):
        self.stream, self.task, self.closing = stream, asyncio.current_task(), None
        if self.task is not None:
            self.task.add_done_callback(self._abandoned)

    def _abandoned(self, _: asyncio.Task) -> None:
        self.closing = asyncio.ensure_future(self.stream.aclose())
        self._closing.add(self.closing)
        self.closing.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing an abandoned engine stream failed: %r", task.exception())

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.remove_done_callback(self._abandoned)
        if self.closing is None:
            await self.stream.aclose()
        elif not self.closing.done():
            await asyncio.wait([self.closing])


class EngineDeployment:
    """Hosts the engine of one model (``model``: its ``ModelConfig`` as a dict)."""

    def __init__(self, model: dict[str, Any]):
        self.engine, self._stopped = None, False
        cfg = ModelConfig.model_validate(model)
        try:
            args = check_model(cfg.engine, cfg.task, cfg.engine_args)
        except ValidationError as err:  # validated at deploy time; a stale replica config
            raise ValueError(describe_validation_error(err, f"models[{cfg.name}]")) from None
        self.model_name, self.kind, self.task = cfg.name, cfg.engine, cfg.task
        self.stream_interval_s = cfg.stream_interval_ms / 1000
        engine_cls = ENGINES[cfg.engine].engine_class()
        self.engine = engine_cls(cfg.name, args, cfg.task)
        atexit.register(self.shutdown)  # a replica that exits without __del__

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        self._require("generate")
        chunks = coalesce(self.engine.generate(request), self.stream_interval_s)
        async with aclosing(_ClosedIfAbandoned(chunks)):
            async for chunk in chunks:
                yield chunk

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._require("embed")
        return await self.engine.embed(request)

    async def model_info(self) -> dict[str, Any]:
        return {**await self.engine.model_info(), "task": self.task}

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, "task": self.task, **await self.engine.stats()}

    def shutdown(self) -> None:
        """Stop what the engine started, once (graceful stop, or interpreter exit)."""
        if getattr(self, "engine", None) is None or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("stopping the %s engine of %s failed", self.kind, self.model_name)

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown."""
        self.shutdown()

    def _require(self, task: str) -> None:
        """The ingress refuses the other task first; this guards direct calls."""
        if task != self.task:
            raise EngineError(f"The model '{self.model_name}' is configured with task "
                              f"'{self.task}', not '{task}'.", status=400, param="model",
                              code="unsupported_model")


def engine_deployment(**options: Any):
    """``EngineDeployment`` as a Serve deployment (``ingress: routed``)."""
    return serve.deployment(**options)(EngineDeployment)
