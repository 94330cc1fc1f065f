"""One request against the fake server: timings bounded by the injected delays, token
counts from usage or chunks, and every failure mode classified."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import httpx2
import pytest

from cluster.bench.client import RequestResult, build_payload, per_token_itl, split_tokens, stream_request
from cluster.bench.workload import RequestSpec

SPEC = RequestSpec(index=0, prompt="hello there", max_tokens=8)


def _one(url: str, mode: str = "chat", timeout: float = 10.0, **payload_kw: Any) -> RequestResult:
    async def go() -> RequestResult:
        async with httpx2.AsyncClient(base_url=url + "/", timeout=timeout) as client:
            payload = build_payload(SPEC, model="m", mode=mode, ignore_eos=True, **payload_kw)  # type: ignore[arg-type]
            return await stream_request(client, payload, mode=mode, index=0, block_t0=0.0)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_timings_respect_injected_delays_and_usage_counts(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(chunks=6, tokens_per_chunk=2, first_delay=0.08, chunk_delay=0.02)
    r = _one(srv.url)
    assert r.ok, r.detail
    # The role-only first chunk arrives at once; TTFT must wait for real text.
    assert r.ttft_s is not None and r.ttft_s >= 0.08
    assert r.e2e_s is not None and r.e2e_s >= 0.08 + 5 * 0.02
    assert (r.output_tokens, r.tokens_from, r.prompt_tokens, r.chunks) == (12, "usage", 7, 6)
    # 2 tokens per chunk: per-token ITL is half the chunk gap, one sample per token after the first chunk.
    assert len(r.itl_s) == 10
    assert sum(r.itl_s) >= 5 * 0.02
    assert sorted(r.itl_s)[5] == pytest.approx(0.01, abs=0.008)
    body = srv.bodies[0]
    assert body["ignore_eos"] is True and body["stream"] is True and body["max_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello there"}]


def test_sse_lines_end_only_at_cr_or_lf(fake_server: Callable[..., Any]) -> None:
    """JSON leaves U+2028, U+0085, form feed etc. raw in strings; they are not SSE line
    ends (str.splitlines, and so httpx's aiter_lines, treat them as such)."""
    srv = fake_server(chunks=4, token_text="a\u2028b\x85c\x0cd\x1ce ")
    r = _one(srv.url)
    assert r.ok, r.detail
    assert r.chunks == 4


def test_without_usage_tokens_are_chunks(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(chunks=5, tokens_per_chunk=3, first_delay=0.01, chunk_delay=0.005)
    r = _one(srv.url, include_usage=False)
    assert r.ok and (r.output_tokens, r.tokens_from) == (5, "chunks")
    assert "stream_options" not in srv.bodies[0]


def test_completions_mode(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(chunks=4, first_delay=0.03)
    r = _one(srv.url, mode="completions")
    assert r.ok and r.output_tokens == 4 and r.ttft_s is not None and r.ttft_s >= 0.03
    assert srv.bodies[0]["prompt"] == "hello there"


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("500", "http 500"), ("400", "http 400"), ("break", "broken stream"), ("sse_error", "stream error")],
)
def test_failures_are_classified(fake_server: Callable[..., Any], fault: str, kind: str) -> None:
    srv = fake_server(period=1, faults={0: fault}, first_delay=0.0, chunk_delay=0.001)
    r = _one(srv.url)
    assert not r.ok and r.error == kind
    assert r.output_tokens == 0
    if fault in ("500", "400"):
        assert r.status == int(fault) and "injected" in (r.detail or "")


def test_connect_and_timeout_failures(fake_server: Callable[..., Any], closed_port: int) -> None:
    assert _one(f"http://127.0.0.1:{closed_port}/v1").error == "connect"
    slow = fake_server(first_delay=2.0)
    r = _one(slow.url, timeout=0.2)
    assert r.error == "timeout" and r.e2e_s is not None and r.e2e_s < 1.5


def test_split_tokens_is_proportional_and_exact() -> None:
    assert split_tokens(10, [1, 1, 1, 1, 1]) == [2, 2, 2, 2, 2]
    assert split_tokens(4, [1, 3]) == [1, 3]
    parts = split_tokens(7, [5, 5, 5])
    assert sum(parts) == 7 and sorted(parts) == [2, 2, 3]
    assert split_tokens(3, [0, 0, 0]) == [1, 1, 1]
    assert split_tokens(5, []) == []


def test_per_token_itl_weights_by_tokens() -> None:
    times = [0.0, 0.1, 0.4, 0.5]
    # Chunk 2 holds 3 tokens after a 0.3 s gap -> three samples of 0.1; chunk 3 holds 0
    # tokens so its gap is not lost but there is no later chunk to carry it to.
    assert per_token_itl(times, [2, 1, 3, 0]) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert per_token_itl([0.0, 0.1, 0.3], [1, 0, 2]) == pytest.approx([0.15, 0.15])
