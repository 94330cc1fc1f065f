"""The failover relay between a real HAProxy (the guard's rules) and replicas that die.

HAProxy is configured as the guard configures Serve's (``rewrite`` with a failover
map), the relay runs as its own process, as on a head, reading the replicas'
addresses from that config.  The replicas are a small HTTP server in this test,
listening on two ports (two replicas), that answers as an engine replica does for
the relay: SSE chunks, each opened by its token count; the first stream of each
request is cut mid-stream (the connection dropped, as when a node dies, or an
``engine_unavailable`` error event, as when the engine dies under a live replica).
A real engine replica behind the relay, killed mid-stream, is
``tests/serve_app/test_failover.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import httptools
import httpx
import orjson
import pytest

from cluster.haproxy_guard import frontend_address, rewrite, write_error_pages, write_shed_files
from cluster.model_routes import write_map
from cluster.ports import free_ports
from serve_app import continuation
from tests.cluster.rotation_support import wait_until
from tests.haproxy_support import SERVE_HEAD, answers, check_config, start

TOKEN = "relay-test-token"
# as Serve's defaults: a client that leaves aborts its request upstream
SERVE_LIKE = SERVE_HEAD.replace("    timeout server 30s\n", "    timeout server 30s\n"
                                "    option abortonclose\n") + """frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_tiny path_beg /_m/tiny/
    use_backend tiny if is_tiny
    use_backend router if {{ path_beg / }}
backend tiny
    http-request set-header x-via haproxy
    server r1 127.0.0.1:{replica}
    server r2 127.0.0.1:{replica2}
backend router
    http-request return status 200 content-type text/plain lf-string "router %[path]"
"""


class Replicas:
    """An engine replica's HTTP side, scripted: what it was asked, and how to die."""

    def __init__(self):
        self.requests: list[tuple[bytes, dict, dict]] = []  # (path, headers, body)
        self.ports: list[int] = []  # the port each request came to
        self.cut = "connection"  # or "error_event", or None: streams run to the end
        self.cut_every = False  # resumed streams too (after one word): retries run out
        self.refuse_resumed = False  # answer a resumed stream's request with a 400
        self.delay = 0.0  # between events
        self.hold = 0.0  # before a whole answer
        self.accepted = 0  # connections
        self.abandoned = threading.Event()  # a stream's reader went away

    async def handle(self, reader, writer):
        self.accepted += 1
        try:
            while await self._answer(reader, writer):
                pass  # kept alive, as uvicorn does
        finally:
            writer.close()

    async def _answer(self, reader, writer):
        msg = {"headers": {}, "body": b"", "done": False}

        class P:
            def on_url(self, url): msg["url"] = url
            def on_header(self, k, v): msg["headers"][k.decode().lower()] = v.decode()
            def on_body(self, b): msg["body"] += b
            def on_message_complete(self): msg["done"] = True
        parser = httptools.HttpRequestParser(P())
        while not msg["done"]:
            data = await reader.read(65536)
            if not data:
                return
            parser.feed_data(data)
        body = orjson.loads(msg["body"])
        self.requests.append((msg["url"], msg["headers"], body))
        self.ports.append(writer.get_extra_info("sockname")[1])
        resumed = (body.get("hpcserve") or {}).get("continuation")
        if resumed is not None and (self.refuse_resumed or not continuation.verified(
                msg["body"], msg["headers"].get(continuation.SIGNATURE_HEADER))):
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        if not body.get("stream"):
            if self.hold:
                try:  # while it "generates", a reader that left is seen as the end
                    if not await asyncio.wait_for(reader.read(1), self.hold):
                        self.abandoned.set()
                        return
                except asyncio.TimeoutError:
                    pass
            out = orjson.dumps({"id": "cmpl-1", "choices": [{"text": "whole"}]})
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(out), out))
            await writer.drain()
            return True
        relayed = continuation.RELAYED_HEADER in msg["headers"]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        ident, created = (resumed["id"], resumed["created"]) if resumed else ("cmpl-7", 7)
        tokens = resumed["tokens"] if resumed else 0
        words = [f"w{i} " for i in range(tokens, body["max_tokens"])]
        for i, word in enumerate(words):
            if self.cut and (i == 3 if resumed is None else self.cut_every and i == 1):
                if self.cut == "error_event":
                    err = b'data: {"error":{"message":"x","type":"server_error","param":null,' \
                          b'"code":"engine_unavailable"}}\n\ndata: [DONE]\n\n'
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(err), err))
                    await writer.drain()
                else:
                    writer.transport.abort()  # the node is gone: no last chunk
                return
            tokens += 1
            event = b"data: " + orjson.dumps({"id": ident, "created": created,
                                              "choices": [{"text": word}]}) + b"\n\n"
            if relayed:
                event = continuation.with_count(event, tokens)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            try:
                await writer.drain()
                if self.delay:
                    await asyncio.sleep(self.delay)
            except ConnectionError:
                self.abandoned.set()
                return
            if writer.is_closing() or reader.at_eof():
                self.abandoned.set()
                return
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        return True


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    d = tmp_path_factory.mktemp("relay")
    os.environ["RAY_AUTH_TOKEN"] = TOKEN  # the replicas' side, as on a node of the cluster
    continuation.relay_key.cache_clear()
    replicas = Replicas()
    loop = asyncio.new_event_loop()
    replica_port, replica2, port, relay_port, p1, p2 = free_ports(6)

    async def serve(at):
        return await asyncio.start_server(replicas.handle, "127.0.0.1", at)
    servers = [loop.run_until_complete(serve(at)) for at in (replica_port, replica2)]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    write_error_pages(d)
    write_shed_files(d)
    write_map(d, ["tiny", "plain"], failover=["tiny"])
    config = rewrite(SERVE_LIKE.format(d=d, p1=p1, p2=p2, port=port, replica=replica_port,
                                       replica2=replica2),
                     http_host="127.0.0.1", serve_bind_host="127.0.0.1", error_dir=d,
                     shed_dir=d, relay_port=relay_port)
    (d / "haproxy.cfg").write_text(config)
    check_config(d / "haproxy.cfg")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.failover_relay", "--port", str(relay_port),
         "--upstream", frontend_address(config, "127.0.0.1"), "--config", str(d / "haproxy.cfg")],
        env={**os.environ, "RAY_AUTH_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
        stderr=open(d / "relay.log", "wb"))
    haproxy = start(d / "haproxy.cfg", port)
    wait_until(lambda: answers(relay_port), 30, "relay listening", poll_s=0.05)
    replicas.listening = {replica_port: servers[0], replica2: servers[1]}
    replicas.loop = loop
    replicas.relay_port = relay_port
    yield f"http://127.0.0.1:{port}", replicas, config
    haproxy.terminate()
    proc.terminate()
    haproxy.wait(10)
    proc.wait(10)
    for server in replicas.listening.values():
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    del os.environ["RAY_AUTH_TOKEN"]
    continuation.relay_key.cache_clear()


def _stream(url: str, model: str = "tiny", max_tokens: int = 10) -> tuple[list[dict], bytes]:
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": model, "prompt": "p", "max_tokens": max_tokens, "stream": True}) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_bytes())
    events = [json.loads(line[6:]) for line in raw.split(b"\n")
              if line.startswith(b"data: {")]
    return events, raw


def test_the_guard_sends_failover_models_through_the_relay_only(relay):
    _, _, config = relay
    frontend = config[config.index("frontend http_frontend"):config.index("\nbackend tiny")]
    lines = frontend.splitlines()
    relay_rule = next(i for i, line in enumerate(lines) if "use_backend hpcserve_failover_relay" in line)
    assert relay_rule < next(i for i, line in enumerate(lines) if "use_backend tiny" in line)
    backend = config[config.index("backend hpcserve_failover_relay"):]
    assert "\n    http-reuse always\n    server relay 127.0.0.1:" in backend


@pytest.mark.parametrize("cut", ["connection", "error_event"])
def test_a_cut_stream_continues_on_another_replica_as_one_stream(relay, cut):
    url, replicas, _ = relay
    replicas.cut, replicas.requests[:] = cut, []
    replicas.ports.clear()
    events, raw = _stream(url)
    # one stream: every word once, in order, one id, no count comments, one [DONE]
    assert "".join(e["choices"][0]["text"] for e in events) == "".join(
        f"w{i} " for i in range(10))
    assert {e["id"] for e in events} == {"cmpl-7"}
    assert b"\n:" not in raw and not raw.startswith(b":")
    assert raw.count(b"data: [DONE]") == 1 and b'"error"' not in raw
    (path1, head1, body1), (path2, head2, body2) = replicas.requests
    assert path1 == path2 == b"/_m/tiny/v1/completions"  # at the model's route
    # straight from the relay (not a second pass through HAProxy), to the other replica
    assert "x-via" not in head1 and "x-via" not in head2
    assert replicas.ports[0] != replicas.ports[1]
    assert continuation.SIGNATURE_HEADER not in head1
    assert body2["hpcserve"]["continuation"] == {
        "text": "w0 w1 w2 ", "id": "cmpl-7", "created": 7, "tokens": 3}
    assert {k: v for k, v in body2.items() if k != "hpcserve"} == body1


def _relay_counts(replicas) -> dict[str, float]:
    """The relay's counters for ``tiny``, from its ``GET /metrics`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(f"http://127.0.0.1:{replicas.relay_port}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name: s.value for family in text_string_to_metric_families(r.text)
            for s in family.samples
            if s.name.endswith("_total") and s.labels.get("model") == "tiny"}


@pytest.mark.parametrize("cut", [None, "connection", "unresumable", "refused"])
def test_the_relay_counts_requests_resumed_streams_and_losses_per_model(relay, cut):
    """What HAProxy's backend counters cannot see (the relay reaches the replicas):
    each request, each stream continued on another replica, each one that was not."""
    url, replicas, _ = relay
    before = _relay_counts(replicas)
    replicas.cut, replicas.requests[:] = cut or None, []
    if cut == "unresumable":  # every replica cuts every stream: the retries run out
        replicas.cut, replicas.cut_every = "connection", True
    if cut == "refused":  # the replica asked to go on answers 400: no stream went on
        replicas.cut, replicas.refuse_resumed = "connection", True
    try:
        events, raw = _stream(url)
    finally:
        replicas.cut_every = replicas.refuse_resumed = False
    after = _relay_counts(replicas)
    delta = {name: after.get(name, 0) - before.get(name, 0)
             for name in ("hpcserve_relay_requests_total", "hpcserve_relay_resumed_streams_total",
                          "hpcserve_relay_lost_total")}
    expected = {None: (1, 0, 0), "connection": (1, 1, 0), "unresumable": (1, 2, 1),
                "refused": (1, 0, 1)}[cut]
    assert tuple(delta.values()) == expected, (delta, raw[-300:])
    assert (b'"engine_unavailable"' in raw) == (cut in ("unresumable", "refused"))


def test_only_a_get_of_metrics_is_the_relays_own(relay):
    """A POST there is a request like any other (with no model route: through HAProxy)."""
    _, replicas, _ = relay
    at = f"http://127.0.0.1:{replicas.relay_port}/metrics"
    assert "hpcserve_relay_requests_total" in httpx.get(at, timeout=10).text
    assert httpx.post(at, content=b"{}", timeout=10).text == "router /metrics"


def test_a_stream_with_no_cut_and_other_models_pass_as_they_are(relay):
    url, replicas, _ = relay
    replicas.cut, replicas.requests[:] = None, []
    replicas.ports.clear()
    events, raw = _stream(url, max_tokens=5)
    assert [e["choices"][0]["text"] for e in events] == [f"w{i} " for i in range(5)]
    whole = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "p", "max_tokens": 5}).json()
    assert whole["choices"][0]["text"] == "whole"
    assert len(replicas.requests) == 2
    # a model without failover is not relayed: its route is set, the relay never sees it
    plain = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "plain", "prompt": "p"}).text
    assert plain == "router /_m/plain/v1/completions" and len(replicas.requests) == 2


def test_a_clients_own_hpcserve_headers_never_reach_a_replica(relay):
    """Even a continuation with a valid signature (as if one leaked) is refused by the
    replica when a client sends it: the relay passes on no ``x-hpcserve-*`` header."""
    url, replicas, _ = relay
    replicas.cut, replicas.requests[:] = None, []
    replicas.ports.clear()
    forged = orjson.dumps({"model": "tiny", "prompt": "p", "max_tokens": 5, "stream": True,
                           "hpcserve": {"continuation": {"text": "x", "id": "a", "created": 1,
                                                         "tokens": 1}}})
    r = httpx.post(url + "/v1/completions", content=forged, timeout=30, headers={
        "content-type": "application/json",
        continuation.SIGNATURE_HEADER: continuation.sign(continuation.relay_key(), forged)})
    assert r.status_code == 400
    ((_, headers, _),) = replicas.requests
    assert continuation.SIGNATURE_HEADER not in headers


def test_a_client_that_leaves_mid_stream_stops_the_replicas_stream(relay):
    """The relay closes its upstream connection, HAProxy its own to the replica."""
    url, replicas, _ = relay
    replicas.cut, replicas.delay, replicas.requests[:] = None, 0.02, []
    replicas.ports.clear()
    replicas.abandoned.clear()
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "model": "tiny", "prompt": "p", "max_tokens": 1000, "stream": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        assert replicas.abandoned.wait(10), "the replica kept streaming to nobody"
    finally:
        replicas.delay = 0.0


def _event(delta: dict | None = None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "created": 5, "choices": [choice]}) \
        + b"\n\n"


def test_resume_body_carries_what_the_client_has_unless_the_stream_had_finished():
    from cluster.relay_stream import resume_body
    request = orjson.dumps({"model": "m", "messages": [], "stream": True,
                            "hpcserve": {"trace_texts": False}})
    events = [_event({"role": "assistant", "content": ""}) + _event({"content": "Hel"}),
              _event({"content": "lo"})]
    body = orjson.loads(resume_body(request, events, 4))
    assert body["hpcserve"] == {"trace_texts": False, "continuation": {
        "text": "Hello", "id": "chatcmpl-1", "created": 5, "tokens": 4}}
    assert {k: v for k, v in body.items() if k != "hpcserve"} == {
        "model": "m", "messages": [], "stream": True}
    assert resume_body(request, [], 0) == request  # cut before any event: from the start
    assert resume_body(request, events + [_event(finish="length")], 6) is None
    assert resume_body(request, events + [b"data: [DONE]\n\n"], 6) is None


def test_a_replica_that_refuses_is_passed_over_without_haproxy(relay):
    """As HAProxy's ``retry-on conn-failure`` would: the relay tries the other replica."""
    url, replicas, _ = relay
    (gone, server), (other, _) = replicas.listening.items()
    replicas.loop.call_soon_threadsafe(server.close)
    wait_until(lambda: not answers(gone), 10, "a replica stopped listening", poll_s=0.05)
    replicas.cut, replicas.requests[:] = None, []
    replicas.ports.clear()
    try:
        for _ in range(4):
            events, _raw = _stream(url, max_tokens=3)
            assert len(events) == 3
        assert replicas.ports == [other] * 4
        assert not any("x-via" in headers for _, headers, _ in replicas.requests)
    finally:
        async def listen():
            return await asyncio.start_server(replicas.handle, "127.0.0.1", gone)
        replicas.listening[gone] = asyncio.run_coroutine_threadsafe(
            listen(), replicas.loop).result(10)


def test_a_client_that_leaves_before_a_whole_answer_stops_the_replica_too(relay):
    url, replicas, _ = relay
    replicas.cut, replicas.hold, replicas.requests[:] = None, 20.0, []
    replicas.abandoned.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=httpx.Timeout(30, read=1),
                       json={"model": "tiny", "prompt": "p", "max_tokens": 5})
        assert replicas.abandoned.wait(10), "the replica kept generating for nobody"
    finally:
        replicas.hold = 0.0


def test_streams_side_by_side_arrive_whole(relay):
    """Several streams at once through the one relay process: each arrives whole,
    in order, without its counts."""
    from concurrent.futures import ThreadPoolExecutor

    url, replicas, _ = relay
    replicas.cut, replicas.delay, replicas.requests[:] = None, 0.002, []
    replicas.ports.clear()
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: _stream(url, max_tokens=40), range(6)))
    finally:
        replicas.delay = 0.0
    for events, raw in results:
        assert "".join(e["choices"][0]["text"] for e in events) == "".join(
            f"w{i} " for i in range(40))
        assert raw.count(b"data: [DONE]") == 1 and b"\n:" not in raw


def test_connections_to_the_replicas_are_kept_and_used_again(relay):
    url, replicas, _ = relay
    replicas.cut, replicas.requests[:] = None, []
    replicas.accepted = 0
    for _ in range(3):
        events, _raw = _stream(url, max_tokens=3)
        assert len(events) == 3
        whole = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "p", "max_tokens": 3})
        assert whole.json()["choices"][0]["text"] == "whole"
    assert len(replicas.requests) == 6 and replicas.accepted <= 2  # one per replica at most


def test_a_replica_connection_is_probed_so_a_silent_dead_node_ends_it():
    import socket

    from cluster.failover_relay import KEEPALIVE_IDLE_S, probe_silent_peer
    with socket.socket() as sock:
        probe_silent_peer(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
