"""Floods refused before Python: HAProxy answers 429 for a key whose limit is spent.

A client that ignores ``Retry-After`` and keeps sending (a retry loop, a script gone
wrong) would otherwise cost every refused request a trip through HAProxy, the
replica's HTTP stack and the request pipeline, on the cores the engines use.  The
head's ledger knows from the replicas' reports which of a key's buckets are empty
and how many requests they refused; ``decide`` turns that into the keys to shed and
until when, and ``ShedMap`` puts them in a map that HAProxy's frontend reads before
it picks a replica (the rules are written into Serve's HAProxy config by
``cluster.haproxy_guard``).  The map holds the store's SHA-256 of each key, never a
key.

A key is shed only while its bucket is empty (it holds less than one unit per
replica: the rest is split among their leases, so none may be able to admit) *and*
its clients were refused more than ``REFUSED_TO_SHED`` times in the last second or
so: a client that backs off as told is never shed.  The entry lasts until the
bucket has refilled a twentieth of its capacity (at least one request, 1-60 s);
then the replicas see the key again, admit from their leases, and refuse (and
report) once more if the flood goes on.
Each time a key is shed again within ``MEMORY_S`` of its last shed, the time
doubles (at most ``MAX_SHED_S``): a flood that goes on reaches the replicas for
less and less of the time, while the key's limit stays what it was.
Requests, tokens: the two limits that refill.  Concurrency, a project's limits and
OIDC tokens are refused by the replicas as before.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.access.limits import Bucket, format_duration

log = logging.getLogger("hpcserve.access")

MAP_FILE = "hpcserve-shed.map"
BODY_FILE = "hpcserve-429.json"
REFUSED_TO_SHED = 5.0     # recent refusals that show a client not backing off
REFILL_FRACTION = 0.05    # shed until the bucket holds this much of its capacity
MIN_SHED_S, MAX_SHED_S = 1.0, 60.0
MEMORY_S = 30.0           # a key shed again this soon after its last shed: time doubles
SHED_METRICS = ("requests", "tokens")

BODY = (b'{"error":{"message":"Rate limit reached for this key: it was refused many '
        b'times in a row. Please retry after the time in the Retry-After header.",'
        b'"type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}')


def haproxy_dir() -> Path | None:
    """Where Serve's HAProxy config lives on the head (None: Serve runs no HAProxy).
    The map and the response body are kept there, under the names above."""
    config = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    return Path(config).parent if config else None


def frontend_rules(directory: Path) -> str:
    """The HAProxy frontend lines that refuse a shed key.  A map value is
    ``metric:limit:deadline`` (Unix seconds): HAProxy itself stops refusing at the
    deadline, so an entry nobody removes (a ledger gone) expires on its own."""
    shed, left = "var(txn.hpcserve_shed)", "var(txn.hpcserve_left)"
    lines = ["    # hpcserve: keys over their limit, refused here (serve_app/access/shed.py)",
             f"    http-request set-var(txn.hpcserve_shed) req.hdr(authorization),"
             f"word(2,' '),sha2(256),hex,lower,map({directory / MAP_FILE}) "
             f"if {{ req.hdr(authorization) -m found }}",
             f"    http-request set-var(txn.hpcserve_now) date if {{ {shed} -m found }}",
             f"    http-request set-var(txn.hpcserve_left) {shed},field(3,:),"
             f"sub(txn.hpcserve_now) if {{ {shed} -m found }}"]
    for metric in SHED_METRICS:
        lines.append(
            f"    http-request return status 429 content-type application/json file "
            f"{directory / BODY_FILE} hdr Retry-After %[{left}] "
            f"hdr x-ratelimit-limit-{metric} %[{shed},field(2,:)] "
            f"hdr x-ratelimit-remaining-{metric} 0 "
            f"hdr x-ratelimit-reset-{metric} %[{left}]s "
            f"if {{ {shed} -m beg {metric}: }} {{ {left} -m int gt 0 }}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Shed:
    """A key refused at HAProxy until ``until`` (monotonic seconds)."""

    name: str
    metric: str
    until: float
    limit: int
    strikes: int = 0   # sheds of this key in a row (each within MEMORY_S of the last)

    def value(self, now: float, wall_now: float) -> str:
        """The map's value: the deadline in Unix seconds, rounded up."""
        return f"{self.metric}:{self.limit}:{math.ceil(wall_now + self.until - now)}"


def decide(keys: Mapping[str, Mapping[str, Any]], buckets: Mapping[str, Bucket],
           current: Mapping[str, Shed], now: float) -> dict[str, Shed]:
    """The sheds, by the key's SHA-256: those whose time has not come, those of
    keys whose bucket is empty while their clients keep being refused, and those
    that ended less than ``MEMORY_S`` ago (remembered for their strikes; ``active``
    picks the ones HAProxy must refuse)."""
    out: dict[str, Shed] = {}
    for digest, record in keys.items():
        if record.get("revoked_at") is not None:
            continue
        shed = current.get(digest)
        if shed is not None and shed.until > now:
            out[digest] = shed
            continue
        previous = shed if shed is not None and now - shed.until < MEMORY_S else None
        if previous is not None:
            out[digest] = previous
        for metric in SHED_METRICS:
            bucket = buckets.get(f"key:{record['name']}|{metric}")
            if bucket is None or bucket.refill_per_s <= 0 or math.isnan(bucket.level):
                continue
            level = bucket.level_at(now)
            # What is left is split among the replicas' leases: with less than one
            # unit per replica, none may hold enough to admit a request.
            empty = level < max(1, len(bucket.leases))
            if not empty or bucket.refused_at(now) < REFUSED_TO_SHED:
                continue
            target = max(1.0, REFILL_FRACTION * bucket.capacity)
            strikes = 0 if previous is None else previous.strikes + 1
            wait = max(MIN_SHED_S, (target - level) / bucket.refill_per_s) * 2 ** strikes
            out[digest] = Shed(record["name"], metric, now + min(MAX_SHED_S, wait),
                               int(bucket.capacity), strikes)
            break
    return out


def active(sheds: Mapping[str, Shed], now: float) -> dict[str, Shed]:
    """The sheds HAProxy must refuse now."""
    return {digest: shed for digest, shed in sheds.items() if shed.until > now}


class ShedMap:
    """Keeps HAProxy's map equal to the sheds: the file (read by every HAProxy that
    Serve starts or reloads) and, through the admin socket, the running one.  After
    any failure, and at the first call, the whole map is sent again from empty."""

    def __init__(self, directory: Path):
        self.path = directory / MAP_FILE
        self.applied: dict[str, str] | None = None  # None: unknown (a previous ledger's)
        self.error: str | None = None

    def apply(self, sheds: Mapping[str, Shed], now: float) -> None:
        sheds = active(sheds, now)
        wall_now = time.time()
        wanted = {digest: shed.value(now, wall_now) for digest, shed in sheds.items()}
        applied = self.applied or {}
        if wanted == self.applied:
            return
        if self.applied is None:
            commands = [f"clear map {self.path}"]
        else:
            commands = [f"del map {self.path} {d}" for d in applied.keys() - wanted.keys()]
        commands += [f"set map {self.path} {d} {v}" if d in applied
                     else f"add map {self.path} {d} {v}"
                     for d, v in wanted.items() if applied.get(d) != v]
        for digest in wanted.keys() - applied.keys():
            log.warning("key '%s' over its %s limit and still sending: refused at HAProxy "
                        "for %s", sheds[digest].name, sheds[digest].metric,
                        format_duration(sheds[digest].until - now))
        errors = []
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(f"{d} {v}\n" for d, v in wanted.items()))
            os.replace(tmp, self.path)
        except OSError as exc:
            errors.append(f"{self.path}: {exc}")
        for sock in self._sockets():
            try:
                errors += [f"{sock}: {e}" for e in _admin(sock, commands)]
            except OSError as exc:  # HAProxy restarting: the next call sends it all again
                errors.append(f"{sock}: {type(exc).__name__}: {exc}")
        self.applied = None if errors else wanted
        self.error = "; ".join(errors)[:500] or None

    def _sockets(self) -> list[Path]:
        """Serve nests HAProxy's files one directory down (a hash of the config)."""
        return sorted(self.path.parent.glob("*/admin.sock")) + sorted(
            self.path.parent.glob("admin.sock"))


_BATCH = 50  # commands per connection: a CLI line must fit HAProxy's buffer


def _admin(path: Path, commands: list[str]) -> list[str]:
    """Run commands on HAProxy's admin socket (';'-separated, a batch per
    connection); what HAProxy answered (a map command that worked answers nothing)."""
    answers: list[str] = []
    for i in range(0, len(commands), _BATCH):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(str(path))
            s.sendall(("; ".join(commands[i:i + _BATCH]) + "\n").encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        answers += [line for line in answer.decode(errors="replace").splitlines()
                    if line.strip()]
    return answers
