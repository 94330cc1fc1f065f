"""The failover relay: mid-stream failover for ``failover: true`` models, one process.

A model with ``failover: true`` has an application of its own, like any other
model on ``ingress: direct`` (its engine replicas answer HTTP).  HAProxy sends its
requests here instead of to its replicas (``cluster.model_routes``); the relay
sends each on to HAProxy at the model's route, so a replica answers as usual, and
streams the answer back.  What it adds is memory: it keeps the events of each
stream it passed on, and when the stream is cut (the replica's node died: the
connection ends before the last chunk; or the replica's engine died: an
``engine_unavailable`` error event), it sends the request again, with the text the
client already has as a signed ``hpcserve.continuation`` (``serve_app.continuation``),
to another replica, and passes that replica's events on as the rest of the same
stream.  At most ``RETRIES`` times, as HAProxy retries a request whose replica died
before answering.

Why a process of its own and not the routed ingress: the routed ingress is a Serve
replica and every chunk crosses a Ray handle stream (gRPC, a core worker) into it,
4.1 ms of its CPU per request at load on the benchmark box, and its one replica
saturates first.  This is a byte relay on uvloop: it parses HTTP with httptools,
looks at a stream's events only to cut them at event boundaries and take out the
token counts the replica adds for it, and parses JSON only when it resends.

It listens on loopback only; HAProxy starts it (``cluster.haproxy_guard``) and the
head's ``down`` stops it with the head's session.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import logging
from dataclasses import dataclass, field

import httptools
import orjson

from serve_app import continuation

log = logging.getLogger("hpcserve.relay")

RETRIES = 2
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
        b"proxy-connection", b"te", b"trailer", b"upgrade", b"expect"}
_LOST_JSON = (b'{"error":{"message":"The engine replica serving this stream was lost and '
              b'no other replica could continue it.","type":"server_error","param":null,'
              b'"code":"engine_unavailable"}}')
_LOST = b"data: " + _LOST_JSON + b"\n\ndata: [DONE]\n\n"  # its end as an SSE error event
_ENGINE_LOST = b'"code":"engine_unavailable"'


@dataclass
class Message:
    """One parsed HTTP message (a client's request or an upstream's response)."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    headers_done: bool = False
    done: bool = False
    status: int = 0
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class _Parsed:
    """httptools callbacks filling ``Message`` objects, one per message on a connection."""

    def __init__(self, response: bool):
        self.messages: list[Message] = []
        self.parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(self)

    @property
    def current(self) -> Message:
        return self.messages[-1]

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        m = self.current
        m.headers_done = True
        m.keep_alive = self.parser.should_keep_alive()
        if isinstance(self.parser, httptools.HttpResponseParser):
            m.status = self.parser.get_status_code()
        else:
            m.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.done = True


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def _response_head(m: Message, chunked: bool) -> bytes:
    try:
        reason = http.HTTPStatus(m.status).phrase.encode()
    except ValueError:
        reason = b""
    lines = [b"HTTP/1.1 %d %s" % (m.status, reason)]
    lines += [k + b": " + v for k, v in m.headers if k.lower() not in _HOP]
    lines.append(b"transfer-encoding: chunked" if chunked else b"content-length: %d" % len(m.body))
    return b"\r\n".join(lines) + b"\r\n\r\n"


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


@dataclass
class Upstream:
    """One exchange with HAProxy: its connection and the response being parsed.
    ``pooled`` once the connection went back to the pool (it is closed otherwise)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parsed: _Parsed
    pooled: bool = False

    @property
    def response(self) -> Message:
        return self.parsed.messages[0]

    def close(self) -> None:
        if not self.pooled:
            self.writer.close()


class Relay:
    def __init__(self, upstream: tuple[str, int], key: bytes | None):
        self.upstream = upstream
        self.key = key
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parsed = _Parsed(response=False)
        try:
            while True:
                while not (parsed.messages and parsed.messages[0].done):
                    data = await reader.read(65536)
                    if not data:
                        return
                    parsed.parser.feed_data(data)
                request = parsed.messages.pop(0)
                if not await self.relay(request, writer) or not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, httptools.HttpParserError):
            pass
        except Exception:
            log.exception("relay: request failed")
        finally:
            writer.close()

    def _request_bytes(self, request: Message, body: bytes,
                       extra: list[tuple[bytes, bytes]]) -> bytes:
        """The request for HAProxy: hop-by-hop headers and a client's ``x-hpcserve-*``
        (the relay's own) left out, ``extra`` added."""
        lines = [request.method + b" " + request.url + b" HTTP/1.1"]
        lines += [k + b": " + v for k, v in request.headers
                  if k.lower() not in _HOP and not k.lower().startswith(b"x-hpcserve-")]
        lines += [k + b": " + v for k, v in extra]
        lines.append(b"content-length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def _exchange(self, raw: bytes) -> Upstream | None:
        """Send ``raw`` upstream; the exchange once a response's head is in, or None
        if the connection ended first (a kept-alive one that HAProxy closed meanwhile
        is tried once more, on a new connection)."""
        while True:
            reused = bool(self.idle)
            try:
                ur, uw = self.idle.pop() if reused else await asyncio.open_connection(
                    *self.upstream)
            except OSError:
                log.warning("relay: HAProxy at %s:%d refused a connection", *self.upstream)
                return None
            up = Upstream(ur, uw, _Parsed(response=True))
            try:
                uw.write(raw)
                while not (up.parsed.messages and up.response.headers_done):
                    data = await ur.read(65536)
                    if not data:
                        raise ConnectionResetError
                    up.parsed.parser.feed_data(data)
                return up
            except (ConnectionError, httptools.HttpParserError):
                uw.close()
                if not reused:
                    return None

    def _release(self, up: Upstream) -> None:
        if up.response.keep_alive and len(self.idle) < 256:
            self.idle.append((up.reader, up.writer))
            up.pooled = True
        else:
            up.writer.close()

    async def relay(self, request: Message, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the client connection is to be closed.  An
        upstream connection left unfinished (the client went away) is closed, so
        its replica stops generating."""
        body = bytes(request.body)
        up = await self._exchange(self._request_bytes(
            request, body, [(continuation.RELAYED_HEADER.encode(), b"1")]))
        if up is None:
            writer.write(_LOST_RESPONSE)
            return False
        try:
            stream = up.response.status == 200 and (
                up.response.header(b"content-type") or b"").startswith(b"text/event-stream")
            if not stream:
                return await self._pass_whole(up, writer)
            writer.write(_response_head(up.response, True))
            events: list[bytes] = []
            tokens, attempt = 0, 0
            while True:
                complete, tokens = await self._pass_events(up, writer, events, tokens)
                if complete:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return True
                up.close()
                resumed = resume_body(body, events, tokens)
                if resumed is None or self.key is None or attempt >= RETRIES:
                    # it had finished (nothing lost: end it well), or cannot be resumed
                    done = any(b"data: [DONE]" in e for e in events)
                    tail = b"" if done else _chunk(_LOST if resumed else b"data: [DONE]\n\n")
                    writer.write(tail + b"0\r\n\r\n")
                    await writer.drain()
                    return False
                attempt += 1
                log.warning("relay: stream %s cut after %d tokens; resuming on another "
                            "replica (%d of %d)", request.url.decode(errors="replace"), tokens,
                            attempt, RETRIES)
                up = await self._exchange(self._request_bytes(request, resumed, [
                    (continuation.RELAYED_HEADER.encode(), b"1"),
                    (continuation.SIGNATURE_HEADER.encode(),
                     continuation.sign(self.key, resumed).encode())]))
                if up is None or up.response.status != 200:
                    writer.write(_chunk(_LOST) + b"0\r\n\r\n")
                    await writer.drain()
                    return False
        finally:
            if up is not None:
                up.close()

    async def _pass_whole(self, up: Upstream, writer) -> bool:
        """A response that is not a stream: passed on once whole (HAProxy already
        retried it if its replica died before answering)."""
        while not up.response.done:
            data = await up.reader.read(65536)
            if not data:
                writer.write(_LOST_RESPONSE)
                return False
            up.parsed.parser.feed_data(data)
        self._release(up)
        writer.write(_response_head(up.response, False) + bytes(up.response.body))
        await writer.drain()
        return True

    async def _pass_events(self, up: Upstream, writer, events: list[bytes],
                           tokens: int) -> tuple[bool, int]:
        """Pass a stream's whole events on until it ends; (whether it ended well, the
        completion tokens the client has)."""
        pending = up.response.body
        while True:
            cut = pending.rfind(b"\n\n") + 2
            if cut >= 2:
                block, count = continuation.without_counts(bytes(pending[:cut]))
                del pending[:cut]
                if count is not None:
                    tokens = count
                error = block.find(b'data: {"error"')
                engine_lost = error >= 0 and _ENGINE_LOST in block[error:]
                if engine_lost:  # the engine died under a live replica: resume too
                    block = block[:error]
                if block:
                    events.append(block)
                    writer.write(_chunk(block))
                    await writer.drain()
                if engine_lost:
                    return False, tokens
            if up.response.done:
                self._release(up)
                return True, tokens
            try:
                data = await up.reader.read(65536)
                if data:
                    up.parsed.parser.feed_data(data)
            except (ConnectionError, httptools.HttpParserError):
                data = b""
            if not data:
                return False, tokens


_LOST_RESPONSE = _response_head(Message(status=503, headers=[
    (b"content-type", b"application/json"), (b"retry-after", b"1")],
    body=bytearray(_LOST_JSON)), False) + _LOST_JSON


async def serve(port: int, upstream: tuple[str, int], ready: asyncio.Event | None = None) -> None:
    relay = Relay(upstream, continuation.relay_key())
    server = await asyncio.start_server(relay.serve_client, "127.0.0.1", port, backlog=4096)
    if relay.key is None:
        log.warning("relay: no Ray auth token; cut streams end with an error event")
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    import uvloop
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT of HAProxy's frontend")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, (host.strip("[]"), int(port))))


if __name__ == "__main__":
    main()
