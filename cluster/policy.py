"""What a pool should do now, decided from what was observed: a pure function.

``decide(config, observation)`` returns a plan -- submit a job (and why), drain an
allocation's node, release (cancel) a drained job -- and touches nothing: no
provider, no Ray, no clock, no store.  ``cluster.pool.Pool`` observes, calls it and
applies the plan.  Tested with plain data in ``tests/cluster/test_policy.py``.

The rules, in the order they are applied:

1. **Hand-over** (rotation's second half): an allocation whose successor has
   joined, or whose wall-time end is within the drain lead, is drained; a draining
   node that has no replicas left (or is gone) is released early, one that outlives
   its drain deadline is cancelled.
2. **Idle release**: a serving node with no replica for ``idle_release_s`` is
   drained while the pool keeps ``min_allocations`` and no replica waits for a node.
3. **Rotation** (first half): an allocation within the lead time of its wall-time
   end gets a successor -- unless it is idle and above the floor, then it is let go.
4. **Floor**: fewer than ``min_allocations`` allocations: submit.
5. **Demand**: replicas Serve wants but cannot place (``demand_nodes`` of this
   pool's nodes, from Ray's autoscaler state): submit what is missing after counting
   the jobs already queued or starting, never above ``max_allocations``.
6. **Budget** (``max_node_hours_per_day``): a submit whose wall-time does not fit
   in what is left of the day's node-hours is held back, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cluster.config import PoolConfig
from cluster.state import DRAINING, QUEUED, SERVING, STARTING, Allocation


@dataclass(frozen=True)
class Submit:
    reason: str
    predecessor: str = ""  # the allocation this one succeeds (rotation)


@dataclass(frozen=True)
class Drain:
    allocation: str
    reason: str


@dataclass(frozen=True)
class Release:
    """Cancel the job of a drained allocation; ``released`` says its node emptied
    (the drain finished) rather than the deadline passing."""

    allocation: str
    reason: str
    released: bool = True


Action = Submit | Drain | Release


@dataclass
class NodeState:
    """What the pool needs to know of an allocation's Ray node."""

    alive: bool = True
    replicas: int = 0          # Serve replicas on it, any state
    running_replicas: int = 0


@dataclass
class Observation:
    now: float
    allocations: list[Allocation]              # the pool's live allocations
    nodes: Mapping[str, NodeState] | None      # by allocation id; None: Ray unreadable
    demand_nodes: int = 0                      # nodes of this pool that waiting replicas need
    lead_s: float = 0.0                        # submit a successor this long before the end
    drain_lead_s: float = 0.0                  # drain this long before the end
    submit_blocked: bool = False               # backoff after failures
    budget_left_s: float | None = None         # node-seconds a new job may still take


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # submits the budget held back

    def submits(self) -> list[Submit]:
        return [a for a in self.actions if isinstance(a, Submit)]


def _serving_slots(live: list[Allocation]) -> list[Allocation]:
    """One per chain: an allocation not draining whose successor is not live yet."""
    ids = {a.id for a in live}
    return [a for a in live if a.phase != DRAINING and a.successor not in ids]


def idle_for(a: Allocation, now: float) -> float:
    return now - a.idle_since if a.idle_since else 0.0


def decide(config: PoolConfig, obs: Observation) -> Plan:
    plan = _decide(config, obs)
    if obs.budget_left_s is None:
        return plan
    # 6. budget: a job may use its whole wall-time; what does not fit is not submitted
    left, kept = obs.budget_left_s, []
    for action in plan.actions:
        if isinstance(action, Submit):
            if left < config.walltime_s:
                plan.refused.append(f"budget: {action.reason} needs {config.walltime_s / 3600:.2f}"
                                    f" node-hours, {max(left, 0) / 3600:.2f} left today")
                continue
            left -= config.walltime_s
        kept.append(action)
    plan.actions = kept
    return plan


def budget_left_s(config: PoolConfig, allocations: Iterable[Allocation],
                  now: float) -> float | None:
    """Node-seconds of ``max_node_hours_per_day`` not yet used or committed.

    Used: every job's run time inside the last 24 h (start to release; a job
    released early counts only until its release).  Committed: what running jobs may
    still use until their wall-time end, and a queued job's whole wall-time.
    """
    if config.max_node_hours_per_day is None:
        return None
    allocations = list(allocations)
    committed = sum(config.walltime_s if a.phase == QUEUED else max(0.0, a.end_time - now)
                    for a in allocations if a.live and (a.phase == QUEUED or a.start_time))
    return config.max_node_hours_per_day * 3600 - node_seconds_used(allocations, now) \
        - committed


def node_seconds_used(allocations: Iterable[Allocation], now: float) -> float:
    """Node-seconds the jobs ran in the last 24 h (a released job until its release)."""
    window = now - 86400
    return sum(max(0.0, min(a.retired_time or now, now) - max(a.start_time, window))
               for a in allocations if a.start_time)


def _decide(config: PoolConfig, obs: Observation) -> Plan:
    plan = Plan()
    live = obs.allocations
    by_id = {a.id: a for a in live}
    nodes = obs.nodes
    draining: set[str] = {a.id for a in live if a.phase == DRAINING}

    # 1. hand-over
    for a in live:
        node = nodes.get(a.id) if nodes is not None else None
        succ = by_id.get(a.successor)
        if a.phase in (STARTING, SERVING) and succ is not None and succ.joined_time:
            plan.actions.append(Drain(a.id, f"successor {succ.id} joined"))
            draining.add(a.id)
        elif a.phase in (STARTING, SERVING) and a.end_time and node is not None and \
                node.alive and obs.now >= a.end_time - obs.drain_lead_s:
            plan.actions.append(Drain(a.id, "wall-time end near, successor not joined"))
            draining.add(a.id)
        elif a.phase == DRAINING and nodes is not None:
            gone = node is None or not node.alive or node.replicas == 0
            if gone:
                plan.actions.append(Release(a.id, "drained, job released early"))
            elif obs.now > a.drain_time + config.drain_deadline_s + 10:
                plan.actions.append(Release(a.id, "drain deadline passed, job cancelled",
                                            released=False))

    slots = [a for a in _serving_slots(live) if a.id not in draining]
    in_flight = [a for a in slots if a.phase in (QUEUED, STARTING)
                 and not (nodes and nodes.get(a.id) and nodes[a.id].running_replicas)]
    missing = max(0, obs.demand_nodes - len(in_flight))

    # 2. idle release: the floor stays, and nothing is given back while replicas wait
    if nodes is not None and missing == 0 and obs.demand_nodes == 0:
        for a in sorted(slots, key=lambda x: x.end_time or math.inf):  # shortest left first
            if len(slots) <= config.min_allocations:
                break
            idle = idle_for(a, obs.now)
            if a.phase in (STARTING, SERVING) and a.joined_time and \
                    idle >= config.idle_release_s:
                plan.actions.append(Drain(a.id, f"idle {idle:.0f} s (no replica), "
                                            f"{len(slots) - 1} allocations stay"))
                draining.add(a.id)
                slots.remove(a)

    # 3. rotation
    for a in list(slots):
        if a.phase not in (STARTING, SERVING) or not a.end_time:
            continue
        if a.successor and a.successor in by_id:
            continue  # a live successor is on its way
        if obs.now >= a.end_time - obs.lead_s:
            idle = a.joined_time and a.idle_since and nodes is not None
            if idle and len(slots) > config.min_allocations:
                plan.actions.append(Drain(a.id, "idle at its rotation time, above the "
                                            "floor: no successor"))
                slots.remove(a)
                continue
            if not obs.submit_blocked:
                plan.actions.append(Submit(f"rotation: {a.id} ends in "
                                           f"{a.end_time - obs.now:.0f} s", predecessor=a.id))

    # 4. floor, 5. demand -- never above max_allocations serving chains
    if obs.submit_blocked:
        return plan
    floor = max(0, config.min_allocations - len(slots))
    for _ in range(floor):
        plan.actions.append(Submit(f"floor: {len(slots)} of min_allocations "
                                   f"{config.min_allocations}"))
    room = max(0, config.max_allocations - len(slots) - floor)
    for _ in range(min(max(0, missing - floor), room)):
        plan.actions.append(Submit(f"demand: replicas waiting need {obs.demand_nodes} "
                                   f"node(s), {len(in_flight)} on the way"))
    return plan


# ---- unmet replica demand -> nodes per pool -------------------------------------------

_IGNORED = ("memory", "object_store_memory")


def node_resources(config: PoolConfig) -> dict[str, float]:
    """What one allocation of ``config`` advertises to Ray."""
    return {**config.resources, "CPU": float(config.num_cpus), "GPU": float(config.num_gpus)}


def bundles_per_node(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many ``bundle``s fit one node: 0 when a resource is missing."""
    fits = math.inf
    for key, need in bundle.items():
        if key in _IGNORED or key.startswith("node:") or need <= 0:
            continue
        fits = min(fits, math.floor(node.get(key, 0.0) / need + 1e-9))
    return 0 if fits == 0 else (1_000_000 if fits is math.inf else int(fits))


def replica_bundle(model: Mapping) -> dict[str, float]:
    """What one replica of a model asks Ray for (its args as a dict)."""
    return {**(model.get("resources") or {"hpc_slot": 1.0}),
            "CPU": float(model.get("num_cpus", 0)), "GPU": float(model.get("num_gpus", 0))}


def host_pool(bundle: Mapping[str, float], pools: Iterable[PoolConfig]) -> PoolConfig | None:
    """The first pool (config order) whose node fits ``bundle``: where demand goes."""
    return next((p for p in pools if bundles_per_node(bundle, node_resources(p))), None)


def demand_by_pool(pools: Iterable[PoolConfig],
                   demand: Iterable[tuple[Mapping[str, float], int]]) -> dict[str, int]:
    """Nodes each pool should add for the waiting bundles (shape, count): each shape
    goes to the first pool (config order) whose node fits it; none: it is not ours
    (e.g. the head's ingress) and is left out."""
    pools = list(pools)
    needed: dict[str, float] = {p.name: 0.0 for p in pools}
    for bundle, count in demand:
        pool = host_pool(bundle, pools)
        if pool is not None:
            needed[pool.name] += count / bundles_per_node(bundle, node_resources(pool))
    return {name: math.ceil(n - 1e-9) for name, n in needed.items()}
