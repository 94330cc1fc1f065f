"""Scale to zero and back: a model with ``min_replicas: 0`` on a pool with
``min_allocations: 0`` gives its node back when idle (``/v1/models`` says ``cold``);
a request then starts it: Serve scales it up, the pool submits a job (which waits
in the scheduler's queue: ``queued``, with the scheduler's ``expected_start``), the
request that waits longer than ``cold_start_timeout_s`` gets a 503 ``model_starting``
with ``Retry-After``, and the next one is served once the replica is up.

The same stack has a second model on a pool whose provider refuses every submit
(the local provider's ``refuse_submits``, as ``sbatch`` refusing a bad account):
woken, it becomes ``unavailable`` with the refusal as reason and its requests get a
503 ``model_unavailable`` at once, the pool retries with a growing backoff, and the
first model is served all the while.  The tests run in order on the one stack."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from cluster.state import StateStore
from tests.cluster.rotation_support import Clients
from tests.conftest import default_config

QUEUE_DELAY_S = 25
COLD_START_TIMEOUT_S = 8
REFUSAL = ("sbatch: error: Batch job submission failed: Invalid account or "
           "account/partition combination specified")


def _cold_model(name: str, **fields) -> dict:
    autoscaling = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                   "upscale_delay_s": 0, "downscale_delay_s": 5}
    return {"name": name, "engine": "zmq", "max_model_len": 2048,
            "cold_start_timeout_s": COLD_START_TIMEOUT_S, "graceful_shutdown_timeout_s": 5,
            **fields, "autoscaling": {**autoscaling, **fields.get("autoscaling", {})}}


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    config = default_config(
        pool={"min_allocations": 0, "max_allocations": 1, "idle_release_s": 5,
              "provider_options": {"queue_delay_s": QUEUE_DELAY_S}},
        models=[_cold_model("tiny"),
                # on the refusing pool only; once woken, Serve keeps wanting its replica
                _cold_model("refused", resources={"refused_slot": 1.0},
                            autoscaling={"downscale_delay_s": 600})])
    config["hpcserve"]["pools"].append({
        "name": "refusing", "provider": "local", "min_allocations": 0, "max_allocations": 1,
        "resources": {"refused_slot": 1.0}, "provider_options": {"refuse_submits": REFUSAL}})
    s = hpcserve_stack(config, name="scale-to-zero")
    yield s
    s.down()


def _status(stack, model: str = "tiny") -> dict | None:
    r = httpx.get(f"{stack.base_url}/models/{model}", timeout=30)
    r.raise_for_status()
    return r.json()["status"]


def _wait_state(stack, states: set[str], timeout: float, model: str = "tiny") -> dict:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = _status(stack, model)
        if status and status["state"] in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"no {states} for {model} within {timeout}s; last status {status}")


def _chat(stack, model: str = "tiny") -> httpx.Response:
    return httpx.post(f"{stack.base_url}/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def test_cold_then_queued_with_its_expected_start_then_503_then_served(stack):
    store = StateStore(stack.home / "run" / "state.db")
    cold = _wait_state(stack, {"cold"}, 60)
    assert cold["running_replicas"] == 0 and cold["target_replicas"] == 0
    assert _status(stack, "refused")["state"] == "cold"
    assert store.allocations(live_only=True) == []

    seen: list[str] = []
    queued: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            status = _status(stack)
            if status and (not seen or seen[-1] != status["state"]):
                seen.append(status["state"])
            if status and status["state"] == "queued":
                queued.append(status)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    first = _chat(stack)  # starts the model; its job waits QUEUE_DELAY_S in the queue
    waited = time.monotonic() - t0
    assert first.status_code == 503, first.text
    assert first.headers.get("retry-after") == "30"
    err = first.json()["error"]
    assert err["code"] == "model_starting" and err["type"] == "server_error"
    assert COLD_START_TIMEOUT_S <= waited < COLD_START_TIMEOUT_S + 10

    deadline = time.monotonic() + 240
    while True:  # what a client told to retry does
        reply = _chat(stack)
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_starting"
    served = time.monotonic() - t0
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    ready = _wait_state(stack, {"ready"}, 30)
    assert ready["running_replicas"] == 1 and ready["walltime_left_s"] > 0
    done.set()
    watcher.join(timeout=30)
    assert seen[0] in ("cold", "queued", "starting") and "queued" in seen, seen
    # the scheduler's expected start (the local provider's queue: submit + delay),
    # there from the tick after the submit on; the job did start then
    (job,) = store.allocations("local")
    expected = {s["expected_start"] for s in queued if "expected_start" in s}
    assert len(expected) == 1 and "expected_start" in queued[-1], queued
    assert abs(expected.pop() - (job.submit_time + QUEUE_DELAY_S)) <= 1
    assert abs(job.start_time - (job.submit_time + QUEUE_DELAY_S)) <= 3
    print(f"\ncold start: first request answered 503 after {waited:.1f}s, served "
          f"{served:.1f}s after it (queue {QUEUE_DELAY_S}s); states {seen}")


def test_a_refusing_provider_makes_its_model_unavailable_and_no_other(stack):
    store = StateStore(stack.home / "run" / "state.db")
    window_s = 30  # first submit ~2 s in, then 4, 8 and 16 s apart
    with Clients(stack, 1) as clients:  # tiny, served all the while
        t0 = time.time()
        # wakes 'refused': Serve wants a replica, its pool's submits are refused.  This
        # request was let through while the model was cold, so it waits its
        # cold_start_timeout_s like any cold request
        woken = _chat(stack, "refused")
        assert woken.status_code == 503, woken.text
        status = _wait_state(stack, {"unavailable"}, 60, model="refused")
        assert status["reason"].startswith(f"submit failed: {REFUSAL}"), status
        assert status["running_replicas"] == 0 and status["target_replicas"] == 1
        answered = []
        while time.time() < t0 + window_s:  # every request now: a 503 at once, with why
            sent = time.monotonic()
            reply = _chat(stack, "refused")
            answered.append(time.monotonic() - sent)
            assert reply.status_code == 503, reply.text
            error = reply.json()["error"]
            assert error["code"] == "model_unavailable" and REFUSAL in error["message"], error
            assert reply.headers.get("retry-after") == "60"
            time.sleep(1)
        assert _status(stack, "refused")["state"] == "unavailable"
        assert _status(stack)["state"] == "ready"
    assert clients.failures == [], "\n".join(clients.failures[:20])
    assert clients.ok >= 10
    assert max(answered) < 5, answered
    # the pool tried again with a growing backoff, not every tick; nothing was submitted
    attempts = [t for t, pool, _, m in store.events(500)
                if pool == "refusing" and m.startswith("submit failed") and t >= t0]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert 3 <= len(attempts) <= 5 and all(b > a for a, b in zip(gaps, gaps[1:])), gaps
    assert store.allocations("refusing") == []
    print(f"\nrefusing provider: woken request 503 {woken.json()['error']['code']}; "
          f"{len(answered)} requests 503 model_unavailable in {max(answered):.2f}s at most; "
          f"{len(attempts)} submit attempts in {window_s}s (gaps "
          f"{', '.join(f'{g:.0f}s' for g in gaps)}); {clients.ok} tiny streams, 0 failed")


def test_idle_again_the_model_goes_cold_and_the_node_is_given_back(stack):
    store = StateStore(stack.home / "run" / "state.db")
    _wait_state(stack, {"cold"}, 120)
    deadline = time.monotonic() + 60
    while store.allocations(live_only=True) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.allocations(live_only=True) == []
    events = [m for _, _, _, m in store.events(100)]
    assert any("(demand:" in m for m in events) and any("idle" in m for m in events), events
