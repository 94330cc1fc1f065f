"""The head's ledger: one Serve replica that replicas sync with in the background.

It owns the limit buckets (``limits.Bucket``), hands out the managed keys (hashes
only) from the store, records every finished request's usage in the store, and
counts tokens per project and model in Ray's Prometheus metrics.  It is pinned to
the head (its store is a file there) and is never on a request's path: replicas
call it every ``sync_interval_s`` and go on with what they have when it is slow,
restarting or its store is broken.  Its health goes to ``access-health.json`` next
to the store, which ``hpcserve status`` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.util.metrics import Counter

from serve_app.access import store
from serve_app.access.client import METRICS, bucket_shape
from serve_app.access.config import AccessConfig, Limits
from serve_app.access.limits import Bucket
from serve_app.access.shed import ShedMap, active, decide, haproxy_dir

log = logging.getLogger("hpcserve.access")

_KEYS_POLL_S = 1.0
_KEY_FIELDS = ("name", "project", "models", "rpm", "tpm", "max_concurrent", "expires_at",
               "revoked_at")
_HEALTH_EVERY_S = 2.0


class LedgerServer:
    def __init__(self, access: dict[str, Any]):
        self.cfg = AccessConfig.model_validate(access)
        self.path = self.cfg.store
        self._conn = None
        self.keys: dict[str, dict[str, Any]] = {}
        self.keys_version = -1
        self.store_error: str | None = None
        self.buckets: dict[str, Bucket] = {}
        self.seen: dict[str, float] = {}
        self.replica_health: dict[str, dict[str, Any]] = {}
        self.unsent_reported = 0
        self._task: asyncio.Task | None = None
        directory = haproxy_dir()  # (with shed_floods off: kept empty)
        self.shed_map = ShedMap(directory) if directory is not None else None
        # its own thread: an update to HAProxy's map never waits behind store writes
        self._shed_thread = ThreadPoolExecutor(1, thread_name_prefix="hpcserve-shed")
        self.sheds: dict = {}
        self.refusals = asyncio.Event()  # wakes the shed loop when replicas refused
        if not os.path.exists(self.path):  # a first start
            store.connect(self.path).close()
        self._reload_keys()
        self.requests = Counter("hpcserve_requests", "finished requests",
                                tag_keys=("project", "model", "status"))
        self.tokens = Counter("hpcserve_tokens", "prompt and completion tokens",
                              tag_keys=("project", "model", "kind"))

    # ---- the store ---------------------------------------------------------
    def _db(self):
        """The store, never recreated after the first start: an empty new store in
        place of a lost one would revoke every key."""
        if self._conn is None:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"the access store {self.path} is missing")
            self._conn = store.connect(self.path)
        return self._conn

    def _reload_keys(self) -> None:
        """Read the keys when they changed.  A fresh read-only connection each time,
        so a store that was deleted, replaced or broken shows as an error (and the
        keys already known stay) instead of being recreated empty."""
        try:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"the access store {self.path} is missing")
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            conn.row_factory = sqlite3.Row
            try:
                version = store.keys_version(conn)
                if version != self.keys_version:
                    self.keys = {h: {f: r[f] for f in _KEY_FIELDS}
                                 for h, r in store.keys_by_hash(conn).items()}
                    self.keys_version = version
            finally:
                conn.close()
            self.store_error = None
        except Exception as exc:  # keep serving the keys we have
            self.store_error = f"{type(exc).__name__}: {exc}"

    def _record(self, rows: list[dict[str, Any]]) -> bool:
        try:
            store.record_usage(self._db(), rows)
            return True
        except Exception as exc:
            self.store_error = f"{type(exc).__name__}: {exc}"
            self._conn = None
            return False

    # ---- background: keys and health -------------------------------------
    async def _background(self) -> None:
        if self.shed_map is not None:
            self._shed_task = asyncio.get_running_loop().create_task(self._shed_floods())
        last_health = 0.0
        while True:
            await asyncio.to_thread(self._reload_keys)
            if time.monotonic() - last_health > _HEALTH_EVERY_S:
                await asyncio.to_thread(self._write_health)
                last_health = time.monotonic()
            await asyncio.sleep(_KEYS_POLL_S)

    async def _shed_floods(self) -> None:
        """Keep HAProxy's list of keys to refuse current (serve_app/access/shed.py);
        with ``shed_floods`` off, empty it once (what an earlier ledger left)."""
        while True:
            self.refusals.clear()
            now = time.monotonic()
            try:  # never let shedding stop the ledger
                if self.cfg.shed_floods:
                    self.sheds = decide(self.keys, self.buckets, self.sheds, now)
                await asyncio.get_running_loop().run_in_executor(
                    self._shed_thread, self.shed_map.apply, self.sheds, now)
            except Exception:
                log.exception("updating HAProxy's shed map failed")
            if not self.cfg.shed_floods and self.shed_map.error is None:
                return
            try:  # at the next refusal reported, or a tick (a shed's time running out)
                async with asyncio.timeout(self.cfg.sync_interval_s):  # not wait_for:
                    await self.refusals.wait()                         # it can swallow a stop
            except asyncio.TimeoutError:
                pass

    def _write_health(self) -> None:
        oidc = [h["oidc"] for h in self.replica_health.values() if h.get("oidc")]
        failing = [o for o in oidc if not o.get("ok")]
        health = {"ts": time.time(), "store_ok": self.store_error is None,
                  "store_error": self.store_error, "keys": len(self.keys),
                  "oidc": (failing or oidc or [None])[0], "replicas": len(self.seen),
                  "unsent_usage": sum(h.get("unsent", 0)
                                      for h in self.replica_health.values()),
                  "shed": sorted(s.name for s in active(self.sheds, time.monotonic()).values()),
                  "shed_error": self.shed_map.error if self.shed_map else None}
        target = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                              "access-health.json")
        try:
            with open(target + ".tmp", "w", encoding="utf-8") as f:
                json.dump(health, f)
            os.replace(target + ".tmp", target)
        except OSError as exc:
            log.warning("cannot write %s: %s", target, exc)

    # ---- limits ------------------------------------------------------------
    def _scopes(self) -> dict[str, Limits]:
        scopes = {f"project:{name}": p for name, p in self.cfg.projects.items() if p.any()}
        for record in self.keys.values():
            if record["revoked_at"] is not None:
                continue
            limits = Limits(rpm=record["rpm"], tpm=record["tpm"],
                            max_concurrent=record["max_concurrent"])
            if limits.any():
                scopes[f"key:{record['name']}"] = limits
        return scopes

    def _leases(self, replica: str, reports: dict[str, list[float]], now: float,
                replicas: set[str]) -> dict[str, tuple[float, float, float, float]]:
        leases = {}
        for scope, limits in self._scopes().items():
            for metric in METRICS:
                shape = bucket_shape(limits, metric)
                if shape is None:
                    continue
                name = f"{scope}|{metric}"
                bucket = self.buckets.get(name)
                if bucket is None or (bucket.capacity, bucket.refill_per_s) != shape:
                    bucket = self.buckets[name] = Bucket(*shape)
                used, demand, *rest = reports.get(name, (0.0, 0.0))
                refused = rest[0] if rest else 0  # a replica of the previous version
                lease = bucket.settle(replica, used, demand, now, replicas, refused)
                leases[name] = (*shape, lease, bucket.level)
        return leases

    # ---- what replicas call --------------------------------------------------
    async def sync(self, report: dict[str, Any]) -> dict[str, Any]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._background())
        now = time.monotonic()
        replica = report["replica"]
        self.seen[replica] = now
        stale = 10 * self.cfg.sync_interval_s + 5
        for r in [r for r, t in self.seen.items() if now - t > stale]:
            self.seen.pop(r)
            self.replica_health.pop(r, None)
        self.replica_health[replica] = report.get("health") or {}
        rows = report.get("usage") or []
        acked = not rows or await asyncio.to_thread(self._record, rows)
        if rows and acked:
            for row in rows:
                tags = {"project": row["project"], "model": row["model"]}
                self.requests.inc(1, {**tags, "status": str(row["status"])})
                for kind in ("prompt", "completion"):
                    if row[f"{kind}_tokens"] > 0:
                        self.tokens.inc(row[f"{kind}_tokens"], {**tags, "kind": kind})
        allowances = report.get("allowances") or {}
        leases = self._leases(replica, allowances, now, set(self.seen))
        if any(len(r) > 2 and r[2] for r in allowances.values()):
            self.refusals.set()
        changed = report.get("keys_version") != self.keys_version
        return {"acked": acked, "keys_version": self.keys_version,
                "keys": self.keys if changed else None, "leases": leases}


Ledger = serve.deployment(name="access-ledger", num_replicas=1,
                          max_ongoing_requests=10_000, graceful_shutdown_timeout_s=5,
                          health_check_period_s=5)(LedgerServer)
