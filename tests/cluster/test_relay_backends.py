"""The failover relay's view of a model's replicas, from HAProxy's config as Serve writes it.

The config below has the shape of Ray Serve 2.60's template (``haproxy_templates.py``):
per application an ACL pair on its route and a backend with its replicas, a backup
server (the head's Serve proxy) and a ``-via-ingress-request-router`` twin whose
servers ``track`` the primary's.  ``tests/serve_app/test_failover.py`` reads a real
one from a running stack.
"""

from __future__ import annotations

import os
import time

from cluster.relay_backends import DOWN_S, Servers, parse

CONFIG = """frontend http_frontend
    bind 127.0.0.1:8000
    acl is_hpcserve_m_tiny path_beg /_m/tiny/
    acl is_hpcserve_m_tiny path /_m/tiny
    acl is_hpcserve path_beg /
    acl is_hpcserve path /
    use_backend hpcserve_m_tiny if is_hpcserve_m_tiny
    use_backend hpcserve if is_hpcserve
    default_backend default_backend
backend default_backend
    http-request return status 404
backend hpcserve_m_tiny
    log global
    http-reuse always
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server inter 5s
    # Servers in this backend
    server replica_a 127.0.0.1:30001 check
    server replica_b 10.0.0.7:30002 check observe layer4 error-limit 10 on-error mark-down
    server head_proxy 127.0.0.1:8001 check backup
backend hpcserve_m_tiny-via-ingress-request-router
    http-reuse always
    server replica_a 127.0.0.1:30001 track hpcserve_m_tiny/replica_a
backend hpcserve
    log global
    server replica_c 127.0.0.1:30003 check
"""


def test_each_model_route_maps_to_its_replicas_without_backups():
    assert parse(CONFIG) == {"/_m/tiny": [("127.0.0.1", 30001), ("10.0.0.7", 30002)]}
    ipv6 = CONFIG.replace("10.0.0.7:30002", "fd00::5:30002")  # as Serve writes it
    assert parse(ipv6)["/_m/tiny"][1] == ("fd00::5", 30002)


def test_a_replica_that_failed_is_passed_over_and_the_least_busy_picked(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(CONFIG)
    servers = Servers(path)
    a = servers.pick(b"/_m/tiny/v1/completions", set())
    b = servers.pick(b"/_m/tiny/v1/completions", set())
    assert {a.port, b.port} == {30001, 30002}  # equals in turn
    a.active = 3
    assert servers.pick(b"/_m/tiny/v1/chat/completions", set()) is b
    assert servers.pick(b"/_m/tiny/v1/completions", {b}) is a
    assert servers.pick(b"/_m/tinyx/v1/completions", set()) is None  # HAProxy's then
    assert servers.pick(b"/v1/completions", set()) is None
    Servers.failed(b)
    assert servers.pick(b"/_m/tiny/v1/completions", set()) is a
    assert servers.pick(b"/_m/tiny/v1/completions", {a}) is None
    b.down_until = time.monotonic() - 1  # DOWN_S later
    assert DOWN_S > 0 and servers.pick(b"/_m/tiny/v1/completions", {a}) is b


def test_a_rewritten_config_is_read_again_and_keeps_what_it_knew(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(CONFIG)
    servers = Servers(path)
    servers.pick(b"/_m/tiny/v1/completions", set())
    first = servers.known[("127.0.0.1", 30001)]
    first.active = 1
    path.write_text(CONFIG.replace("10.0.0.7:30002", "127.0.0.1:30004"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    servers._checked = 0.0  # as after RELOAD_S
    ports = {servers.pick(b"/_m/tiny/v1/completions", set()).port for _ in range(4)}
    assert ports == {30004}  # the least busy of the new set
    assert servers.known[("127.0.0.1", 30001)] is first and first.active == 1
