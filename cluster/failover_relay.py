"""The failover relay: mid-stream failover for the models with failover on, one process.

A model with failover on (``failover: true``, or ``auto`` decided on:
``cluster.model_routes.decide_failover``) has an application of its own, like any other
model on ``ingress: direct`` (its engine replicas answer HTTP).  HAProxy sends its
requests here instead of to its replicas (``cluster.model_routes``), with the
model's route already in the path; the relay sends each to one of the model's
replicas itself (``cluster.relay_backends``, read from HAProxy's config) and
streams the answer back.  What it adds is memory: it keeps the events of each
stream it passed on, and when the stream is cut (the replica's node died: the
connection ends before the last chunk; or the replica's engine died: an
``engine_unavailable`` error event), it sends the request again, with the text the
client already has as a signed ``hpcserve.continuation`` (``serve_app.continuation``),
to another replica, and passes that replica's events on as the rest of the same
stream.  At most ``RETRIES`` times, as HAProxy retries a request whose replica died
before answering (so does the relay, on another replica, then through HAProxy).

Why a process of its own and not the routed ingress: the routed ingress is a Serve
replica and every chunk crosses a Ray handle stream (gRPC, a core worker) into it,
4.1 ms of its CPU per request at load on the benchmark box.  This is a byte relay
on uvloop's protocols: a replica's chunk is handled in the callback that reads it
(no task switch per chunk), looked at only to cut the stream at event boundaries
and take out the token counts the replica adds for it, and JSON is parsed only when
it resends.  A client that reads slowly pauses the replica's connection.

It listens on loopback only, and answers ``GET /metrics`` there too
(``cluster.relay_metrics``); HAProxy starts it (``cluster.haproxy_guard``) and the
head's ``down`` stops it with the head's session.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import socket
from pathlib import Path

import httptools

from cluster import relay_metrics
from cluster.relay_backends import Server, Servers
from cluster.relay_stream import (LOST_EVENT, LOST_RESPONSE, Request, Response, chunk,
                                  response_head, resume_body)
from serve_app import continuation

log = logging.getLogger("hpcserve.relay")

RETRIES = 2  # resends of a cut stream, and other replicas tried for one that never answered
CONNECT_TIMEOUT_S = 2.0
# kept-alive connections per replica: as many as streams in flight at the heaviest
# load (a request that finds none waits for a new connection and the replica's accept)
IDLE_PER_REPLICA = 512
KEEPALIVE_IDLE_S = 5  # a replica connection silent this long is probed (probe_silent_peer)
_RELAYED = (continuation.RELAYED_HEADER.encode(), b"1")


def probe_silent_peer(sock) -> None:
    """TCP keepalive probes on a replica connection: a node that dies without a word
    (power, network) sends no FIN or RST, and a stream would wait on it forever;
    probed, the connection ends ~``KEEPALIVE_IDLE_S + 3 * 2`` s after its last data
    and the stream is resumed elsewhere.  A live peer's kernel answers the probes,
    however long its engine is silent."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class Upstream(asyncio.Protocol):
    """A connection to a replica (or HAProxy), one exchange at a time; while it has
    one, it counts among its server's requests in flight."""

    def __init__(self, server: Server):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, raw: bytes, response: Response) -> None:
        self.end()
        self.response = response
        self.server.active += 1
        self.transport.write(raw)

    def end(self) -> None:
        """The exchange is over (the connection may take another)."""
        if self.response is not None:
            self.response = None
            self.server.active -= 1

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.close()  # nothing was asked
            return
        try:
            self.response.feed(data)
        except ValueError:  # not HTTP as uvicorn speaks it: as if the connection ended
            log.warning("relay: a malformed response from %s:%d", *self.server.address)
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.response is not None:
            self.response.lost()

    def close(self) -> None:
        self.closed = True
        if self.response is not None:
            self.response.lost()  # anyone waiting on it wakes
        self.end()
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    """A connection from HAProxy: its requests, answered in order, one at a time."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.requests: collections.deque[Request] = collections.deque()
        self.current = Request()
        self.task: asyncio.Task | None = None
        self.upstream: Upstream | None = None  # being streamed from
        self.gone = self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.gone = True
        if self.upstream is not None:
            self.upstream.close()  # so its replica stops generating
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.paused = True
        self._keep_pace()

    def resume_writing(self) -> None:
        self.paused = False
        self._keep_pace()

    def read_from(self, up: Upstream | None) -> None:
        """Stream from ``up`` (None: from no one), reading it only while this client
        keeps up; a connection left paused is read again (it may go back to the pool)."""
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.transport.resume_reading()
        self.upstream = up
        self._keep_pace()

    def _keep_pace(self) -> None:
        """The replica's connection is read only while this client takes what it sends."""
        up = self.upstream
        if up is not None and not up.closed:
            (up.transport.pause_reading if self.paused else up.transport.resume_reading)()

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.transport.write(data)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.current.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.requests.append(self.current)
        self.current = Request()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        try:
            while self.requests and not self.gone:
                request = self.requests.popleft()
                if not await self.relay.relay(request, self) or not request.keep_alive:
                    self.transport.close()
                    return
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("relay: request failed")
            self.transport.close()
        finally:
            self.task = None


class Relay:
    def __init__(self, servers: Servers, haproxy: tuple[str, int], key: bytes | None):
        self.servers = servers
        self.haproxy = Server(*haproxy)  # the way through HAProxy, when no replica is known
        self.key = key
        self.loop = asyncio.get_running_loop()

    async def _connect(self, server: Server) -> tuple[Upstream, bool] | None:
        while server.idle:
            up = server.idle.pop()
            if not up.closed:
                return up, True
        try:
            transport, up = await asyncio.wait_for(self.loop.create_connection(
                lambda: Upstream(server), *server.address), CONNECT_TIMEOUT_S)
            probe_silent_peer(transport.get_extra_info("socket"))
            return up, False
        except (OSError, asyncio.TimeoutError):
            return None

    async def _exchange(self, path: bytes, raw: bytes, tokens: int, tried: set[Server],
                        stats: relay_metrics.ModelStats) -> tuple[Upstream, Response] | None:
        """Send ``raw`` to a replica for ``path`` (a new one to ``tried``; HAProxy when
        none is left), and the exchange once the response's head is in; None if no
        one answered.  A replica that refused or closed before answering is passed
        over a while and another tried, as HAProxy's ``retry-on`` would."""
        attempts = 0
        while attempts <= RETRIES:
            server = self.servers.pick(path, tried) or self.haproxy
            connected = await self._connect(server)
            if connected is None:
                log.warning("relay: %s:%d refused a connection", *server.address)
                attempts += 1
            else:
                up, reused = connected
                response = Response(self.loop, tokens)
                up.send(raw, response)
                try:
                    answered = await response.head
                except asyncio.CancelledError:  # the client left
                    up.close()
                    raise
                if answered:
                    tried.add(server)
                    return up, response
                up.close()
                if reused:
                    continue  # a kept-alive connection it had closed meanwhile
                attempts += 1
            if server is self.haproxy:
                return None
            tried.add(server)
            self.servers.failed(server)
            stats.passed_over.inc()
        if self.haproxy not in tried:  # the last resort, with its health checks
            tried.update(self.servers.known.values())
            return await self._exchange(path, raw, tokens, tried, stats)
        return None

    @staticmethod
    def _release(up: Upstream) -> None:
        """Back to its server's idle connections if it can take another exchange."""
        response = up.response
        up.end()
        if response.keep_alive and not up.closed and not response.buffer \
                and up.transport.is_reading() and len(up.server.idle) < IDLE_PER_REPLICA:
            up.server.idle.append(up)
        else:
            up.close()

    async def relay(self, request: Request, client: Client) -> bool:
        """Answer one request; False when the client connection is to be closed.  An
        upstream connection left unfinished (the client went away) is closed, so
        its replica stops generating."""
        if request.url == relay_metrics.PATH and request.method == b"GET":
            client.write(relay_metrics.response())
            return True
        stats = relay_metrics.stats_for(request.url, self.servers.known_routes)
        stats.requests.inc()
        body = bytes(request.body)
        tried: set[Server] = set()
        exchange = await self._exchange(request.url, request.to(body, [_RELAYED]), 0, tried,
                                        stats)
        if exchange is None:
            stats.lost.inc()
            client.write(LOST_RESPONSE)
            return False
        up, response = exchange
        if not response.is_stream:
            return await self._pass_whole(up, response, client, stats)
        client.write(response_head(response.status, response.headers, True))
        events: list[bytes] = []
        attempt = 0
        while True:
            client.read_from(up)
            try:
                whole = await response.stream_to(client, events)
            finally:
                client.read_from(None)
            if client.gone:
                up.close()
                return False
            if whole:
                self._release(up)
                client.write(b"0\r\n\r\n")
                return True
            up.close()
            resumed = resume_body(body, events, response.tokens)
            if resumed is None or self.key is None or attempt >= RETRIES:
                # it had finished (nothing lost: end it well), or cannot be resumed
                done = any(b"data: [DONE]" in e for e in events)
                if resumed is not None:
                    stats.lost.inc()
                tail = b"" if done else chunk(LOST_EVENT if resumed else b"data: [DONE]\n\n")
                client.write(tail + b"0\r\n\r\n")
                return False
            attempt += 1
            log.warning("relay: stream %s cut after %d tokens; resuming on another "
                        "replica (%d of %d)", request.url.decode(errors="replace"),
                        response.tokens, attempt, RETRIES)
            raw = request.to(resumed, [_RELAYED, (
                continuation.SIGNATURE_HEADER.encode(),
                continuation.sign(self.key, resumed).encode())])
            exchange = await self._exchange(request.url, raw, response.tokens, tried, stats)
            if exchange is None or not exchange[1].is_stream:
                if exchange is not None:
                    exchange[0].close()
                stats.lost.inc()
                client.write(chunk(LOST_EVENT) + b"0\r\n\r\n")
                return False
            stats.resumed.inc()
            up, response = exchange

    async def _pass_whole(self, up: Upstream, response: Response, client: Client,
                          stats: relay_metrics.ModelStats) -> bool:
        """A response that is not a stream: passed on once whole."""
        client.read_from(up)
        try:
            whole = await response.collect()
        finally:
            client.read_from(None)
        if not whole:
            up.close()
            stats.lost.inc()
            client.write(LOST_RESPONSE)
            return False
        self._release(up)
        client.write(response_head(response.status, response.headers, False,
                                    len(response.body)) + bytes(response.body))
        return True


async def serve(port: int, haproxy: tuple[str, int], config: Path | None = None,
                ready: asyncio.Event | None = None) -> None:
    relay = Relay(Servers(config), haproxy, continuation.relay_key())
    server = await relay.loop.create_server(lambda: Client(relay), "127.0.0.1", port,
                                            backlog=4096)
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
    p.add_argument("--config", type=Path, help="HAProxy's config, for the replicas' addresses")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, (host.strip("[]"), int(port)), args.config))


if __name__ == "__main__":
    main()
