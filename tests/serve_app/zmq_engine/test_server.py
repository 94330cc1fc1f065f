"""A real engine process over real ZeroMQ: the wire protocol, streaming, batching."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from serve_app.protocol import EngineError, GenerateDelta, GenerateRequest, SamplingParams
from serve_app.zmq_engine import wire
from serve_app.zmq_engine.client import EngineClient, EngineProcess, EngineUnavailable, free_port


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    process = EngineProcess.spawn(tiny_model_dir, max_batch=8, threads=1, startup_timeout=120)
    yield process
    process.stop()


def with_client(engine: EngineProcess, body: Callable[[EngineClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = EngineClient(engine.address)
        try:
            return await body(client)
        finally:
            await client.close()
    return asyncio.run(main())


def chat(text: str, request_id: str = "r", **sampling: Any) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id=request_id, model="tiny",
                           messages=[{"role": "user", "content": text}],
                           sampling=SamplingParams(**sampling))


async def collect(client: EngineClient, request: GenerateRequest) -> list[list[GenerateDelta]]:
    return [chunk async for chunk in client.generate(request)]


def text_of(chunks: list[list[GenerateDelta]]) -> str:
    return "".join(d.text for chunk in chunks for d in chunk)


def test_generate_streams_text_and_ends_with_usage(engine: EngineProcess) -> None:
    chunks = with_client(engine, lambda c: collect(c, chat("Hello there", max_tokens=16)))
    deltas = [d for chunk in chunks for d in chunk]
    assert len(chunks) > 1  # streamed, not one reply at the end
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 16 == sum(d.num_tokens for d in deltas)
    assert last.usage.prompt_tokens > 0 and text_of(chunks)


def test_model_info_and_health(engine: EngineProcess) -> None:
    async def body(client: EngineClient) -> dict:
        await client.health(timeout=5)
        return await client.model_info()
    assert with_client(engine, body) == {"model": "tiny-chat-v1", "max_model_len": 2048,
                                         "task": "generate", "dimensions": None}


def test_stop_string_cuts_the_stream(engine: EngineProcess) -> None:
    full = text_of(with_client(engine, lambda c: collect(c, chat("Write code", max_tokens=20))))
    stop = full[5:9]
    request = chat("Write code", max_tokens=20, stop=[stop])
    chunks = with_client(engine, lambda c: collect(c, request))
    assert text_of(chunks) == full[:full.index(stop)]
    assert chunks[-1][-1].finish_reason == "stop"


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_context_too_long_is_a_400_naming_the_field(engine: EngineProcess, kind: str) -> None:
    text = "word " * 2100
    request = (chat(text) if kind == "messages" else
               GenerateRequest(request_id="r", model="tiny", prompt=text))
    with pytest.raises(EngineError) as info:
        with_client(engine, lambda c: collect(c, request))
    assert (info.value.status, info.value.code, info.value.param) == (
        400, "context_length_exceeded", kind)


def test_abandoned_stream_is_aborted_in_the_engine(engine: EngineProcess) -> None:
    async def body(client: EngineClient) -> dict:
        before = (await client.stats())["requests_aborted"]
        stream = client.generate(chat("Hello", max_tokens=1500, ignore_eos=True))
        await anext(stream)
        assert (await client.stats())["running"] == 1
        await stream.aclose()  # the consumer went away
        for _ in range(50):
            stats = await client.stats()
            if stats["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["requests_aborted"] == before + 1
        return stats
    stats = with_client(engine, body)
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_cancelled_consumer_task_aborts_too(engine: EngineProcess) -> None:
    async def body(client: EngineClient) -> dict:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in client.generate(chat("Hi", max_tokens=1500, ignore_eos=True)):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            stats = await client.stats()
            if stats["running"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats
    assert with_client(engine, body)["running"] == 0


def test_concurrent_requests_are_batched_and_greedy_output_is_unchanged(
        engine: EngineProcess) -> None:
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

    async def body(client: EngineClient) -> tuple[list[str], list[str], dict, dict]:
        alone = [text_of(await collect(client, chat(p, f"a{i}", max_tokens=24)))
                 for i, p in enumerate(prompts)]
        before = await client.stats()
        results = await asyncio.gather(*(collect(client, chat(p, f"b{i}", max_tokens=24))
                                         for i, p in enumerate(prompts)))
        return alone, [text_of(r) for r in results], before, await client.stats()

    alone, batched, before, after = with_client(engine, body)
    assert batched == alone
    steps = {int(k): v - before["decode_steps_by_batch_size"].get(k, 0)
             for k, v in after["decode_steps_by_batch_size"].items()}
    assert sum(v for size, v in steps.items() if size > 1) > 0, steps
    assert after["tokens_generated"] - before["tokens_generated"] == 8 * 24


def test_raw_wire_protocol_replies(engine: EngineProcess) -> None:
    """What a non-Python client sees: msgpack maps over a plain DEALER socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine.address)
    try:
        def ask(message: dict) -> dict:
            sock.send(wire.encode(message))
            assert sock.poll(5000), f"no reply to {message}"
            return wire.decode(sock.recv())
        assert ask({"type": "health", "request_id": "h"}) == {
            "type": "health_ok", "request_id": "h", "ok": True, "detail": ""}
        assert ask({"type": "bogus", "request_id": "x"})["status"] == 400
        reply = ask({"type": "submit", "request_id": "s", "prompt": "Hi",
                     "sampling": {"temperature": 0, "max_tokens": 2}})
        while reply["finish_reason"] is None:
            assert sock.poll(5000)
            reply = wire.decode(sock.recv())
        assert reply["usage"]["completion_tokens"] == 2
        first = ask({"type": "submit", "request_id": "long", "messages": [
            {"role": "user", "content": "Hi"}], "sampling": {"max_tokens": 1000, "ignore_eos": True}})
        assert first["type"] == "delta" and first["request_id"] == "long"
        sock.send(wire.encode({"type": "abort", "request_id": "long"}))
        while reply.get("finish_reason") is None or reply["request_id"] != "long":
            assert sock.poll(5000)
            reply = wire.decode(sock.recv())
        assert reply["finish_reason"] == "abort"
    finally:
        sock.close()


def test_sigterm_stops_gracefully_and_an_orphan_exits_by_itself(tiny_model_dir: Path) -> None:
    parent = subprocess.Popen(["sleep", "300"])
    try:
        # The engine watches `parent` as if it were the replica that started it.
        orphan = EngineProcess.spawn(tiny_model_dir, threads=1, watch_parent=False,
                                     extra_args=["--watch-pid", str(parent.pid)])
        parent.kill()
        parent.wait()
        orphan.process.wait(timeout=15)
        assert orphan.process.returncode == 0
    finally:
        parent.kill()
        parent.wait()

    engine = EngineProcess.spawn(tiny_model_dir, threads=1)

    async def in_flight_stream_then_sigterm() -> int | None:
        client = EngineClient(engine.address)
        try:
            stream = client.generate(chat("Hi", max_tokens=1500, ignore_eos=True))
            await anext(stream)
            started = time.monotonic()
            code = await asyncio.to_thread(engine.stop, 10)
            assert time.monotonic() - started < 5
            with pytest.raises(EngineUnavailable) as info:  # told, not left waiting
                async for _ in stream:
                    pass
            assert info.value.status == 503
            return code
        finally:
            await client.close()
    assert asyncio.run(in_flight_stream_then_sigterm()) == 0  # it handled SIGTERM itself

    async def body() -> None:
        client = EngineClient(engine.address)
        try:
            await client.health(timeout=0.5)
        finally:
            await client.close()
    with pytest.raises(EngineUnavailable):
        asyncio.run(body())


def test_a_silent_engine_fails_the_stream_instead_of_hanging() -> None:
    """Nothing listens at the address (like an engine killed with SIGKILL)."""
    async def body() -> None:
        client = EngineClient(f"tcp://127.0.0.1:{free_port()}", stall_timeout=0.3,
                              health_timeout=0.3)
        try:
            with pytest.raises(EngineUnavailable):
                await asyncio.wait_for(collect(client, chat("Hi")), timeout=5)
        finally:
            await client.close()
    asyncio.run(body())


def test_a_cancel_that_lands_as_a_message_arrives_is_not_swallowed() -> None:
    """Python 3.11's ``wait_for`` returns the item instead of raising in this race;
    the stream then ran on to ``max_tokens`` after its caller left."""
    async def race(spins: int) -> str:
        client = EngineClient("tcp://127.0.0.1:1", stall_timeout=30)
        inbox: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(client._wait(inbox))
        await asyncio.sleep(0.01)  # waiting on the inbox
        inbox.put_nowait({"type": "delta"})
        for _ in range(spins):
            await asyncio.sleep(0)
        if task.done():
            return "answered before the cancel"
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    outcomes = [asyncio.run(race(spins)) for spins in range(4)]
    assert "swallowed" not in outcomes and "cancelled" in outcomes, outcomes


def test_an_embedding_engine_embeds_over_the_wire_and_refuses_generation(engine) -> None:
    """``--task embed``: ``embed`` messages get float32 matrices back (concurrent ones
    share forward passes); ``submit`` is a 400, as ``embed`` is to a generation engine."""
    import numpy as np

    from serve_app.protocol import EmbedRequest
    from tests.serve_app.embedding_support import minilm_dir

    def embed(request_id: str, inputs: list) -> EmbedRequest:
        return EmbedRequest(request_id=request_id, model="m", inputs=inputs)

    async def body(client: EngineClient):
        results = await asyncio.gather(*(client.embed(embed(f"e{i}", [f"text {i}", [101, 102]]))
                                         for i in range(6)))
        with pytest.raises(EngineError) as refused:
            await collect(client, chat("hi"))
        return results, await client.model_info(), await client.stats(), refused.value

    with EngineProcess.spawn(minilm_dir(), task="embed", max_batch=8, threads=1) as embedder:
        results, info, stats, refused = with_client(embedder, body)
    assert all(r.embeddings.shape == (2, 384) and r.embeddings.dtype == np.float32
               for r in results)
    assert np.allclose(np.linalg.norm(results[0].embeddings, axis=1), 1.0, atol=1e-5)
    assert info["task"] == "embed" and info["dimensions"] == 384 and info["max_model_len"] == 256
    assert stats["embed_requests"] == 6 and max(map(int, stats["embed_batches_by_size"])) > 2
    assert (refused.status, refused.code) == (400, "unsupported_task")
    with pytest.raises(EngineError) as wrong:
        with_client(engine, lambda c: c.embed(embed("x", ["hi"])))
    assert (wrong.value.status, wrong.value.code) == (400, "unsupported_task")
