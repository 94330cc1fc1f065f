"""Access for many users, end to end: keys made with the real CLI, the official
openai client, two engine replicas behind HAProxy, the head's ledger.

One stack for the module (direct ingress, two replicas of the tiny model): every
test makes its own keys, so they do not share limits or usage.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.cluster.rotation_support import wait_until
from tests.conftest import default_config
from tests.serve_app.access.oidc_issuer import Issuer, new_private_key

MODEL = "tiny"
HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
           "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    """The centre's OIDC issuer: its own key pair, JWKS served over HTTP."""
    with Issuer(tmp_path_factory.mktemp("issuer")) as iss:
        iss.serve()
        yield iss


@pytest.fixture(scope="module")
def stack(hpcserve_stack, issuer):
    oidc = issuer.oidc_config("url", project_map={"proj-a": "physics"}, jwks_refresh_s=2)
    config = default_config(
        models=[{"name": MODEL, "engine": "zmq", "max_model_len": 2048, "num_replicas": 2}],
        pool={"resources": {"hpc_slot": 2}},
        args={"access": {"managed_keys": True, "oidc": oidc,
                         "projects": {"physics": {"models": ["tiny*"]},
                                      "capped": {"rpm": 1000, "max_concurrent": 64}}}})
    s = hpcserve_stack(config, name="access")
    yield s
    s.down()


def create_key(stack, name: str, *options: str, wait: bool = True) -> str:
    """A key made with the CLI; by default once every replica knows it (a new key
    takes effect within 5 s: the ledger reads the store every second and replicas
    sync every 0.25 s)."""
    key = stack.cli("keys", "create", name, *options).stdout.strip().splitlines()[-1]
    if wait:
        wait_known(stack, key)
    return key


def client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)


def chat(stack, key: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}], **extra}
    return httpx.post(f"{stack.base_url}/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


def wait_known(stack, key: str) -> None:
    """Until both replicas know a new key (and so its limits, which come with it):
    listing models is not limited, and HAProxy spreads the calls over the replicas."""
    def known() -> bool:
        return all(httpx.get(f"{stack.base_url}/models", timeout=30,
                             headers={"Authorization": f"Bearer {key}"}).status_code == 200
                   for _ in range(8))
    wait_until(known, 30, "every replica to know the new key", poll_s=0.2)


def usage_by_key(stack) -> dict[str, dict]:
    out = stack.cli("usage", "--by", "key", "--format", "json").stdout
    return {row["key"]: row for row in json.loads(out)["rows"]}


def test_a_key_created_with_the_cli_works_with_the_openai_client(stack):
    key = create_key(stack, "alice", "--project", "physics", wait=False)
    created = time.monotonic()
    wait_known(stack, key)
    print(f"new key accepted by both replicas {time.monotonic() - created:.2f} s after "
          "`hpcserve keys create`")
    assert time.monotonic() - created < 5
    reply = client(stack, key).chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content is not None
    listed = stack.cli("keys", "list").stdout
    assert "alice" in listed and key not in listed


def test_bad_credentials_are_each_a_401_that_says_which(stack):
    key = create_key(stack, "short-lived", "--project", "physics", "--expires", "1s",
                     wait=False)
    cases = {"": "Missing API key", "Bearer": "Missing API key",
             "Basic abc": "Missing API key", "Bearer hpcs_not-a-key": "Incorrect API key"}
    for header, needle in cases.items():
        r = httpx.get(f"{stack.base_url}/models", headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401 and needle in r.json()["error"]["message"], (header, r.text)
    wait_until(lambda: chat(stack, key).status_code == 401, 30, "the key to expire")
    wait_until(lambda: "expired" in chat(stack, key).text, 30, "'expired' from both replicas")


def test_a_revoked_key_is_refused_within_5_s(stack):
    key = create_key(stack, "bob", "--project", "physics")
    assert chat(stack, key).status_code == 200
    stack.cli("keys", "revoke", "bob")
    revoked = time.monotonic()
    wait_until(lambda: chat(stack, key).status_code == 401, 30, "the revoked key refused")
    took = time.monotonic() - revoked
    print(f"revoked key refused {took:.2f} s after `hpcserve keys revoke`")
    assert took < 5
    assert "revoked" in chat(stack, key).json()["error"]["message"]


def test_a_key_limited_to_one_model_cannot_see_or_use_another(stack):
    key = create_key(stack, "carol", "--project", "physics", "--models", "other-model")
    assert client(stack, key).models.list().data == []
    with pytest.raises(openai.NotFoundError) as info:
        client(stack, key).chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as missing:
        client(stack, key).chat.completions.create(
            model="no-such-model", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert info.value.code == missing.value.code == "model_not_found"
    everyone = create_key(stack, "dave", "--project", "physics")
    assert [m.id for m in client(stack, everyone).models.list().data] == [MODEL]


def test_an_rpm_limit_holds_across_both_replicas(stack):
    key = create_key(stack, "burst", "--project", "physics", "--rpm", "30")
    started = time.monotonic()
    with ThreadPoolExecutor(60) as pool:
        replies = list(pool.map(lambda _: chat(stack, key, max_tokens=8), range(60)))
    refilled = (time.monotonic() - started) * 30 / 60  # the bucket refills 0.5 a second
    ok = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    print(f"rpm 30, burst of 60 over 2 replicas: {len(ok)} served, {len(limited)} limited "
          f"(the bucket refilled {refilled:.1f} meanwhile)")
    assert len(ok) + len(limited) == 60
    assert 20 <= len(ok) <= 30 + int(refilled) + 1
    for r in limited:
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
    for r in ok + limited:
        assert all(h in r.headers for h in HEADERS[:3]), dict(r.headers)
        assert r.headers["x-ratelimit-limit-requests"] == "30"


def test_a_key_flooding_past_its_limit_is_refused_by_haproxy_not_the_replicas(stack):
    """8 clients that ignore Retry-After, 6 s: after the first refusals the ledger
    puts the key in HAProxy's map, and the rest are refused there -- they never
    reach a replica, so the ledger (which records every request a replica saw) has
    only those that came before.  Then the key is served again."""
    key = create_key(stack, "flood", "--project", "physics", "--rpm", "60")
    replies: list[httpx.Response] = []
    shown: list[str] = []
    end = time.monotonic() + 6

    def flood() -> None:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            body = {"model": MODEL, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}
            while time.monotonic() < end:
                replies.append(http.post(f"{stack.base_url}/chat/completions", json=body))
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(flood)
        while time.monotonic() < end and not shown:  # the operator sees it meanwhile
            status = stack.cli("status").stdout
            shown += [line for line in status.splitlines() if "refused at HAProxy" in line]
    ok = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    shed = [r for r in limited if "refused many times" in r.json()["error"]["message"]]
    print(f"flood: {len(replies)} requests in 6 s, {len(ok)} served, {len(limited)} "
          f"refused ({len(shed)} by HAProxy)")
    assert len(ok) + len(limited) == len(replies)
    assert len(ok) <= 60 + 6 + 1                      # the burst and 6 s of refill
    # once HAProxy refuses the key, most refusals are HAProxy's (before that, how soon
    # the first shed comes depends on how busy the box is)
    shed_ids = {id(r) for r in shed}
    first = next((i for i, r in enumerate(replies) if id(r) in shed_ids), None)
    assert first is not None, ("HAProxy refused none of the flood; hpcserve status:\n"
                               + stack.cli("status").stdout)
    later = [r for r in replies[first:] if r.status_code == 429]
    assert len(shed) >= 0.5 * len(later), "most refusals should come from HAProxy"
    for r in shed:
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert shown and "flood" in shown[0], status
    # every request a replica answered is in the ledger, and none of the shed ones
    reached = len(replies) - len(shed)
    wait_until(lambda: usage_by_key(stack).get("flood", {}).get("requests") == reached, 30,
               f"{reached} ledger rows for the flooding key", poll_s=0.5)
    # the flood over, the key is served again once its bucket refilled (a few s)
    wait_until(lambda: chat(stack, key).status_code == 200, 30, "the key served again",
               poll_s=1.0)


def test_a_tpm_limit_holds_within_one_requests_tokens(stack):
    key = create_key(stack, "tokens", "--project", "physics", "--tpm", "400")
    used, max_tokens = 0, 60
    for _ in range(30):
        r = chat(stack, key, max_tokens=max_tokens, ignore_eos=True)
        if r.status_code == 429:
            assert r.headers["x-ratelimit-limit-tokens"] == "400"
            break
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
    else:
        pytest.fail("the tpm limit never answered 429")
    print(f"tpm 400: {used} tokens served before the first 429")
    assert 400 - 2 * max_tokens <= used <= 400 + max_tokens + 40


def test_the_ledger_totals_equal_the_usage_in_the_responses(stack):
    key = create_key(stack, "ledger", "--project", "physics")
    c = client(stack, key)
    expected = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
    for i in range(6):
        if i % 2:
            stream = c.chat.completions.create(
                model=MODEL, max_tokens=5 + i, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"count to {i}"}])
            usage = [chunk.usage for chunk in stream if chunk.usage][-1]
        else:
            usage = c.completions.create(model=MODEL, prompt=f"once upon {i}",
                                         max_tokens=3 + i).usage
        expected["prompt_tokens"] += usage.prompt_tokens
        expected["completion_tokens"] += usage.completion_tokens
        expected["requests"] += 1
    wait_until(lambda: usage_by_key(stack).get("ledger", {}).get("requests") == 6, 30,
               "the ledger to record the requests")
    row = usage_by_key(stack)["ledger"]
    assert {k: row[k] for k in expected} == expected


def test_tokens_from_the_centres_issuer_are_accepted_and_bad_ones_refused(stack, issuer):
    good = issuer.token()
    reply = client(stack, good).chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens > 0
    bad = {
        "signature is invalid": issuer.token(key=new_private_key()),
        "algorithm is not accepted": issuer.token(alg="none"),
        "issuer is not accepted": issuer.token(iss="https://evil.example.org"),
        "audience is not accepted": issuer.token(aud="someone-else"),
        "expired": issuer.token(exp=int(time.time()) - 3600),
        "no project": issuer.token(groups=["/unknown-group"]),
    }
    for needle, token in bad.items():
        r = chat(stack, token)
        assert r.status_code == 401, (needle, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.text)
        assert token not in r.text


def test_a_token_user_is_in_the_ledger_under_its_project(stack, issuer):
    token = issuer.token(preferred_username="erin")
    usage = client(stack, token).completions.create(model=MODEL, prompt="hi",
                                                    max_tokens=3).usage
    def recorded():
        out = stack.cli("usage", "--by", "user", "--format", "json").stdout
        return next((r for r in json.loads(out)["rows"] if r["user"] == "erin"), None)
    wait_until(lambda: recorded() is not None, 30, "erin's request in the ledger")
    assert recorded()["total_tokens"] == usage.total_tokens


def test_an_issuer_that_cannot_be_reached_leaves_cached_keys_working(stack, issuer):
    token = issuer.token()
    issuer.stop()
    try:
        def failing() -> bool:
            out = stack.cli("status", "--json").stdout
            reports = json.loads(out).get("access") or []
            return any((r.get("oidc") or {}).get("error") for r in reports)
        wait_until(failing, 60, "status to show the JWKS fetch failing")
        assert chat(stack, token).status_code == 200
    finally:
        issuer.serve()


def test_a_broken_keys_store_leaves_known_keys_working_and_shows_in_status(stack):
    key = create_key(stack, "survivor", "--project", "physics")
    db = stack.home / "access.db"
    aside = db.with_name("access.db.aside")
    db.rename(aside)  # the store gone (a lost mount, an operator's mistake)

    def reports() -> list[dict]:
        return json.loads(stack.cli("status", "--json").stdout).get("access") or []
    try:
        wait_until(lambda: any(not r["store_ok"] for r in reports()), 60,
                   "status to show the store failing")
        for _ in range(4):  # both replicas, and after several key polls of the ledger
            assert chat(stack, key).status_code == 200
        failing = [r["store_error"] for r in reports() if not r["store_ok"]]
        print("status while the store is gone:", failing)
        assert failing and "access.db" in failing[0]
    finally:
        aside.rename(db)
    wait_until(lambda: all(r["store_ok"] for r in reports()), 60, "the store back")
