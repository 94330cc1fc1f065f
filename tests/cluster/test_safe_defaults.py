"""Safe by default, on a real `hpcserve up` with no API key (the embedded default's shape).

Nothing hpcserve or Ray Serve opens may answer beyond loopback; the metrics address
`up` prints must answer; HAProxy's admin socket is not world-writable; and when the
only replica's node is lost under load, no client gets a 500 or an error that is not
OpenAI-shaped (streams cut mid-body are what the direct path gives: documented).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.head import HeadInfo
from cluster.listening import listeners
from tests.conftest import non_loopback_address

SERVE_ROLES = ("OpenAI API", "HAProxy", "Serve ", "hpcserve")


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    s = hpcserve_stack(name="safe-defaults")
    yield s
    s.down()


def _serve_listeners(stack):
    return [item for item in listeners(stack.home / "run", stack.head, authenticated=False)
            if item.role.startswith(SERVE_ROLES)]


def test_no_serve_or_hpcserve_socket_listens_beyond_loopback(stack):
    found = _serve_listeners(stack)
    roles = {item.role for item in found}
    # the stack's whole data path is there: otherwise this test could pass on nothing
    assert {"OpenAI API (Serve's HAProxy)", "HAProxy stats page",
            "HAProxy Prometheus metrics", "Serve fallback proxy (HTTP)",
            "Serve replica: direct-ingress HTTP", "hpcserve ZMQ engine"} <= roles, roles
    exposed = [item for item in found if item.reach != "this machine"]
    assert not exposed, exposed
    address = non_loopback_address()
    if address:  # and from the outside, the API port is closed
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{stack.port}/v1/models", timeout=5)


def test_status_lists_every_port_with_its_role(stack):
    status = json.loads(stack.cli("status", "--json").stdout)
    by_port = {p["port"]: p for p in status["ports"]}
    api = by_port[stack.port]
    assert api["role"] == "OpenAI API (Serve's HAProxy)" and api["reach"] == "this machine"
    head = stack.head
    assert by_port[head.metrics_port]["role"].startswith("Ray node Prometheus metrics")
    assert int(head.dashboard_url.rsplit(":", 1)[1]) in by_port
    assert all(p["auth"] and p["reach"] for p in status["ports"])
    text = stack.cli("status").stdout
    assert "LISTENING ON" in text and f"127.0.0.1:{stack.port}" in text


def test_the_printed_metrics_address_answers(stack):
    (url,) = re.findall(r"^metrics:\s+(\S+)", stack.up_output, flags=re.MULTILINE)
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200 and "ray_" in reply.text
    cmdline = " ".join(psutil.Process(stack.head.pid).cmdline())
    assert cmdline.count("--metrics-export-port=") == 1
    assert "--runtime-env-agent-port=" in cmdline


def test_haproxy_admin_socket_is_private_and_errors_are_openai_shaped(stack):
    head: HeadInfo = stack.head
    hdir = Path(head.env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert stat.S_IMODE(os.stat(head.private_dir).st_mode) == 0o700
    assert Path(head.temp_dir).parent == Path(head.private_dir)  # Ray's own is 0777
    assert stat.S_IMODE(os.stat(hdir).st_mode) == 0o700
    for sock in hdir.glob("admin.sock*"):
        if stat.S_ISSOCK(os.stat(sock).st_mode):
            assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0, sock
    config = next(hdir.rglob("haproxy.cfg")).read_text()
    assert "mode 666" not in config
    assert "retry-on conn-failure empty-response" in config  # cluster.head.HAPROXY_RETRY_ON
    for status in (502, 503, 504):
        (page,) = re.findall(rf"errorfile {status} (\S+)", config)
        raw = Path(page).read_bytes()
        head_part, body = raw.split(b"\r\n\r\n", 1)
        assert head_part.startswith(b"HTTP/1.1 50")
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        if status != 504:
            assert head_part.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head_part


# ---- the only replica's node lost under load ------------------------------------------

def _allocation_processes(home: Path) -> list[psutil.Process]:
    """Every process of the stack's local allocation: a lost node loses them all (the
    replica and the engine run in sessions of their own, so a group kill misses them)."""
    procs = []
    for pid_file in (home / "run" / "jobs").rglob("supervisor.pid"):  # not the control loop's
        root = psutil.Process(int(pid_file.read_text()))
        procs += [root, *root.children(recursive=True)]
    return procs


def _is_openai_error(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def test_losing_the_only_replicas_node_under_load_gives_no_500(stack):
    url = f"{stack.base_url}/chat/completions"
    outcomes: list[tuple[str, int, bytes, float, float]] = []
    stop = threading.Event()
    killed_at: list[float] = []

    def user(streaming: bool) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 48, "stream": streaming, "ignore_eos": True}
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    with client.stream("POST", url, json=body) as r:
                        raw = b"".join(r.iter_bytes())
                        kind = "ok" if r.status_code == 200 else "status"
                        if streaming and r.status_code == 200 and b"data: [DONE]" not in raw:
                            kind = "sse-error" if b'"error"' in raw else "truncated"
                        outcomes.append((kind, r.status_code, raw, started, time.monotonic()))
                except httpx.TransportError as exc:  # a stream cut mid-body
                    outcomes.append(("transport", 0, repr(exc).encode(), started,
                                     time.monotonic()))

    threads = [threading.Thread(target=user, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(o[0] == "ok" for o in outcomes) < 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    victims = _allocation_processes(stack.home)
    assert any("ServeReplica" in p.name() for p in victims), [p.name() for p in victims]
    killed_at.append(time.monotonic())
    for proc in victims:  # the node is gone: everything on it at once
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # until the pool's replacement serves again (a new job, a new replica)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if sum(o[0] == "ok" and o[3] > killed_at[0] + 1 for o in outcomes) >= 4:
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=150)

    kill = killed_at[0]
    in_flight = [o for o in outcomes if o[3] < kill < o[4]]
    assert in_flight, "the node was lost with no request in flight"
    recovered = [o for o in outcomes if o[0] == "ok" and o[3] > kill + 1]
    assert len(recovered) >= 4, "the service did not serve again after the loss"
    for kind, status, raw, _, _ in outcomes:
        assert status != 500, raw[:300]
        if kind == "status":
            assert status in (503, 504), (status, raw[:300])
            assert _is_openai_error(raw), raw[:300]
    # What the direct path gives a stream on the lost node (docs/security.md... README):
    # a body cut mid-stream, never a non-OpenAI error page.
    cut = [o for o in outcomes if o[0] in ("transport", "truncated")]
    assert all(o[3] < kill + 5 for o in cut), "streams were cut long after the loss"
