"""``ZmqEngine``: a Serve replica that relays to hpcserve's ZeroMQ engine process.

The engine runs outside the replica (PyTorch and a decode loop would fight the
replica's event loop for the GIL); the replica only forwards requests and deltas.
With no ``address`` the replica starts the engine on its own node and owns it: the
engine stops with the replica, and exits by itself if the replica is killed.  With
an ``address`` it relays to an engine something else started (e.g. the batch job
under srun/MPI) and leaves it alone.  ``max_model_len`` caps the context (prompt +
completion) below the model's own, for an engine the replica starts.

Chat templating happens in the engine process (it has the tokenizer), so the replica
sends requests exactly as the ingress gave them.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.engines.coalesce import coalesce
from serve_app.protocol import GenerateDelta, GenerateRequest
from serve_app.zmq_engine.client import EngineClient, EngineProcess, EngineUnavailable

log = logging.getLogger("hpcserve.engines.zmq")


@serve.deployment
class ZmqEngine:
    def __init__(self, model_name: str, model_path: str | None = None, address: str | None = None,
                 max_batch: int = 32, stream_interval_ms: float = 0.0,
                 max_model_len: int | None = None):
        self.model_name = model_name
        self.stream_interval_s = stream_interval_ms / 1000
        self._process: EngineProcess | None = None
        if address is None:
            if model_path is None:
                from serve_app.tiny_model import ensure_tiny_model
                model_path = str(ensure_tiny_model())
            self._process = EngineProcess.spawn(model_path, max_batch=max_batch,
                                                max_model_len=max_model_len)
            atexit.register(self._process.stop)  # a replica that exits without __del__
            address = self._process.address
            log.info("started engine pid %d for %s on %s", self._process.pid, model_name, address)
        self.address = address
        self._client = EngineClient(address)
        self._info: dict[str, Any] | None = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        async for deltas in coalesce(self._client.generate(request), self.stream_interval_s):
            yield deltas

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            info = await self._client.model_info()
            self._info = {"model": self.model_name, "max_model_len": info["max_model_len"],
                          "engine": "zmq", "engine_model": info["model"], "address": self.address}
        return self._info

    async def check_health(self) -> None:
        if self._process is not None and not self._process.alive():
            raise EngineUnavailable(
                f"engine pid {self._process.pid} exited with {self._process.process.returncode}")
        await self._client.health(timeout=5.0)

    async def stats(self) -> dict[str, Any]:
        return await self._client.stats()

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown: stop the engine this replica started."""
        process = getattr(self, "_process", None)
        if process is not None:
            process.stop()
            atexit.unregister(process.stop)
            self._process = None
