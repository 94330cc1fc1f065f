"""HTTP/1.1 for the failover relay: a client's request, and a replica's answer as it comes.

The relay's peers are HAProxy (clients) and Serve's replicas (uvicorn), so this is
the little of HTTP/1.1 they speak: requests parsed by httptools; responses by hand,
because what the relay does with a response is per chunk: an event stream's chunks
are cut at SSE event boundaries, the token counts a replica adds for the relay
(``serve_app.continuation``) taken out, and an ``engine_unavailable`` error event
kept back (the relay resumes the stream instead), all in the callback that read
them (``Response.feed``), so no task wakes per chunk.
"""

from __future__ import annotations

import asyncio
import http
from typing import Protocol

import orjson

from serve_app import continuation

_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
        b"proxy-connection", b"te", b"trailer", b"upgrade", b"expect"}
LOST_JSON = (b'{"error":{"message":"The engine replica serving this stream was lost and '
             b'no other replica could continue it.","type":"server_error","param":null,'
             b'"code":"engine_unavailable"}}')
LOST_EVENT = b"data: " + LOST_JSON + b"\n\ndata: [DONE]\n\n"  # its end as an SSE error event
_ENGINE_LOST = b'"code":"engine_unavailable"'


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def response_head(status: int, headers: list[tuple[bytes, bytes]], chunked: bool,
                   length: int = 0) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [k + b": " + v for k, v in headers if k.lower() not in _HOP]
    lines.append(b"transfer-encoding: chunked" if chunked else b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


LOST_RESPONSE = response_head(503, [(b"content-type", b"application/json"),
                                      (b"retry-after", b"1")], False, len(LOST_JSON)) + LOST_JSON


class Request:
    """A client's request, as httptools parsed it."""

    def __init__(self):
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.keep_alive = True

    def to(self, body: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
        """This request for a replica: hop-by-hop headers and a client's ``x-hpcserve-*``
        (the relay's own) left out, ``extra`` added."""
        lines = [self.method + b" " + self.url + b" HTTP/1.1"]
        lines += [k + b": " + v for k, v in self.headers
                  if k.lower() not in _HOP and not k.lower().startswith(b"x-hpcserve-")]
        lines += [k + b": " + v for k, v in extra]
        lines.append(b"content-length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Response:
    """A replica's answer, parsed from the bytes as they come.  ``head`` resolves
    (True) once its head is in, or (False) if the connection ended first; ``done``
    once it ended: True whole, False cut.  Its body is collected (``collect``) or,
    for an event stream, passed on to the client chunk by chunk (``stream_to``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokens: int = 0):
        self.head, self.done = loop.create_future(), loop.create_future()
        self.status, self.headers, self.keep_alive = 0, [], True
        self.buffer, self.body = bytearray(), bytearray()
        self.length: int | None = None
        self.chunked = False
        self.eof = False
        self.sink: Sink | None = None  # streaming to it
        self.collecting = False
        self.events: list[bytes] = []
        self.pending = bytearray()
        self.tokens = tokens

    @property
    def is_stream(self) -> bool:
        return self.status == 200 and self.chunked and any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream")
            for k, v in self.headers)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if not self.head.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self.buffer[:end]))
            del self.buffer[:end + 4]
            self.head.set_result(True)
        if self.sink is not None or self.collecting:
            self._body()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, status = lines[0].split(b" ", 2)[:2]
        self.status = int(status)
        self.keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            low = name.lower()
            if low == b"content-length":
                self.length = int(value)
            elif low == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif low == b"connection":
                self.keep_alive = b"close" not in value.lower() and (
                    self.keep_alive or b"keep-alive" in value.lower())
            self.headers.append((name, value))
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.length = 0  # no body, whatever the headers say
            self.chunked = False
        elif not self.chunked and self.length is None:
            self.keep_alive = False  # its end is the connection's

    def lost(self) -> None:
        """The connection ended."""
        self.eof = True
        if not self.head.done():
            self.head.set_result(False)
        elif self.sink is not None or self.collecting:
            self._body()

    def collect(self) -> asyncio.Future:
        self.collecting = True
        self._body()
        return self.done

    def stream_to(self, client: Sink, events: list[bytes]) -> asyncio.Future:
        self.sink, self.events = client, events
        self._body()
        return self.done

    def _finish(self, whole: bool) -> None:
        if not self.done.done():
            self.done.set_result(whole)

    def _body(self) -> None:
        buf = self.buffer
        if not self.chunked:
            take = len(buf) if self.length is None else self.length - len(self.body)
            self.body += buf[:take]
            del buf[:take]  # what follows is not this response's (and the connection not reused)
            if self.length is not None and len(self.body) >= self.length:
                self._finish(True)
            elif self.eof:
                self._finish(self.length is None)
            return
        while not self.done.done():
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            try:
                size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
            except ValueError:  # not chunked framing: the stream is lost from here
                buf.clear()
                self.keep_alive = False
                self._finish(False)
                return
            if size == 0:  # the last chunk; then the trailer section, ended by CRLF
                end = buf.find(b"\r\n\r\n", line_end)
                if end < 0 and buf[line_end:line_end + 4] != b"\r\n\r\n":
                    break
                del buf[:(end if end >= 0 else line_end) + 4]
                self._flush_events(final=True)
                self._finish(True)
                return
            start = line_end + 2
            if len(buf) < start + size + 2:
                break
            payload = bytes(buf[start:start + size])
            del buf[:start + size + 2]
            if self.sink is None:
                self.body += payload
            else:
                self.pending += payload
                if not self._flush_events():
                    return
        if self.eof:
            self._finish(False)

    def _flush_events(self, final: bool = False) -> bool:
        """Pass the whole events in ``pending`` on; False when an ``engine_unavailable``
        event cut the stream (it is not passed on: the relay resumes it)."""
        if self.sink is None:
            return True
        pending = self.pending
        cut = len(pending) if final else pending.rfind(b"\n\n") + 2
        if cut < 2:
            return True
        block = bytes(pending[:cut])
        del pending[:cut]
        if block[:1] == b":" or b"\n:" in block:
            block, count = continuation.without_counts(block)
            if count is not None:
                self.tokens = count
        error = block.find(b'data: {"error"')
        engine_lost = error >= 0 and _ENGINE_LOST in block[error:]
        if engine_lost:  # the engine died under a live replica: resume too
            block = block[:error]
        if block:
            self.events.append(block)
            self.sink.write(chunk(block))
        if engine_lost:
            self._finish(False)
            return False
        return True


def resume_body(request_body: bytes, events: list[bytes], tokens: int) -> bytes | None:
    """The request again, with what the client has as ``hpcserve.continuation``; None
    when the stream had already ended (its ``finish_reason`` passed on)."""
    text, first = [], None
    for block in events:
        for line in block.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return None
            event = orjson.loads(line[6:])
            first = first or event
            for choice in event.get("choices") or ():
                if choice.get("finish_reason"):
                    return None
                text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    if first is None:  # the client has no event yet: the request as it was
        return request_body
    data = orjson.loads(request_body)
    options = data.get("hpcserve") if isinstance(data.get("hpcserve"), dict) else {}
    data["hpcserve"] = {**options, "continuation": {
        "text": "".join(text), "id": first["id"], "created": first["created"],
        "tokens": tokens}}
    return orjson.dumps(data)
