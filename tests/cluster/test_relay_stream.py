"""A replica's answer as the failover relay reads it, fed byte by byte and in odd pieces.

Whatever way TCP splits a response, the client gets whole SSE events without the
token counts, the relay knows the last count, and an ``engine_unavailable`` event
ends the stream as cut (kept back, so the relay can resume it).
"""

from __future__ import annotations

import asyncio

import pytest

from cluster.relay_stream import Response
from serve_app import continuation

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


def _event(i: int) -> bytes:
    return b'data: {"id":"c","choices":[{"text":"w%d "}]}\n\n' % i


def _chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _feed(raw: bytes, piece: int, *, eof: bool = False):
    """A streamed response fed ``piece`` bytes at a time: (response, what the client got)."""
    async def run():
        response = Response(asyncio.get_running_loop(), tokens=2)
        sink = Sink()
        for i in range(0, len(raw), piece):
            response.feed(raw[i:i + piece])
            if response.head.done() and response.sink is None:
                response.stream_to(sink, [])
        if eof:
            response.lost()
        return response, sink
    return asyncio.run(run())


def _dechunked(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        out += rest[:n]
        data = rest[n + 2:]
    return bytes(out)


@pytest.mark.parametrize("piece", [1, 7, 64, 10**6])
def test_events_pass_whole_without_counts_however_the_bytes_come(piece):
    first = continuation.with_count(_event(0), 3) + continuation.with_count(_event(1), 4)
    raw = HEAD + _chunked(first, continuation.with_count(_event(2), 5),
                          b"data: [DONE]\n\n") + b"0\r\n\r\n"
    response, sink = _feed(raw, piece)
    assert response.done.result() is True and response.status == 200 and response.is_stream
    assert response.tokens == 5
    assert _dechunked(bytes(sink.data)) == _event(0) + _event(1) + _event(2) + b"data: [DONE]\n\n"
    assert response.events and not response.buffer


def test_an_engine_lost_event_cuts_the_stream_and_is_kept_back():
    lost = (b'data: {"error":{"message":"x","type":"server_error","param":null,'
            b'"code":"engine_unavailable"}}\n\ndata: [DONE]\n\n')
    raw = HEAD + _chunked(continuation.with_count(_event(0), 3), lost) + b"0\r\n\r\n"
    response, sink = _feed(raw, 5)
    assert response.done.result() is False and response.tokens == 3
    assert _dechunked(bytes(sink.data)) == _event(0)


def test_a_connection_that_ends_before_the_last_chunk_is_a_cut_stream():
    raw = HEAD + _chunked(continuation.with_count(_event(0), 3)) + b"40\r\ndata: {"
    response, sink = _feed(raw, 9, eof=True)
    assert response.done.result() is False
    assert _dechunked(bytes(sink.data)) == _event(0)  # not half an event


def test_a_whole_response_is_collected_by_its_length_and_a_lost_head_is_no_answer():
    async def run():
        loop = asyncio.get_running_loop()
        whole = Response(loop)
        whole.feed(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                   b"content-length: 11\r\n\r\n{\"error\"")
        assert whole.head.result() is True and not whole.is_stream
        done = whole.collect()
        whole.feed(b":1}")
        never = Response(loop)
        never.feed(b"HTTP/1.1 200")
        never.lost()
        return whole, await done, never
    whole, complete, never = asyncio.run(run())
    assert complete is True and whole.status == 400 and bytes(whole.body) == b'{"error":1}'
    assert whole.keep_alive
    assert never.head.result() is False


def test_a_body_is_its_length_a_204_has_none_and_bad_framing_is_a_cut():
    async def run():
        loop = asyncio.get_running_loop()
        longer = Response(loop)
        longer.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")
        await longer.collect()
        empty = Response(loop)
        empty.feed(b"HTTP/1.1 204 No Content\r\ncontent-type: text/plain\r\n\r\n")
        await empty.collect()
        bad = Response(loop)
        bad.feed(HEAD + b"zz\r\ndata: x\n\n\r\n")
        bad.stream_to(Sink(), [])
        return longer, empty, bad, await bad.done
    longer, empty, bad, whole = asyncio.run(run())
    assert bytes(longer.body) == b"ok" and bytes(longer.buffer) == b"EXTRA"  # not this one's
    assert empty.done.result() is True and not empty.body
    assert whole is False and not bad.keep_alive
