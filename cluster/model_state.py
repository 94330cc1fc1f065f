"""Each model's state for clients and operators, published where replicas read it.

The control loop computes, per model, one of

* ``ready``: replicas serve;  ``scaling``: they serve and more are coming;
* ``starting``: no replica serves yet, a node is joining or the engine loading;
* ``queued``: no replica serves, and the batch job that would host one waits in the
  scheduler's queue; ``expected_start`` (unix seconds) is the scheduler's estimate of
  the earliest such job's start, where it gives one (``Provider.expected_start``);
* ``cold``: zero replicas wanted; the first request starts one;
* ``unavailable``: replicas are wanted and nothing can host them: none is placed on
  a node, no job is on its way, and the pool cannot add one (its node-hour budget is
  spent, or the provider refuses submissions), with the reason,

plus replica counts and the least wall-time left among the nodes serving it.  It is
written to the GCS's key-value store (``internal_kv``, namespace ``hpcserve``) once
per control tick; replicas poll a cached copy in the background
(``serve_app.model_state``), so no request waits for the control plane.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cluster.config import PoolConfig
from cluster.policy import host_pool, replica_bundle
from cluster.state import QUEUED, STARTING, Allocation

KV_NAMESPACE = b"hpcserve"
KV_KEY = b"model_state"
LOCAL_FILE = "model_state.json"  # in the run dir, beside the control loop's heartbeat


def model_states(models: Iterable[Mapping[str, Any]], deployments: Mapping[str, dict],
                 pools: Iterable[PoolConfig], allocations: Iterable[Allocation],
                 blocked: Mapping[str, str], now: float,
                 expected_starts: Mapping[str, float] | None = None) -> dict[str, dict]:
    """``deployments``: Serve's deployment details by name (``engine-<model>``);
    ``blocked``: pool name -> why it cannot submit (budget spent, provider refusing);
    ``expected_starts``: allocation id -> the scheduler's expected start of its job."""
    pools = list(pools)
    allocations = list(allocations)
    expected_starts = expected_starts or {}
    by_node = {a.node_id: a for a in allocations if a.node_id}
    out = {}
    for model in models:
        dep = deployments.get(f"engine-{model['name']}") or {}
        replicas = dep.get("replicas") or []
        running = [r for r in replicas if r.get("state") == "RUNNING"]
        target = int(dep.get("target_num_replicas", len(replicas)))
        pool = host_pool(replica_bundle(model), pools)
        mine = [a for a in allocations if pool is not None and a.pool == pool.name]
        ends = [by_node[r["node_id"]].end_time for r in running
                if r.get("node_id") in by_node and by_node[r["node_id"]].end_time]
        extra: dict[str, Any] = {}  # reason, expected_start: only when known
        if running:
            state = "scaling" if target > len(running) else "ready"
        elif target == 0:
            state = "cold"
        elif pool is not None and pool.name in blocked and \
                not any(r.get("node_id") for r in replicas) and \
                not any(a.phase in (QUEUED, STARTING) for a in mine):
            # no replica placed, no job on its way, and none can be added: the pool's
            # serving nodes (other models' perhaps) have no room for one
            state, extra["reason"] = "unavailable", blocked[pool.name]
        elif not any(a.joined_time for a in mine) and any(a.phase == QUEUED for a in mine):
            state = "queued"
            starts = [expected_starts[a.id] for a in mine
                      if a.phase == QUEUED and a.id in expected_starts]
            if starts:
                extra["expected_start"] = round(min(starts))
        else:
            state = "starting"  # a node joining or the engine loading
        out[model["name"]] = {
            "state": state, "running_replicas": len(running), "target_replicas": target,
            "walltime_left_s": round(min(ends) - now) if ends else None,
            **extra}
    return out


def document(states: dict[str, dict], now: float) -> str:
    """What both copies hold: the states and when they were computed."""
    return json.dumps({"time": now, "models": states})


def publish(view, doc: str) -> None:
    """``view``: ``cluster.ray_view.RayView`` (its GCS client)."""
    view.publish(KV_KEY, doc.encode(), KV_NAMESPACE)


def write_local(run_dir: Path, doc: str) -> None:
    """The same document in the run dir, replaced whole, for readers without a GCS client."""
    tmp = run_dir / f".{LOCAL_FILE}.tmp"
    tmp.write_text(doc)
    os.replace(tmp, run_dir / LOCAL_FILE)


def read_local(run_dir: Path, now: float, max_age_s: float = 60.0) -> dict[str, dict]:
    """The states ``write_local`` wrote last; {} before the first tick, and when
    they are older than ``max_age_s`` (the control loop stopped, or cannot see
    Ray): an old ``unavailable`` is no reason to give up."""
    try:
        data = json.loads((run_dir / LOCAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if now - float(data.get("time") or 0) > max_age_s:
        return {}
    return data.get("models") or {}


def blocked_models(states: Mapping[str, dict], since: dict[str, float], now: float,
                   grace_s: float) -> dict[str, str]:
    """Models ``unavailable`` for at least ``grace_s`` (model -> reason).  ``since``
    (model -> when it was first seen unavailable) is kept up to date in place; a
    model seen in any other state, or not seen (no fresh states), starts over."""
    for name in [n for n in since if n not in states]:
        del since[name]
    for name, st in states.items():
        if st.get("state") == "unavailable":
            since.setdefault(name, now)
        else:
            since.pop(name, None)
    return {name: states[name].get("reason") or "no node can host it"
            for name, t in since.items() if now - t >= grace_s}
