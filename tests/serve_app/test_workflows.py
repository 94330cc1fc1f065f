"""The tribunal end to end: `hpcserve up` with the tiny model under three names, and
workflows over them, called with the official openai client and raw HTTP.

One stack for the module: ``tribunal-qa`` (short intermediate steps) for the
behaviour and the measurement, ``tribunal-long`` (long drafts) for what must happen
while steps run: a member's replica killed, a client that goes away.  An API key and
the usage ledger are on, so the ledger's rows show what each request was charged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import statistics
import threading
import time

import httpx
import openai
import pytest

from serve_app.layout import model_app
from tests.cluster.rotation_support import wait_until
from tests.conftest import default_config
from tests.serve_app.conftest import EngineStatsProbe
from tests.serve_app.test_failover import _engine_replicas

NAMES = ("model-a", "model-b", "model-c")
# the default ingress serves each model from an application of its own (serve_app.layout);
# the workflows run in the router app and call them by handle
ENGINES = [f"{model_app('hpcserve', n)}/engine-{n}" for n in NAMES]
STEPS = 32        # tribunal-qa: tokens of each intermediate step
LONG = 400        # tribunal-long: tokens of each draft (seconds of work; the critique of
                  # two such drafts still fits the tiny model's 2048 tokens)
MEMBERS = [{"model": "model-a", "temperature": 1.0, "seed": 1},
           {"model": "model-b", "temperature": 1.0, "seed": 2}]
WORKFLOWS = [
    {"name": "tribunal-qa", "kind": "tribunal", "members": MEMBERS, "judge": "model-c",
     "rounds": 1, "steps": {"max_tokens": STEPS, "ignore_eos": True}},
    {"name": "tribunal-long", "kind": "tribunal", "members": MEMBERS,
     "judge": {"model": "model-c", "max_tokens": 32}, "rounds": 1,
     "steps": {"max_tokens": LONG, "ignore_eos": True}},
]
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
KEY = "workflows-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(hpcserve_stack, tmp_path_factory):
    models = [{"name": n, "engine": "zmq", "max_model_len": 2048} for n in NAMES]
    ledger = tmp_path_factory.mktemp("workflows-ledger") / "access.db"
    s = hpcserve_stack(default_config(
        models=models, pool={"resources": {"hpc_slot": 3}},
        args={"workflows": WORKFLOWS, "api_keys": [KEY], "access": {"store": str(ledger)}}),
        name="workflows")
    s.ledger = ledger
    yield s
    s.down()


def ledger_rows(stack, model: str) -> list[dict]:
    """The usage ledger's rows for ``model``, oldest first."""
    if not stack.ledger.exists():
        return []
    with sqlite3.connect(stack.ledger) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT * FROM usage WHERE model = ? ORDER BY ts", (model,))]


def new_ledger_rows(stack, model: str, seen: int, count: int) -> list[dict]:
    rows: list[dict] = []

    def recorded() -> bool:
        rows[:] = ledger_rows(stack, model)[seen:]
        return len(rows) >= count
    wait_until(recorded, 30, f"{count} new ledger rows for {model}", poll_s=0.2)
    return rows


@pytest.fixture(scope="module")
def probe(stack):
    p = EngineStatsProbe(stack.head, ENGINES)
    yield p
    p.close()


def stats(probe) -> dict[str, dict]:
    return {name.removeprefix("engine-"): s for name, s in probe.stats().items()}


def idle(probe, timeout: float = 60) -> dict[str, dict]:
    """Until no engine holds a request; the stats then."""
    out: dict = {}

    def check() -> bool:
        out.update(stats(probe))
        return all(s.get("running") == 0 and s.get("waiting") == 0 for s in out.values())
    wait_until(check, timeout, f"every engine idle: {out}", poll_s=0.2)
    return out


def trace_usage(trace: list[dict]) -> tuple[int, int]:
    return (sum(s["prompt_tokens"] for s in trace), sum(s["completion_tokens"] for s in trace))


def extension(obj) -> dict:
    """The openai client keeps unknown fields: ``hpcserve`` as a plain dict."""
    return (obj.model_extra or {})["hpcserve"]


def test_models_lists_the_workflows(stack):
    listed = {m.id: m for m in stack.client().models.list().data}
    assert set(listed) == {*NAMES, "tribunal-qa", "tribunal-long"}
    one = httpx.get(f"{stack.base_url}/models/tribunal-qa", headers=AUTH, timeout=30).json()
    assert one["engine"] == "workflow"
    assert one["workflow"] == {"kind": "tribunal", "members": ["model-a", "model-b"],
                               "judge": "model-c", "rounds": 1}

    def derived() -> bool:  # once the control loop has published its models' states
        status = httpx.get(f"{stack.base_url}/models/tribunal-qa", headers=AUTH,
                           timeout=30).json()["status"]
        return status is not None and status["state"] == "ready"
    wait_until(derived, 60, "a derived status of tribunal-qa")
    status = httpx.get(f"{stack.base_url}/models/tribunal-qa", headers=AUTH,
                       timeout=30).json()["status"]
    assert status["running_replicas"] == 3 and "reason" not in status


def test_a_tribunal_answers_with_the_openai_client_and_its_trace(stack, probe):
    before = idle(probe)
    seen = len(ledger_rows(stack, "tribunal-qa"))
    reply = stack.client().chat.completions.create(
        model="tribunal-qa", messages=QUESTION, max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True, "hpcserve": {"trace_texts": True}})
    after = idle(probe)
    assert reply.model == "tribunal-qa" and reply.object == "chat.completion"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    ext = extension(reply)
    assert (ext["workflow"], ext["kind"]) == ("tribunal-qa", "tribunal")
    trace = ext["trace"]
    # the steps, in order: both drafts, the judge's critique, the judge's final answer
    assert [(s["step"], s["role"], s["model"]) for s in trace] == [
        ("draft", "member", "model-a"), ("draft", "member", "model-b"),
        ("critique", "judge", "model-c"), ("final", "judge", "model-c")]
    assert all(s["status"] == "ok" for s in trace), trace
    assert [s["completion_tokens"] for s in trace] == [STEPS, STEPS, STEPS, 16]
    # the intermediate texts were asked for; the final one is the answer itself
    assert all(s["text"] for s in trace[:3]) and "text" not in trace[3]
    # drafts in parallel: their time windows overlap; the rest one after the other
    a, b, critique, final = trace
    assert max(a["start_s"], b["start_s"]) < min(a["end_s"], b["end_s"])
    assert max(a["end_s"], b["end_s"]) <= critique["start_s"] < critique["end_s"] \
        <= final["start_s"]
    # usage is every step's
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == trace_usage(trace)
    assert reply.usage.completion_tokens == 3 * STEPS + 16
    # the engines' own counts: one call per member, two for the judge
    finished = {n: after[n]["requests_finished"] - before[n]["requests_finished"]
                for n in NAMES}
    assert finished == {"model-a": 1, "model-b": 1, "model-c": 2}
    prompts = {n: after[n]["prompt_tokens"] - before[n]["prompt_tokens"] for n in NAMES}
    assert sum(prompts.values()) == reply.usage.prompt_tokens
    (row,) = new_ledger_rows(stack, "tribunal-qa", seen, 1)  # charged every step
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_a_streamed_tribunal_carries_the_trace_on_its_last_chunk(stack):
    seen = len(ledger_rows(stack, "tribunal-qa"))
    chunks = list(stack.client().chat.completions.create(
        model="tribunal-qa", messages=QUESTION, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    trace = extension(finish[0])["trace"]
    assert [s["step"] for s in trace] == ["draft", "draft", "critique", "final"]
    assert all("text" not in s for s in trace)  # not asked for
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == trace_usage(trace)
    assert trace[-1]["completion_tokens"] == 12
    # the caller's ledger is charged every step
    (row,) = new_ledger_rows(stack, "tribunal-qa", seen, 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (
        usage.prompt_tokens, usage.completion_tokens, 200)


def test_continuous_usage_counts_the_earlier_steps(stack):
    chunks = list(stack.client().chat.completions.create(
        model="tribunal-qa", messages=QUESTION, max_tokens=8, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    firsts = [c.usage.completion_tokens for c in chunks if c.choices and
              (c.choices[0].delta.content or "")]
    assert firsts and firsts[0] > 3 * STEPS  # the drafts' and the critique's tokens
    assert chunks[-1].usage.completion_tokens == 3 * STEPS + 8


def test_completions_endpoint_and_option_errors(stack):
    out = stack.client().completions.create(model="tribunal-qa", prompt="The sky is",
                                            max_tokens=6, extra_body={"ignore_eos": True})
    assert out.choices[0].text and out.usage.completion_tokens == 3 * STEPS + 6
    assert [s["step"] for s in extension(out)["trace"]] == ["draft", "draft", "critique",
                                                            "final"]
    body = {"model": "tribunal-qa", "messages": QUESTION, "max_tokens": 4}
    for extra, param in (({"logprobs": True}, "logprobs"),        # the judge's engine lacks it
                         ({"hpcserve": {"trace": 1}}, "hpcserve.trace"),
                         ({"max_tokens": 5000}, "max_tokens")):   # beyond the judge's context
        r = httpx.post(f"{stack.base_url}/chat/completions", json={**body, **extra},
                       headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _raw_stream_request(stack, body: dict) -> socket.socket:
    """A POST sent on a plain socket, so the test can close it at any moment (httpx
    would not return before the response's headers, which a tribunal sends only when
    its final step starts)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_a_disconnect_during_the_drafts_cancels_every_step(stack, probe):
    before = idle(probe)
    seen = len(ledger_rows(stack, "tribunal-long"))
    sock = _raw_stream_request(stack, {"model": "tribunal-long", "messages": QUESTION,
                                       "max_tokens": 8, "stream": True})
    now: dict = {}

    def drafting() -> bool:  # both members well into their drafts
        now.update(stats(probe))
        return all(now[n]["running"] == 1 and now[n]["tokens_generated"]
                   >= before[n]["tokens_generated"] + 20 for n in ("model-a", "model-b"))
    wait_until(drafting, 60, f"both members drafting: {now}", poll_s=0.1)
    sock.close()
    after = idle(probe)
    for name in ("model-a", "model-b"):
        assert after[name]["requests_aborted"] == before[name]["requests_aborted"] + 1, after
        assert after[name]["requests_finished"] == before[name]["requests_finished"]
    assert after["model-c"]["requests_finished"] == before["model-c"]["requests_finished"]
    assert after["model-c"]["prefills"] == before["model-c"]["prefills"]  # judge never ran
    # what the drafts computed before they were cancelled is charged
    (row,) = new_ledger_rows(stack, "tribunal-long", seen, 1)
    assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] < 2 * LONG, row


def test_a_disconnect_during_the_final_step_cancels_it(stack, probe):
    before = idle(probe)
    body = {"model": "tribunal-qa", "messages": QUESTION, "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as http:
        with http.stream("POST", f"{stack.base_url}/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while '"content":""' in (line := next(lines)) or not line:
                pass  # the role chunk; then the first text of the final step
            assert "content" in line
    after = idle(probe)
    judge = {k: after["model-c"][k] - before["model-c"][k]  # the critique finished
             for k in ("requests_aborted", "requests_finished", "tokens_generated")}
    assert judge["requests_aborted"] == 1 and judge["requests_finished"] == 1, judge


def test_measure_added_latency_and_final_step_ttft(stack):
    """For the closing note: a one-round tribunal (2 drafts at once, a critique, the
    final answer; 32 tokens each intermediate step) against one call of the judge's
    model, both streamed with the same final request; medians of 3."""
    client = stack.client()
    kwargs = dict(messages=QUESTION, max_tokens=32, stream=True,
                  extra_body={"ignore_eos": True})

    def timed(model: str) -> tuple[float, float, list[dict] | None]:
        t0 = time.monotonic()
        ttft, trace = None, None
        for chunk in client.chat.completions.create(model=model, **kwargs):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.monotonic() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                trace = (chunk.model_extra or {}).get("hpcserve", {}).get("trace")
        return time.monotonic() - t0, ttft, trace

    timed("model-c")  # warm both paths
    timed("tribunal-qa")
    single = [timed("model-c") for _ in range(3)]
    tribunal = [timed("tribunal-qa") for _ in range(3)]
    med = statistics.median
    e2e_single, e2e_tribunal = med(s[0] for s in single), med(t[0] for t in tribunal)
    final_ttft = med(t[2][-1]["ttft_s"] for t in tribunal)
    final_start = med(t[2][-1]["start_s"] for t in tribunal)
    print(f"\nMEASURED single judge call: e2e {e2e_single:.3f}s, TTFT "
          f"{med(s[1] for s in single):.3f}s | one-round tribunal: e2e {e2e_tribunal:.3f}s "
          f"(added {e2e_tribunal - e2e_single:.3f}s, x{e2e_tribunal / e2e_single:.2f}), "
          f"client TTFT {med(t[1] for t in tribunal):.3f}s, final step starts at "
          f"{final_start:.3f}s, its TTFT {final_ttft:.3f}s")
    assert e2e_tribunal > e2e_single


def test_a_member_killed_mid_request_leaves_an_answer_from_the_rest(stack, probe):
    """Last: model-b's replica is SIGKILLed while it drafts; Serve replaces it."""
    idle(probe)
    (victim,) = _engine_replicas(
        stack.home, f"ray::ServeReplica:{model_app('hpcserve', 'model-b')}:engine-model-b")
    result: dict = {}

    def call() -> None:
        try:
            result["reply"] = stack.client(timeout=300).chat.completions.create(
                model="tribunal-long", messages=QUESTION, max_tokens=8,
                extra_body={"ignore_eos": True})
        except openai.APIError as err:  # reported below
            result["error"] = err
    thread = threading.Thread(target=call)
    thread.start()
    now: dict = {}

    def drafting() -> bool:
        now.update(stats(probe))
        return now["model-a"]["running"] == 1 and now["model-b"]["running"] == 1
    wait_until(drafting, 60, f"both members drafting: {now}", poll_s=0.1)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert "reply" in result, result
    reply = result["reply"]
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    trace = extension(reply)["trace"]
    assert [(s["step"], s["model"], s["status"]) for s in trace] == [
        ("draft", "model-a", "ok"), ("draft", "model-b", "failed"),
        ("critique", "model-c", "ok"), ("final", "model-c", "ok")]
    assert trace[1]["error"] and trace[1]["completion_tokens"] < LONG
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == trace_usage(trace)

    def replaced() -> bool:  # Serve starts a new replica; the panel is whole again
        return "error" not in stats(probe)["model-b"]
    wait_until(replaced, 300, "a new model-b replica")
