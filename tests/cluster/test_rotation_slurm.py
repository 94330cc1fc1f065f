"""hpcserve on a real SLURM: allocations rotate under streaming load, the control
loop survives a SIGKILL, and a scheduler outage never stops serving.

One stack and one set of streaming clients span the whole module; the tests run
in order and the last one checks that no request failed over all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cluster.providers.slurm import SlurmConfig, SlurmProvider
from cluster.state import FAILED, StateStore
from tests.cluster.rotation_support import Clients, wait_until

WALLTIME_S = 180
ROTATIONS = 3


@pytest.fixture(scope="module")
def stack(hpcserve_stack, slurm_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-out")
    s = hpcserve_stack(
        name="slurm",
        pool={"provider": "slurm", "walltime_s": WALLTIME_S, "lead_time_s": 120,
              "lead_time_margin_s": 15, "warning_s": 15, "drain_deadline_s": 60,
              "provider_options": {"slurm_conf": str(slurm_cluster.conf),
                                   "output_dir": str(out), "command_timeout_s": 10},
              "worker_env": {"HPCSERVE_NODE_IP": "auto-loopback"}},
        models=[{"name": "tiny", "engine": "zmq", "max_model_len": 2048,
                 "graceful_shutdown_timeout_s": 10, "health_check_period_s": 1}])
    s.slurm_conf = str(slurm_cluster.conf)
    yield s
    s.down()


@pytest.fixture(scope="module")
def clients(stack):
    c = Clients(stack, n=4).start()
    yield c
    c.close()


def _store(stack) -> StateStore:
    return StateStore(stack.home / "run" / "state.db")


def _rotations(stack) -> list:
    return [a for a in _store(stack).allocations()
            if a.rotated_out]


def _squeue(stack) -> list[str]:
    """This stack's pool's jobs.  Not every ``hpcserve-*`` job: the session's cluster
    keeps the provider tests' ended jobs listed for MinJobAge (120 s)."""
    pool = stack.config["hpcserve"]["pools"][0]["name"]
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %j %T"],
                         env={**os.environ, "SLURM_CONF": stack.slurm_conf},
                         capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if f" hpcserve-{pool}-" in line]


def test_serves_from_a_slurm_job(stack, clients):
    """...through the failover relay: a SLURM pool's jobs run on compute nodes (the
    pool does not say it shares the head's cores), so ``failover: auto`` is on."""
    assert "mid-stream failover on for tiny" in stack.up_output
    assert json.loads(stack.cli("status", "--json").stdout)["failover_models"] == ["tiny"]
    live = _store(stack).allocations(live_only=True)
    assert [a.provider for a in live] == ["slurm"]
    assert any(live[0].job_id in line and "RUNNING" in line for line in _squeue(stack))
    wait_until(lambda: clients.ok >= 4, 120, "first streams")


def test_control_loop_killed_and_restarted_readopts_jobs(stack, clients):
    wait_until(lambda: len(_rotations(stack)) >= 1, WALLTIME_S * 2 + 60, "a first rotation")
    run_dir = stack.home / "run"
    pid = int((run_dir / "control.pid").read_text())
    before = {a.id: a.job_id for a in _store(stack).allocations(live_only=True)}
    served = clients.ok
    os.kill(pid, signal.SIGKILL)
    # the supervisor restarts it (hpcserve status counts the restart)
    wait_until(lambda: int((run_dir / "control.pid").read_text()) != pid, 30, "a restarted loop")
    assert json.loads(stack.cli("status", "--json").stdout)["control_restarts"] >= 1
    time.sleep(10)
    assert clients.ok > served, "serving must not depend on the control loop"
    log = (run_dir / "logs" / "control.log").read_text()
    assert f"re-adopting {len(before)} live allocations" in log
    after = _store(stack).allocations(live_only=True)
    # Re-adopted: the same allocations with the same jobs; nothing submitted twice.
    for a in after:
        if a.id in before:
            assert a.job_id == before[a.id]
        else:
            assert a.predecessor in before, f"{a.id} is a duplicate, not a successor"
    roots = [a for a in _store(stack).allocations() if not a.predecessor]
    assert len(roots) == 1, "every allocation after the first is a successor"
    # squeue first, the store after: the pool saves a job right after sbatch returns,
    # so a rotation between the two reads cannot make a tracked job look untracked;
    # what is still missing a moment later was never tracked.
    listed = {line.split()[0]: line for line in _squeue(stack)}

    def untracked() -> set[str]:
        return set(listed) - {a.job_id for a in _store(stack).allocations()}

    missing = untracked()
    if missing:
        time.sleep(5)
        missing = untracked()
    assert not missing, f"SLURM jobs not tracked by the pool: {[listed[j] for j in missing]}"


def test_scheduler_outage_keeps_serving_and_pool_recovers(stack, clients, slurm_cluster):
    rotations_before = len(_rotations(stack))
    served = clients.ok
    slurm_cluster.stop_ctld()
    try:
        time.sleep(25)
        assert clients.ok > served, "serving continues while slurmctld is down"
    finally:
        slurm_cluster.start_ctld()
    log = (stack.home / "run" / "logs" / "control.log").read_text()
    assert "poll failed" in log or "submit failed" in log, "the outage was seen"
    wait_until(lambda: len(_rotations(stack)) > rotations_before, WALLTIME_S * 2 + 60,
          "a rotation after the outage")


def test_three_rotations_without_a_failed_request(stack, clients):
    wait_until(lambda: len(_rotations(stack)) >= ROTATIONS, WALLTIME_S * 3, f"{ROTATIONS} rotations")
    time.sleep(5)
    clients.close()
    store = _store(stack)
    allocations = {a.id: a for a in store.allocations()}
    print(f"\n{clients.ok} streams completed, {len(clients.failures)} failed")
    for a in _rotations(stack):
        s = allocations[a.successor]
        print(f"rotation {a.id} (job {a.job_id}) -> {s.id} (job {s.job_id}): "
              f"submit->serving {(s.serving_time or a.retired_time) - s.submit_time:.1f}s "
              f"(queue {s.start_time - s.submit_time:.1f}s, join "
              f"{s.joined_time - s.submit_time:.1f}s), drain {a.retired_time - a.drain_time:.1f}s, "
              f"overlap {a.retired_time - s.start_time:.1f} node-s, "
              f"released {a.end_time - a.retired_time:.0f}s before wall-time end")
    assert clients.failures == [], "\n".join(clients.failures[:20])
    # A job may fail while starting on a loaded machine (it is then replaced); an
    # allocation that was serving must never be lost.
    assert not [a for a in allocations.values() if a.phase == FAILED and a.serving_time]
    retired = _rotations(stack)
    infos = SlurmProvider(SlurmConfig(slurm_conf=stack.slurm_conf)).poll(
        [a.job_id for a in retired])
    assert all(i.state.terminal for i in infos.values()), infos
    assert all(a.retired_time < a.end_time for a in retired)
