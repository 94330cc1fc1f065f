"""The routed ingress's failover, on plain data: a replica that dies between a
stream's last token and its end (``RoutedIngress._engine_stream``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayError

from serve_app.ingress import RoutedIngress
from serve_app.protocol import GenerateDelta, GenerateRequest, SamplingParams, Usage


class DiesAfter:
    """An engine handle whose first call streams ``tokens`` one-token deltas and dies;
    what every call asked for is kept."""

    def __init__(self, tokens: int):
        self.tokens, self.asked = tokens, []
        self.generate = SimpleNamespace(remote=self._call)

    async def _call(self, req: GenerateRequest):
        self.asked.append(req)
        first = len(self.asked) == 1
        for i in range(self.tokens if first else req.sampling.max_tokens):
            usage = Usage(5, 0) if i == 0 else None
            yield [GenerateDelta(f"t{i} ", 1, usage=usage)]
        if first:
            raise RayError("the replica's node died")
        yield [GenerateDelta("", 0, "length", Usage(9, req.sampling.max_tokens))]


def _run(engine: DiesAfter, max_tokens: int, retries: int = 2) -> list[GenerateDelta]:
    ingress = RoutedIngress.__new__(RoutedIngress)  # only what _engine_stream reads
    ingress.engines = {"m": engine}
    ingress.config = SimpleNamespace(max_retries=retries)
    req = GenerateRequest(request_id="r", model="m", prompt="p",
                          sampling=SamplingParams(max_tokens=max_tokens))

    async def collect():
        return [d async for batch in ingress._engine_stream(req) for d in batch]
    return asyncio.run(collect())


@pytest.mark.parametrize("retries", [2, 0])
def test_a_stream_cut_after_its_last_token_ends_without_another_engine_call(retries):
    """Not one token over max_tokens from a second replica; and with no retries
    allowed, no error for a stream the client has whole."""
    engine = DiesAfter(tokens=3)
    deltas = _run(engine, max_tokens=3, retries=retries)
    assert len(engine.asked) == 1
    assert sum(d.num_tokens for d in deltas) == 3 and deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == Usage(5, 3)


def test_a_stream_cut_earlier_continues_on_another_replica_for_the_rest():
    engine = DiesAfter(tokens=2)
    deltas = _run(engine, max_tokens=5)
    assert len(engine.asked) == 2 and engine.asked[1].sampling.max_tokens == 3
    assert engine.asked[1].continuation == "t0 t1 "
    assert sum(d.num_tokens for d in deltas) == 5 and deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == Usage(9, 5)
