"""``Pace`` against a simulated engine: lines that do not fit its slots queue and
start late, and the limit settles where they fit."""

from __future__ import annotations

import asyncio
import random
import time

from serve_app.batch.pace import Pace

SLOTS = 8


class Engine:
    """``SLOTS`` requests at a time, first come first served; each runs 80-240 ms, so
    a slot frees every 20 ms or so: a line that queues behind k others starts about
    k x 20 ms late."""

    def __init__(self):
        self.random = random.Random(7)
        self.slots = asyncio.Semaphore(SLOTS)
        self.queued_max = 0
        self.waiting = 0

    async def line(self, pace: Pace) -> None:
        await pace.acquire()
        try:
            sent = time.monotonic()
            self.waiting += 1
            self.queued_max = max(self.queued_max, self.waiting - SLOTS)
            async with self.slots:
                await asyncio.sleep(0.005)  # prefill
                pace.observe(time.monotonic() - sent, sent)
                self.waiting -= 1
                await asyncio.sleep(self.random.uniform(0.075, 0.235))
        finally:
            pace.release()


def fast(pace: Pace) -> Pace:
    pace.INTERVAL_S, pace.hold_s, pace.slack_s = 0.1, 0.3, 0.01
    return pace


async def drive(pace: Pace, engine: Engine, seconds: float) -> list[int]:
    """Keep far more lines ready than fit; the limits seen every 50 ms."""
    seen, deadline = [], time.monotonic() + seconds
    tasks: set[asyncio.Task] = set()
    while time.monotonic() < deadline:
        while len(tasks) < 64:
            task = asyncio.get_running_loop().create_task(engine.line(pace))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.05)
        seen.append(int(pace.limit))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return seen


def test_the_limit_settles_near_what_the_engine_starts_at_once():
    async def main():
        pace, engine = fast(Pace(64)), Engine()
        seen = await drive(pace, engine, 4.0)
        late = seen[len(seen) // 2:]
        assert max(seen) >= SLOTS  # slow start found the engine's size
        # a sawtooth around the engine's size: probing up by one, backing off a quarter
        assert all(SLOTS // 2 - 1 <= x <= SLOTS + 4 for x in late), late
        assert 0.6 * SLOTS <= sum(late) / len(late) <= 1.25 * SLOTS, late
        assert pace.inflight == 0
    asyncio.run(main())


def test_without_adaptation_the_limit_is_the_maximum():
    async def main():
        pace, engine = fast(Pace(20, adaptive=False)), Engine()
        seen = await drive(pace, engine, 0.5)
        assert set(seen) == {20} and engine.queued_max == 20 - SLOTS
    asyncio.run(main())


def test_waiters_wake_when_a_slot_frees_and_cancelled_ones_leave():
    async def main():
        pace = Pace(1, adaptive=False)
        await pace.acquire()
        waiter = asyncio.get_running_loop().create_task(pace.acquire())
        cancelled = asyncio.get_running_loop().create_task(pace.acquire())
        await asyncio.sleep(0.01)
        cancelled.cancel()
        pace.release()
        await asyncio.wait_for(waiter, 1)
        assert pace.inflight == 1 and not pace._waiters
    asyncio.run(main())
