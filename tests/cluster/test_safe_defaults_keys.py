"""With API keys: the endpoint answers on the configured host, and every port that
serves the API (HAProxy's frontend, each replica's direct-ingress port, Serve's
fallback proxy) refuses a request without the key."""

from __future__ import annotations


import httpx
import pytest

from cluster.listening import listeners
from tests.conftest import default_config, non_loopback_address

KEY = "sk-test-safe-defaults"
API_ROLES = ("OpenAI API (Serve's HAProxy)", "Serve replica: direct-ingress HTTP",
             "Serve fallback proxy (HTTP)")


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    cfg_args = {"api_keys": [KEY]}
    config = default_config(args=cfg_args)
    config["http_options"]["host"] = address
    s = hpcserve_stack(config, name="safe-keys")
    s.address = address
    yield s
    s.down()


def test_the_endpoint_answers_on_the_configured_host_only(stack):
    url = f"http://{stack.address}:{stack.port}/v1"
    assert f"endpoint:  {url}" in stack.up_output
    ok = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text
    with pytest.raises(httpx.ConnectError):  # HAProxy binds the configured host only
        httpx.get(f"http://127.0.0.1:{stack.port}/v1/models", timeout=5)


def test_every_port_serving_the_api_refuses_a_request_without_the_key(stack):
    found = [item for item in listeners(stack.home / "run", stack.head, authenticated=True)
             if item.role in API_ROLES]
    assert {item.role for item in found} == set(API_ROLES), found
    for item in found:
        host = "127.0.0.1" if item.host in ("0.0.0.0", "::") else item.host
        base = f"http://{host}:{item.port}"
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions",
                                    {"model": "tiny", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": "hi"}]})):
            for headers in ({}, {"Authorization": "Bearer wrong-key"}):
                r = httpx.request(method, base + path, json=body, headers=headers, timeout=60)
                assert r.status_code == 401, (item, path, headers, r.status_code, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert item.auth == "API key"
