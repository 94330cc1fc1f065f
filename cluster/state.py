"""The pool's memory: allocations and observed timings in sqlite.

Everything the pool decides from is persisted here, so a control loop that is
killed and restarted re-adopts the jobs it had (and submits no duplicates) instead
of starting over.  Writes are tiny and infrequent; sqlite's WAL mode keeps
``hpcserve status`` readable while the loop writes.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Pool phases of an allocation, in order.  QUEUED/STARTING/SERVING/DRAINING are live.
QUEUED, STARTING, SERVING, DRAINING, RETIRED, FAILED = (
    "QUEUED", "STARTING", "SERVING", "DRAINING", "RETIRED", "FAILED")
LIVE_PHASES = (QUEUED, STARTING, SERVING, DRAINING)


@dataclass
class Allocation:
    id: str
    pool: str
    provider: str
    job_id: str = ""
    phase: str = QUEUED
    job_state: str = "PENDING"
    node: str = ""
    node_id: str = ""
    submit_time: float = 0.0
    start_time: float = 0.0       # job started running (scheduler's view)
    end_time: float = 0.0         # wall-time end
    joined_time: float = 0.0      # its Ray node is alive
    serving_time: float = 0.0     # first RUNNING replica on it
    drain_time: float = 0.0       # drain requested
    idle_since: float = 0.0       # its node has had no Serve replica since (0: has some)
    retired_time: float = 0.0
    predecessor: str = ""
    successor: str = ""
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.phase in LIVE_PHASES

    @property
    def rotated_out(self) -> bool:
        """Handed over to a successor: drained, then released (by us or by itself)."""
        return self.phase == RETIRED and bool(self.successor) and self.drain_time > 0


_COLUMNS = [f.name for f in fields(Allocation)]


class StateStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} {'TEXT PRIMARY KEY' if c == 'id' else ''}" for c in _COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS allocations ({cols})")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(allocations)")}
        for f in fields(Allocation):  # a state.db of an older hpcserve: add new columns
            if f.name not in have:
                self.db.execute(f"ALTER TABLE allocations ADD COLUMN {f.name} "
                                f"DEFAULT {f.default!r}")
        self.db.execute("CREATE TABLE IF NOT EXISTS observations "
                        "(pool TEXT, kind TEXT, value REAL, time REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS events "
                        "(time REAL, pool TEXT, allocation TEXT, message TEXT)")

    def save(self, a: Allocation) -> None:
        marks = ", ".join("?" for _ in _COLUMNS)
        self.db.execute(f"INSERT OR REPLACE INTO allocations ({', '.join(_COLUMNS)}) "
                        f"VALUES ({marks})", [getattr(a, c) for c in _COLUMNS])

    def allocations(self, pool: str | None = None, live_only: bool = False) -> list[Allocation]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM allocations"
        where, args = [], []
        if pool is not None:
            where.append("pool = ?")
            args.append(pool)
        if live_only:
            where.append(f"phase IN ({', '.join('?' for _ in LIVE_PHASES)})")
            args += LIVE_PHASES
        if where:
            query += " WHERE " + " AND ".join(where)
        rows = self.db.execute(query + " ORDER BY submit_time", args).fetchall()
        return [Allocation(**dict(zip(_COLUMNS, row))) for row in rows]

    def observe(self, pool: str, kind: str, value: float) -> None:
        self.db.execute("INSERT INTO observations VALUES (?, ?, ?, ?)",
                        (pool, kind, value, time.time()))

    def observations(self, pool: str, kind: str, last: int = 5) -> list[float]:
        rows = self.db.execute("SELECT value FROM observations WHERE pool = ? AND kind = ? "
                               "ORDER BY time DESC LIMIT ?", (pool, kind, last)).fetchall()
        return [r[0] for r in rows]

    def event(self, pool: str, allocation: str, message: str) -> None:
        self.db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                        (time.time(), pool, allocation, message))

    def events(self, limit: int = 50) -> list[tuple[float, str, str, str]]:
        return self.db.execute("SELECT * FROM events ORDER BY time DESC LIMIT ?",
                               (limit,)).fetchall()[::-1]


def as_dict(a: Allocation) -> dict:
    return asdict(a)
