"""Allocations rotate under load: successors start before wall-times end, old
nodes are drained, and streaming clients never see a failure.

Both ingress modes: ``routed`` (the head's ingress could also retry a failed
stream) and ``direct`` (HAProxy sends streams straight to the engine replica, so
nothing but Serve's drain -- deregister first, then let streams finish -- keeps
them whole)."""

from __future__ import annotations

import json

import pytest

from cluster.providers.local import LocalProvider, _read_pid
from cluster.state import FAILED, StateStore
from serve_app.processes import pid_alive
from tests.cluster.rotation_support import stream_through_rotations, wait_jobs_ended

WALLTIME_S = 150
ROTATIONS = 2


@pytest.fixture(scope="module", params=["routed", "direct"])
def stack(hpcserve_stack, request):
    s = hpcserve_stack(
        name=f"rotation-{request.param}", args={"ingress": request.param},
        pool={"walltime_s": WALLTIME_S, "lead_time_s": 100, "lead_time_margin_s": 15,
              "warning_s": 15, "drain_deadline_s": 60},
        models=[{"name": "tiny", "engine": "zmq", "max_model_len": 2048,
                 "graceful_shutdown_timeout_s": 10, "health_check_period_s": 1}])
    yield s
    s.down()


def test_rotation_under_load_loses_nothing(stack):
    run_dir = stack.home / "run"
    store = StateStore(run_dir / "state.db")
    clients, retired = stream_through_rotations(stack, store, ROTATIONS,
                                                timeout=WALLTIME_S * (ROTATIONS + 2) + 120)
    print(f"\n{clients.ok} streams completed, {len(clients.failures)} failed")
    for a in retired:
        succ = next(s for s in store.allocations() if s.id == a.successor)
        overlap = a.retired_time - succ.start_time
        print(f"rotation {a.id} -> {succ.id}: successor submitted "
              f"{a.end_time - succ.submit_time:.0f}s before wall-time end, "
              f"submit->joined {succ.joined_time - succ.submit_time:.1f}s, "
              f"submit->serving {succ.serving_time - succ.submit_time:.1f}s, "
              f"drain->released {a.retired_time - a.drain_time:.1f}s, "
              f"overlap {overlap:.1f}s, released {a.end_time - a.retired_time:.0f}s early")
    assert clients.failures == [], "\n".join(clients.failures[:20])
    assert len(retired) >= ROTATIONS, json.dumps(stack.cli("status", "--json").stdout)
    assert clients.ok > 20
    assert not [a for a in store.allocations() if a.phase == FAILED and a.serving_time]
    # The old allocations are gone: their jobs ended and no process of theirs is left.
    provider = LocalProvider(run_dir / "jobs" / "local")
    infos = wait_jobs_ended(provider, [a.job_id for a in retired])
    for a in retired:
        assert infos[a.job_id].state.terminal, infos[a.job_id]
        job_pid = _read_pid(run_dir / "jobs" / "local" / a.job_id / "job.pid")
        assert not pid_alive(job_pid)
        assert a.retired_time < a.end_time, "released before its wall-time end"
    # ... and the service still serves on the successor.
    assert stack.client().completions.create(model="tiny", prompt="x", max_tokens=2)
