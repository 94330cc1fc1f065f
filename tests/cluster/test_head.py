"""cluster.head: the environment every ``ray start`` gets, where a real HAProxy can
show what it does."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from cluster.head import HAPROXY_RETRY_ON
from cluster.model_routes import frontend_rules
from cluster.ports import free_ports
from tests.haproxy_support import HTTP_DEFAULTS, check_config, start


def _whole(request: bytes) -> bool:
    head, sep, body = request.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


class _Dies:
    """A replica that takes each request and dies before answering: reads it whole,
    then closes the connection with nothing sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.taken = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not _whole(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if b"POST" in data:
                    self.taken += 1


class _Answers(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("retry_on, served", [(HAPROXY_RETRY_ON, True),
                                              ("conn-failure", False)])  # Serve's default
def test_a_request_whose_replica_dies_before_answering_goes_to_another(tmp_path: Path,
                                                                       retry_on, served):
    dies = _Dies()
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    (port,) = free_ports(1)
    config = tmp_path / "haproxy.cfg"
    # the lines of Serve's generated defaults that decide a retry, with our retry-on
    # and the frontend rule that holds the request whole (cluster.haproxy_guard)
    config.write_text(HTTP_DEFAULTS + f"""    option redispatch 1
    retry-on {retry_on}
frontend f
    bind 127.0.0.1:{port}
{frontend_rules(tmp_path, route=False)}    default_backend b
backend b
    balance first
    server dies 127.0.0.1:{dies.port}
    server other 127.0.0.1:{other.server_address[1]}
""")
    check_config(config)
    proc = start(config, port)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "m", "messages": []}, timeout=30)
        assert dies.taken >= 1  # the first try reached the dying replica
        if served:
            assert r.status_code == 200 and r.json() == {"model": "m", "messages": []}
        else:
            assert r.status_code == 502
        # anything else is never sent twice: a batch created twice would run twice
        taken = dies.taken
        r = httpx.post(f"http://127.0.0.1:{port}/v1/batches", json={"input_file_id": "f"},
                       timeout=30)
        assert r.status_code == 502 and dies.taken == taken + 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        other.shutdown()
        other.server_close()
        dies.sock.close()


def test_what_a_worker_inherits_from_the_head_can_travel_through_heappe(tmp_path: Path):
    """Every ``ray start`` setting a worker job gets (``cluster.control``) must pass
    HEAppE's check on task environment variables; head-only ones (HAProxy's retry
    policy, whose value has a space) stay on the head."""
    from cluster.config import HeadConfig
    from cluster.control import worker_environment
    from cluster.head import HeadInfo, ray_environment
    from cluster.providers.heappe_template import unsafe_environment_variable

    token = tmp_path / "token"
    token.write_text("secret-token")
    env = ray_environment(HeadConfig(), token, tmp_path / "h")
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == HAPROXY_RETRY_ON  # the head has it
    head = HeadInfo(pid=1, node_ip="127.0.0.2", gcs_address="127.0.0.2:1", dashboard_url="",
                    metrics_port=0, http_url="", temp_dir="", token_path=str(token), env=env)
    worker = worker_environment(head)
    assert "RAY_SERVE_HAPROXY_RETRY_ON" not in worker and worker["RAY_AUTH_TOKEN"]
    assert unsafe_environment_variable(worker) is None
