"""Model states from plain data: what /v1/models says in each situation."""

from __future__ import annotations

from cluster.config import PoolConfig
from cluster.model_state import model_states
from cluster.state import QUEUED, SERVING, STARTING, Allocation

NOW = 50_000.0
POOLS = [PoolConfig(name="cpu"), PoolConfig(name="gpu", num_gpus=1,
                                               resources={"hpc_slot": 1.0, "a100": 1.0})]
TINY = {"name": "tiny"}
BIG = {"name": "big", "num_gpus": 1, "resources": {"a100": 1.0}}


def _dep(target: int, *states: str, node: str = "n1") -> dict:
    return {"target_num_replicas": target,
            "replicas": [{"state": s, "node_id": node} for s in states]}


def _alloc(pool: str, phase: str, **fields) -> Allocation:
    a = Allocation(id=f"{pool}-{phase}", pool=pool, provider="local", phase=phase)
    for key, value in fields.items():
        setattr(a, key, value)
    return a


def _state(models, deployments, allocations=(), blocked=None):
    return model_states(models, deployments, POOLS, allocations, blocked or {}, NOW)


def test_ready_scaling_cold():
    serving = _alloc("cpu", SERVING, node_id="n1", joined_time=1, end_time=NOW + 600)
    s = _state([TINY], {"engine-tiny": _dep(1, "RUNNING")}, [serving])["tiny"]
    assert s == {"state": "ready", "running_replicas": 1, "target_replicas": 1,
                 "walltime_left_s": 600}
    s = _state([TINY], {"engine-tiny": _dep(3, "RUNNING", "STARTING")}, [serving])["tiny"]
    assert s["state"] == "scaling" and s["target_replicas"] == 3
    assert _state([TINY], {"engine-tiny": _dep(0)})["tiny"]["state"] == "cold"


def test_queued_then_starting_follow_the_models_own_pool():
    queued = _alloc("gpu", QUEUED)
    states = _state([TINY, BIG], {"engine-tiny": _dep(1, "STARTING"),
                                  "engine-big": _dep(1, "STARTING")}, [queued])
    assert states["big"]["state"] == "queued"      # its job waits in the scheduler
    assert states["tiny"]["state"] == "starting"   # the cpu pool has nothing queued
    joined = _alloc("gpu", STARTING, joined_time=NOW - 5)
    assert _state([BIG], {"engine-big": _dep(1, "STARTING")},
                  [joined])["big"]["state"] == "starting"


def test_unavailable_says_why_and_only_for_the_blocked_pool():
    states = _state([TINY, BIG], {"engine-tiny": _dep(1, "RUNNING"),
                                  "engine-big": _dep(1, "STARTING")},
                    blocked={"gpu": "budget: demand needs 1.00 node-hours, 0.20 left today"})
    assert states["big"]["state"] == "unavailable"
    assert states["big"]["reason"].startswith("budget")
    assert states["tiny"]["state"] == "ready"
