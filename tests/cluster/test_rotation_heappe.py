"""The rotation test through HEAppE: the pool's provider is ``heappe`` (the real
py4heappe client over HTTP) against the HEAppE test server, whose jobs run the
real cluster/worker_job.sh under LocalProvider's scheduler-like supervisor.

What it adds over test_rotation.py: everything a worker needs to join (head
address, allocation id, resources, the Ray token and the cluster's Ray settings)
travels only through HEAppE -- template parameters and task environment
variables -- and the job gets no early-warning signal from the scheduler, as
behind HEAppE.  Streaming clients must still never see a failure.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from cluster.control import worker_environment
from cluster.providers.heappe import HeappeProvider
from cluster.providers.local import _read_pid
from cluster.state import FAILED, StateStore
from serve_app.processes import pid_alive
from tests.cluster.rotation_support import stream_through_rotations, wait_jobs_ended

WALLTIME_S = 150
ROTATIONS = 2


@pytest.fixture(scope="module")
def stack(hpcserve_stack, heappe_local):
    s = hpcserve_stack(
        name="rotation-heappe",
        pool={"name": "hpc", "provider": "heappe", "walltime_s": WALLTIME_S,
              "lead_time_s": 100, "lead_time_margin_s": 15, "warning_s": 15,
              "drain_deadline_s": 60,
              "provider_options": heappe_local.provider_options(connect_timeout_s=5.0,
                                                                request_timeout_s=10.0)},
        models=[{"name": "tiny", "engine": "zmq", "max_model_len": 2048,
                 "graceful_shutdown_timeout_s": 10, "health_check_period_s": 1}])
    yield s
    s.down()          # before heappe_local stops: `down` cancels through HEAppE


def test_rotation_through_heappe_loses_nothing(stack, heappe_local):
    run_dir = stack.home / "run"
    store = StateStore(run_dir / "state.db")
    backing = heappe_local.state.backing            # the LocalProvider behind HEAppE
    clients, retired = stream_through_rotations(stack, store, ROTATIONS,
                                                timeout=WALLTIME_S * (ROTATIONS + 2) + 120)
    allocations = store.allocations()
    print(f"\n{clients.ok} streams completed, {len(clients.failures)} failed")
    for a in retired:
        succ = next(s for s in allocations if s.id == a.successor)
        overlap = a.retired_time - succ.start_time
        print(f"rotation {a.id} (HEAppE job {a.job_id}) -> {succ.id} (job {succ.job_id}): "
              f"successor submitted {a.end_time - succ.submit_time:.0f}s before wall-time end, "
              f"submit->joined {succ.joined_time - succ.submit_time:.1f}s, "
              f"submit->serving {succ.serving_time - succ.submit_time:.1f}s, "
              f"drain->released {a.retired_time - a.drain_time:.1f}s, "
              f"overlap {overlap:.1f}s, released {a.end_time - a.retired_time:.0f}s early")
    calls = Counter(f"{endpoint} {status}" for endpoint, status in heappe_local.state.log)
    print("HEAppE calls:", dict(sorted(calls.items())))
    assert clients.failures == [], "\n".join(clients.failures[:20])
    assert len(retired) >= ROTATIONS, json.dumps(stack.cli("status", "--json").stdout)
    assert clients.ok > 20
    # A job may fail while starting on a loaded machine (it is then replaced); an
    # allocation that was serving must never be lost.
    assert not [a for a in allocations if a.phase == FAILED and a.serving_time]
    assert {a.provider for a in allocations} == {"heappe"}
    assert not [c for c in calls if int(c.rsplit(" ", 1)[1]) >= 500], calls

    # Everything the worker needs reached the job through HEAppE: env.json is what the
    # backing LocalProvider got from the test server, which built it from the HEAppE
    # job's template parameters and task environment variables only.
    expected = worker_environment(stack.head)
    assert expected.get("RAY_AUTH_TOKEN") and expected.get("RAY_AUTH_MODE") == "token"
    for a in allocations:
        job = heappe_local.state.jobs[int(a.job_id)]
        job_dir = backing.jobs_dir / job.backing_id
        env = json.loads((job_dir / "env.json").read_text())
        missing = {k: v for k, v in expected.items() if env.get(k) != v}
        assert not missing, f"{a.id}: spec.env entries lost on the way: {sorted(missing)}"
        assert env["HPCSERVE_ALLOCATION_ID"] == a.id and env["HPCSERVE_POOL"] == "hpc"
        assert env["HPCSERVE_HEAD_ADDRESS"] == stack.head.gcs_address
        assert json.loads(env["HPCSERVE_RESOURCES"]) == {"hpc_slot": 1.0}
        assert env["HPCSERVE_WARNING_S"] == "15" and env["HPCSERVE_WALLTIME_S"] == str(WALLTIME_S)
        # No early-warning signal from the scheduler: the job's own timer is the warning.
        assert json.loads((job_dir / "job.json").read_text())["warning_s"] == 0

    # The old allocations are gone: HEAppE reports their jobs ended, no process is left.
    provider = HeappeProvider(**heappe_local.provider_options())
    infos = wait_jobs_ended(provider, [a.job_id for a in retired])
    for a in retired:
        assert infos[a.job_id].state.terminal, infos[a.job_id]
        job_dir = backing.jobs_dir / heappe_local.state.jobs[int(a.job_id)].backing_id
        job_pid = _read_pid(job_dir / "job.pid")
        assert job_pid and not pid_alive(job_pid)
        assert not pid_alive(_read_pid(job_dir / "supervisor.pid"))
        with pytest.raises(ProcessLookupError):
            os.killpg(job_pid, 0)               # nothing of its process group is left
        assert a.retired_time < a.end_time, "released before its wall-time end"
    # ... and the service still serves on the successor.
    assert stack.client().completions.create(model="tiny", prompt="x", max_tokens=2)
