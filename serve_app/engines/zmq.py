"""``ZmqEngine``: relays to hpcserve's ZeroMQ engine process.

The engine runs outside the replica (PyTorch and a decode loop would fight the
replica's event loop for the GIL); the replica only forwards requests and deltas
(or embeddings).  With no ``address`` the replica starts the engine on its own node
and owns it: the engine stops with the replica, and exits by itself if the replica
is killed.  With an ``address`` it relays to an engine something else started (e.g.
the batch job under srun/MPI) and leaves it alone.  ``max_model_len`` caps the
context below the model's own, for an engine the replica starts.

Chat templating and tokenization happen in the engine process (it has the
tokenizer), so the replica sends requests exactly as the ingress gave them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engines.args import ZmqEngineArgs
from serve_app.protocol import EmbedRequest, EmbedResult, GenerateDelta, GenerateRequest
from serve_app.zmq_engine.client import EngineClient, EngineProcess, EngineUnavailable

log = logging.getLogger("hpcserve.engines.zmq")


class ZmqEngine:
    def __init__(self, model_name: str, args: ZmqEngineArgs, task: str = "generate"):
        self.model_name = model_name
        self._process: EngineProcess | None = None
        address = args.address
        if address is None:
            model_path = args.model_path
            if model_path is None:
                from serve_app.tiny_model import ensure_tiny_model
                model_path = str(ensure_tiny_model())
            self._process = EngineProcess.spawn(
                model_path, max_batch=args.max_batch, max_model_len=args.max_model_len,
                threads=args.threads, task=task, extra_args=["--dtype", args.dtype])
            address = self._process.address
            log.info("started engine pid %d for %s on %s", self._process.pid, model_name, address)
        self.address = address
        self._client = EngineClient(address)
        self._info: dict[str, Any] | None = None

    def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        return self._client.generate(request)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self._client.embed(request)

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            info = await self._client.model_info()
            self._info = {"model": self.model_name, "max_model_len": info["max_model_len"],
                          "engine": "zmq", "engine_model": info["model"], "address": self.address}
            if info.get("dimensions"):
                self._info["dimensions"] = info["dimensions"]
        return self._info

    async def check_health(self) -> None:
        if self._process is not None and not self._process.alive():
            raise EngineUnavailable(
                f"engine pid {self._process.pid} exited with {self._process.process.returncode}")
        await self._client.health(timeout=5.0)

    async def stats(self) -> dict[str, Any]:
        return await self._client.stats()

    def shutdown(self) -> None:
        """Stop the engine process this replica started (one given by address stays)."""
        process, self._process = self._process, None
        if process is not None:
            process.stop()
