"""The pool's decisions from plain data: no Ray, no provider, no processes."""

from __future__ import annotations

from cluster.config import PoolConfig
from cluster.policy import (
    Drain,
    NodeState,
    Observation,
    Release,
    Submit,
    budget_left_s,
    decide,
    demand_by_pool,
)
from cluster.state import DRAINING, QUEUED, RETIRED, SERVING, STARTING, Allocation

NOW = 100_000.0


def _pool(**overrides) -> PoolConfig:
    return PoolConfig(**{"name": "p", "walltime_s": 3600, "idle_release_s": 60, **overrides})


def _alloc(name: str, phase: str = SERVING, *, end_in: float = 3000, idle_for: float = 0,
           **fields) -> Allocation:
    a = Allocation(id=name, pool="p", provider="local", phase=phase,
                   submit_time=NOW - 600, joined_time=NOW - 500 if phase != QUEUED else 0,
                   end_time=NOW + end_in if phase != QUEUED else 0,
                   idle_since=NOW - idle_for if idle_for else 0.0)
    for key, value in fields.items():
        setattr(a, key, value)
    return a


def _serving(replicas: int = 1) -> NodeState:
    return NodeState(alive=True, replicas=replicas, running_replicas=replicas)


def _decide(config, allocations, nodes=None, **obs):
    if nodes is None:
        nodes = {a.id: _serving(0 if a.idle_since else 1) for a in allocations
                 if a.phase != QUEUED}
    return decide(config, Observation(now=NOW, allocations=allocations, nodes=nodes,
                                      lead_s=120, drain_lead_s=60, **obs)).actions


def test_the_floor_is_filled():
    actions = _decide(_pool(min_allocations=2), [])
    assert [type(a) for a in actions] == [Submit, Submit]
    assert all(a.reason.startswith("floor") for a in actions)


def test_demand_counts_jobs_already_queued_or_starting():
    config = _pool(min_allocations=1, max_allocations=4)
    live = [_alloc("a"), _alloc("q", QUEUED), _alloc("s", STARTING)]
    nodes = {"a": _serving(), "s": NodeState(alive=True)}
    assert _decide(config, live, nodes, demand_nodes=2) == []  # both on their way
    (submit,) = _decide(config, live, nodes, demand_nodes=3)
    assert isinstance(submit, Submit) and submit.reason.startswith("demand")
    assert "2 on the way" in submit.reason


def test_demand_never_beyond_max_allocations():
    config = _pool(min_allocations=1, max_allocations=3)
    actions = _decide(config, [_alloc("a")], demand_nodes=5)
    assert len(actions) == 2 and all(isinstance(a, Submit) for a in actions)
    assert _decide(config, [_alloc("a"), _alloc("b"), _alloc("c")], demand_nodes=5) == []


def test_idle_release_keeps_the_floor():
    config = _pool(min_allocations=1, max_allocations=3)
    assert _decide(config, [_alloc("a", idle_for=600)]) == []  # at the floor: kept
    actions = _decide(config, [_alloc("a"), _alloc("b", idle_for=61)])
    assert actions == [Drain("b", "idle 61 s (no replica), 1 allocations stay")]
    assert _decide(config, [_alloc("a"), _alloc("b", idle_for=59)]) == []  # not yet


def test_idle_release_gives_back_all_idle_nodes_down_to_the_floor():
    config = _pool(min_allocations=1, max_allocations=3)
    live = [_alloc("a", idle_for=100, end_in=900), _alloc("b", idle_for=100, end_in=300),
            _alloc("c", idle_for=100, end_in=600)]
    drained = [a.allocation for a in _decide(config, live) if isinstance(a, Drain)]
    assert drained == ["b", "c"]  # the shortest wall-time left go first; "a" stays


def test_no_idle_release_while_replicas_wait_for_nodes():
    config = _pool(min_allocations=0, max_allocations=3)
    live = [_alloc("a", idle_for=600), _alloc("q", QUEUED)]
    assert not [a for a in _decide(config, live, demand_nodes=1) if isinstance(a, Drain)]


def test_a_node_that_never_got_a_replica_is_released_too():
    config = _pool(min_allocations=1, max_allocations=3)
    live = [_alloc("a"), _alloc("s", STARTING, idle_for=70)]
    assert _decide(config, live) == [Drain("s", "idle 70 s (no replica), 1 allocations stay")]


def test_rotation_of_an_idle_allocation_above_the_floor_gets_no_successor():
    config = _pool(min_allocations=1, max_allocations=3)
    live = [_alloc("a"), _alloc("b", end_in=100, idle_for=10)]  # within lead 120, idle
    actions = _decide(config, live)
    assert actions == [Drain("b", "idle at its rotation time, above the floor: no successor")]


def test_rotation_at_the_floor_submits_a_successor_even_when_idle():
    config = _pool(min_allocations=1)
    (action,) = _decide(config, [_alloc("a", end_in=100, idle_for=10)])
    assert isinstance(action, Submit) and action.predecessor == "a"
    assert action.reason.startswith("rotation")


def test_hand_over_drains_then_releases():
    config = _pool(min_allocations=1)
    old = _alloc("old", successor="new")
    new = _alloc("new", STARTING, predecessor="old")
    assert _decide(config, [old, new]) == [Drain("old", "successor new joined")]
    old.phase, old.drain_time = DRAINING, NOW - 5
    actions = _decide(config, [old, new], nodes={"old": NodeState(replicas=0),
                                                 "new": _serving()})
    assert actions == [Release("old", "drained, job released early")]


def test_provider_refusing_means_no_submits_but_drains_go_on():
    config = _pool(min_allocations=2, max_allocations=4)
    live = [_alloc("a"), _alloc("b", idle_for=600)]
    actions = _decide(config, live, demand_nodes=2, submit_blocked=True)
    assert not [a for a in actions if isinstance(a, Submit)]
    live = [_alloc("a", end_in=30)]  # wall-time end near: drains regardless
    assert _decide(config, live, submit_blocked=True) == [
        Drain("a", "wall-time end near, successor not joined")]


def test_no_ray_view_no_node_decisions():
    config = _pool(min_allocations=1, max_allocations=3)
    live = [_alloc("a"), _alloc("b", idle_for=600)]
    assert decide(config, Observation(now=NOW, allocations=live, nodes=None)).actions == []


def test_demand_goes_to_the_first_pool_whose_node_fits():
    cpu = _pool(name="cpu", resources={"hpc_slot": 1.0})
    gpu = _pool(name="gpu", num_gpus=2, resources={"hpc_slot": 1.0, "a100": 2.0})
    demand = [({"hpc_slot": 1.0}, 3),                      # cpu pool, one per node
              ({"hpc_slot": 0.5, "a100": 1.0}, 3),          # gpu pool, two per node
              ({"serve_head": 0.001}, 1)]                   # the head's: no pool
    assert demand_by_pool([cpu, gpu], demand) == {"cpu": 3, "gpu": 2}
    assert demand_by_pool([cpu], [({"hpc_slot": 1.0, "CPU": 4.0}, 1)]) == {"cpu": 0}


def test_budget_holds_back_what_does_not_fit_and_keeps_what_runs():
    config = _pool(min_allocations=1, max_allocations=3, walltime_s=3600,
                   max_node_hours_per_day=2.0)
    running = _alloc("a", start_time=NOW - 1800, end_in=1800)  # 0.5 h used + 0.5 h committed
    left = budget_left_s(config, [running], NOW)
    assert left == 2 * 3600 - 3600
    plan = decide(config, Observation(now=NOW, allocations=[running],
                                      nodes={"a": _serving()}, demand_nodes=2,
                                      budget_left_s=left))
    assert len(plan.submits()) == 1  # one more hour fits, the second does not
    assert len(plan.refused) == 1 and plan.refused[0].startswith("budget: demand")


def test_budget_edge_counts_released_jobs_only_until_their_release():
    config = _pool(min_allocations=1, walltime_s=3600, max_node_hours_per_day=1.0)
    released = _alloc("r", RETIRED, start_time=NOW - 7200, end_in=-3600,
                      retired_time=NOW - 5400)  # ran 0.5 h, released 1.5 h before its end
    old = _alloc("o", RETIRED, start_time=NOW - 90000, retired_time=NOW - 86500)  # yesterday
    left = budget_left_s(config, [released, old], NOW)
    assert left == 3600 - 1800
    plan = decide(config, Observation(now=NOW, allocations=[], nodes={}, budget_left_s=left))
    assert plan.submits() == [] and plan.refused  # the floor's job needs 1 h, 0.5 h left
    assert len(decide(config, Observation(now=NOW, allocations=[], nodes={},
                                          budget_left_s=3600)).submits()) == 1
