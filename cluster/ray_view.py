"""What the control loop sees of the running cluster, and the one thing it does to it.

Read-only views come from the GCS (nodes and their labels) and the dashboard's
Serve API (replicas and where they run); the only action is DrainNode.  The control
loop is not a Ray driver: it keeps working while the head restarts and never holds
cluster resources.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from cluster.head import HeadInfo

ALLOCATION_LABEL = "hpcserve-allocation"


@dataclass
class NodeView:
    node_id: str
    ip: str
    alive: bool
    draining: bool
    labels: dict[str, str]
    replicas: list[dict] = field(default_factory=list)  # Serve replicas on this node
    # resources held by an actor or task: also a replica Ray placed here whose worker
    # has not started yet (Serve lists its node only once it has: >10 s on a busy box)
    busy: bool = False

    @property
    def allocation(self) -> str | None:
        return self.labels.get(ALLOCATION_LABEL)

    @property
    def running_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.get("state") == "RUNNING")


class RayView:
    def __init__(self, head: HeadInfo):
        self.head = head
        self._gcs = None
        # One client for every tick: a new one builds an SSL context (the CA bundle is
        # parsed), which was most of the idle control loop's CPU (0.73 -> 0.10 % of a core).
        self._http = httpx.Client(timeout=10)
        self.deployments: dict[str, dict] = {}  # Serve's deployment details, last nodes()
        self._resource_state = None  # GetClusterResourceState of the last nodes()

    def _client(self):
        if self._gcs is None:
            from ray._raylet import GcsClient
            self._gcs = GcsClient(address=self.head.gcs_address)
        return self._gcs

    def nodes(self) -> list[NodeView]:
        """All worker nodes (the head excluded) with their Serve replicas."""
        from ray.autoscaler.v2.sdk import get_cluster_resource_state
        from ray.core.generated import gcs_pb2

        infos = self._client().get_all_node_info(timeout=5)
        replicas = self._replicas_by_node()
        self._resource_state = get_cluster_resource_state(self._client())
        busy = {ns.node_id.hex() for ns in self._resource_state.node_states
                if resources_in_use(ns.total_resources, ns.available_resources)}
        out = []
        for node_id, info in infos.items():
            labels = dict(info.labels)
            if ALLOCATION_LABEL not in labels:
                continue
            hex_id = node_id.hex()
            out.append(NodeView(
                node_id=hex_id, ip=info.node_manager_address,
                alive=info.state == gcs_pb2.GcsNodeInfo.ALIVE,
                draining=bool(getattr(info, "state_snapshot", None)
                              and info.state_snapshot.state == info.state_snapshot.DRAINING),
                labels=labels, replicas=replicas.get(hex_id, []), busy=hex_id in busy))
        return out

    def _replicas_by_node(self) -> dict[str, list[dict]]:
        r = self._http.get(f"{self.head.dashboard_url}/api/serve/applications/",
                           headers=self.head.auth_headers())
        r.raise_for_status()
        by_node: dict[str, list[dict]] = {}
        deployments = {}
        for app in (r.json().get("applications") or {}).values():
            for name, dep in (app.get("deployments") or {}).items():
                deployments[name] = dep
                for rep in dep.get("replicas") or []:
                    rep = {**rep, "deployment": name}
                    by_node.setdefault(rep.get("node_id") or "", []).append(rep)
        self.deployments = deployments
        return by_node

    def publish(self, key: bytes, value: bytes, namespace: bytes) -> None:
        """Write to the GCS key-value store (what replicas read, cached)."""
        self._client().internal_kv_put(key, value, True, namespace)

    def pending_demand(self) -> list[tuple[dict[str, float], int]]:
        """Resource shapes that tasks and actors wait for, with counts.

        Serve's autoscaler decides each model's replica count; a replica it cannot
        place is an actor whose lease waits for resources, which every raylet reports
        to the GCS.  ``GetClusterResourceState`` (what Ray's own autoscaler v2 reads)
        returns them aggregated by shape: seen on Ray 2.60 as ``{hpc_slot: 1} x 1``
        for a second replica of a one-slot pool.  Serve's deployment status says less:
        a STARTING replica may be waiting for a node or loading its engine, and it
        does not say what resources it needs.  Read by the last ``nodes()`` (one GCS
        call per tick), else now.
        """
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state, self._resource_state = self._resource_state, None
        if state is None:
            state = get_cluster_resource_state(self._client())
        return [(dict(r.request.resources_bundle), int(r.count))
                for r in state.pending_resource_requests]

    def drain(self, node_id: str, deadline_s: float, message: str) -> tuple[bool, str]:
        """Ask the GCS to drain a node: Serve moves its replicas before the deadline."""
        from ray.core.generated import autoscaler_pb2

        deadline_ms = int((time.time() + deadline_s) * 1000)
        accepted, why = self._client().drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            message, deadline_ms)
        return bool(accepted), why or ""


def resources_in_use(total: dict[str, float], available: dict[str, float]) -> bool:
    """Whether an actor or task holds any of a node's resources (memory, object
    store and the node's own ``node:`` resources do not count)."""
    return any(amount - available.get(key, 0.0) > 1e-6 for key, amount in total.items()
               if key not in ("memory", "object_store_memory") and not key.startswith("node:"))
