"""Talking to a ZMQ engine: an asyncio client, and a way to start an engine process.

``EngineClient`` multiplexes any number of concurrent requests over one DEALER
socket: a single reader task routes each incoming frame to the request it belongs
to.  A consumer that stops reading (client gone, task cancelled) aborts its request
in the engine, so abandoned requests stop costing decode steps.

Error mapping, so the ingress can tell "your request is wrong" from "try another
replica": engine errors with a 4xx status raise ``EngineError``; 5xx errors, and an
engine that stops answering, raise ``EngineUnavailable``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from serve_app.processes import free_port, terminate
from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    EngineError,
    GenerateDelta,
    GenerateRequest,
)
from serve_app.zmq_engine import wire
from serve_app.zmq_engine.server import EXIT_ADDRESS_IN_USE

log = logging.getLogger("hpcserve.zmq_engine")


class EngineUnavailable(ConnectionError):
    """The engine is dead, unreachable or failed internally: retry on another replica."""

    def __init__(self, message: str, *, status: int = 503, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def _raise_for_error(message: dict[str, Any]) -> None:
    status = int(message.get("status") or 500)
    text = str(message.get("message") or "engine error")
    if status >= 500:
        raise EngineUnavailable(text, status=status, code=message.get("code"))
    raise EngineError(text, status=status, param=message.get("param"), code=message.get("code"))


class EngineClient:
    """One connection to an engine, shared by all requests of this process.

    ``stall_timeout``: when a stream has been silent that long the engine is pinged,
    and an engine that does not answer within ``health_timeout`` fails the stream,
    because a dead peer is otherwise indistinguishable from a slow one in ZeroMQ.
    """

    def __init__(self, address: str, *, stall_timeout: float = 10.0, health_timeout: float = 5.0):
        self.address = address
        self.stall_timeout = stall_timeout
        self.health_timeout = health_timeout
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._streams: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    def _connect(self) -> zmq.asyncio.Socket:
        """Create the socket lazily: it belongs to the event loop that first uses it."""
        if self._socket is None:
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(self.address)
            self._socket = sock
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return self._socket

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def _read_loop(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            try:
                message = wire.decode(frame)
            except wire.WireError as exc:
                log.warning("dropping a malformed frame from %s: %s", self.address, exc)
                continue
            rid = message.get("request_id")
            if rid in self._calls:
                future = self._calls.pop(rid)
                if not future.done():
                    future.set_result(message)
            elif rid in self._streams:
                self._streams[rid].put_nowait(message)

    def _send_nowait(self, message: dict[str, Any]) -> None:
        """Send without awaiting: usable from ``finally`` while being cancelled."""
        future = self._connect().send(wire.encode(message))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        """Stream a request's deltas; each item holds every delta that had arrived."""
        sock = self._connect()
        rid = self._next_id()  # wire ids are ours: a retried request_id cannot collide
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._streams[rid] = inbox
        done = False
        try:
            await sock.send(wire.encode({**wire.submit_message(request), "request_id": rid}))
            while not done:
                messages = [await self._wait(inbox)]
                while not inbox.empty():
                    messages.append(inbox.get_nowait())
                deltas: list[GenerateDelta] = []
                error: dict[str, Any] | None = None
                for message in messages:
                    if message["type"] == wire.ERROR:
                        error, done = message, True
                        break
                    delta = wire.delta_from_message(message)
                    deltas.append(delta)
                    done = delta.finish_reason is not None
                    if done:
                        break
                if deltas:
                    yield deltas
                if error is not None:
                    _raise_for_error(error)
        finally:
            self._streams.pop(rid, None)
            if not done and self._socket is not None:
                self._send_nowait({"type": wire.ABORT, "request_id": rid})

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed a request's inputs (the engine batches them with other requests')."""
        sock = self._connect()
        rid = self._next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        answered = False
        try:
            await sock.send(wire.encode({**wire.embed_message(request), "request_id": rid}))
            while not future.done():  # a long queue is fine; a dead engine is not
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        await asyncio.shield(future)
                except TimeoutError:
                    await self.health(self.health_timeout)
            message, answered = future.result(), True
        finally:
            self._calls.pop(rid, None)
            if not answered and self._socket is not None:
                self._send_nowait({"type": wire.ABORT, "request_id": rid})
        if message["type"] == wire.ERROR:
            _raise_for_error(message)
        return wire.embedding_from_message(message)

    async def _wait(self, inbox: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
        """The next message; a health check after every ``stall_timeout`` of silence.

        ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` returns the
        item instead of raising when a cancel lands as the item arrives -- with a
        message every few ms, a cancelled stream then ran on to ``max_tokens``."""
        while True:
            try:
                async with asyncio.timeout(self.stall_timeout):
                    return await inbox.get()
            except TimeoutError:
                await self.health(self.health_timeout)  # raises if the engine is gone

    async def _call(self, kind: str, timeout: float) -> dict[str, Any]:
        sock = self._connect()
        rid = self._next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        try:
            await sock.send(wire.encode({"type": kind, "request_id": rid}))
            async with asyncio.timeout(timeout):
                message = await future
        except TimeoutError:
            raise EngineUnavailable(
                f"engine at {self.address} did not answer {kind!r} within {timeout:g}s") from None
        finally:
            self._calls.pop(rid, None)
        if message["type"] == wire.ERROR:
            _raise_for_error(message)
        return message

    async def health(self, timeout: float = 5.0) -> None:
        """Return if the engine can generate; raise ``EngineUnavailable`` otherwise."""
        reply = await self._call(wire.HEALTH, timeout)
        if not reply.get("ok"):
            raise EngineUnavailable(f"engine at {self.address} is unhealthy: {reply.get('detail')}")

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        return (await self._call(wire.STATS, timeout))["stats"]

    async def model_info(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = await self._call(wire.INFO, timeout)
        return {"model": reply.get("model"), "max_model_len": reply.get("max_model_len"),
                "task": reply.get("task") or "generate", "dimensions": reply.get("dimensions")}

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._reader = None


def wait_healthy(address: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until the engine answers a health check with ok (sync: for start-up code)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"engine exited with code {process.returncode} during start-up")
            sock.send(wire.encode({"type": wire.HEALTH, "request_id": "startup"}))
            if sock.poll(500):
                if wire.decode(sock.recv()).get("ok"):
                    return
                time.sleep(0.5)
    finally:
        sock.close(linger=0)
    raise TimeoutError(f"engine at {address} not healthy after {timeout:g}s")


class EngineProcess:
    """An engine process this process started, and will stop (exactly that PID)."""

    def __init__(self, process: subprocess.Popen, address: str):
        self.process = process
        self.address = address

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def spawn(cls, model_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, *,
              max_batch: int = 32, max_model_len: int | None = None, threads: int | None = None,
              task: str = "generate", extra_args: Sequence[str] = (),
              env: dict[str, str] | None = None, startup_timeout: float = 300.0, watch_parent: bool = True) -> EngineProcess:
        """Start ``serve_app.zmq_engine.server`` in its own session and wait for health.

        With ``port=None`` a free port is picked (and re-picked if another process took
        it first).  ``watch_parent``: the engine exits by itself when this process dies,
        so a killed replica leaves no orphaned engine on the node.
        """
        for attempt in range(3):
            address = f"tcp://{host}:{port or free_port(host)}"
            cmd = [sys.executable, "-m", "serve_app.zmq_engine.server", "--model", str(model_dir),
                   "--bind", address, "--max-batch", str(max_batch), "--task", task,
                   *extra_args]
            if max_model_len:
                cmd += ["--max-model-len", str(max_model_len)]
            if threads:
                cmd += ["--threads", str(threads)]
            if watch_parent:
                cmd += ["--watch-pid", str(os.getpid())]
            process = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                                       start_new_session=True, stdin=subprocess.DEVNULL)
            engine = cls(process, address)
            try:
                wait_healthy(address, startup_timeout, process)
                return engine
            except RuntimeError:
                engine.stop()
                if port is None and process.returncode == EXIT_ADDRESS_IN_USE and attempt < 2:
                    continue
                raise
            except BaseException:
                engine.stop()
                raise
        raise AssertionError("unreachable")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        return terminate(self.process, timeout)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
