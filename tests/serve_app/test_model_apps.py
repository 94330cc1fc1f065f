"""Several models, each answered by its own engine replicas (``ingress: direct``).

``hpcserve up`` splits the app (``serve_app.layout``): an application per model at
``/_m/<model>`` and the router at ``/``.  Clients still call ``/v1/...``; HAProxy
reads the body's ``model`` and sends the request to that model's replicas, so a
token takes the same one hop as with one model.  What needs Python in between
(the model list, a workflow over both models, unknown models) is the router's.
"""

from __future__ import annotations

import csv
import io
import json

import httpx
import openai
import pytest

API_KEY = "model-apps-key"
MODELS = ["tiny-a", "tiny-b"]
WORKFLOW = {"name": "duo", "kind": "tribunal", "members": ["tiny-a"], "judge": "tiny-b",
            "rounds": 1, "steps": {"max_tokens": 4}}


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    models = [{"name": n, "engine": "zmq", "max_model_len": 2048,
               "resources": {"hpc_slot": 0.5}} for n in MODELS]
    s = hpcserve_stack(args={"api_keys": [API_KEY], "ingress": "direct", "models": models,
                             "workflows": [WORKFLOW]}, name="model-apps")
    yield s
    s.down()


def _backends(stack) -> dict[str, int]:
    """Requests each HAProxy backend's replicas served (the fallback proxy excluded)."""
    port = stack.head.env["RAY_SERVE_HAPROXY_STATS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/stats;csv", timeout=10).text
    out: dict[str, int] = {}
    for r in csv.DictReader(io.StringIO(text.lstrip("# "))):
        if r["svname"].startswith("SERVE_REPLICA"):
            out[r["pxname"]] = out.get(r["pxname"], 0) + int(r["stot"])
    return out


def test_each_model_is_an_application_of_its_own_behind_the_router(stack):
    status = json.loads(stack.cli("status", "--json").stdout)
    apps = {name: set(a["deployments"]) for name, a in status["applications"].items()}
    assert apps == {"hpcserve": {"Ingress", "access-ledger"},
                    "hpcserve.m.tiny-a": {"engine-tiny-a"},
                    "hpcserve.m.tiny-b": {"engine-tiny-b"}}


def test_a_models_requests_reach_its_own_replicas_not_the_router(stack):
    before = _backends(stack)
    client = stack.client()
    for model in MODELS:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            stream=True) if c.choices)
        assert text
        assert client.completions.create(model=model, prompt="hi", max_tokens=2).model == model
    after = _backends(stack)
    served = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert served.get("http-hpcserve.m.tiny-a") == 2 and served.get("http-hpcserve.m.tiny-b") == 2
    assert served.get("http-hpcserve", 0) == 0, served


def test_the_router_serves_the_rest(stack):
    before = _backends(stack)
    client = stack.client()
    assert sorted(m.id for m in client.models.list().data) == sorted([*MODELS, "duo"])
    r = client.chat.completions.create(model="duo", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    served = {k: v - before.get(k, 0) for k, v in _backends(stack).items()}
    assert served.get("http-hpcserve") == 3, served  # the workflow's steps: by handle


def test_credentials_are_checked_by_the_models_own_replicas(stack):
    r = httpx.post(f"{stack.base_url}/chat/completions", timeout=30,
                   headers={"Authorization": "Bearer wrong"},
                   json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["message"], r.text
