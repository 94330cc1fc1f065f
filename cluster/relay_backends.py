"""Where the failover relay sends a model's requests: its replicas, read from HAProxy's config.

Serve renders the model's application into HAProxy's config as an ACL on its route
prefix and a backend listing its replicas' HTTP addresses, and rewrites the file
whenever replicas come or go (``cluster.haproxy_guard`` edits it in place).  The
relay reads the same file, so it connects to a replica itself and the tokens make
one hop through it instead of a second pass through HAProxy.  What HAProxy would
add there -- retrying a replica that refused or died before answering, steering
around one that failed -- the relay does itself (``Servers.failed``); when it knows
no replica for a path, or every one failed, it falls back to HAProxy's frontend,
which has the health checks and Serve's fallback server.

Picks the replica with the fewest requests in flight from the relay (a failover
model's requests all come through it), the first of equals in turn.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

DOWN_S = 5.0  # how long a replica that refused or timed out is passed over
RELOAD_S = 0.25  # how often the config's mtime is looked at (when requests come)

_ACL = re.compile(r"^\s*acl is_(\S+) path_beg (/\S*?)/?$", re.MULTILINE)
_BACKEND = re.compile(r"^backend (\S+)\n((?:[ \t].*\n?|\n)*)", re.MULTILINE)
# host:port split at the last colon (an IPv6 host is written without brackets)
_SERVER = re.compile(r"^\s*server (\S+) (\S+):(\d+)\b(.*)$", re.MULTILINE)


@dataclass(eq=False)
class Server:
    """One replica's HTTP address, with the relay's own view of it."""

    host: str
    port: int
    active: int = 0  # requests in flight through the relay
    down_until: float = 0.0
    idle: list = field(default_factory=list)  # kept-alive connections (the relay's)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def parse(config: str) -> dict[str, list[tuple[str, int]]]:
    """Route prefix (``/_m/<model>``) to its backend's server addresses, backups left out."""
    servers = {}
    for name, body in _BACKEND.findall(config):
        servers[name] = [(host.strip("[]"), int(port))
                         for _, host, port, rest in _SERVER.findall(body)
                         if " backup" not in rest and " track " not in f" {rest} "]
    routes = {}
    for name, prefix in _ACL.findall(config):
        if prefix not in ("", "/") and servers.get(name):
            routes[prefix] = servers[name]
    return routes


class Servers:
    """The replicas of each route, as the config at ``path`` has them now."""

    def __init__(self, path: Path | None):
        self.path = path
        self.routes: dict[bytes, list[Server]] = {}
        self.known: dict[tuple[str, int], Server] = {}
        self._mtime = None
        self._checked = 0.0
        self._turn = 0

    def refresh(self, now: float) -> None:
        """The routes as the config has them now (read again at most every ``RELOAD_S``)."""
        if self.path is None or now - self._checked < RELOAD_S:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            mtime = stat.st_mtime_ns, stat.st_size  # a rewrite in place can keep the mtime
            if mtime == self._mtime:
                return
            text = self.path.read_text()
        except OSError:
            return
        self._mtime = mtime
        routes = {}
        for prefix, addresses in parse(text).items():
            routes[prefix.encode() + b"/"] = [
                self.known.setdefault(a, Server(*a)) for a in addresses]
        self.routes = routes

    def known_routes(self) -> dict[bytes, list[Server]]:
        """The routes as the config has them now."""
        self.refresh(time.monotonic())
        return self.routes

    def pick(self, path: bytes, exclude: set[Server]) -> Server | None:
        """The replica for a request to ``path``, or None to go through HAProxy."""
        now = time.monotonic()
        self.refresh(now)
        for prefix, servers in self.routes.items():
            if path.startswith(prefix):
                break
        else:
            return None
        live = [s for s in servers if s not in exclude and s.down_until <= now]
        if not live:
            return None
        self._turn += 1
        least = min(s.active for s in live)
        equals = [s for s in live if s.active == least]
        return equals[self._turn % len(equals)]

    @staticmethod
    def failed(server: Server) -> None:
        """``server`` refused, timed out or closed before answering: pass it over a while."""
        server.down_until = time.monotonic() + DOWN_S
        for up in server.idle:
            up.close()
        server.idle.clear()
