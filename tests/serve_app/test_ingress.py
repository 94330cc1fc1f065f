"""The OpenAI surface end to end: real head, a local allocation, the ZMQ engine.

Every test runs against both ingress modes: ``routed`` (an ingress replica on the
head in front of the engine deployment) and ``direct`` (the engine replica answers
HTTP itself, behind Serve's HAProxy).

Clients are the official ``openai`` package and raw httpx (for malformed input
the SDK would refuse to send).
"""

from __future__ import annotations

import httpx
import openai
import pytest

API_KEY = "test-key-123"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module", params=["routed", "direct"])
def stack(hpcserve_stack, request):
    s = hpcserve_stack(args={"api_keys": [API_KEY], "max_request_bytes": MAX_BODY,
                             "ingress": request.param}, name=f"ingress-{request.param}")
    s.ingress_mode = request.param
    yield s
    s.down()


def _post(stack, path: str, body, *, headers=None, content=None):
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    if content is None and body is not None:
        import json
        content = json.dumps(body)
    return httpx.post(stack.base_url + path, content=content, headers=hdrs, timeout=60)


def test_up_reports_first_token_time(stack):
    assert "first token served" in stack.up_output


def test_deployments_match_the_ingress_mode(stack):
    """routed: an Ingress in front of the engine; direct: the engine alone; with keys,
    the access ledger on the head in both."""
    import json

    # the local provider's jobs share the head's cores: failover: auto stays off
    assert "mid-stream failover on" not in stack.up_output
    status = json.loads(stack.cli("status", "--json").stdout)
    deployments = set(status["applications"]["hpcserve"]["deployments"])
    expected = {"Ingress", "engine-tiny"} if stack.ingress_mode == "routed" else {"engine-tiny"}
    assert deployments == expected | {"access-ledger"}


def test_haproxy_sends_requests_to_the_ingress_replica(stack):
    """Not to Serve's Python proxy, which HAProxy falls back to (one hop more) when
    it cannot reach an ingress replica at its node address."""
    import csv
    import io

    for _ in range(3):
        stack.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    port = stack.head.env["RAY_SERVE_HAPROXY_STATS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/stats;csv", timeout=10).text
    rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
    servers = [r for r in rows if r["pxname"] == "http-hpcserve" and r["svname"] != "BACKEND"]
    replicas = [r for r in servers if r["svname"].startswith("SERVE_REPLICA")]
    fallback = [r for r in servers if "PROXY" in r["svname"]]
    assert replicas and all(r["status"] == "UP" for r in replicas), servers
    assert sum(int(r["stot"]) for r in replicas) >= 3
    assert sum(int(r["stot"]) for r in fallback) == 0, fallback


def test_list_models(stack):
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion(stack):
    r = stack.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_non_streamed(stack):
    client = stack.client()
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Count to five"}],
                  max_completion_tokens=16, temperature=0, seed=7)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason


def test_completion_and_stop(stack):
    client = stack.client()
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    text = r.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        s = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                      temperature=0, stop=[stop])
        assert s.choices[0].finish_reason == "stop"
        assert stop not in s.choices[0].text
        assert text.startswith(s.choices[0].text)


def test_streamed_completion(stack):
    chunks = list(stack.client().completions.create(
        model="tiny", prompt="The weather", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(stack):
    client = stack.client()
    kwargs = dict(model="tiny", prompt="Random words:", max_tokens=12, temperature=1.0,
                  top_p=0.9, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == \
        client.completions.create(**kwargs).choices[0].text


def test_health(stack):
    assert httpx.get(stack.base_url[:-3] + "/health", timeout=10).json() == {"status": "ok"}


def test_api_key_required(stack):
    wrong = openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401
    r = httpx.get(stack.base_url + "/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


CHAT = "/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "word " * 3000
BAD_INPUTS = [
    # (id, path, body, raw content, headers, status, param, code)
    ("invalid-json", CHAT, None, b"{not json", None, 400, None, "invalid_json"),
    ("json-array", CHAT, [1, 2], None, None, 400, None, "invalid_json"),
    ("wrong-content-type", CHAT, None, b"model=tiny", {"Content-Type": "text/plain"}, 415,
     None, "unsupported_media_type"),
    ("missing-messages", CHAT, {"model": "tiny"}, None, None, 400, "messages",
     "missing_required_parameter"),
    ("empty-messages", CHAT, {"model": "tiny", "messages": []}, None, None, 400, "messages",
     None),
    ("unknown-role", CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
     None, None, 400, "messages.0.role", None),
    ("content-wrong-type", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
     None, None, 400, "messages.0.content", None),
    ("temperature-wrong-type", CHAT, {"model": "tiny", "messages": MSGS, "temperature": "hot"},
     None, None, 400, "temperature", None),
    ("temperature-out-of-range", CHAT, {"model": "tiny", "messages": MSGS, "temperature": 3},
     None, None, 400, "temperature", None),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": MSGS}, None, None, 404, "model",
     "model_not_found"),
    ("max-tokens-zero", CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 0}, None, None,
     400, "max_tokens", None),
    ("max-tokens-negative", "/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5},
     None, None, 400, "max_tokens", None),
    ("max-tokens-beyond-context", CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 100000},
     None, None, 400, "max_tokens", "context_length_exceeded"),
    ("prompt-beyond-context", "/completions", {"model": "tiny", "prompt": LONG_PROMPT,
                                               "max_tokens": 4},
     None, None, 400, "prompt", "context_length_exceeded"),
    ("n-greater-than-1", CHAT, {"model": "tiny", "messages": MSGS, "n": 2}, None, None, 400, "n",
     "unsupported_parameter"),
    ("unknown-parameter", CHAT, {"model": "tiny", "messages": MSGS, "frobnicate": True}, None,
     None, 400, "frobnicate", "unsupported_parameter"),
    ("logprobs-unsupported", CHAT, {"model": "tiny", "messages": MSGS, "logprobs": True}, None,
     None, 400, "logprobs", "unsupported_parameter"),
    ("too-many-stops", CHAT, {"model": "tiny", "messages": MSGS, "stop": list("abcde")}, None,
     None, 400, "stop", None),
    ("missing-prompt", "/completions", {"model": "tiny"}, None, None, 400, "prompt", None),
    ("two-prompts", "/completions", {"model": "tiny", "prompt": ["a", "b"]}, None, None, 400,
     "prompt", None),
    ("oversized-body", CHAT, {"model": "tiny", "messages": [
        {"role": "user", "content": "x" * (MAX_BODY + 10)}]}, None, None, 413, None,
     "body_too_large"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_openai_error(stack, case):
    _, path, body, content, headers, status, param, code = case
    r = _post(stack, path, body, headers=headers, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_unknown_route_and_method_are_openai_shaped(stack):
    r = httpx.get(stack.base_url + "/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(stack.base_url + CHAT, headers={"Authorization": f"Bearer {API_KEY}"},
                  timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_service_still_serves_after_bad_inputs(stack):
    # ignore_eos: random weights may sample EOS first (CI once got 1 of 3 tokens).
    r = stack.client().completions.create(model="tiny", prompt="ok", max_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_deploy_of_the_same_config_keeps_serving_and_notes_nothing(stack):
    """``hpcserve deploy`` end to end; a mode switch under ``auto`` is announced."""
    import copy

    from cluster.config import ingress_mode_changes
    from cluster.head import serve_status

    proc = stack.cli("deploy", "-c", str(stack.home / "config.yaml"))
    assert proc.stdout.strip() == "deployed" and "note" not in proc.stderr
    out = stack.client().completions.create(model="tiny", prompt="hi", max_tokens=2,
                                            extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2

    # What `deploy` would say for other configs, against the real running status.
    running = serve_status(stack.head)
    auto = copy.deepcopy(stack.config)
    args = auto["applications"][0]["args"]
    args["ingress"] = "auto"
    changes = ingress_mode_changes(running, auto)                 # auto, one model: direct
    assert changes == ([] if stack.ingress_mode == "direct"
                       else ["app 'hpcserve': ingress routed -> direct (mid-stream failover"
                             " on replica crashes is off but for models with failover on)"])
    args["models"] = args["models"] + [{**args["models"][0], "name": "tiny2"}]
    changes = ingress_mode_changes(running, auto)                 # auto, two models: direct
    assert changes == ([] if stack.ingress_mode == "direct"
                       else ["app 'hpcserve': ingress routed -> direct (mid-stream failover"
                             " on replica crashes is off but for models with failover on)"])
    args["models"] = [{**m, "failover": True} for m in args["models"]]
    changes = ingress_mode_changes(running, auto)                 # failover: the relay, direct
    assert changes == ([] if stack.ingress_mode == "direct"
                       else ["app 'hpcserve': ingress routed -> direct (mid-stream failover"
                             " on replica crashes is off but for models with failover on)"])
    args["models"] = [{**m, "autoscaling": {"min_replicas": 0}} for m in args["models"]]
    changes = ingress_mode_changes(running, auto)                 # every model may go cold: routed
    assert changes == ([] if stack.ingress_mode == "routed"
                       else ["app 'hpcserve': ingress direct -> routed"
                             " (one hop more per token; failover on replica crashes)"])


def test_down_stops_everything_up_started(stack):
    """Last in this module: `hpcserve down` leaves no process of the head's session
    (HAProxy included) nor of any allocation's job behind."""
    import json

    from serve_app.processes import session_members

    head = stack.head
    job_pids = [int(p.read_text()) for p in (stack.home / "run" / "jobs").rglob("job.pid")]
    assert job_pids and session_members(head.pid)
    stack.down()
    assert session_members(head.pid) == []
    for pid in job_pids:
        assert session_members(pid) == []
    status = json.loads(stack.cli("status", "--json", check=False).stdout)
    assert status == {"running": False}

