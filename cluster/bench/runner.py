"""Drives the load: concurrency steps (closed loop), QPS steps (open loop, Poisson), and
compare mode, which interleaves targets block by block.

Compare mode exists because the question "what does hpcserve cost?" has an answer of a
few percent, smaller than the drift of a shared machine over minutes. Running all of
the bare sweep and then all of the service sweep would fold that drift into the ratio.
Instead every step is split into `rounds` blocks and the targets alternate in an
A B B A ... order, so slow periods hit both alike and a linear drift cancels. Both
targets get the same prompts and the same arrival schedule in each round.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import httpx2

from cluster.bench.client import Mode, RequestResult, build_payload, stream_request
from cluster.bench.progress import NullProgress, ProgressSink
from cluster.bench.workload import PromptFactory, RequestSpec, poisson_arrivals

StepKind = Literal["concurrency", "qps"]
# Workload stream of the warmup requests: apart from every step's (step*1000 + round).
_WARMUP_STREAM = 10**9


class BenchError(RuntimeError):
    """The benchmark cannot produce meaningful numbers (e.g. a target never answers)."""


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible base URL (ending in /v1) and the model name it serves."""

    name: str
    url: str
    model: str
    api_key: str | None = None


@dataclass(frozen=True)
class Step:
    kind: StepKind
    value: float

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"c={int(self.value)}"
        return f"qps={self.value:g}"


@dataclass(frozen=True)
class BenchConfig:
    """Everything about the load except where it goes. Exactly one of `duration` (seconds
    per step and target) or `requests` (per step and target) bounds each step."""

    steps: Sequence[Step]
    mode: Mode = "chat"
    duration: float | None = None
    requests: int | None = None
    rounds: int = 1
    ignore_eos: bool = False
    include_usage: bool = True
    extra_body: dict[str, Any] | None = None
    max_concurrency: int | None = None
    warmup: int = 0
    timeout: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.duration is None) == (self.requests is None):
            raise ValueError("give exactly one of duration or requests")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.requests is not None and self.requests < self.rounds:
            raise ValueError("requests must be >= rounds")
        if not self.steps:
            raise ValueError("no steps")
        for s in self.steps:
            if s.value <= 0 or (s.kind == "concurrency" and s.value != int(s.value)):
                raise ValueError(f"bad step {s.label}")
            # Fewer requests than users would silently measure a lower concurrency than
            # the label says; refuse rather than mislabel the data.
            if s.kind == "concurrency" and self.requests is not None and self.requests // self.rounds < s.value:
                raise ValueError(
                    f"{s.label}: {self.requests} requests in {self.rounds} round(s) leave "
                    f"{self.requests // self.rounds} per block, fewer than {int(s.value)} users; "
                    f"use requests >= {int(s.value) * self.rounds} (several times more for a steady state) or a duration"
                )


@dataclass
class Block:
    """One target's share of one step in one round: the unit that gets interleaved."""

    step_index: int
    round: int
    target: str
    results: list[RequestResult]
    wall_s: float
    offered: int
    loop_lag_s: list[float] = field(default_factory=list)


@dataclass
class BenchRun:
    targets: list[Target]
    config: BenchConfig
    prompt_tokens: int
    output_tokens: int
    blocks: list[Block] = field(default_factory=list)

    @property
    def order(self) -> list[tuple[int, int, str]]:
        """(step, round, target) in the order the blocks ran: evidence of interleaving."""
        return [(b.step_index, b.round, b.target) for b in self.blocks]


def block_order(targets: Sequence[Target], step_index: int, rounds: int) -> list[tuple[int, Target]]:
    """(round, target) pairs for one step, alternating direction every block (ABBA)."""
    order: list[tuple[int, Target]] = []
    for r in range(rounds):
        flip = (step_index * rounds + r) % 2 == 1
        for t in reversed(targets) if flip else targets:
            order.append((r, t))
    return order


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


def _make_client(target: Target, config: BenchConfig) -> httpx2.AsyncClient:
    # httpx caps a pool at 100 connections by default; a capped pool makes requests
    # queue inside the *client* and shows up as server TTFT. No cap: the step's
    # concurrency (or the Poisson process) is the only limit.
    # httpx2, not httpx: httpcore 1.0's pool hands a newly idle connection to *every*
    # queued request; all but one fail, re-queue and retry (pydantic/httpx2#1075,
    # encode/httpcore#1035). When many users finish together -- as they do behind a
    # server that sends text in bursts -- users sat in that churn for seconds: at c=128
    # only 5-10 of 128 requests reached the server, and a TTFT p90 of 10 s was the
    # client's. httpx2 is the fork the openai SDK itself uses.
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30.0)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx2.AsyncClient(
        base_url=target.url.rstrip("/") + "/",
        limits=limits,
        timeout=httpx2.Timeout(config.timeout, connect=min(30.0, config.timeout)),
        headers=headers,
    )


class LoopLagProbe:
    """Measures how late a short timer fires on the client's event loop during a block.

    All timestamps come from this loop: if it is too busy to read chunks when they
    arrive, the reported latencies are the client's, not the server's. The lag makes
    that visible instead of silently blaming the endpoint.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, time.perf_counter() - t - self.interval))

    async def __aenter__(self) -> "LoopLagProbe":
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class _BlockSender:
    """Sends the requests of one block to one target and collects their results."""

    def __init__(
        self,
        client: httpx2.AsyncClient,
        target: Target,
        config: BenchConfig,
        progress: ProgressSink,
        count_tokens: Callable[[str], int] | None,
    ) -> None:
        self.client, self.target, self.config = client, target, config
        self.progress, self.count_tokens = progress, count_tokens
        self.results: list[RequestResult] = []
        self.t0 = time.perf_counter()

    async def send(self, spec: RequestSpec) -> None:
        payload = build_payload(
            spec,
            model=self.target.model,
            mode=self.config.mode,
            ignore_eos=self.config.ignore_eos,
            include_usage=self.config.include_usage,
            extra=self.config.extra_body,
        )
        res = await stream_request(
            self.client,
            payload,
            mode=self.config.mode,
            index=spec.index,
            block_t0=self.t0,
            count_tokens=self.count_tokens,
        )
        self.results.append(res)
        self.progress.advance(res)


async def run_concurrency_block(
    sender: _BlockSender, factory: PromptFactory, stream: int, users: int,
    requests: int | None, duration: float | None,
) -> None:
    """`users` virtual users, each sending its next request as soon as the last one ends.

    A user stops at the deadline (a request running then is let finish: cutting it
    would count a healthy request as a failure) or when the block's request budget is
    spent.
    """
    counter = itertools.count()
    deadline = sender.t0 + duration if duration is not None else None

    async def user() -> None:
        while deadline is None or time.perf_counter() < deadline:
            i = next(counter)
            if requests is not None and i >= requests:
                return
            await sender.send(factory.request(stream, i))

    await asyncio.gather(*(user() for _ in range(users)))


async def run_qps_block(
    sender: _BlockSender, specs: Sequence[RequestSpec], offsets: Sequence[float], max_concurrency: int | None,
) -> None:
    """Start request i at `offsets[i]` seconds however many are still in flight (open
    loop), unless `max_concurrency` caps them. Prompts come pre-built so their cost never
    delays an arrival."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(spec: RequestSpec) -> None:
        if gate is None:
            await sender.send(spec)
            return
        async with gate:
            await sender.send(spec)

    tasks: list[asyncio.Task[None]] = []
    sender.t0 = t0 = time.perf_counter()
    for spec, offset in zip(specs, offsets):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    await asyncio.gather(*tasks)


async def _warmup(client: httpx2.AsyncClient, target: Target, config: BenchConfig, factory: PromptFactory) -> None:
    """A few sequential requests so connection set-up and first-call costs (compiles,
    lazy imports) stay out of step one, and a wrong URL or model fails fast and loud."""
    sender = _BlockSender(client, target, config, NullProgress(), None)
    for i in range(config.warmup):
        await sender.send(factory.request(_WARMUP_STREAM, i))
    if config.warmup and not any(r.ok for r in sender.results):
        r = sender.results[-1]
        raise BenchError(f"{target.name} ({target.url}): every warmup request failed: {r.error}: {r.detail}")


async def run_bench(
    targets: Sequence[Target],
    config: BenchConfig,
    factory: PromptFactory,
    progress: ProgressSink | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> BenchRun:
    """Run every step against every target, interleaved, one AsyncClient per target."""
    if not targets or len({t.name for t in targets}) != len(targets):
        raise ValueError("targets must be non-empty with distinct names")
    sink = progress or NullProgress()
    run = BenchRun(list(targets), config, factory.prompt_tokens, factory.output_tokens)
    async with AsyncExitStack() as stack:
        clients = {t.name: await stack.enter_async_context(_make_client(t, config)) for t in targets}
        for t in targets:
            await _warmup(clients[t.name], t, config, factory)
        for s, step in enumerate(config.steps):
            for r, target in block_order(targets, s, config.rounds):
                run.blocks.append(
                    await _run_block(clients[target.name], target, config, factory, s, step, r, sink, count_tokens)
                )
    return run


def _block_budget(config: BenchConfig, round_: int) -> tuple[int | None, float | None]:
    """A round's share of the step's request count or duration."""
    requests = _share(config.requests, config.rounds, round_) if config.requests is not None else None
    duration = config.duration / config.rounds if config.duration is not None else None
    return requests, duration


def _stream_id(step_index: int, round_: int) -> int:
    return step_index * 1000 + round_


def arrival_offsets(config: BenchConfig, step: Step, step_index: int, round_: int) -> list[float]:
    """The Poisson schedule of one QPS block; every target gets the same one in a round."""
    requests, duration = _block_budget(config, round_)
    seed = [config.seed, _stream_id(step_index, round_)]
    return poisson_arrivals(step.value, seed=seed, count=requests, duration=duration)


async def _run_block(
    client: httpx2.AsyncClient, target: Target, config: BenchConfig, factory: PromptFactory,
    s: int, step: Step, r: int, sink: ProgressSink, count_tokens: Callable[[str], int] | None,
) -> Block:
    requests, duration = _block_budget(config, r)
    stream = _stream_id(s, r)  # same prompts for every target in this round
    label = f"{target.name} {step.label}" + (f" round {r + 1}/{config.rounds}" if config.rounds > 1 else "")
    sender = _BlockSender(client, target, config, sink, count_tokens)
    if step.kind == "concurrency":
        sink.start_block(label, requests)
        async with LoopLagProbe() as lag:
            sender.t0 = time.perf_counter()
            await run_concurrency_block(sender, factory, stream, int(step.value), requests, duration)
        offered = len(sender.results)
    else:
        offsets = arrival_offsets(config, step, s, r)
        specs = [factory.request(stream, i) for i in range(len(offsets))]
        sink.start_block(label, len(offsets))
        async with LoopLagProbe() as lag:
            await run_qps_block(sender, specs, offsets, config.max_concurrency)
        offered = len(offsets)
    wall = time.perf_counter() - sender.t0
    sink.end_block()
    return Block(
        step_index=s, round=r, target=target.name, results=sender.results, wall_s=wall, offered=offered,
        loop_lag_s=lag.samples,
    )
