"""Elastic pools on the local provider: a spike of streaming clients makes Serve want
three replicas, the pool submits jobs for the two it cannot place, and when the load
stops and Serve scales down, the idle nodes are drained and their jobs cancelled.
Nothing fails on the way.  Timings are printed for the closing note."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from cluster.state import FAILED, RETIRED, SERVING, StateStore
from tests.cluster.rotation_support import Clients, elastic_model, wait_until

IDLE_RELEASE_S = 15


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    s = hpcserve_stack(
        name="elastic",
        pool={"min_allocations": 1, "max_allocations": 3, "idle_release_s": IDLE_RELEASE_S},
        models=[elastic_model(3)])
    yield s
    s.down()


def _serving(store: StateStore) -> list:
    return [a for a in store.allocations(live_only=True) if a.phase == SERVING]


def _events(store: StateStore) -> list[tuple[float, str, str, str]]:
    return store.events(500)


def test_a_spike_grows_the_pool_and_silence_shrinks_it(stack):
    store = StateStore(stack.home / "run" / "state.db")
    assert len(store.allocations(live_only=True)) == 1
    started = time.time()
    run_dir = stack.home / "run"
    with Clients(stack, 8) as clients:
        # mid-scale-up, the control loop is killed: its supervisor restarts it, and the
        # restarted loop re-adopts the queued/starting jobs instead of submitting again
        wait_until(lambda: len(store.allocations(live_only=True)) == 3, 300, "2 jobs submitted")
        loop_pid = int((run_dir / "control.pid").read_text())
        os.kill(loop_pid, signal.SIGKILL)
        wait_until(lambda: int((run_dir / "control.pid").read_text()) != loop_pid, 30,
              "the supervisor to restart the control loop")
        wait_until(lambda: len(_serving(store)) == 3, 300, "3 serving allocations")
        grown = time.time()
        time.sleep(15)  # the three replicas serve the spike together
        stopped = time.time()
    assert clients.failures == [], "\n".join(clients.failures[:20])
    wait_until(lambda: len(store.allocations(live_only=True)) == 1, 300,
          "the pool to shrink back to 1 allocation")
    shrunk = time.time()

    allocations = store.allocations()
    # a job whose node failed to join (an overloaded box) is replaced: not a duplicate
    failed = [a for a in allocations if a.phase == FAILED]
    extra = [a for a in allocations if a.submit_time >= started and a.phase != FAILED]
    assert len(extra) == 2, [(a.id, a.phase, a.reason) for a in allocations]  # no duplicate
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["control_restarts"] == 1 and status["control_alive"], status
    # two of the three given back (the shortest wall-time left goes first, which may
    # be the original one), drained and released early, none failed
    released = [a for a in allocations if a.phase == RETIRED]
    assert len(released) == 2, [(a.id, a.phase, a.reason) for a in allocations]
    assert all("released early" in a.reason for a in released), released
    events = _events(store)
    submits = [(t, m) for t, _, _, m in events if "submitted job" in m and t >= started]
    assert len(submits) == 2 + len(failed), submits
    assert all("(demand:" in m for _, m in submits), submits
    drains = [m for t, _, _, m in events if "drain requested" in m and t >= stopped]
    assert len(drains) == 2 and all("idle" in m for m in drains), drains
    # the control plane's own metrics (the loop restarted mid-scale-up: counters since)
    (url,) = re.findall(r"^control:\s+(\S+)", stack.up_output, flags=re.MULTILINE)
    scraped = httpx.get(url, timeout=10).text
    assert 'hpcserve_pool_drains_total{pool="local",reason="idle"} 2.0' in scraped, scraped
    assert 'hpcserve_pool_allocations{phase="SERVING",pool="local"} 1.0' in scraped
    assert 'hpcserve_pool_unmet_demand_nodes{pool="local"} 0.0' in scraped
    seen = min(t for t, _, _, m in events if m.startswith("demand: replicas") and t >= started)
    print(f"\n{clients.ok} streams, 0 failed; demand seen {seen - started:.1f}s after the "
          f"load began, first submit {submits[0][0] - seen:.1f}s after that (control "
          f"plane); submit->serving "
          + ", ".join(f"{a.serving_time - a.submit_time:.1f}s" for a in extra)
          + f" ({len(failed)} job(s) failed to join and were replaced)"
          + f"; grown after {grown - started:.0f}s; last request -> released "
          + ", ".join(f"{a.retired_time - stopped:.0f}s" for a in released)
          + f"; back to 1 allocation {shrunk - stopped:.0f}s after the load stopped")
    used = sum((a.retired_time or shrunk) - max(a.start_time, started)
               for a in allocations if a.start_time)
    print(f"node-seconds over the test: {used:.0f} elastic vs "
          f"{3 * (shrunk - started):.0f} with 3 allocations kept up")
