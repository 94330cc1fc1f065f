"""Limits that hold for the whole service, with no remote call before a request starts.

The head's ledger keeps one token bucket per limit (``Bucket``: a key's or a
project's requests, tokens or concurrent requests).  Each replica holds a *lease*
on part of a bucket (``Allowance``) and admits requests from it locally; every
sync (``access.sync_interval_s``) it reports what it used and what was asked of it,
and gets a new lease.  A lease is at most what the bucket holds minus every other
replica's outstanding lease, so the replicas together never admit more than the
bucket allows; leases follow demand (a replica that sees the traffic gets most of
the bucket within a few syncs when the bucket runs low), and an ample bucket is
split evenly so that a request on any replica is admitted.

Requests per minute and tokens per minute refill continuously (capacity per 60 s);
concurrency does not refill: a finished request gives its slot back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

WINDOW_S = 60.0
_SMOOTHING = 0.5      # weight of the previous demand estimate
REFUSED_TAU_S = 1.0   # how long a refusal counts in ``Bucket.refused``


@dataclass
class Bucket:
    """Head side: one limit's level and the leases handed out on it."""

    capacity: float
    refill_per_s: float            # capacity / 60 for rates, 0 for concurrency
    level: float = math.nan
    updated: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)
    demand: dict[str, float] = field(default_factory=dict)
    refused: float = 0.0           # requests refused, decaying by e every REFUSED_TAU_S

    def settle(self, replica: str, used: float, demand: float, now: float,
               replicas: set[str], refused: int = 0) -> float:
        """Take ``replica``'s report and return its new lease."""
        if math.isnan(self.level):
            self.level, self.updated = self.capacity, now
        self.refused = self.refused_at(now) + refused
        self.level = self.level_at(now)
        self.updated = now
        self.level = min(self.capacity, self.level - used)
        self.leases.pop(replica, None)
        for gone in set(self.leases) - replicas:   # a replica that stopped syncing
            self.leases.pop(gone)
        for gone in set(self.demand) - replicas:
            self.demand.pop(gone)
        self.demand[replica] = _SMOOTHING * self.demand.get(replica, 0.0) + demand
        peers = replicas | {replica}
        # Each replica's weight is its demand plus an even share of the level: while
        # the bucket is ample the split stays even (no replica is starved because its
        # last request went elsewhere); under pressure it follows demand.
        floor = max(1.0, self.level) / len(peers)
        weights = {r: self.demand.get(r, 0.0) + floor for r in peers}
        share = weights[replica] / sum(weights.values())
        free = self.level - sum(self.leases.values())
        lease = max(0.0, min(free, self.level * share))
        self.leases[replica] = lease
        return lease

    def refused_at(self, now: float) -> float:
        """Recent refusals: about those of the last ``REFUSED_TAU_S``."""
        return self.refused * math.exp(-max(0.0, now - self.updated) / REFUSED_TAU_S)

    def level_at(self, now: float) -> float:
        return min(self.capacity,
                   self.level + self.refill_per_s * max(0.0, now - self.updated))

    def reset_after_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*``)."""
        if self.refill_per_s <= 0:
            return 0.0
        return max(0.0, (self.capacity - self.level) / self.refill_per_s)


class Report(NamedTuple):
    """One allowance's use since the last sync: cost admitted, cost asked for
    (admitted or not), requests refused."""

    used: float
    demand: float
    refused: int = 0


@dataclass
class Allowance:
    """Replica side: the lease on one bucket, and what was used of it since the last
    report.  ``level`` is the bucket's level at the last sync (for the headers)."""

    capacity: float
    refill_per_s: float
    lease: float = 0.0
    used: float = 0.0
    demand: float = 0.0
    refused: int = 0
    level: float = math.nan

    def try_take(self, cost: float) -> bool:
        self.demand += cost
        if self.used + cost > self.lease:
            self.refused += 1
            return False
        self.used += cost
        return True

    def give_back(self, amount: float) -> None:
        """A finished request's concurrency slot, or tokens admitted but not used."""
        self.used -= amount

    def report(self) -> Report:
        """What to send the ledger; from now on, use counts against the next lease
        (until it arrives, against what is left of this one)."""
        report = Report(self.used, self.demand, self.refused)
        self.lease = max(0.0, self.lease - self.used)
        self.used, self.demand, self.refused = 0.0, 0.0, 0
        return report

    def unreport(self, report: Report) -> None:
        """The report did not arrive: count it again in the next one."""
        self.lease += report.used
        self.used += report.used
        self.demand += report.demand
        self.refused += report.refused

    def granted(self, lease: float, level: float) -> None:
        self.lease, self.level = lease, level

    def remaining(self) -> float:
        level = self.capacity if math.isnan(self.level) else self.level
        return max(0.0, level - self.used)

    def wait_s(self, cost: float) -> float:
        """A fair Retry-After: when the bucket will hold ``cost`` again."""
        if self.refill_per_s <= 0:
            return 1.0
        return max(1.0, (cost - self.remaining()) / self.refill_per_s)

    def reset_s(self) -> float:
        if self.refill_per_s <= 0:
            return 0.0
        return max(0.0, (self.capacity - self.remaining()) / self.refill_per_s)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``20ms``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
