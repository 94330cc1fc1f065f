"""The replica's side of access: cached keys, lease allowances, unsent usage.

One background task per replica syncs with the head's ledger every
``access.sync_interval_s``: it sends the usage rows of finished requests and what
each allowance used, and gets back the keys (when they changed) and new leases.
The request path only reads what the last sync left here.  When the ledger cannot
be reached, cached keys keep working, leases run down (limits err on the side of
refusing), and usage waits to be sent (up to ``_MAX_UNSENT`` rows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from serve_app.access.limits import Allowance

log = logging.getLogger("hpcserve.access")

_MAX_UNSENT = 200_000
METRICS = ("requests", "tokens", "concurrent")


def bucket_shape(limits, metric: str) -> tuple[float, float] | None:
    """(capacity, refill per second) of one metric of a ``Limits``, or None."""
    value = {"requests": limits.rpm, "tokens": limits.tpm,
             "concurrent": limits.max_concurrent}[metric]
    if value is None:
        return None
    return float(value), (0.0 if metric == "concurrent" else value / 60.0)


class AccessClient:
    def __init__(self, ledger: Any, interval_s: float):
        self.ledger = ledger
        self.interval_s = interval_s
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.keys: dict[str, dict[str, Any]] = {}       # sha256 -> key record
        self.keys_version = -1
        self.allowances: dict[tuple[str, str], Allowance] = {}
        self.unsent: list[dict[str, Any]] = []
        self.health: dict[str, Any] = {}                # reported with each sync
        self.probes: dict[str, Any] = {}                # name -> () -> health entry
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def first_sync(self, timeout_s: float = 5.0) -> None:
        """Before a replica's first sync no managed key is known: a request that
        arrives then waits for it (once per replica, bounded)."""
        self.start()
        if not self.synced.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self.synced.wait()
            except asyncio.TimeoutError:
                pass

    def allowance(self, scope: str, metric: str) -> Allowance | None:
        return self.allowances.get((scope, metric))

    def record(self, row: dict[str, Any]) -> None:
        if len(self.unsent) < _MAX_UNSENT:
            self.unsent.append(row)
        else:
            log.warning("usage buffer full (%d rows): the ledger has not answered; "
                        "dropping usage of request %s", _MAX_UNSENT, row["request_id"])

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ledger restarting, the head busy: next time
                log.warning("access sync failed: %r", exc)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def sync(self) -> None:
        for name, probe in self.probes.items():
            self.health[name] = probe()
        rows = self.unsent[:5000]
        reports = {(s, m): a.report() for (s, m), a in self.allowances.items()}
        try:
            answer = await self.ledger.sync.remote({
                "replica": self.replica, "keys_version": self.keys_version, "usage": rows,
                "allowances": {f"{s}|{m}": r for (s, m), r in reports.items()},
                "health": self.health})
        except BaseException:
            for name, report in reports.items():
                if name in self.allowances:
                    self.allowances[name].unreport(report)
            raise
        if answer["acked"]:  # recorded (idempotent by request id if resent)
            del self.unsent[:len(rows)]
        self.health["unsent"] = len(self.unsent)
        if answer.get("keys") is not None:
            self.keys, self.keys_version = answer["keys"], answer["keys_version"]
        for name, (capacity, refill, lease, level) in answer["leases"].items():
            scope, _, metric = name.rpartition("|")
            allowance = self.allowances.get((scope, metric))
            if allowance is None or (allowance.capacity, allowance.refill_per_s) != (
                    capacity, refill):
                allowance = self.allowances[(scope, metric)] = Allowance(capacity, refill)
            allowance.granted(lease, level)
        for key in set(self.allowances) - {tuple(n.rpartition("|")[::2])
                                           for n in answer["leases"]}:
            del self.allowances[key]  # a limit that was removed
        self.synced.set()
