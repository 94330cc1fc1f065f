"""Scale to zero and back: a model with ``min_replicas: 0`` on a pool with
``min_allocations: 0`` gives its node back when idle (``/v1/models`` says ``cold``);
a request then starts it: Serve scales it up, the pool submits a job (which waits
in the scheduler's queue: ``queued``), the request that waits longer than
``cold_start_timeout_s`` gets a 503 ``model_starting`` with ``Retry-After``, and the
next one is served once the replica is up."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from cluster.state import StateStore

QUEUE_DELAY_S = 25
COLD_START_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    s = hpcserve_stack(
        name="scale-to-zero",
        pool={"min_allocations": 0, "max_allocations": 1, "idle_release_s": 5,
              "provider_options": {"queue_delay_s": QUEUE_DELAY_S}},
        models=[{"name": "tiny", "engine": "zmq", "max_model_len": 2048,
                 "cold_start_timeout_s": COLD_START_TIMEOUT_S,
                 "graceful_shutdown_timeout_s": 5,
                 "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                 "upscale_delay_s": 0, "downscale_delay_s": 5}}])
    yield s
    s.down()


def _status(stack) -> dict | None:
    r = httpx.get(f"{stack.base_url}/models/tiny", timeout=30)
    r.raise_for_status()
    return r.json()["status"]


def _wait_state(stack, states: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = _status(stack)
        if status and status["state"] in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"no {states} within {timeout}s; last status {status}")


def _chat(stack) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def test_cold_then_queued_then_503_then_served_then_cold_again(stack):
    store = StateStore(stack.home / "run" / "state.db")
    cold = _wait_state(stack, {"cold"}, 60)
    assert cold["running_replicas"] == 0 and cold["target_replicas"] == 0
    assert store.allocations(live_only=True) == []

    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            status = _status(stack)
            if status and (not seen or seen[-1] != status["state"]):
                seen.append(status["state"])
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
    print(f"\ncold start: first request answered 503 after {waited:.1f}s, served "
          f"{served:.1f}s after it (queue {QUEUE_DELAY_S}s); states {seen}")

    # idle again: Serve scales to zero, the pool gives the node back
    _wait_state(stack, {"cold"}, 120)
    deadline = time.monotonic() + 60
    while store.allocations(live_only=True) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.allocations(live_only=True) == []
    events = [m for _, _, _, m in store.events(100)]
    assert any("(demand:" in m for m in events) and any("idle" in m for m in events), events
