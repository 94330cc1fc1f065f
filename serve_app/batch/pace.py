"""How many batch lines a model's engines get at once: as many as they start promptly.

Engines queue what does not fit in their running batch (the zmq engine's
``max_batch`` times its replicas, vLLM's ``max_num_seqs``), first come first served,
so a batch that sends more lines than fit makes every interactive request wait
behind them (measured: TTFT P90 x63 with 64 lines on 32 slots).  The engines do not
say how much fits in one way every engine shares, but every engine shows it the
same way: a line that has to queue gets its first token late.  So ``Pace`` keeps a
per-model limit on lines in flight and steers it by the lines' own time to first
token (TTFT):

* it starts low and doubles each interval while lines start promptly (slow start),
  then grows by one per interval while the limit is in use;
* when the median TTFT of an interval exceeds ``slow_factor`` times the fastest
  recently seen plus ``slack_s``, the lines queued: the limit drops by ``backoff`` and
  holds for ``hold_s`` -- interactive requests that arrived take the slots the
  batch leaves.  Lines sent before a drop are not counted after it (they queued
  under the old limit).

The limit never exceeds ``batch.max_concurrency``.  With ``adaptive_concurrency:
false`` the limit is simply that maximum.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque


class Pace:
    INTERVAL_S = 1.0
    MIN_SAMPLES = 3
    FLOOR_WINDOWS = 60       # the fastest TTFT of the last this many intervals
    slow_factor = 2.0
    slack_s = 0.1
    backoff = 0.85
    hold_s = 3.0

    def __init__(self, maximum: int, adaptive: bool = True, initial: int = 4):
        self.maximum = maximum
        self.adaptive = adaptive
        self.limit = float(min(maximum, initial) if adaptive else maximum)
        self.inflight = 0
        self.slow_start = adaptive
        self.samples: list[float] = []
        self.floors: deque[float] = deque(maxlen=self.FLOOR_WINDOWS)
        self.window_start = time.monotonic()
        self.hold_until = 0.0
        self.changed = 0.0       # when the limit last dropped
        self._waiters: list[asyncio.Future] = []

    # ---- slots ----------------------------------------------------------------------
    async def acquire(self) -> None:
        while self.inflight >= int(self.limit):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.inflight += 1

    def release(self) -> None:
        """Synchronous, so a cancelled line's ``finally`` gives its slot back for sure."""
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:  # each checks the limit again
            if not waiter.done():
                waiter.set_result(None)

    # ---- steering ---------------------------------------------------------------------
    def observe(self, ttft_s: float, sent: float) -> None:
        """A line's time from being sent (``time.monotonic()``) to its first token.
        Lines sent before the last decrease tell of the old limit: not counted."""
        if not self.adaptive or sent < self.changed:
            return
        self.samples.append(ttft_s)
        now = time.monotonic()
        if now - self.window_start < self.INTERVAL_S or len(self.samples) < self.MIN_SAMPLES:
            return
        median, fastest = statistics.median(self.samples), min(self.samples)
        self.samples.clear()
        self.window_start = now
        self.floors.append(fastest)
        floor = min(self.floors)
        before = int(self.limit)
        if median > self.slow_factor * floor + self.slack_s:
            self.limit = max(1.0, self.limit * self.backoff)
            self.slow_start = False
            self.changed, self.hold_until = now, now + self.hold_s
        elif now >= self.hold_until and self.inflight >= int(self.limit) - 1:
            grown = self.limit * 2 if self.slow_start else self.limit + 1
            self.limit = min(float(self.maximum), grown)
        if int(self.limit) > before:
            self._wake()

    def state(self) -> dict[str, float]:
        return {"limit": int(self.limit), "inflight": self.inflight,
                "floor_ms": round(1000 * min(self.floors), 1) if self.floors else None}
