"""A small OpenAI-like streaming server with injected delays and faults.

It runs uvicorn in a thread of the test process on a socket bound to port 0, so the
port is free by construction and stopping it touches nothing but what we started.
Faults are chosen by the server-side arrival number (n % period), which makes the
expected failure counts exact whatever order concurrent requests arrive in.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeConfig:
    chunks: int = 8
    tokens_per_chunk: int = 1
    first_delay: float = 0.02
    chunk_delay: float = 0.005
    period: int = 10
    faults: dict[int, str] = field(default_factory=dict)  # n % period -> "500" | "400" | "break" | "sse_error"
    token_text: str = "tok "


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FakeOpenAI:
    def __init__(self, cfg: FakeConfig) -> None:
        self.cfg = cfg
        self.count = 0
        self.in_flight = 0
        self.peak = 0
        self.in_flight_s = 0.0  # integral of in_flight over time: / wall time = mean in flight
        self._changed = time.perf_counter()
        self.bodies: list[dict[str, Any]] = []
        self.connections: set[int] = set()  # client ports: one per TCP connection
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._handler(chat=True))
        self.app.post("/v1/completions")(self._handler(chat=False))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="critical", access_log=False, lifespan="off", backlog=1024)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def _add_in_flight(self, change: int) -> None:
        now = time.perf_counter()
        self.in_flight_s += self.in_flight * (now - self._changed)
        self.in_flight, self._changed = self.in_flight + change, now

    def _handler(self, chat: bool) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Any:
            body = await request.json()
            self.connections.add(request.client.port)
            n = self.count
            self.count += 1
            self.bodies.append(body)
            fault = self.cfg.faults.get(n % self.cfg.period)
            if fault in ("500", "400"):
                err = {"error": {"message": f"injected {fault}", "type": "test", "param": None, "code": int(fault)}}
                return JSONResponse(err, status_code=int(fault))
            self._add_in_flight(1)
            self.peak = max(self.peak, self.in_flight)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(chat, fault, include_usage), media_type="text/event-stream")

        return handle

    async def _stream(self, chat: bool, fault: str | None, include_usage: bool) -> AsyncIterator[bytes]:
        cfg = self.cfg
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str, finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            return _sse({"id": "x", "object": obj, "choices": [choice]})

        try:
            if chat:  # framing only: must not count as the first token
                yield _sse({"id": "x", "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(cfg.first_delay)
            for i in range(cfg.chunks):
                if i > 0:
                    await asyncio.sleep(cfg.chunk_delay)
                if fault == "break" and i == 2:
                    raise RuntimeError("injected: stream cut mid-way")
                if fault == "sse_error" and i == 1:
                    yield _sse({"error": {"message": "injected engine failure", "type": "internal", "code": 500}})
                    yield b"data: [DONE]\n\n"
                    return
                yield chunk(cfg.token_text * cfg.tokens_per_chunk)
            yield chunk("", finish="length")
            if include_usage:
                total = cfg.chunks * cfg.tokens_per_chunk
                yield _sse({"id": "x", "object": obj, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": total, "total_tokens": total + 7}})
            yield b"data: [DONE]\n\n"
        finally:
            self._add_in_flight(-1)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAI]]:
    """Factory: fake_server(**FakeConfig fields) -> a started server, stopped at teardown."""
    started: list[FakeOpenAI] = []

    def make(**kwargs: Any) -> FakeOpenAI:
        srv = FakeOpenAI(FakeConfig(**kwargs)).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()




@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
