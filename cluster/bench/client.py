"""One streaming OpenAI request, timed the way a user experiences it.

TTFT is taken at the first chunk that carries generated text (a role-only first chunk
is framing, not a token). Inter-token latency is per *token*, not per chunk: a server
that coalesces k tokens into one chunk after a gap g produced those tokens at g/k each,
and counting that as one gap of g would make coalescing look like a regression. Token
counts come from the server's `usage` (asked for with `stream_options.include_usage`)
when it reports one, else from a tokenizer, else one token per chunk.

A request is a failure if anything stops the user from getting a complete answer: an
HTTP error status, an error object inside the SSE stream, a connection cut mid-stream,
a stream that ends without `[DONE]` or a finish reason, or no text at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import httpx2
import orjson

from cluster.bench.workload import RequestSpec
from serve_app.framing import sse_lines

Mode = Literal["chat", "completions"]

# Failure kinds, stable strings because they are keys in the JSON report.
HTTP_ERROR = "http {status}"
STREAM_ERROR = "stream error"
BROKEN_STREAM = "broken stream"
TRUNCATED = "truncated"
EMPTY = "empty"
BAD_CHUNK = "bad chunk"
TIMEOUT = "timeout"
CONNECT = "connect"


@dataclass(slots=True)
class RequestResult:
    """What one request measured; latencies in seconds, None when never reached."""

    index: int
    start_s: float
    ok: bool = False
    error: str | None = None
    detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    chunks: int = 0
    tokens_from: str = "chunks"
    itl_s: list[float] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        """A flat record for requests.jsonl; ITL samples are left out to keep it small."""
        return {
            "index": self.index,
            "start_s": self.start_s,
            "ok": self.ok,
            "error": self.error,
            "detail": self.detail,
            "status": self.status,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "chunks": self.chunks,
            "tokens_from": self.tokens_from,
        }


def endpoint_path(mode: Mode) -> str:
    return "chat/completions" if mode == "chat" else "completions"


def build_payload(
    spec: RequestSpec,
    *,
    model: str,
    mode: Mode,
    ignore_eos: bool,
    include_usage: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The request body. `ignore_eos` is a vLLM/hpcserve extension: without it a random
    or chatty model stops early and the output length, hence the load, is uncontrolled."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": True}
    if mode == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


def split_tokens(total: int, weights: list[int]) -> list[int]:
    """Share `total` tokens among chunks in proportion to their text length.

    Largest-remainder rounding keeps the parts integers that sum to `total`. When the
    server reports only a total, text length is the best evidence of how many tokens a
    coalesced chunk holds.
    """
    if not weights:
        return []
    wsum = sum(weights)
    if wsum <= 0:
        weights, wsum = [1] * len(weights), len(weights)
    exact = [total * w / wsum for w in weights]
    parts = [int(x) for x in exact]
    short = total - sum(parts)
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[:short]:
        parts[i] += 1
    return parts


def per_token_itl(times: list[float], tokens: list[int]) -> list[float]:
    """Inter-token latencies from chunk arrival times and tokens per chunk.

    Tokens after the first within the first chunk arrived together with it and belong
    to TTFT, so they give no sample. A chunk holding 0 tokens passes its gap on to the
    next chunk that holds some.
    """
    samples: list[float] = []
    carried = 0.0
    for i in range(1, len(times)):
        gap = times[i] - times[i - 1] + carried
        k = tokens[i]
        if k <= 0:
            carried = gap
            continue
        carried = 0.0
        samples.extend([gap / k] * k)
    return samples


def _chunk_text(obj: dict[str, Any], mode: Mode) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if mode == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream thoughts first; those are generated tokens too.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def _has_finish(obj: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") for c in obj.get("choices") or [])


async def stream_request(
    client: httpx2.AsyncClient,
    payload: dict[str, Any],
    *,
    mode: Mode,
    index: int,
    block_t0: float,
    count_tokens: Callable[[str], int] | None = None,
) -> RequestResult:
    """Send one streaming request and time it; never raises for endpoint failures."""
    t0 = time.perf_counter()
    res = RequestResult(index=index, start_s=t0 - block_t0)
    times: list[float] = []
    sizes: list[int] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    done = finished = False
    end: float | None = None
    try:
        async with client.stream("POST", endpoint_path(mode), json=payload) as resp:
            res.status = resp.status_code
            if resp.status_code >= 400:
                body = (await resp.aread()).decode(errors="replace")
                return _fail(res, HTTP_ERROR.format(status=resp.status_code), body, t0)
            async for line in sse_lines(resp.aiter_bytes()):
                # After [DONE], read on to the end of the body (as the openai SDK does):
                # a response left unfinished closes its connection, and every request
                # would then pay for a new one on both sides of a comparison.
                if done or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done, end = True, time.perf_counter()
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    return _fail(res, BAD_CHUNK, data, t0)
                if not isinstance(obj, dict):
                    return _fail(res, BAD_CHUNK, data, t0)
                if obj.get("error"):
                    return _fail(res, STREAM_ERROR, orjson.dumps(obj["error"]).decode(), t0)
                text = _chunk_text(obj, mode)
                if text:
                    now = time.perf_counter()
                    if not times:
                        res.ttft_s = now - t0
                    times.append(now)
                    sizes.append(len(text))
                    texts.append(text)
                finished = finished or _has_finish(obj)
                if obj.get("usage"):
                    usage = obj["usage"]
    except httpx2.TimeoutException as exc:
        return _fail(res, TIMEOUT, repr(exc), t0)
    except httpx2.ConnectError as exc:
        return _fail(res, CONNECT, repr(exc), t0)
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
        return _fail(res, BROKEN_STREAM, repr(exc), t0)
    except httpx2.HTTPError as exc:
        return _fail(res, type(exc).__name__, repr(exc), t0)

    res.e2e_s = (end or time.perf_counter()) - t0
    res.chunks = len(times)
    if not (done or finished):
        return _fail(res, TRUNCATED, "stream ended without [DONE] or finish_reason", t0, keep_e2e=True)
    if not times:
        return _fail(res, EMPTY, "no generated text", t0, keep_e2e=True)
    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        res.prompt_tokens = usage.get("prompt_tokens")
        res.tokens_from = "usage"
    elif count_tokens is not None:
        res.output_tokens = count_tokens("".join(texts))
        res.tokens_from = "tokenizer"
    else:
        res.output_tokens = len(times)
        res.tokens_from = "chunks"
    per_chunk = [1] * len(times) if res.output_tokens == len(times) else split_tokens(res.output_tokens, sizes)
    res.itl_s = per_token_itl(times, per_chunk)
    res.ok = True
    return res


def _fail(res: RequestResult, kind: str, detail: str, t0: float, keep_e2e: bool = False) -> RequestResult:
    res.ok = False
    res.error = kind
    res.detail = detail[:300]
    if not keep_e2e:
        res.e2e_s = time.perf_counter() - t0
    return res
