"""Model states from plain data: what /v1/models says in each situation."""

from __future__ import annotations

from cluster.config import PoolConfig
from cluster.model_state import blocked_models, document, model_states, read_local, write_local
from cluster.pool import Pool
from cluster.providers.base import Provider, WorkerSpec
from cluster.state import QUEUED, RETIRED, SERVING, STARTING, Allocation, StateStore

NOW = 50_000.0
POOLS = [PoolConfig(name="cpu"), PoolConfig(name="gpu", num_gpus=1,
                                               resources={"hpc_slot": 1.0, "a100": 1.0})]
TINY = {"name": "tiny"}
BIG = {"name": "big", "num_gpus": 1, "resources": {"a100": 1.0}}


def _dep(target: int, *states: str, node: str | None = "n1") -> dict:
    """``node`` None: the replicas wait for a node (Serve's node_id is unset)."""
    return {"target_num_replicas": target,
            "replicas": [{"state": s, "node_id": node} for s in states]}


def _alloc(pool: str, phase: str, **fields) -> Allocation:
    a = Allocation(id=f"{pool}-{phase}", pool=pool, provider="local", phase=phase)
    for key, value in fields.items():
        setattr(a, key, value)
    return a


def _state(models, deployments, allocations=(), blocked=None, expected_starts=None):
    return model_states(models, deployments, POOLS, allocations, blocked or {}, NOW,
                        expected_starts)


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


def test_queued_carries_the_schedulers_expected_start_when_it_gives_one():
    early, late = _alloc("gpu", QUEUED, id="gpu-a"), _alloc("gpu", QUEUED, id="gpu-b")
    waiting = {"engine-big": _dep(1, "STARTING", node=None)}
    big = _state([BIG], waiting, [early, late],
                 expected_starts={"gpu-a": NOW + 95.4, "gpu-b": NOW + 30.6})["big"]
    assert big == {"state": "queued", "running_replicas": 0, "target_replicas": 1,
                   "walltime_left_s": None, "expected_start": round(NOW + 31)}  # the earliest
    unknown = _state([BIG], waiting, [early, late], expected_starts={})["big"]
    assert unknown["state"] == "queued" and "expected_start" not in unknown  # N/A: left out
    # another pool's estimate is not this model's
    other = _state([TINY], {"engine-tiny": _dep(1, "STARTING", node=None)},
                   [_alloc("cpu", QUEUED, id="cpu-a"), early],
                   expected_starts={"gpu-a": NOW + 10})["tiny"]
    assert other["state"] == "queued" and "expected_start" not in other


def test_unavailable_says_why_and_only_for_the_blocked_pool():
    states = _state([TINY, BIG], {"engine-tiny": _dep(1, "RUNNING"),
                                  "engine-big": _dep(1, "STARTING", node=None)},
                    blocked={"gpu": "budget: demand needs 1.00 node-hours, 0.20 left today"})
    assert states["big"]["state"] == "unavailable"
    assert states["big"]["reason"].startswith("budget")
    assert states["tiny"]["state"] == "ready"


def test_unavailable_even_where_the_pool_serves_other_models():
    """The pool's nodes are full of another model's replicas; this one's waits for a
    node the pool cannot add: unavailable, not 'starting' for ever."""
    serving = _alloc("cpu", SERVING, node_id="n1", joined_time=1, end_time=NOW + 600)
    other = {"name": "other"}  # same resources as tiny: the same pool
    blocked = {"cpu": "submit failed: sbatch: error: invalid account; next try in 8 s"}
    states = _state([TINY, other], {"engine-tiny": _dep(1, "RUNNING"),
                                    "engine-other": _dep(1, "STARTING", node=None)},
                    [serving], blocked)
    assert states["other"] == {"state": "unavailable", "running_replicas": 0,
                               "target_replicas": 1, "walltime_left_s": None,
                               "reason": blocked["cpu"]}
    assert states["tiny"]["state"] == "ready"
    # a replica already placed on a node, or a job on its way: not unavailable
    placed = _state([other], {"engine-other": _dep(1, "STARTING", node="n1")},
                    [serving], blocked)["other"]
    assert placed["state"] == "starting"
    queued = _state([other], {"engine-other": _dep(1, "STARTING", node=None)},
                    [serving, _alloc("cpu", QUEUED, id="cpu-q")], blocked)["other"]
    assert queued["state"] == "starting"  # a node of the pool serves: not 'queued'


def test_a_spent_budget_makes_a_waiting_model_unavailable(tmp_path):
    """Budget at zero (a job ran the whole day's node-hour): the pool submits nothing,
    says why, and a model whose replica waits for a node is unavailable with that."""
    config = PoolConfig(name="gpu", min_allocations=0, max_allocations=2, walltime_s=3600,
                        num_gpus=1, resources={"hpc_slot": 1.0, "a100": 1.0},
                        max_node_hours_per_day=1.0)
    store = StateStore(tmp_path / "state.db")
    store.save(_alloc("gpu", RETIRED, id="gpu-old", start_time=NOW - 7200,
                      retired_time=NOW - 3600))
    provider = _NoSubmits()
    pool = Pool(config, provider, store, WorkerSpec("", "gpu", "127.0.0.1:1", 3600, 60),
                drain=lambda *_: (True, ""))
    pool.demand_nodes = 1
    pool.tick(nodes=[], now=NOW)
    assert provider.submits == 0
    reason = pool.blocked(NOW)
    assert reason.startswith("budget: demand") and "0.00 left today" in reason, reason
    big = model_states([BIG], {"engine-big": _dep(1, "STARTING", node=None)}, [config],
                       store.allocations(live_only=True), {"gpu": reason}, NOW)["big"]
    assert big["state"] == "unavailable" and big["reason"] == reason


class _NoSubmits(Provider):
    name = "fake"
    submits = 0

    def submit(self, spec):
        self.submits += 1
        raise AssertionError("the budget should have held this back")

    def poll(self, job_ids):
        return {}

    def cancel(self, job_id):
        pass


def test_up_gives_up_on_a_model_only_once_it_stayed_unavailable(tmp_path):
    """``hpcserve up`` reads the control loop's file: a model unavailable for the
    grace period stops the wait, with the pool's reason; a flicker does not."""
    assert read_local(tmp_path, NOW) == {}  # before the first tick
    states = _state([TINY, BIG], {"engine-tiny": _dep(1, "STARTING", node=None),
                                  "engine-big": _dep(1, "STARTING", node=None)},
                    blocked={"gpu": "budget: demand needs 1.00 node-hours, 0.20 left today"})
    write_local(tmp_path, document(states, NOW))
    seen = read_local(tmp_path, NOW + 5)
    assert seen == states and seen["big"]["state"] == "unavailable"
    assert read_local(tmp_path, NOW + 61) == {}  # the control loop stopped writing
    since: dict[str, float] = {}
    assert blocked_models(seen, since, 100.0, grace_s=20) == {}  # just seen
    assert blocked_models(seen, since, 119.0, grace_s=20) == {}
    assert blocked_models(seen, since, 120.0, grace_s=20) == {
        "big": "budget: demand needs 1.00 node-hours, 0.20 left today"}
    # it got a node meanwhile: the clock starts over
    seen["big"] = {**seen["big"], "state": "starting"}
    assert blocked_models(seen, since, 121.0, grace_s=20) == {} and since == {}
