"""The stream coalescer: fewer chunks, no later first or last token, nothing lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.engines.coalesce import coalesce
from serve_app.protocol import GenerateDelta, Usage


async def _tokens(n: int, gap_s: float, *, fail_after: int | None = None, log: list | None = None):
    """An engine stand-in: one token per ``gap_s``, the last with finish_reason."""
    try:
        for i in range(n):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine died")
            await asyncio.sleep(gap_s)
            last = i == n - 1
            yield [GenerateDelta(text=f"t{i} ", num_tokens=1,
                                 finish_reason="length" if last else None,
                                 usage=Usage(3, n) if last else None)]
    finally:
        if log is not None:
            log.append("source closed")


async def _collect(source, interval_s: float):
    t0 = time.monotonic()
    chunks = []
    async for chunk in coalesce(source, interval_s):
        chunks.append((time.monotonic() - t0, chunk))
    return chunks


def _text(chunks) -> str:
    return "".join(d.text for _, chunk in chunks for d in chunk)


def test_zero_interval_passes_every_chunk_through():
    chunks = asyncio.run(_collect(_tokens(20, 0.001), 0))
    assert len(chunks) == 20
    assert _text(chunks) == "".join(f"t{i} " for i in range(20))


def test_tokens_are_sent_in_bursts_at_most_an_interval_apart():
    n, gap, interval = 60, 0.004, 0.030
    chunks = asyncio.run(_collect(_tokens(n, gap), interval))
    assert _text(chunks) == "".join(f"t{i} " for i in range(n))
    assert sum(d.num_tokens for _, c in chunks for d in c) == n
    # ~240 ms of tokens in bursts of ~30 ms: far fewer chunks than tokens.
    assert 4 <= len(chunks) <= n // 3, [len(c) for _, c in chunks]
    # The first token is not held back; it travels alone.
    assert chunks[0][1][0].text == "t0 " and chunks[0][0] < interval
    last = chunks[-1][1][-1]
    assert last.finish_reason == "length" and last.usage == Usage(3, n)


def test_the_finishing_chunk_is_not_held_back():
    # 3 tokens 5 ms apart, interval 1 s: without the finish rule the end waits 1 s.
    chunks = asyncio.run(_collect(_tokens(3, 0.005), 1.0))
    assert [d.text for _, c in chunks for d in c] == ["t0 ", "t1 t2 "]
    assert chunks[-1][0] < 0.5


def test_an_engine_error_comes_after_the_text_before_it():
    received = []

    async def run():
        async for chunk in coalesce(_tokens(10, 0.002, fail_after=5), 0.050):
            received.extend(d.text for d in chunk)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(run())
    assert "".join(received) == "t0 t1 t2 t3 t4 "


def test_closing_the_stream_closes_the_engine_side():
    """A client that goes away must free the request in the engine."""
    log: list[str] = []

    async def run():
        stream = coalesce(_tokens(1000, 0.002, log=log), 0.020)
        async for _ in stream:
            break
        await stream.aclose()
        return log[:]

    assert asyncio.run(run()) == ["source closed"]


def test_a_source_that_swallows_the_cancel_is_still_closed_at_its_next_chunk():
    """Python 3.11's ``wait_for`` returns the item that arrives with a cancel; an
    engine client built on it would stream on to its end after the client left."""
    log: list[str] = []

    async def deaf(n: int):
        try:
            for i in range(n):
                try:
                    await asyncio.sleep(0.002)
                except asyncio.CancelledError:
                    pass  # swallowed, as by wait_for when the item arrives with it
                log.append(f"token {i}")
                yield [GenerateDelta(text="t", num_tokens=1)]
        finally:
            log.append("source closed")

    async def run():
        stream = coalesce(deaf(1000), 0.020)
        async for _ in stream:
            break
        await stream.aclose()
        return log[:]

    seen = asyncio.run(run())
    assert seen[-1] == "source closed" and len(seen) < 20, seen


def test_deltas_with_logprobs_are_kept_apart():
    async def source():
        for i in range(4):
            await asyncio.sleep(0.002)
            yield [GenerateDelta(text=f"{i}", num_tokens=1, extras={"logprobs": [i]},
                                 finish_reason="stop" if i == 3 else None)]

    chunks = asyncio.run(_collect(source(), 0.5))
    assert [[d.extras["logprobs"] for d in c] for _, c in chunks] == [[[0]], [[1], [2], [3]]]


def test_merge_keeps_the_latest_usage_so_the_prompt_size_is_not_lost():
    """Engines put the usage so far on their first delta (continuous usage stats)."""
    from serve_app.engines.coalesce import merge

    first = GenerateDelta(text="a", num_tokens=1, usage=Usage(5, 1))
    (merged,) = merge([first, GenerateDelta(text="b", num_tokens=2)])
    assert (merged.text, merged.num_tokens, merged.usage) == ("ab", 3, Usage(5, 1))
    (merged,) = merge([first, GenerateDelta(text="c", num_tokens=1, finish_reason="stop",
                                            usage=Usage(5, 2))])
    assert (merged.finish_reason, merged.usage) == ("stop", Usage(5, 2))
